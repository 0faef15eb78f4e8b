"""Self-supervised training data and training loop.

The sparse (Z-downsampled) stack has full resolution in X and Y. A lateral
crop degraded along one in-plane axis, exactly as Z was degraded (keep every
``factor``-th row, then upscale back with the interpolation used at
inference), is a training input whose answer is known: the undegraded crop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from data import UserError
from model import AttentionResUNet, autocast, network_architecture, resolve_precision, select_device, starting_weights
from morph import (interpolate_along_axis, is_integer_factor, kept_positions, mix_interfaces, row_interfaces,
                   sample_rows)
from settings import Network, SettingsLike, Training, as_settings, check_choice, check_crop_pool


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so that a CPU run repeats exactly (with the same number of torch threads:
    sums split across another number of threads round differently, by about one 255th of a probability)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def seeded(seed: int, device: Optional[torch.device] = None) -> Iterator[None]:
    """:func:`seed_everything` for the work inside, then the caller's random states (python, numpy, torch's
    CPU generator and that of the CUDA ``device`` the work runs on) and cuDNN flags back: a training called
    from a notebook leaves the user's random streams where they were. A CPU ``device`` starts no CUDA."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cudnn_flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    cuda_devices = []
    if device is not None and device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_devices):
        try:
            seed_everything(seed)
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_flags


def downscale_upscale_height(image: np.ndarray, factor: float, phase: int = 0, method: str = "linear",
                             profile_fwhm: float = 0.0) -> np.ndarray:
    """Degrade an image along its height axis (axis -2) the way Z was degraded.

    Keeps rows ``phase, phase + factor, ...`` and fills the others with
    :func:`morph.interpolate_along_axis`, the same function that upscales Z at
    inference. Rows before the first / after the last kept row copy it.

    At a non-integer factor (an isotropic output at any Z/XY ratio) the kept
    rows fall between pixel rows, as kept slices fall between output slices at
    inference: each is cut there (:func:`morph.sample_rows`: the two pixel rows
    blended, a mask's row thresholded at 0.5, since a real kept slice of a mask
    is binary) and the gaps are filled from those fractional positions.

    Parameters
    ----------
    image : ndarray, shape (..., H, W)
        bool for masks, float32 for grey values.
    factor : float
        An integer, or any value >= 1.5.
    phase : int, 0 <= phase < :func:`row_phases` ``(factor)``
    method : {'linear', 'nearest', 'sdf'}
    profile_fwhm : float
        Slice profile: before rows are dropped, blur along the height with a
        Gaussian of this full width at half maximum, in Z steps (``factor``
        pixels), as a thick physical section blurs along Z. 0 = pure skipping.

    Returns
    -------
    ndarray of float32, shape (..., H, W)
    """
    height = image.shape[-2]
    positions = kept_row_positions(height, factor, phase)
    if len(positions) < 2:
        raise UserError(f"An image of height {height} keeps fewer than two rows at factor {factor:g}; "
                         "use a larger TRAIN_XY_SIZE.")
    binary = image.dtype == bool
    if profile_fwhm > 0:
        from scipy.ndimage import gaussian_filter1d

        sigma = profile_fwhm * factor / (2.0 * np.sqrt(2.0 * np.log(2.0)))
        image = gaussian_filter1d(np.asarray(image, dtype=np.float32), sigma, axis=-2, mode="reflect")
    if is_integer_factor(factor):
        sparse = np.take(image, positions, axis=-2)
    else:
        sparse = sample_rows(image, positions, axis=-2, binary=binary and profile_fwhm <= 0)
    return interpolate_along_axis(sparse, positions, height, axis=image.ndim - 2, method=method).astype(np.float32, copy=False)


def kept_row_positions(height: int, factor: float, phase: int = 0) -> np.ndarray:
    """The rows :func:`downscale_upscale_height` keeps of an image ``height`` rows high: ``phase, phase + factor,
    ...`` (fractional at a non-integer factor), every one within the image."""
    return phase + kept_positions(max(0, int(np.floor((height - 1 - phase) / factor + 1e-6)) + 1), factor)


def degrade_label_interfaces(labels: np.ndarray, factor: float, phase: int = 0) -> np.ndarray:
    """The interfaces half of a dense label image's boundary input (``BOUNDARY_INPUT`` 'interfaces') for a training
    crop degraded along its height as :func:`downscale_upscale_height` degrades it: the ids of the kept rows (at a
    non-integer factor, of the pixel row nearest each kept row, as a kept slice of a label image holds whole ids),
    filled between them by per-label shape-based interpolation along the rows (:func:`morph.row_interfaces`),
    as the restore fills its planes (``restore._chunk_interfaces``).

    Parameters
    ----------
    labels : ndarray of int, shape (C, H, W)
    factor : float
    phase : int

    Returns
    -------
    ndarray of float32 (0/1), shape (C, H, W)
    """
    height = labels.shape[-2]
    positions = kept_row_positions(height, factor, phase)
    rows = np.clip(np.round(positions).astype(np.int64), 0, height - 1)
    return row_interfaces(labels[:, rows, :], positions, height).astype(np.float32)


def row_phases(factor: float) -> int:
    """How many row phases the degradation draws from: ``factor`` at an integer factor (every
    offset of the kept rows), ``ceil(factor)`` at a non-integer one (whose kept rows take every
    fractional offset along the crop anyway)."""
    return int(round(factor)) if is_integer_factor(factor) else int(np.ceil(factor))


def check_lateral_axes(lateral_axes: str) -> None:
    """Raise a clear error for a ``TRAIN_LATERAL_AXES`` that is not one of ``settings.LATERAL_AXES``."""
    check_choice("TRAIN_LATERAL_AXES", lateral_axes)


def check_crop_size(stack_shape: Sequence[int], crop_size_zyx: Sequence[int], factor: float,
                    panel_width: Optional[int] = None) -> None:
    """Raise a clear ``UserError`` for a crop that cannot be cut from the sparse stack (or from one of
    its panels of ``panel_width`` columns, :func:`create_cropped_image_dataset`); a ``panel_width`` that
    does not divide the stack's width is the caller's error (``ValueError``)."""
    depth, height, width = crop_size_zyx
    if panel_width is not None and (panel_width < 1 or stack_shape[2] % panel_width):
        raise ValueError(f"panel_width {panel_width} does not divide the stack's width {stack_shape[2]}")
    if panel_width is not None and width > panel_width:
        raise UserError(f"TRAIN_XY_SIZE={width} is wider than the {panel_width} columns of each training window; "
                        "use a smaller TRAIN_XY_SIZE.")
    if depth % 2 == 0 or depth < 1:
        raise UserError(f"TRAIN_Z_SIZE must be odd (the centre slice is the label), got {depth}. Use e.g. 3 or 5.")
    if depth > stack_shape[0]:
        raise UserError(
            f"TRAIN_Z_SIZE={depth} is larger than the {stack_shape[0]} slices kept at factor {factor}; "
            "use a smaller TRAIN_Z_SIZE or a smaller resolution factor."
        )
    if height > stack_shape[1] or width > stack_shape[2]:
        raise UserError(
            f"TRAIN_XY_SIZE={height}x{width} is larger than the stack's slices ({stack_shape[1]}x{stack_shape[2]}); "
            "use a TRAIN_XY_SIZE no larger than the image."
        )
    if min(height, width) < rows_for_two_kept(factor):
        raise UserError(f"TRAIN_XY_SIZE={min(height, width)} is too small for factor {factor:g}: "
                         f"use at least {rows_for_two_kept(factor)}.")


def rows_for_two_kept(factor: float) -> int:
    """The crop edge that keeps two rows at every phase of the degradation (:func:`row_phases`)."""
    return 2 * int(np.ceil(factor - 1e-6))


# How often one distinct crop may be drawn: augment_data's flips still show the network other pixels
# for a few draws; beyond that a small stack only repeats itself, so its budget shrinks instead.
DRAWS_PER_DISTINCT_CROP = 4


def network_multiple(depth: int) -> int:
    """Crop edges must be multiples of this: the network halves its input ``depth`` times."""
    return 2 ** depth


def smallest_crop_edge(factor: float, depth: int) -> int:
    """The smallest lateral crop edge that trains: two kept rows at ``factor`` and a bottleneck of
    at least 2 x 2, rounded up to a multiple the network accepts."""
    multiple = network_multiple(depth)
    need = max(2 * multiple, rows_for_two_kept(factor))
    return -(-need // multiple) * multiple


def largest_crop_edge(height: int, width: int, depth: int) -> int:
    """The largest crop edge that fits in ``height`` x ``width`` slices, a multiple the network accepts."""
    multiple = network_multiple(depth)
    return min(height, width) // multiple * multiple


def most_draws(stack_shape: Sequence[int], crop_size_zyx: Sequence[int], factor: float, lateral_axes: str = "yx",
               depth: int = 3) -> int:
    """The most training crops a stack of kept slices ``stack_shape`` (K, H, W) is drawn for:
    :data:`DRAWS_PER_DISTINCT_CROP` draws of each of its :func:`distinct_crops` (a network of ``depth``
    levels tells lateral shifts of less than ``2 ** depth`` pixels hardly apart)."""
    return DRAWS_PER_DISTINCT_CROP * distinct_crops(stack_shape, crop_size_zyx, factor, lateral_axes,
                                                    network_multiple(depth))


def distinct_crops(stack_shape: Sequence[int], crop_size_zyx: Sequence[int], factor: float,
                   lateral_axes: str = "yx", lateral_step: int = 8) -> int:
    """How many different crops :func:`create_cropped_image_dataset` can draw: the positions of the
    crop in the kept slices (every slice; laterally every ``lateral_step`` pixels, since a shift
    smaller than one pixel of the network's coarsest level, ``2 ** depth``, shows it nearly the same
    crop), each transposed or not (square crops with ``lateral_axes='yx'``), each with ``factor``
    row phases of the degradation."""
    depth, height, width = crop_size_zyx
    positions = max(0, stack_shape[0] - depth + 1)
    for size, crop in zip(stack_shape[1:], crop_size_zyx[1:]):
        positions *= max(0, (size - crop) // lateral_step + 1) if size >= crop else 0
    orientations = 2 if height == width and lateral_axes == "yx" else 1
    return positions * orientations * row_phases(factor)


def create_cropped_image_dataset(
    downscaled_stack_dhw: np.ndarray,
    crop_size_zyx: Sequence[int],
    n_samples: int,
    factor: float,
    min_content_ratio: float = 0.005,
    random_state: int = 0,
    method: str = "linear",
    kind: str = "mask",
    profile_fwhm: float = 0.0,
    lateral_axes: str = "yx",
    crop_pool: float = 1.0,
    panel_width: Optional[int] = None,
    label_ids: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Random lateral crops of the sparse stack, degraded along their height.

    With ``lateral_axes='yx'`` half of the square crops are transposed before
    degradation, so the network learns to restore along both lateral axes (it
    is applied with Z along Y and along X). The degraded row phase is random,
    so the network does not depend on where the kept rows fall in a tile.

    Parameters
    ----------
    downscaled_stack_dhw : ndarray, shape (K, H, W)
        The kept slices: a mask (non-zero = foreground) or, with
        ``kind='intensity'``, normalised float32 intensities.
    crop_size_zyx : (C, h, w)
        C neighbouring kept slices (odd) by an h x w lateral window.
    n_samples : int
    factor : float
    min_content_ratio : float
        Crops whose label has a smaller foreground fraction are rejected.
    random_state : int
    method : str
        Interpolation passed to :func:`downscale_upscale_height`.
    kind : {'mask', 'intensity'}
        Masks are binarised and crops with too little foreground rejected;
        intensities are used as they are, every crop accepted.
    profile_fwhm : float
        Slice profile of the degradation (see :func:`downscale_upscale_height`).
    lateral_axes : {'yx', 'y'}
        'yx': degrade along Y or X at random (square crops); 'y': along Y only.
    crop_pool : float >= 1
        ``round(n_samples * crop_pool)`` candidate crops are drawn and the
        ``n_samples`` whose centre slice the interpolation gets most wrong
        (:func:`interpolation_error`) are kept, in the order drawn. 1 keeps
        every crop drawn; the candidates are the crops ``crop_pool=1`` would
        draw for that many samples. The choice is among distinct candidates
        (:func:`hardest_draws`): a stack too small to offer ``n_samples`` of
        them trains on the crops of ``crop_pool=1``.
    panel_width : int, optional
        The stack is separate windows of ``panel_width`` columns laid side by
        side along X (a large store's training windows,
        ``blocks.training_stack``): no crop straddles two of them, whose
        meeting column is an edge no image has. Default: one panel, the whole
        width.
    label_ids : ndarray of int, shape (K, H, W), optional
        The ids of a dense label image whose boundary mask is ``downscaled_stack_dhw``: each input is then
        the boundary network's with interfaces (:func:`morph.mix_interfaces` of the degraded mask and
        :func:`degrade_label_interfaces` of the crop's ids; ``BOUNDARY_INPUT`` 'interfaces').

    Returns
    -------
    inputs : ndarray of float32, shape (n_samples, C, h, w)
    labels : ndarray of float32, shape (n_samples, 1, h, w): 0/1 for masks
    """
    if kind == "mask":
        stack = np.asarray(downscaled_stack_dhw) != 0
    else:
        stack = np.asarray(downscaled_stack_dhw, dtype=np.float32)
        min_content_ratio = -np.inf
    if label_ids is not None and np.shape(label_ids) != stack.shape:
        raise ValueError(f"label_ids has shape {np.shape(label_ids)}, the stack {stack.shape}: they must match.")
    check_crop_size(stack.shape, crop_size_zyx, factor, panel_width)
    check_lateral_axes(lateral_axes)
    check_crop_pool(crop_pool)
    depth = crop_size_zyx[0]
    n_candidates = max(n_samples, int(round(n_samples * crop_pool)))
    draws = draw_crops(stack, crop_size_zyx, n_candidates, factor, min_content_ratio, random_state, lateral_axes,
                       panel_width)
    if n_candidates > n_samples:
        draws = hardest_draws(draws, n_samples, lambda draw: interpolation_error(
            crop_at(stack, crop_size_zyx, draw)[depth // 2], factor, draw[4], method, profile_fwhm, kind))
    return degraded_samples(stack, crop_size_zyx, draws, factor, method, profile_fwhm, label_ids)


def draw_crops(stack: np.ndarray, crop_size_zyx: Sequence[int], n_draws: int, factor: float, min_content_ratio: float,
               random_state: int, lateral_axes: str, panel_width: Optional[int] = None
               ) -> List[Tuple[int, int, int, bool, int]]:
    """``n_draws`` random crops ``(z0, y0, x0, transposed, phase)`` of ``stack`` (K, H, W) whose centre
    slice has at least ``min_content_ratio`` foreground, in the order drawn, each within one panel of
    ``panel_width`` columns; a ``UserError`` when too few are found (see :func:`create_cropped_image_dataset`)."""
    depth, height, width = crop_size_zyx
    panels = 1 if panel_width is None else stack.shape[2] // panel_width
    if min_content_ratio > 0 and not np.any(stack):
        raise UserError("The kept slices read for training hold no foreground (every voxel is 0): there is nothing "
                        "to learn from. Check that the input (and --channel) is the mask or label image meant. A "
                        "large store trains on random windows: where its foreground fills only a small region, train "
                        "on a crop around it (--save-model) and restore the store with --model.")
    rng = np.random.default_rng(random_state)
    draws = []
    attempts, max_attempts = 0, 200 * n_draws
    while len(draws) < n_draws and attempts < max_attempts:
        attempts += 1
        z0 = rng.integers(0, stack.shape[0] - depth + 1)
        y0 = rng.integers(0, stack.shape[1] - height + 1)
        if panels == 1:  # the draws of a whole stack, as before panels existed
            x0 = rng.integers(0, stack.shape[2] - width + 1)
        else:
            x0 = rng.integers(panels) * panel_width + rng.integers(0, panel_width - width + 1)
        # The coin is tossed for every crop, so that 'y' draws the very crops of 'yx' (a fair ablation).
        transposed = bool(rng.random() < 0.5 and height == width and lateral_axes == "yx")
        label = stack[z0 + depth // 2, y0:y0 + height, x0:x0 + width]
        if label.mean() < min_content_ratio:
            continue
        draws.append((z0, y0, x0, transposed, int(rng.integers(row_phases(factor)))))
    if len(draws) < n_draws:
        raise UserError(
            f"Only {len(draws)} of {n_draws} random crops had a centre slice with at least "
            f"{min_content_ratio:.3%} foreground after {attempts} tries. Lower MIN_CONTENT_RATIO, "
            "lower TRAIN_NB (or CROP_POOL), or use a smaller TRAIN_XY_SIZE."
        )
    return draws


def crop_at(stack: np.ndarray, crop_size_zyx: Sequence[int], draw: tuple) -> np.ndarray:
    """The crop ``(C, h, w)`` of a draw (transposed laterally when drawn so): a view, nothing is copied."""
    depth, height, width = crop_size_zyx
    z0, y0, x0, transposed = draw[:4]
    crop = stack[z0:z0 + depth, y0:y0 + height, x0:x0 + width]
    return crop.transpose(0, 2, 1) if transposed else crop


def degraded_samples(stack: np.ndarray, crop_size_zyx: Sequence[int], draws: Sequence[tuple], factor: float,
                     method: str, profile_fwhm: float, label_ids: Optional[np.ndarray] = None
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """Training pairs of ``draws``: each crop degraded along its height at its phase
    (:func:`downscale_upscale_height`), float32 ``(N, C, h, w)``, and its centre slice ``(N, 1, h, w)``;
    with ``label_ids``, the degraded crop mixed with the interfaces of its ids (:func:`degrade_label_interfaces`)."""
    depth, height, width = crop_size_zyx
    inputs = np.empty((len(draws), depth, height, width), dtype=np.float32)
    labels = np.empty((len(draws), 1, height, width), dtype=np.float32)
    for i, draw in enumerate(draws):
        crop = crop_at(stack, crop_size_zyx, draw)
        inputs[i] = downscale_upscale_height(crop, factor, phase=draw[4], method=method, profile_fwhm=profile_fwhm)
        if label_ids is not None:
            inputs[i] = mix_interfaces(inputs[i], degrade_label_interfaces(crop_at(label_ids, crop_size_zyx, draw),
                                                                           factor, draw[4]))
        labels[i, 0] = crop[depth // 2]
    return inputs, labels


def hardest_draws(draws: List[tuple], n_samples: int, error: Callable[[tuple], float]) -> List[tuple]:
    """The ``n_samples`` distinct draws with the largest ``error``, in the order drawn.

    Ranking repeated draws would train on fewer distinct crops than random
    drawing does: a stack that offers fewer distinct candidates than
    ``n_samples`` (a small volume whose planes are about the crop size) keeps
    its first ``n_samples`` draws, the crops ``crop_pool=1`` would train on.

    Parameters
    ----------
    draws : list of hashable crop descriptions, in the order drawn (repeats allowed)
    n_samples : int
    error : callable giving a draw's interpolation error (larger = harder)
    """
    distinct = list(dict.fromkeys(draws))  # first occurrences, in the order drawn
    if len(distinct) < n_samples:
        return draws[:n_samples]
    errors = np.array([error(draw) for draw in distinct])
    hardest = np.sort(np.argsort(-errors, kind="stable")[:n_samples])
    return [distinct[i] for i in hardest]


def interpolation_error(label_hw: np.ndarray, factor: float, phase: int, method: str = "linear",
                        profile_fwhm: float = 0.0, kind: str = "mask") -> float:
    """How wrong the degraded-then-interpolated version of one label image is.

    Masks: the fraction of pixels whose class the interpolation (at 0.5)
    gets wrong; grey values: the mean absolute difference. This is what the
    network has to correct in that crop, so it ranks candidate crops.

    Parameters
    ----------
    label_hw : ndarray, shape (h, w), bool/0-1 (masks) or float32 (grey values)
    factor, phase, method, profile_fwhm : as in :func:`downscale_upscale_height`
    kind : {'mask', 'intensity'}
    """
    degraded = downscale_upscale_height(label_hw, factor, phase=phase, method=method, profile_fwhm=profile_fwhm)
    if kind == "mask":
        return float(np.mean((degraded >= 0.5) != (label_hw != 0)))
    return float(np.mean(np.abs(degraded - label_hw)))


def augment_data(inputs: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Random flips of one sample along height and/or width, applied identically
    to input ``(C, h, w)`` and label ``(1, h, w)``. The degraded axis stays the
    height axis (no transposes here)."""
    for axis in (-2, -1):
        if rng.random() < 0.5:
            inputs, labels = np.flip(inputs, axis), np.flip(labels, axis)
    return np.ascontiguousarray(inputs), np.ascontiguousarray(labels)


class CustomDataset(Dataset):
    """Pairs of degraded inputs ``(C, h, w)`` and labels ``(1, h, w)`` as float32 tensors."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, augment: bool = False, random_state: int = 0):
        self.inputs, self.labels, self.augment = inputs, labels, augment
        self.rng = np.random.default_rng(random_state)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        x, y = self.inputs[index], self.labels[index]
        if self.augment:
            x, y = augment_data(x, y, self.rng)
        return torch.from_numpy(x), torch.from_numpy(y)


def split_indices(n_samples: int, val_split: float, random_state: int) -> Tuple[np.ndarray, np.ndarray]:
    """Training and validation sample indices: ``ceil(val_split * n)`` of a seeded permutation are kept for
    validation (the split scikit-learn's ``train_test_split`` makes with the same seed, without needing it).

    Returns
    -------
    train_index, val_index : ndarray of int
    """
    n_val = int(np.ceil(val_split * n_samples))
    permutation = np.random.RandomState(random_state).permutation(n_samples)
    return permutation[n_val:], permutation[:n_val]


def make_loaders(inputs: np.ndarray, labels: np.ndarray, val_split: float, batch_size: int,
                 random_state: int) -> Tuple[DataLoader, DataLoader]:
    """Training (shuffled, augmented) and validation loaders from one sample set."""
    train_index, val_index = split_indices(len(inputs), val_split, random_state)
    train_x, val_x, train_y, val_y = inputs[train_index], inputs[val_index], labels[train_index], labels[val_index]
    generator = torch.Generator().manual_seed(random_state)
    train_loader = DataLoader(CustomDataset(train_x, train_y, augment=True, random_state=random_state),
                              batch_size=batch_size, shuffle=True, generator=generator, drop_last=len(train_x) > batch_size)
    val_loader = DataLoader(CustomDataset(val_x, val_y), batch_size=batch_size, shuffle=False)
    return train_loader, val_loader


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the batch (smoothed so empty targets are defined)."""
    probabilities = torch.sigmoid(logits)
    intersection = (probabilities * targets).sum()
    return 1.0 - (2.0 * intersection + eps) / (probabilities.sum() + targets.sum() + eps)


SSIM_WINDOW = 7  # skimage.metrics.structural_similarity's default window (uniform, 7 x 7)
SSIM_MIX = 0.84  # weight of 1 - SSIM in the 'ssim' loss; the rest is L1 (Zhao et al. 2017, IEEE TCI 3:47)


def ssim_map(predicted: torch.Tensor, target: torch.Tensor, data_range: float = 1.0,
             window: int = SSIM_WINDOW) -> torch.Tensor:
    """Local SSIM of two (N, C, H, W) float tensors, as ``skimage.metrics.structural_similarity``
    computes it by default: a uniform ``window`` x ``window`` window, sample covariances,
    K1 = 0.01, K2 = 0.03. Returns (N, C, H - window + 1, W - window + 1): valid windows only.
    A crop smaller than the window (a shallow network's smallest crops, 4 or 6 pixels) is
    scored with the largest odd window it holds."""
    smallest_edge = min(predicted.shape[-2:])
    if smallest_edge < window:
        window = smallest_edge - 1 + smallest_edge % 2

    def mean(values: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(values, window, stride=1)

    n_pixels = window * window
    unbiased = n_pixels / (n_pixels - 1.0)
    mu_p, mu_t = mean(predicted), mean(target)
    var_p = unbiased * (mean(predicted * predicted) - mu_p * mu_p)
    var_t = unbiased * (mean(target * target) - mu_t * mu_t)
    cov = unbiased * (mean(predicted * target) - mu_p * mu_t)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2))


def ssim_l1_loss(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``SSIM_MIX`` x (1 - mean SSIM) + (1 - ``SSIM_MIX``) x L1, on normalised grey values
    (data range 1). SSIM rewards the local contrast and structure that MSE averages away
    between kept slices; the L1 term keeps the grey levels (SSIM hardly sees a uniform offset)."""
    ssim = ssim_map(predicted, targets).mean()
    return SSIM_MIX * (1.0 - ssim) + (1.0 - SSIM_MIX) * F.l1_loss(predicted, targets)


SSIM_WEIGHT_WITH_MSE = 0.05  # weight of 1 - SSIM beside MSE in the 'mse+ssim' loss (docs/grey-scale.md)


def mse_ssim_loss(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MSE + ``SSIM_WEIGHT_WITH_MSE`` x (1 - mean SSIM), on normalised grey values (data range 1).

    MSE alone regresses to the mean where the network is unsure between kept slices and smooths
    texture away; a small SSIM term keeps local contrast. The default for grey values: on two EM
    stacks at factors 4 and 8 it gains up to 0.015 SSIM for at most 0.13 dB of PSNR
    (docs/grey-scale.md)."""
    return F.mse_loss(predicted, targets) + SSIM_WEIGHT_WITH_MSE * (1.0 - ssim_map(predicted, targets).mean())


def intensity_criterion(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The regression loss of grey values named by ``INTENSITY_LOSS``: 'mse', 'l1', 'ssim'
    (:func:`ssim_l1_loss`) or 'mse+ssim' (:func:`mse_ssim_loss`)."""
    return {"l1": nn.L1Loss(), "mse": nn.MSELoss(), "ssim": ssim_l1_loss, "mse+ssim": mse_ssim_loss}[name]


def train_execution_process(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    num_epochs: int,
    learning_rate: float,
    device: Optional[torch.device] = None,
    dice_weight: float = 0.0,
    progress: bool = True,
    precision: str = "fp32",
    intensity_loss: str = Training.intensity_loss,
) -> Tuple[nn.Module, Dict[str, List[float]]]:
    """Train with Adam and BCE-with-logits (+ optional soft Dice; ``intensity_loss``,
    MSE, L1, SSIM + L1 or MSE + SSIM, for an intensity model), one-cycle LR.

    Prints ``Epoch [X/Y] Train Loss: ..., Val Loss: ...`` after each epoch and
    returns the model with the weights of the best validation epoch, plus the
    loss history ``{"train": [...], "val": [...]}``. ``precision`` 'bf16' (or
    'auto' where the hardware has native bfloat16) runs the forward and
    backward passes under bfloat16 autocast, weights and optimizer in float32;
    model and inputs are channels-last, the layout oneDNN and cuDNN prefer.
    """
    device = device or select_device()
    compute_dtype = resolve_precision(precision, device)
    model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    total_steps = max(1, num_epochs * len(train_loader))
    # Warm-up over 10 % of the steps, but at least 2 (OneCycleLR divides by the warm-up length).
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=max(total_steps, 4),
                                                    pct_start=max(0.1, 2.0 / max(total_steps, 4)))
    intensity = getattr(model, "architecture", {}).get("output") == "intensity"
    if intensity:  # grey values are regressed (INTENSITY_LOSS)
        criterion = intensity_criterion(intensity_loss)
    else:
        criterion = nn.BCEWithLogitsLoss()

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = criterion(logits, targets)
        return loss + dice_weight * soft_dice_loss(logits, targets) if dice_weight else loss

    history: Dict[str, List[float]] = {"train": [], "val": []}
    best_val, best_state = float("inf"), None
    bar = tqdm(total=total_steps, desc="Training", unit="step", disable=not progress)
    for epoch in range(num_epochs):
        model.train()
        running, seen = 0.0, 0
        for x, y in train_loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, compute_dtype):
                loss = loss_fn(model(x).float(), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item() * len(x)
            seen += len(x)
            bar.update(1)
        train_loss = running / max(seen, 1)
        val_loss = evaluate_loss(model, val_loader, loss_fn, device, compute_dtype)
        history["train"].append(train_loss)
        history["val"].append(val_loss)
        if progress:
            bar.write(f"Epoch [{epoch + 1}/{num_epochs}] Train Loss: {train_loss:.4f}, Val Loss: {val_loss:.4f}")
        if val_loss < best_val:
            best_val = val_loss
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, history


@torch.inference_mode()
def evaluate_loss(model: nn.Module, loader: DataLoader, loss_fn, device: torch.device,
                  compute_dtype: torch.dtype = torch.float32) -> float:
    """Mean loss over a loader in eval mode."""
    model.eval()
    total, count = 0.0, 0
    for x, y in loader:
        x, y = x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)
        with autocast(device, compute_dtype):
            logits = model(x).float()
        total += loss_fn(logits, y).item() * len(x)
        count += len(x)
    return total / max(count, 1)


def training_recipe(recipe: SettingsLike = None, kind: str = "mask",
                    **changes: Any) -> Tuple[Training, Network]:
    """The training recipe and network of ``recipe`` (default ``Settings()``, the command line's), with
    ``changes`` (field names of :class:`settings.Training` and :class:`settings.Network`, e.g.
    ``train_nb=240``) and the "by kind" values of ``kind`` filled in."""
    recipe = as_settings(recipe)
    training_names = {f.name for f in dataclasses.fields(Training)}
    network_names = {f.name for f in dataclasses.fields(Network)}
    unknown = set(changes) - training_names - network_names
    if unknown:
        raise TypeError(f"fit_on_sparse_stack got unknown settings {', '.join(sorted(unknown))}; they are fields "
                        "of settings.Training and settings.Network.")
    training = dataclasses.replace(recipe.training, **{k: v for k, v in changes.items() if k in training_names})
    network = dataclasses.replace(recipe.network, **{k: v for k, v in changes.items() if k in network_names})
    fine_tuning = training.num_epochs is None and starting_point(training, network, kind)[0] is not None
    crops_by_kind = training.train_nb is None
    training = training.for_kind(kind, fine_tuning)
    if crops_by_kind and recipe.fitted_to is not None:
        # The kind's number of crops, as restore.fit_recipe_to_stack caps a number typed in eval.py.
        n_kept, height, width, factor = recipe.fitted_to
        most = most_draws((n_kept, height, width), (training.train_z_size,) + (training.train_xy_size,) * 2, factor,
                          training.lateral_axes, network.depth)
        training = dataclasses.replace(training, train_nb=min(training.train_nb, most))
    return training, network


def starting_point(training: Training, network: Network, kind: str = "mask"
                   ) -> Tuple[Optional[Dict[str, torch.Tensor]], str]:
    """The weights a training with this recipe starts from (``START_FROM``: the phantom-trained starting
    model where it has the same network and the stack is a mask, :func:`model.starting_weights`; else
    None, random weights) and the plan's line saying so."""
    output = "intensity" if kind == "intensity" else "logits"
    architecture = network_architecture(training.train_z_size, 1, network.depth, network.base_filters,
                                        network.dropout_rate, network.input_skip, output, network.skip_merge,
                                        network.shortcut_norm)
    return starting_weights(architecture, "intensity" if kind == "intensity" else "mask", training.start_from)


def fit_on_sparse_stack(
    sparse_dhw: np.ndarray,
    factor: float,
    recipe: SettingsLike = None,
    *,
    kind: str = "mask",
    device: Optional[torch.device] = None,
    progress: bool = True,
    panel_width: Optional[int] = None,
    label_ids: Optional[np.ndarray] = None,
    **changes: Any,
) -> Tuple[AttentionResUNet, Dict[str, List[float]], Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """The complete self-supervised training on a sparse stack.

    This is the one training recipe that ``eval.py``, ``apply.py`` and
    ``bench.py`` share; without ``recipe`` it is the command line's
    (``settings.Settings()``), for ``kind``: for masks, 3 epochs fine-tuning the
    phantom-trained starting model (``start_from='phantom'``, :func:`starting_point`).
    A network the starting model does not fit (another architecture, channel count
    or kind) starts from random weights, as ``start_from='scratch'`` does, and its
    "by kind" epochs are then those of a training from scratch.

    Parameters
    ----------
    sparse_dhw : ndarray, shape (K, H, W)
        The kept slices: a mask (non-zero = foreground) or, with ``kind='intensity'``,
        normalised float32 grey values.
    factor : float
    recipe : Settings, optional
        The recipe (a dict of ``eval.py``-style constants is read as ``Settings.from_dict``).
    kind : {'mask', 'dense labels', 'intensity'}
        'dense labels': the boundary mask of a dense label image, trained as a mask with that kind's
        recipe (:data:`settings.RECIPE_BY_KIND`).
    panel_width : int, optional
        ``sparse_dhw`` is separate windows of this many columns side by side; no crop straddles two
        (:func:`create_cropped_image_dataset`).
    label_ids : ndarray of int, shape (K, H, W), optional
        The ids of the dense label image whose boundary mask ``sparse_dhw`` is: the network then trains on
        the input with interfaces (``BOUNDARY_INPUT`` 'interfaces', :func:`create_cropped_image_dataset`).
    **changes
        Fields of :class:`settings.Training` or :class:`settings.Network` changed from ``recipe``
        (``train_xy_size=32, num_epochs=1, base_filters=8``).

    Returns
    -------
    model : AttentionResUNet in eval mode (best validation weights)
    history : dict of per-epoch losses
    samples : dict ``{"train": (inputs, labels), "validation": (inputs, labels)}``,
        the arrays the model was trained and validated on
    """
    training, network = training_recipe(recipe, kind, **changes)
    device = device or select_device()
    with seeded(training.random_state, device):
        return _fit(sparse_dhw, factor, training, network, kind, device, progress, panel_width, label_ids)


def _fit(sparse_dhw: np.ndarray, factor: float, training: Training, network: Network, kind: str,
         device: Optional[torch.device], progress: bool, panel_width: Optional[int], label_ids: Optional[np.ndarray]
         ) -> Tuple[AttentionResUNet, Dict[str, List[float]], Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """The body of :func:`fit_on_sparse_stack`, run with the random generators seeded."""
    inputs, labels = create_cropped_image_dataset(
        sparse_dhw, (training.train_z_size, training.train_xy_size, training.train_xy_size), training.train_nb,
        factor, training.min_content_ratio, training.random_state, training.upscale_method,
        "intensity" if kind == "intensity" else "mask", training.profile_fwhm, training.lateral_axes,
        training.crop_pool, panel_width, label_ids)
    train_loader, val_loader = make_loaders(inputs, labels, training.val_split, training.batch_size,
                                            training.random_state)
    del inputs, labels  # the loaders hold their own copies: the samples are in memory once, not twice
    model = AttentionResUNet(in_channels=training.train_z_size, n_classes=1, depth=network.depth,
                             base_filters=network.base_filters, dropout_rate=network.dropout_rate,
                             input_skip=network.input_skip, skip_merge=network.skip_merge,
                             shortcut_norm=network.shortcut_norm,
                             output="intensity" if kind == "intensity" else "logits")
    state, start = starting_point(training, network, kind)
    if state is not None:
        model.load_state_dict(state)
    if progress:
        print(f"Training starts from {start}.")
    model, history = train_execution_process(model, train_loader, val_loader, training.num_epochs,
                                             training.learning_rate, device, dice_weight=training.dice_weight,
                                             progress=progress, precision=training.precision,
                                             intensity_loss=training.intensity_loss)
    samples = {"train": (train_loader.dataset.inputs, train_loader.dataset.labels),
               "validation": (val_loader.dataset.inputs, val_loader.dataset.labels)}
    return model, history, samples


# --------------------------------------------------------------------------- #
# Figures
# --------------------------------------------------------------------------- #
def _finish_figure(figure, path: Optional[Path], show: bool) -> None:
    import matplotlib.pyplot as plt

    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110, bbox_inches="tight")
    if show and plt.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo", "template"):
        plt.show()
    plt.close(figure)


def plot_loss_history(history: Dict[str, List[float]], path: Optional[Path] = None, show: bool = False) -> None:
    """Training and validation loss per epoch, saved as PNG."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    epochs = np.arange(1, len(history["train"]) + 1)
    axis.plot(epochs, history["train"], "o-", label="train")
    axis.plot(epochs, history["val"], "o-", label="validation")
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss")
    axis.set_title("Training history")
    axis.legend()
    _finish_figure(figure, path, show)


@torch.inference_mode()
def display_training_results(model: nn.Module, samples: Dict[str, Tuple[np.ndarray, np.ndarray]],
                             n_examples: int = 3, path: Optional[Path] = None, show: bool = False) -> None:
    """Degraded input (centre channel) / label / prediction for a few samples of each set.

    ``samples`` maps a set name ("train", "validation") to ``(inputs (N, C, h, w),
    labels (N, 1, h, w))``, as returned by :func:`fit_on_sparse_stack`.
    """
    import matplotlib.pyplot as plt

    device = next(model.parameters()).device
    model.eval()
    # A mask model gives logits (shown as probabilities); an intensity model gives grey values on the
    # normalised scale of its inputs, shown as they are.
    grey = getattr(model, "architecture", {}).get("output") == "intensity"
    rows = []
    for name, (inputs, labels) in samples.items():
        count = min(n_examples, len(inputs))
        outputs = model(torch.from_numpy(inputs[:count]).to(device)).float()
        predictions = (outputs if grey else torch.sigmoid(outputs)).cpu().numpy()
        centre = inputs.shape[1] // 2
        rows += [(name, inputs[i, centre], labels[i, 0], predictions[i, 0]) for i in range(count)]
    figure, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    for axes_row, (name, *images) in zip(axes, rows):
        # grey values: one window per row, the label's, so that input, label and prediction compare
        vmin, vmax = (float(images[1].min()), float(images[1].max())) if grey else (0.0, 1.0)
        for axis, image, title in zip(axes_row, images, ("degraded input", "label", "prediction")):
            axis.imshow(image, cmap="gray", vmin=vmin, vmax=max(vmax, vmin + 1e-6), interpolation="nearest")
            axis.set_title(f"{name}: {title}", fontsize=9)
            axis.axis("off")
    _finish_figure(figure, path, show)
