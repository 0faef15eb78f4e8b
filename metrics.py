"""Scores of a restored stack against its ground truth.

IoU over a whole Z-downsampled stack is inflated by the slices that were kept
verbatim, so every report shows the score on the reconstructed slices too.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
from scipy import ndimage

from morph import ON_GRID_TOLERANCE


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"Cannot compare stacks of shapes {a.shape} and {b.shape}.")


def calculate_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two binary arrays; 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    _check_same_shape(a, b)
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def calculate_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two binary arrays; 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    _check_same_shape(a, b)
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(a & b) / total


def reconstructed_indices(kept_indices: Sequence[float], depth: int) -> np.ndarray:
    """Z indices that had to be reconstructed: between the first and last kept
    slice and not kept. Slices after the last kept one are extrapolated, not
    interpolated, and are left out. ``kept_indices`` may be fractional output
    positions (an isotropic output at a non-integer factor,
    ``morph.kept_positions``): a kept slice between two output slices makes
    neither of them kept."""
    kept = np.asarray(kept_indices, dtype=np.float64)
    between = np.arange(int(np.ceil(kept.min() - ON_GRID_TOLERANCE)),
                        min(int(np.floor(kept.max() + ON_GRID_TOLERANCE)) + 1, depth))
    on_grid = np.round(kept[np.abs(kept - np.round(kept)) <= ON_GRID_TOLERANCE]).astype(np.int64)
    return between[~np.isin(between, on_grid)]


def mean_surface_distance(a: np.ndarray, b: np.ndarray, z_indices: Optional[Sequence[int]] = None) -> float:
    """Average symmetric surface distance (ASSD) in voxels between two 3D masks.

    Surface voxels are foreground voxels with a background 6-neighbour. With
    ``z_indices``, only surface voxels in those slices are averaged (distances
    are still measured in 3D). NaN when exactly one of the surfaces is empty.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    _check_same_shape(a, b)
    surface_a = a & ~ndimage.binary_erosion(a, border_value=1)
    surface_b = b & ~ndimage.binary_erosion(b, border_value=1)
    if not surface_a.any() and not surface_b.any():
        return 0.0
    if not surface_a.any() or not surface_b.any():
        return float("nan")
    select = np.zeros(a.shape[0], dtype=bool)
    select[np.asarray(z_indices if z_indices is not None else np.arange(a.shape[0]), dtype=np.int64)] = True
    dist_to_b = ndimage.distance_transform_edt(~surface_b).astype(np.float32)
    dist_to_a = ndimage.distance_transform_edt(~surface_a).astype(np.float32)
    distances = np.concatenate([dist_to_b[surface_a & select[:, None, None]], dist_to_a[surface_b & select[:, None, None]]])
    return float(distances.mean()) if distances.size else 0.0


def mean_label_iou(predicted_labels: np.ndarray, true_labels: np.ndarray, z_indices: Optional[Sequence[int]] = None,
                   over: str = "either") -> float:
    """Mean over label ids of the IoU between same-id regions.

    Id 0 (background, or the boundaries of a dense label image) never counts.
    With ``over='either'`` every non-zero id found in either stack counts (an id
    only in the prediction scores 0); 1.0 when there is no label. With
    ``over='truth'`` only the non-zero ids present in ``true_labels`` count (a
    predicted id absent from the truth costs only through the voxels it takes
    from true ids); NaN when the truth has no non-zero id. Restricted to
    ``z_indices`` when given; ids absent from those slices are skipped.
    """
    if over not in ("either", "truth"):
        raise ValueError(f"over must be 'either' or 'truth', got '{over}'.")
    _check_same_shape(predicted_labels, true_labels)
    if z_indices is not None:
        predicted_labels, true_labels = predicted_labels[z_indices], true_labels[z_indices]
    ids, inverse = np.unique(np.concatenate([true_labels.ravel(), predicted_labels.ravel()]), return_inverse=True)
    # Ids renumbered to 0..n-1; per-id areas and same-id overlaps, memory linear in n.
    n = len(ids)
    true_index, predicted_index = np.split(inverse.ravel(), 2)
    intersection = np.bincount(true_index[true_index == predicted_index], minlength=n)
    true_area = np.bincount(true_index, minlength=n)
    union = true_area + np.bincount(predicted_index, minlength=n) - intersection
    present = (ids != 0) & ((union if over == "either" else true_area) > 0)
    if not present.any():
        return 1.0 if over == "either" else float("nan")
    return float(np.mean(intersection[present] / union[present]))


def adapted_rand_error(predicted_labels: np.ndarray, true_labels: np.ndarray) -> float:
    """Adapted Rand error (``skimage.metrics.adapted_rand_error``, its first value) of a label image.

    0 for a perfect segmentation up to renaming of the ids, up to 1; lower is
    better. Voxels whose true id is 0 are ignored (skimage's default), so a
    dense label image's 0-valued boundaries do not count; a predicted 0 is an
    id like any other. Ids are renumbered first, so large ids (uint32, uint64)
    cost no memory. NaN when every true id is 0.
    """
    from skimage.metrics import adapted_rand_error as skimage_are

    _check_same_shape(predicted_labels, true_labels)
    if not np.any(true_labels):
        return float("nan")
    both = np.stack([true_labels, predicted_labels])
    _, inverse = np.unique(both, return_inverse=True)
    codes = inverse.reshape(both.shape) + 1
    codes[both == 0] = 0  # 0 stays 0: skimage ignores it in the truth
    return float(skimage_are(codes[0], codes[1])[0])


def score_reconstruction(predicted: np.ndarray, truth: np.ndarray, kept_indices: Sequence[int]) -> Dict[str, float]:
    """IoU and Dice on the reconstructed slices and over the whole stack.

    Parameters
    ----------
    predicted, truth : ndarray of bool, shape (D, H, W)
    kept_indices : sequence of int

    Returns
    -------
    dict with keys ``iou_recon``, ``dice_recon``, ``iou_stack``, ``dice_stack``.
    """
    _check_same_shape(predicted, truth)
    recon = reconstructed_indices(kept_indices, truth.shape[0])
    return {
        "iou_recon": calculate_iou(predicted[recon], truth[recon]),
        "dice_recon": calculate_dice(predicted[recon], truth[recon]),
        "iou_stack": calculate_iou(predicted, truth),
        "dice_stack": calculate_dice(predicted, truth),
    }


def grey_data_range(truth: np.ndarray) -> float:
    """The data range PSNR and SSIM of grey values are taken over: 255 for 8-bit images (they fill it, and
    published EM figures use it), else the truth's own range, ``max - min``: a 12-bit camera's image in a
    16-bit file spans a sixteenth of the dtype, whose range would add about 24 dB to every PSNR and bring
    every SSIM to 1.000, the methods' differences lost in the fourth decimal. A constant truth, which has no
    range, is scored over its dtype's (1 for floats)."""
    dtype_range = (float(np.iinfo(truth.dtype).max) - float(np.iinfo(truth.dtype).min)
                   if np.issubdtype(truth.dtype, np.integer) else 1.0)
    if truth.dtype in (np.uint8, np.int8) or not truth.size:
        return dtype_range
    spread = float(truth.max()) - float(truth.min())  # as floats: an int16 difference would wrap around
    return spread if spread > 0 else dtype_range  # a constant truth: the dtype's range (floats: 1)


def score_intensity_reconstruction(predicted: np.ndarray, truth: np.ndarray, kept_indices: Sequence[int],
                                   data_range: Optional[float] = None) -> Dict[str, float]:
    """PSNR and SSIM of a restored grey-scale stack on the reconstructed slices.

    Parameters
    ----------
    predicted, truth : ndarray, shape (D, H, W), any numeric dtype
    kept_indices : sequence of int
    data_range : float, optional
        Default :func:`grey_data_range` of ``truth``: 255 for 8-bit images, else ``truth.max() - truth.min()``.

    Returns
    -------
    dict with ``psnr_recon`` (dB, over all reconstructed voxels), ``ssim_recon`` (mean of the per-slice
    ``skimage.metrics.structural_similarity``) and ``data_range``, the range both were taken over.
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    _check_same_shape(predicted, truth)
    if data_range is None:
        data_range = grey_data_range(truth)
    recon = reconstructed_indices(kept_indices, truth.shape[0])
    pred, true = predicted[recon].astype(np.float64), truth[recon].astype(np.float64)
    ssim = [structural_similarity(t, p, data_range=data_range) for t, p in zip(true, pred)]
    return {"psnr_recon": float(peak_signal_noise_ratio(true, pred, data_range=data_range)),
            "ssim_recon": float(np.mean(ssim)), "data_range": float(data_range)}


def score_label_reconstruction(predicted_labels: np.ndarray, true_labels: np.ndarray,
                               kept_indices: Sequence[int]) -> Dict[str, float]:
    """Scores of a restored label image on its reconstructed slices.

    Only the slices of :func:`reconstructed_indices` count: kept slices come
    back verbatim, and slices after the last kept one are extrapolated.

    Parameters
    ----------
    predicted_labels, true_labels : ndarray of int, shape (D, H, W)
        Label images; 0 is background (or the boundaries between objects).
    kept_indices : sequence of int
        Z indices of the slices that were kept.

    Returns
    -------
    dict with
        ``accuracy_recon`` : fraction of reconstructed voxels with the right id, 0 included.
        ``label_iou_recon`` : mean IoU over the non-zero ids present in the reconstructed
            ground truth (:func:`mean_label_iou` with ``over='truth'``).
        ``are_recon`` : adapted Rand error (:func:`adapted_rand_error`; voxels whose true id
            is 0 ignored), lower is better; blind to a renaming of the ids.
    """
    _check_same_shape(predicted_labels, true_labels)
    recon = reconstructed_indices(kept_indices, true_labels.shape[0])
    predicted, true = predicted_labels[recon], true_labels[recon]
    return {
        "accuracy_recon": float(np.count_nonzero(predicted == true) / true.size) if true.size else float("nan"),
        "label_iou_recon": mean_label_iou(predicted, true, over="truth"),
        "are_recon": adapted_rand_error(predicted, true),
    }
