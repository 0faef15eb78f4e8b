"""Classical interpolation of missing slices along one axis.

One function, :func:`interpolate_along_axis`, fills the gaps between kept
slices. It serves three purposes, which is why it lives in one place:

* the shape-based (signed-distance) baseline, :func:`morph_stack_interpolated`;
* the degradation of training inputs (``train.downscale_upscale_height``);
* the initial Z upscaling at inference (``restore.upscale_height``, whose torch twin
  ``restore.upscale_along_z`` the engine runs).

Training and inference must see the same interpolation: that match is what
lets a network trained on lateral crops restore the Z axis.

Label images have their own shape-based baseline, :func:`interpolate_labels_sdf`
(every id's signed distance blended between the kept slices, the nearest id wins).

Conventions (all methods)
-------------------------
* Kept slices come back unchanged.
* Output positions before the first or after the last kept slice copy the
  nearest kept slice (there is nothing to interpolate towards).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

METHODS = ("nearest", "linear", "cubic", "sdf")
# A numpy array or a torch tensor (torch is not imported here: the engine passes its planes).
ArrayOrTensor = Any


# --------------------------------------------------------------------------- #
# The Z grid of a factor: where the kept slices sit on the output grid
# --------------------------------------------------------------------------- #
# Positions closer than this to an output slice are on it: k * factor in float64 is exact to far better.
ON_GRID_TOLERANCE = 1e-6


def is_integer_factor(factor: float) -> bool:
    """Whether every kept slice of ``factor`` lands on an output slice."""
    return abs(factor - round(factor)) <= ON_GRID_TOLERANCE


def kept_positions(n_kept: int, factor: float) -> np.ndarray:
    """Output Z index of each kept slice, ``k * factor``.

    Parameters
    ----------
    n_kept : int
        Number of kept slices K.
    factor : float
        Z step of the kept slices in output slices (the Z/XY ratio); an integer,
        or any value >= 1 for an isotropic output at a non-integer ratio.

    Returns
    -------
    ndarray, shape (K,): int64 for an integer factor, else float64 (a kept slice
    may fall between two output slices).
    """
    if is_integer_factor(factor):
        return np.arange(n_kept, dtype=np.int64) * int(round(factor))
    return np.arange(n_kept, dtype=np.float64) * float(factor)


def restored_depth(n_kept: int, factor: float) -> int:
    """Output depth D of ``n_kept`` kept slices: every output slice up to the last kept one,
    ``floor((K - 1) * factor) + 1``."""
    return int(np.floor((n_kept - 1) * float(factor) + ON_GRID_TOLERANCE)) + 1


def slices_on_grid(n_kept: int, factor: float, depth: int, offset: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
    """The kept slices that fall on an output slice: ``(kept indices, output indices)``, int64.

    At an integer factor that is every kept slice inside ``depth``; at a
    non-integer one, only those whose position ``k * factor`` is an integer
    (every 16th at 6.5625): the others fall between output slices, which are
    restored. ``offset``: the output position of kept slice 0 (a slab of the
    output that starts after it has a negative one).
    """
    positions = kept_positions(n_kept, factor).astype(np.float64) + offset
    nearest = np.round(positions)
    on_grid = (np.abs(positions - nearest) <= ON_GRID_TOLERANCE) & (nearest >= 0) & (nearest < depth)
    return np.flatnonzero(on_grid).astype(np.int64), nearest[on_grid].astype(np.int64)


def sample_rows(image: np.ndarray, positions: np.ndarray, axis: int = -2, binary: bool = False) -> np.ndarray:
    """Slices of ``image`` at fractional ``positions`` along ``axis``, blended linearly between the
    two neighbouring slices; ``binary``: a mask's slice there (the blend >= 0.5).

    This is how a slice cut between two voxel planes of an isotropic image is
    simulated: the training degradation at a non-integer ratio, and bench.py's
    ground truth on another grid.

    Parameters
    ----------
    image : ndarray
    positions : ndarray of float, shape (n,), within ``[0, image.shape[axis] - 1]``
    axis : int
    binary : bool

    Returns
    -------
    ndarray, ``image`` with ``axis`` of length n: float32, or bool when ``binary``.
    """
    positions = np.asarray(positions, dtype=np.float64)
    size = image.shape[axis]
    if positions.size and (positions.min() < -ON_GRID_TOLERANCE or positions.max() > size - 1 + ON_GRID_TOLERANCE):
        raise ValueError(f"Positions must lie within [0, {size - 1}], got {positions.min():g}..{positions.max():g}.")
    lower = np.clip(np.floor(positions + ON_GRID_TOLERANCE).astype(np.int64), 0, size - 1)
    upper = np.minimum(lower + 1, size - 1)
    weight = np.clip(positions - lower, 0.0, 1.0).astype(np.float32)
    weight[np.abs(weight) <= ON_GRID_TOLERANCE] = 0.0
    shape = [1] * image.ndim
    shape[axis] = len(positions)
    low = np.take(image, lower, axis=axis).astype(np.float32)
    sampled = low + weight.reshape(shape) * (np.take(image, upper, axis=axis).astype(np.float32) - low)
    return sampled >= 0.5 if binary else sampled


def bracket(kept_positions: Sequence[float], length: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index, the kept slices on either side and the blend weight.

    Parameters
    ----------
    kept_positions : sequence of int or float, strictly increasing
        Output index of each kept slice (between two output indices at a
        non-integer factor, :func:`kept_positions`).
    length : int
        Output length along the axis.

    Returns
    -------
    lower, upper : ndarray of int64, shape (length,)
        Index into the kept slices below and above each output index.
    weight : ndarray of float32, shape (length,)
        0 at the lower kept slice, 1 at the upper one. Outside the kept range,
        ``lower == upper`` is the nearest kept slice and ``weight == 0``.
    """
    positions = np.asarray(kept_positions, dtype=np.float64)
    if positions.ndim != 1 or len(positions) == 0 or np.any(np.diff(positions) <= 0):
        raise ValueError("kept_positions must be a non-empty, strictly increasing sequence.")
    index = np.arange(length, dtype=np.float64)
    upper = np.clip(np.searchsorted(positions, index, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    if len(positions) == 1:
        return np.zeros(length, np.int64), np.zeros(length, np.int64), np.zeros(length, np.float32)
    weight = (index - positions[lower]) / (positions[upper] - positions[lower])
    before, after = index <= positions[0], index >= positions[-1]
    upper[before], weight[before] = lower[before], 0.0
    lower[after], upper[after], weight[after] = len(positions) - 1, len(positions) - 1, 0.0
    return lower.astype(np.int64), upper.astype(np.int64), weight.astype(np.float32)


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Signed Euclidean distance of a binary slice: > 0 inside, < 0 outside.

    Inside voxels carry their distance to the nearest background voxel (>= 1),
    outside voxels minus their distance to the nearest foreground voxel, so
    thresholding at 0 gives the mask back exactly. An empty mask has no
    boundary: it returns ``-inf`` everywhere, a full mask ``+inf``; the
    blending in :func:`interpolate_along_axis` resolves those.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.full(mask.shape, -np.inf, dtype=np.float32)
    if mask.all():
        return np.full(mask.shape, np.inf, dtype=np.float32)
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    return (inside - outside).astype(np.float32)


def _stand_in_for_uniform(full: bool, partner: np.ndarray) -> np.ndarray:
    """Signed distance standing in for an empty (or full) slice: minus the
    partner's largest inside distance (or plus its largest outside distance)."""
    value = max(-float(partner.min()), 1.0) if full else -max(float(partner.max()), 1.0)
    return np.full_like(partner, value)


def _blend_sdf(sdf_a: np.ndarray, sdf_b: np.ndarray, weight: float) -> np.ndarray:
    """Foreground of the linear blend of two signed distances.

    An empty slice (``-inf``) is replaced by minus the largest inside distance
    of its partner, so every object of the partner shrinks away and is gone by
    the middle of the gap, its thick core lasting longest. A full slice
    (``+inf``) is treated symmetrically. Two empty slices give background.
    """
    if np.isinf(sdf_a).all() and np.isinf(sdf_b).all():
        return (sdf_a > 0) if weight < 0.5 else (sdf_b > 0)
    if np.isinf(sdf_a).all():
        sdf_a = _stand_in_for_uniform(sdf_a.flat[0] > 0, sdf_b)
    if np.isinf(sdf_b).all():
        sdf_b = _stand_in_for_uniform(sdf_b.flat[0] > 0, sdf_a)
    return (1.0 - weight) * sdf_a + weight * sdf_b > 0


def interpolate_along_axis(
    sparse: np.ndarray,
    kept_positions: Sequence[float],
    length: int,
    axis: int = 0,
    method: str = "linear",
    progress: bool = False,
) -> np.ndarray:
    """Fill the gaps between kept slices of an array along one axis.

    Parameters
    ----------
    sparse : ndarray, any dimensionality
        The kept slices, stacked along ``axis`` (binary or [0, 1] values).
    kept_positions : sequence of int or float
        Output index of each kept slice along ``axis``.
    length : int
        Output length along ``axis``.
    axis : int
        The axis to fill (Z for a ``(D, H, W)`` stack; rows for a 2D crop).
    method : {'nearest', 'linear', 'cubic', 'sdf'}
        'nearest' copies the nearest kept slice (ties go to the lower one);
        'linear' blends intensities, returning float32 (in [0, 1] for masks);
        'cubic' is a cubic spline through the kept slices (not-a-knot ends,
        float32; grey-scale baseline, it overshoots at edges); 'sdf' blends
        signed distances of each kept slice (shape-based interpolation,
        Raya & Udupa 1990) and returns bool.
    progress : bool
        Show a tqdm bar over the output slices ('sdf' only, the slow one).

    Returns
    -------
    ndarray
        ``sparse`` with ``axis`` resized to ``length``.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown interpolation method '{method}'; choose one of {METHODS}.")
    if sparse.shape[axis] != len(kept_positions):
        raise ValueError(f"{sparse.shape[axis]} kept slices along axis {axis} but {len(kept_positions)} positions.")
    moved = np.moveaxis(sparse, axis, 0)
    lower, upper, weight = bracket(kept_positions, length)
    if method == "nearest":
        out = moved[np.where(weight <= 0.5, lower, upper)]
    elif method == "cubic":
        from scipy.interpolate import CubicSpline

        positions = np.asarray(kept_positions)
        inside = np.arange(length)[(np.arange(length) >= positions[0]) & (np.arange(length) <= positions[-1])]
        out = moved[np.where(weight <= 0.5, lower, upper)].astype(np.float32)  # outside the kept range: copies
        if len(positions) >= 2:
            out[inside] = CubicSpline(positions, moved.astype(np.float32), axis=0)(inside)
    elif method == "linear":
        w = weight.reshape((-1,) + (1,) * (moved.ndim - 1))
        low = moved[lower].astype(np.float32)
        out = moved[upper].astype(np.float32)
        out -= low  # in place: inference calls this on chunks of tens of MB, so no temporaries
        out *= w
        out += low
    else:
        out = np.empty((length,) + moved.shape[1:], dtype=bool)
        @functools.lru_cache(maxsize=2)  # gaps are visited in order: two kept slices suffice
        def sdf_of(k: int) -> np.ndarray:
            return signed_distance(moved[k])

        for i in tqdm(range(length), desc="Shape-based interpolation", unit="slice", disable=not progress, leave=False):
            if weight[i] == 0:
                out[i] = moved[lower[i]] != 0
            else:
                out[i] = _blend_sdf(sdf_of(lower[i]), sdf_of(upper[i]), float(weight[i]))
    return np.moveaxis(out, 0, axis)


def morph_stack_interpolated(sparse_dhw: np.ndarray, kept_indices: Sequence[int], original_depth: int,
                             progress: bool = True) -> np.ndarray:
    """Shape-based (signed-distance) interpolation of a Z-downsampled mask.

    Parameters
    ----------
    sparse_dhw : ndarray, shape (K, H, W)
        The kept slices (bool or 0/non-zero).
    kept_indices : sequence of int, length K
        Z index of each kept slice in the full stack.
    original_depth : int
        Depth D of the restored stack.
    progress : bool
        Show a tqdm bar over the gaps.

    Returns
    -------
    morphed_dhw : ndarray of bool, shape (D, H, W)
        Kept slices unchanged; gaps filled by blending the signed distances of
        the two neighbouring kept slices and thresholding at 0; slices after
        the last kept one copy it. Where one side of a gap is empty, objects
        shrink away and vanish by the middle of the gap.
    """
    return interpolate_along_axis(np.asarray(sparse_dhw) != 0, kept_indices, original_depth, axis=0,
                                  method="sdf", progress=progress)


def interpolate_labels_sdf(sparse_labels_khw: np.ndarray, kept_indices: Sequence[int], depth: int,
                           margin: int = None, progress: bool = False) -> np.ndarray:
    """Per-label shape-based interpolation of a Z-downsampled label image.

    Every id, 0 included, is interpolated like a mask by
    :func:`morph_stack_interpolated`: on each kept slice it has a signed
    distance (:func:`signed_distance`, here negated: inside < 0), which is
    blended linearly between the two kept slices that bracket the output slice
    (:func:`bracket`). The voxel takes the id with the smallest blended
    distance; among equal distances, the smallest id.

    Parameters
    ----------
    sparse_labels_khw : ndarray of int, shape (K, H, W)
        The kept slices of the label image (any integer ids, 0 is an id too).
    kept_indices : sequence of int, strictly increasing, length K
        Z index of each kept slice in the full stack.
    depth : int
        Depth D of the restored stack.
    margin : int, optional
        How far (in pixels) around an id's bounding box its distances are
        computed; default ``4 * gap`` (at least 8). Only a speed setting: the
        result does not depend on it (a gap is recomputed with a wider margin
        wherever the nearest id could lie outside the boxes).
    progress : bool
        Show a tqdm bar over the gaps.

    Returns
    -------
    labels_dhw : ndarray, dtype of ``sparse_labels_khw``, shape (D, H, W)
        Kept slices verbatim; slices before the first or after the last kept
        slice copy the nearest kept one. Ids only come from the kept slices,
        and in a gap only the ids present on both of its kept slices can
        appear: an id missing from one of them has an infinite distance there,
        so it ends at its last kept slice (no shrinking away inside the gap).
        A gap whose kept slices share no id copies the nearer kept slice.

    Notes
    -----
    Memory is a few arrays of one gap (``gap x H x W``), never one per id:
    the ids of a gap are visited one after the other, each only inside its
    bounding box on the two kept slices, widened by ``margin``, and a running
    minimum keeps the winning id. This is exact because outside that box an
    id is more than ``margin`` pixels away on both kept slices, so its blended
    distance exceeds ``margin``; a gap where some voxel's winner is further
    than ``margin`` is redone with twice the margin.
    """
    sparse = np.asarray(sparse_labels_khw)
    if sparse.ndim != 3:
        raise ValueError(f"Expected kept label slices of shape (K, H, W), got {sparse.shape}.")
    if not np.issubdtype(sparse.dtype, np.integer):
        raise ValueError(f"Label ids must be integers, got dtype {sparse.dtype}.")
    if len(sparse) != len(kept_indices):
        raise ValueError(f"{len(sparse)} kept slices but {len(kept_indices)} kept indices.")
    lower, upper, weight = bracket(kept_indices, depth)
    out = np.empty((depth,) + sparse.shape[1:], dtype=sparse.dtype)
    copies = weight == 0
    out[copies] = sparse[lower[copies]]
    gaps = np.unique(lower[~copies])
    for k in tqdm(gaps, desc="Per-label shape-based interpolation", unit="gap", disable=not progress, leave=False):
        zs = np.flatnonzero((lower == k) & ~copies)
        gap = int(kept_indices[k + 1]) - int(kept_indices[k])
        out[zs] = fill_label_gap(sparse[k], sparse[k + 1], weight[zs],
                                 max(8, 4 * gap) if margin is None else max(1, int(margin)))
    return out


def fill_label_gap(labels_a: np.ndarray, labels_b: np.ndarray, weights: np.ndarray, margin: int = 8,
                   cap: Optional[float] = None) -> np.ndarray:
    """Per-label shape-based interpolation of one gap: the slices at ``weights`` between two kept label slices.

    With ``cap``, a local variant: every distance is clipped to ``[-cap, cap]`` and an id missing from one
    kept slice counts as ``cap`` away there (instead of never winning in the gap), so a voxel's id depends only
    on the kept slices within ``cap`` pixels of it, and a window of the slices gives the whole slices' result
    wherever it is more than ``cap`` pixels from the window's edge (what ``labeling.grow_labels`` needs block by
    block). An id that ends in the gap then fades out instead of stopping at its last kept slice.

    Parameters
    ----------
    labels_a, labels_b : ndarray of int, shape (H, W)
        The kept slices below and above the gap.
    weights : ndarray of float, shape (n,)
        Where each output slice lies, 0 at ``labels_a`` and 1 at ``labels_b``.
    margin : int
        A speed setting only, as in :func:`interpolate_labels_sdf` (with ``cap``: unused).
    cap : float, optional
        Largest distance, in pixels, that counts (see above); None: the reference definition.

    Returns
    -------
    labels_nhw : ndarray, dtype of ``labels_a``, shape (n, H, W)
    """
    shape = labels_a.shape
    ids, inverse = np.unique(np.stack([labels_a, labels_b]), return_inverse=True)
    inverse = inverse.reshape((2,) + shape) + 1  # ids renumbered 1..n, as ndimage.find_objects wants them
    boxes_a, boxes_b = (ndimage.find_objects(inverse[s], max_label=len(ids)) for s in (0, 1))
    if cap is None:
        common = [j for j in range(len(ids)) if boxes_a[j] is not None and boxes_b[j] is not None]
        if not common:  # nothing to blend: each output slice copies the nearer kept slice (ties: the lower one)
            return np.where((weights <= 0.5)[:, None, None], labels_a, labels_b)
    else:  # every id of either slice; further than cap + 1 from its box an id's clipped distance is cap
        common, margin = list(range(len(ids))), int(np.ceil(cap)) + 1
    w = weights.astype(np.float32)[:, None, None]
    while True:
        best = np.full((len(weights),) + shape, np.inf, dtype=np.float32)
        winner = np.zeros((len(weights),) + shape, dtype=np.int64)
        for j in common:  # increasing ids: with strict '<', ties go to the smaller id
            box_a, box_b = boxes_a[j] or boxes_b[j], boxes_b[j] or boxes_a[j]  # one may be missing (cap only)
            box = tuple(slice(max(0, min(a.start, b.start) - margin), min(size, max(a.stop, b.stop) + margin))
                        for a, b, size in zip(box_a, box_b, shape))
            # Exact inside the box: the id's voxels all lie in it, and a ring of at least one
            # other voxel surrounds them wherever the box does not meet the slice's edge.
            sdf_a = -signed_distance(inverse[0][box] == j + 1)
            sdf_b = -signed_distance(inverse[1][box] == j + 1)
            if cap is not None:  # a missing id's -signed_distance is +inf: clipped to cap
                sdf_a, sdf_b = np.clip(sdf_a, -cap, cap), np.clip(sdf_b, -cap, cap)
            blended = (1.0 - w) * sdf_a + w * sdf_b
            region = (slice(None),) + box
            better = blended < best[region]
            best[region][better] = blended[better]
            winner[region][better] = j
        if cap is not None or margin >= max(shape) or not (best > margin).any():
            return ids[winner]
        margin *= 2


# --------------------------------------------------------------------------- #
# Dense label images: the boundaries between ids, and where shape-based interpolation puts them
# --------------------------------------------------------------------------- #
def label_boundaries(labels_khw: np.ndarray) -> np.ndarray:
    """The boundary mask of a dense label image, slice by slice: id 0 (the boundaries a segmentation drew)
    and both pixels of every in-plane 4-neighbour pair of two different non-zero ids (ids that touch).

    Parameters
    ----------
    labels_khw : ndarray of int, shape (K, H, W)

    Returns
    -------
    boundaries_khw : ndarray of bool, shape (K, H, W)
    """
    boundaries = labels_khw == 0
    for axis in (1, 2):
        before = [slice(None)] * 3
        after = [slice(None)] * 3
        before[axis], after[axis] = slice(None, -1), slice(1, None)
        first, second = labels_khw[tuple(before)], labels_khw[tuple(after)]
        touching = (first != second) & (first != 0) & (second != 0)
        boundaries[tuple(before)] |= touching
        boundaries[tuple(after)] |= touching
    return boundaries


def _distance_along_rows(mask_rw: np.ndarray) -> np.ndarray:
    """For each pixel of ``mask_rw`` (R, W), the distance along its row to the nearest True pixel of that row:
    0 on True pixels, ``inf`` in a row without one. float32 (R, W)."""
    columns = np.arange(mask_rw.shape[1], dtype=np.float32)
    last_before = np.maximum.accumulate(np.where(mask_rw, columns, -np.inf), axis=1)
    first_after = np.minimum.accumulate(np.where(mask_rw, columns, np.inf)[:, ::-1], axis=1)[:, ::-1]
    return np.minimum(columns - last_before, first_after - columns)


def fill_label_rows(kept_rows_njw: np.ndarray, positions: Sequence[float], height: int,
                    cap: float = 16.0) -> np.ndarray:
    """Per-label shape-based interpolation between rows, each row's distances measured along the row only.

    The rows ``positions`` of ``n`` images are known; every other row of each image gets, pixel by pixel, the
    id with the smallest blend (:func:`bracket`) of its two bracketing rows' signed distances (negated: inside
    < 0), as :func:`fill_label_gap` blends a kept slice's, but with each kept row's distances taken along that
    row alone and clipped to ``[-cap, cap]`` (an id missing from a row counts as ``cap`` away there). A restored
    pixel thus depends only on its own column's neighbourhood of ``cap`` pixels in its image's kept rows, the
    same in a network plane at inference (rows = kept slices along Z) as in a training crop (rows = kept rows of
    a lateral crop): what makes it an input the network can train on and restore with.

    Parameters
    ----------
    kept_rows_njw : ndarray of int, shape (n, J, W)
        The known rows of ``n`` images, ``J >= 1`` of them each.
    positions : sequence of float, strictly increasing, length J
        Where the known rows lie along the images' height (fractional at a non-integer factor).
    height : int
        Height of the filled images.
    cap : float
        Largest distance, in pixels, that counts.

    Returns
    -------
    labels_nhw : ndarray, dtype of ``kept_rows_njw``, shape (n, height, W)
        Rows outside ``positions``' range copy the nearest known row; ties go to the smaller id.
    """
    kept = np.asarray(kept_rows_njw)
    n, n_rows, width = kept.shape
    lower, upper, weight = bracket(positions, height)
    weight = weight[None, :, None]
    best = np.full((n, height, width), np.inf, dtype=np.float32)
    winner = np.zeros((n, height, width), dtype=kept.dtype)
    ids, inverse = np.unique(kept, return_inverse=True)
    inverse = inverse.reshape(kept.shape) + 1  # ids renumbered 1..n, as ndimage.find_objects wants them
    margin = int(np.ceil(cap)) + 1
    for j, box in enumerate(ndimage.find_objects(inverse)):  # increasing ids: ties go to the smaller id
        # Exact within the id's images and columns widened by the cap: elsewhere its blended distance is cap,
        # and every pixel has an id below that (the one it holds on its lower known row).
        images, columns = box[0], slice(max(0, box[2].start - margin), min(width, box[2].stop + margin))
        rows = inverse[images, :, columns]
        inside = (rows == j + 1).reshape(-1, rows.shape[2])
        signed = np.where(inside, -_distance_along_rows(~inside), _distance_along_rows(inside))
        signed = np.clip(signed, -cap, cap).reshape(rows.shape)
        blended = (1.0 - weight) * signed[:, lower] + weight * signed[:, upper]
        region = (images, slice(None), columns)
        better = blended < best[region]
        best[region][better] = blended[better]
        winner[region][better] = ids[j]
    return winner


# The boundary network of a dense label image (BOUNDARY_INPUT "interfaces") sees between kept slices the mean of
# two guesses of where the boundaries run: the boundary mask upsampled linearly, which cannot tell one id from
# another (a sheet that moved shows twice, faintly), and row_interfaces, which follow each id from one kept slice to
# the next. Half and half: the network weighs them itself.
INTERFACES_SHARE = 0.5


def mix_interfaces(linear: ArrayOrTensor, interfaces: ArrayOrTensor) -> ArrayOrTensor:
    """The boundary network's input with interfaces: ``(1 - INTERFACES_SHARE) * linear + INTERFACES_SHARE *
    interfaces``, for numpy arrays or torch tensors of one float dtype (training crops and the engine's planes)."""
    return (1.0 - INTERFACES_SHARE) * linear + INTERFACES_SHARE * interfaces


def row_interfaces(kept_rows_njw: np.ndarray, positions: Sequence[float], height: int,
                   cap: float = 16.0) -> np.ndarray:
    """Where per-label shape-based interpolation between rows puts the boundaries between ids:
    :func:`label_boundaries` of :func:`fill_label_rows`, each image's boundaries in its own plane.

    Returns
    -------
    interfaces_nhw : ndarray of bool, shape (n, height, W)
    """
    return label_boundaries(fill_label_rows(kept_rows_njw, positions, height, cap))
