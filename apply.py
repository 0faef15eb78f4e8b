"""Apply a trained network to a sparse stack: tiled slice-by-slice inference and the restore command.

The network was trained on lateral crops degraded along their height. At
inference the stack is upsampled along Z with the same interpolation and cut
into 2D planes in which Z is the height axis: ``(Z, X)`` planes along Y and
``(Z, Y)`` planes along X. Both orientations are predicted with the one tiling
function, :func:`predict_tiled`, and their probabilities are averaged.
"""
from __future__ import annotations

import argparse
import functools
import glob
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from model import select_device
from morph import bracket, interpolate_along_axis

ORIENTATIONS = ("y", "x")
# Network inputs built at a time (float32 values, 16 MB): inference memory is the output plus a few of these.
CHUNK_VALUES = 4_000_000
# eval.py constants that apply.py's command line also accepts (training and inference recipe).
RESTORE_SETTING_NAMES = ("BINARIZE_THRESHOLD", "TRAIN_XY_SIZE", "TRAIN_Z_SIZE", "TRAIN_NB", "VAL_SPLIT", "MIN_CONTENT_RATIO",
                         "RANDOM_STATE", "BATCH_SIZE", "NUM_EPOCHS", "LEARNING_RATE", "DICE_WEIGHT", "BASE_FILTERS",
                         "DEPTH", "DROPOUT_RATE", "INPUT_SKIP", "UPSCALE_METHOD", "INFERENCE_TILE_SIZE",
                         "INFERENCE_BATCH_SIZE", "ORIENTATIONS", "CHANNEL_STRIDE", "TTA_FLIPS", "KEEP_KEPT_SLICES",
                         "PROBABILITY_THRESHOLD")


def upscale_height(sparse: np.ndarray, factor: int, original_depth: Optional[int] = None, axis: int = 0,
                   method: str = "linear") -> np.ndarray:
    """Upsample the sparse axis of a stack (kept slices at ``0, factor, ...``).

    The interpolation is :func:`morph.interpolate_along_axis`, the function
    that also degrades training inputs (``train.downscale_upscale_height``).

    Parameters
    ----------
    sparse : ndarray, shape (K, ...) along ``axis``
    factor : int
    original_depth : int, optional
        Output length; default ``(K - 1) * factor + 1``. Slices after the last
        kept one copy it.

    Returns
    -------
    ndarray of float32 ('linear') with ``axis`` of length ``original_depth``.
    """
    n_kept = sparse.shape[axis]
    depth = (n_kept - 1) * factor + 1 if original_depth is None else int(original_depth)
    return interpolate_along_axis(sparse, np.arange(n_kept) * factor, depth, axis=axis, method=method)


def reflect_indices(indices: np.ndarray, size: int) -> np.ndarray:
    """Mirror out-of-range indices back into ``[0, size)`` (numpy 'reflect' mode)."""
    if size == 1:
        return np.zeros_like(indices)
    period = 2 * (size - 1)
    folded = np.abs(indices) % period
    return np.where(folded >= size, period - folded, folded)


def tile_starts(size: int, tile: int, overlap: int) -> np.ndarray:
    """Start offsets of tiles of length ``tile`` covering ``size`` with at least ``overlap``."""
    if size <= tile:
        return np.array([0])
    n_tiles = math.ceil((size - overlap) / (tile - overlap))
    return np.round(np.linspace(0, size - tile, n_tiles)).astype(int)


def blending_window(height: int, width: int) -> np.ndarray:
    """Separable cosine (Hann) window ``(height, width)`` with a small floor so
    that image borders covered by one tile only still get weight."""
    def hann(n: int) -> np.ndarray:
        return np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2
    return np.maximum(np.outer(hann(height), hann(width)), 1e-3).astype(np.float32)


@torch.inference_mode()
def predict_tiled(model: nn.Module, images_nchw: np.ndarray, tile_size: int, overlap: int, batch_size: int,
                  device: Optional[torch.device] = None, flips: Sequence[Tuple[int, ...]] = ((),)) -> np.ndarray:
    """Foreground probabilities of 2D images, tiled with smooth blending.

    Every image is cut into ``tile_size`` tiles (smaller images are one tile)
    overlapping by ``overlap`` pixels; tiles of all images are batched
    together, and overlapping predictions are blended with a cosine window so
    no seams show.

    Parameters
    ----------
    model : nn.Module returning logits ``(N, 1, h, w)``
    images_nchw : ndarray of float32, shape (N, C, H, W)
    tile_size, overlap, batch_size : int
    flips : sequence of tuples of axes
        Test-time augmentation: each entry flips the tile along those axes
        (-2 = height, -1 = width) and the predictions are averaged.

    Returns
    -------
    probabilities : ndarray of float32, shape (N, H, W)
    """
    device = device or next(model.parameters()).device
    n_images, _, height, width = images_nchw.shape
    tile_h, tile_w = min(tile_size, height), min(tile_size, width)
    overlap = min(overlap, tile_size // 2)
    window = blending_window(tile_h, tile_w)
    tiles = [(i, y, x) for i in range(n_images)
             for y in tile_starts(height, tile_h, overlap) for x in tile_starts(width, tile_w, overlap)]
    summed = np.zeros((n_images, height, width), dtype=np.float32)
    weights = np.zeros((height, width), dtype=np.float32)
    for _, y, x in tiles[: len(tiles) // n_images]:  # identical layout in every image
        weights[y:y + tile_h, x:x + tile_w] += window
    for start in range(0, len(tiles), batch_size):
        batch = tiles[start:start + batch_size]
        x_batch = torch.from_numpy(np.stack([images_nchw[i, :, y:y + tile_h, x:x + tile_w] for i, y, x in batch]))
        x_batch = x_batch.to(device)
        probabilities = torch.zeros((len(batch), tile_h, tile_w), device=device)
        for dims in flips:
            flipped = torch.flip(x_batch, dims) if dims else x_batch
            out = torch.sigmoid(model(flipped))[:, 0]
            probabilities += torch.flip(out, dims) if dims else out
        probabilities = (probabilities / len(flips)).float().cpu().numpy() * window
        for (i, y, x), tile in zip(batch, probabilities):
            summed[i, y:y + tile_h, x:x + tile_w] += tile
    return summed / weights


def _plane_chunk(sparse_kpl: np.ndarray, planes: np.ndarray, offsets: np.ndarray, factor: int,
                 depth: int, method: str) -> np.ndarray:
    """Network inputs ``(n, C, D, L)`` for planes ``planes`` of a sparse view
    ``(K, P, L)``: channel c of plane p is plane ``p + offsets[c]`` (mirrored at
    the borders), upsampled along Z to ``depth``."""
    channel_planes = reflect_indices(planes[:, None] + offsets[None, :], sparse_kpl.shape[1])
    gathered = sparse_kpl[:, channel_planes.ravel(), :]  # (K, n*C, L)
    upscaled = upscale_height(gathered, factor, depth, axis=0, method=method)  # (D, n*C, L)
    upscaled = upscaled.reshape(depth, len(planes), len(offsets), -1)
    return np.ascontiguousarray(upscaled.transpose(1, 2, 0, 3), dtype=np.float32)


def apply_model_to_stack_tiled_slice_by_slice(
    model: nn.Module,
    sparse_dhw: np.ndarray,
    factor: int,
    train_depth: int,
    tile_size: int,
    batch_size: int = 32,
    original_depth: Optional[int] = None,
    channel_stride: Optional[int] = None,
    orientations: Sequence[str] = ORIENTATIONS,
    flips: Sequence[Tuple[int, ...]] = ((),),
    keep_kept_slices: bool = True,
    upscale_method: str = "linear",
    overlap: Optional[int] = None,
    out_dtype=np.float32,
    device: Optional[torch.device] = None,
    progress: bool = True,
) -> np.ndarray:
    """Restore the full-depth probability stack from the kept slices.

    Parameters
    ----------
    model : trained network with ``train_depth`` input channels
    sparse_dhw : ndarray, shape (K, H, W)
        The kept slices, Z step ``factor`` (bool or [0, 1] values).
    factor : int
    train_depth : int
        Channels of the model (``TRAIN_Z_SIZE``), odd.
    tile_size : int
        Tile edge (``TRAIN_XY_SIZE`` or larger); planes larger than this are tiled.
    batch_size : int
        Tiles per forward pass.
    original_depth : int, optional
        Output depth D; default ``(K - 1) * factor + 1``.
    channel_stride : int, optional
        Spacing of the neighbouring planes used as channels. In training the
        channels are kept slices ``factor`` voxels apart, so the default is
        ``factor``, which gives the network the geometry it was trained on.
    orientations : subset of ('y', 'x')
        'y': planes along Y, images ``(Z, X)``; 'x': planes along X, images
        ``(Z, Y)``. Probabilities of several orientations are averaged.
    flips : sequence of axis tuples
        Test-time flips (see :func:`predict_tiled`); ``((),)`` = none.
    keep_kept_slices : bool
        Copy the kept slices verbatim into the output (they are known).
    upscale_method : str
        Must match the training degradation (``train.downscale_upscale_height``).
    overlap : int, optional
        Tile overlap in pixels; default a quarter tile.
    out_dtype : numpy dtype
        float32 by default; float16 halves the memory of large outputs, and
        uint8 quarters it, storing ``round(255 * p)``.

    Returns
    -------
    probabilities_dhw : ndarray of ``out_dtype``, shape (D, H, W), values in [0, 1]
        (0..255 for an integer ``out_dtype``)

    Memory stays bounded by one chunk of planes (about 16 MB of inputs, or one
    plane of ``C x D x W`` floats if that is larger) plus the output array: the
    upscaled stack is never built whole.
    """
    if train_depth % 2 == 0:
        raise ValueError(f"train_depth (TRAIN_Z_SIZE) must be odd, got {train_depth}.")
    unknown = set(orientations) - set(ORIENTATIONS)
    if unknown or not orientations:
        raise ValueError(f"orientations must be a non-empty subset of {ORIENTATIONS}, got {orientations}.")
    device = device or select_device()
    model.to(device).eval()
    sparse = np.asarray(sparse_dhw)
    if not np.issubdtype(sparse.dtype, np.floating):
        sparse = sparse != 0  # 1 byte per voxel; chunks are converted to float32 as they are built
    n_kept, height, width = sparse.shape
    depth = (n_kept - 1) * factor + 1 if original_depth is None else int(original_depth)
    stride = factor if channel_stride is None else int(channel_stride)
    offsets = (np.arange(train_depth) - train_depth // 2) * stride
    overlap = tile_size // 4 if overlap is None else overlap
    output = np.zeros((depth, height, width), dtype=out_dtype)
    scale = 255.0 if np.issubdtype(output.dtype, np.integer) else 1.0  # uint8 output holds round(255 * p)

    for n_done, orientation in enumerate(orientations):
        # A transposed view turns planes along X into planes along Y, so one code path serves both.
        sparse_view = sparse if orientation == "y" else sparse.transpose(0, 2, 1)
        output_view = output if orientation == "y" else output.transpose(0, 2, 1)
        n_planes, plane_width = sparse_view.shape[1], sparse_view.shape[2]
        chunk = max(1, CHUNK_VALUES // (train_depth * depth * plane_width))
        bar = tqdm(total=n_planes, desc=f"Inference (planes along {orientation.upper()})", unit="plane",
                   disable=not progress, leave=False)
        for start in range(0, n_planes, chunk):
            planes = np.arange(start, min(start + chunk, n_planes))
            images = _plane_chunk(sparse_view, planes, offsets, factor, depth, upscale_method)
            probabilities = predict_tiled(model, images, tile_size, overlap, batch_size, device, flips)
            del images  # else it lives on while the next chunk is built: two chunks at the peak, not one
            block = probabilities.transpose(1, 0, 2)  # (D, n, L)
            if n_done:  # running mean over orientations
                current = output_view[:, planes[0]:planes[-1] + 1, :].astype(np.float32) / scale
                block = current + (block - current) / (n_done + 1)
            output_view[:, planes[0]:planes[-1] + 1, :] = np.rint(block * scale) if scale != 1.0 else block
            bar.update(len(planes))
        bar.close()
    if keep_kept_slices:
        # Slice by slice: a whole-stack ``(sparse != 0) * scale`` would be a float64 copy of every kept slice.
        for k, z in enumerate(range(0, min(n_kept * factor, depth), factor)):
            output[z] = sparse[k] != 0
            output[z] *= output.dtype.type(scale)
    return output


# --------------------------------------------------------------------------- #
# Restoring a genuinely anisotropic stack (the everyday job)
# --------------------------------------------------------------------------- #
def factor_from_voxel_size(z_step: float, xy_size: float) -> Tuple[int, float]:
    """Integer restoration factor for a Z step and a lateral pixel size.

    Non-integer ratios are rounded to the nearest integer: the restored stack
    then has ``factor`` slices per input step, each ``z_step / factor`` thick,
    which differs from ``xy_size`` by at most a third (ratio 2.5 -> 2). A
    warning states the resulting voxel size. Training degrades lateral crops
    by the same integer factor, so training and inference stay matched.

    Returns
    -------
    factor : int
    output_z_step : float
    """
    if z_step <= 0 or xy_size <= 0:
        raise ValueError(f"Voxel sizes must be positive, got Z step {z_step} and XY size {xy_size}.")
    ratio = z_step / xy_size
    factor = int(round(ratio))
    if factor < 2:
        raise ValueError(f"The Z step ({z_step}) is only {ratio:.2f} times the XY pixel size ({xy_size}): "
                         "the stack is already (nearly) isotropic and there are no slices to restore.")
    if abs(ratio - factor) > 0.01 * ratio:
        warnings.warn(f"Z/XY ratio {ratio:.3f} is not an integer; restoring {factor} slices per input step. "
                      f"Output voxel size: Z {z_step / factor:.4g} x Y {xy_size:.4g} x X {xy_size:.4g} "
                      f"({(z_step / factor) / xy_size:.3f} times XY along Z).", UserWarning, stacklevel=2)
    return factor, z_step / factor


def assign_labels(foreground_dhw: np.ndarray, sparse_labels_khw: np.ndarray, factor: int) -> np.ndarray:
    """Give every restored foreground voxel the id of the nearest labelled voxel
    in the two neighbouring kept slices (3D distance, Z step = ``factor`` voxels).

    Ids therefore only come from the kept slices: touching objects are never
    merged and an object never changes id; an object that exists in one kept
    slice only can shrink away where the foreground does.

    Parameters
    ----------
    foreground_dhw : ndarray of bool, shape (D, H, W)
    sparse_labels_khw : ndarray of uint, shape (K, H, W), 0 = background
    factor : int

    Returns
    -------
    labels_dhw : ndarray, dtype of ``sparse_labels_khw``, shape (D, H, W)
    """
    from scipy import ndimage

    depth = foreground_dhw.shape[0]
    kept_positions = np.arange(len(sparse_labels_khw)) * factor
    lower, upper, _ = bracket(kept_positions, depth)
    out = np.zeros(foreground_dhw.shape, dtype=sparse_labels_khw.dtype)
    @functools.lru_cache(maxsize=2)  # slices are visited in order: two kept slices suffice
    def nearest_label(k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Label of, and squared distance to, the nearest labelled pixel of kept slice k."""
        labels_hw = sparse_labels_khw[k]
        if not labels_hw.any():
            return np.zeros_like(labels_hw), np.full(labels_hw.shape, np.inf, np.float32)
        distance, (iy, ix) = ndimage.distance_transform_edt(labels_hw == 0, return_indices=True)
        return labels_hw[iy, ix], (distance**2).astype(np.float32)

    for z in tqdm(range(depth), desc="Assigning label ids", unit="slice", leave=False):
        label_a, dist_a = nearest_label(int(lower[z]))
        label_b, dist_b = nearest_label(int(upper[z]))
        dist_a = dist_a + float(z - kept_positions[lower[z]]) ** 2
        dist_b = dist_b + float(kept_positions[upper[z]] - z) ** 2
        out[z] = np.where(foreground_dhw[z], np.where(dist_a <= dist_b, label_a, label_b), 0)
    kept = kept_positions[kept_positions < depth]
    out[kept] = sparse_labels_khw[: len(kept)]
    return out


def restore_probabilities(sparse_khw: np.ndarray, factor: int, settings: Dict[str, Any],
                          model: Optional[nn.Module] = None, original_depth: Optional[int] = None,
                          device: Optional[torch.device] = None, out_dtype=np.float32,
                          progress: bool = True) -> Tuple[np.ndarray, nn.Module, Dict[str, Any]]:
    """Train on the kept slices (unless a model is given), then restore them.

    The one train-then-apply recipe shared by ``eval.py``, ``apply.py``,
    ``bench.py`` and ``ablation.py``.

    Parameters
    ----------
    sparse_khw : ndarray, shape (K, H, W)
        Kept slices, Z step ``factor`` (non-zero = foreground).
    factor : int
    settings : dict
        ``eval.default_settings()``-style constants (training and inference).
    model : nn.Module, optional
        A trained model; without one, a model is trained on ``sparse_khw``.
    original_depth : int, optional
        Output depth; default ``(K - 1) * factor + 1``.
    out_dtype : numpy dtype
        Probability dtype (uint8 stores 0-255).

    Returns
    -------
    probabilities : ndarray of ``out_dtype``, shape (D, H, W)
    model : the model used
    info : dict with ``train_s``, ``infer_s``, ``history`` and ``samples``
        (``None`` / 0 when a model was given)
    """
    from eval import inference_kwargs, training_kwargs
    from train import fit_on_sparse_stack

    device = device or select_device(settings.get("DEVICE") or None)
    foreground = sparse_khw if sparse_khw.dtype == bool else sparse_khw != 0
    info: Dict[str, Any] = {"train_s": 0.0, "history": None, "samples": None}
    if model is None:
        start = time.perf_counter()
        model, info["history"], info["samples"] = fit_on_sparse_stack(foreground, factor, device=device,
                                                                      progress=progress, **training_kwargs(settings))
        info["train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    probabilities = apply_model_to_stack_tiled_slice_by_slice(model, foreground, factor, original_depth=original_depth,
                                                              device=device, out_dtype=out_dtype, progress=progress,
                                                              **inference_kwargs(settings))
    info["infer_s"] = time.perf_counter() - start
    return probabilities, model, info


def threshold_probabilities(probabilities_dhw: np.ndarray, threshold: float, in_place: bool = False) -> np.ndarray:
    """Foreground mask ``p >= threshold``, slice by slice (no float copy of the
    stack); uint8 probabilities are read as 0-255.

    With ``in_place`` (uint8 probabilities only) the mask is written over the
    probabilities and returned as a bool view of the same memory: the
    probabilities are gone, and no second output-sized array is allocated.
    """
    scale = 255.0 if np.issubdtype(probabilities_dhw.dtype, np.integer) else 1.0
    if in_place and probabilities_dhw.dtype != np.uint8:
        raise ValueError("In-place thresholding needs uint8 probabilities.")
    # In place, slice z is read before it is overwritten, and 0/1 bytes are valid bools.
    mask = probabilities_dhw.view(np.bool_) if in_place else np.empty(probabilities_dhw.shape, dtype=bool)
    for z in range(len(mask)):
        np.greater_equal(probabilities_dhw[z], threshold * scale, out=mask[z])
    return mask


def restore_stack(stack_khw: np.ndarray, factor: int, settings: Dict[str, Any], model: Optional[nn.Module] = None,
                  labels: Optional[np.ndarray] = None, device: Optional[torch.device] = None,
                  probability_dtype=np.uint8, keep_probabilities: bool = True
                  ) -> Tuple[np.ndarray, Optional[np.ndarray], nn.Module, Dict[str, Any]]:
    """Restore an anisotropic stack to ``(K - 1) * factor + 1`` slices.

    Parameters
    ----------
    stack_khw : ndarray of bool, shape (K, H, W)
        The acquired slices (foreground mask).
    factor : int
    settings : dict
        ``eval.default_settings()``-style constants (training and inference).
    model : nn.Module, optional
        A trained model; without one, a model is trained on ``stack_khw``
        itself, exactly as ``eval.py`` trains.
    labels : ndarray of uint, shape (K, H, W), optional
        Instance ids of the acquired slices: ids are restored too
        (see :func:`assign_labels`).
    probability_dtype : numpy dtype
        uint8 (0-255) keeps memory at one byte per output voxel.
    keep_probabilities : bool
        False (with uint8) thresholds in place: peak memory about one byte per
        output voxel, and ``None`` is returned for the probabilities.

    Returns
    -------
    restored : ndarray, shape (D, H, W)
        bool mask, or labels of ``labels``' dtype. Input slices sit verbatim at
        ``0, factor, 2*factor, ...``.
    probabilities : ndarray of ``probability_dtype``, shape (D, H, W), or None
    model : the model used
    info : dict with ``train_s``, ``infer_s``, ``history``
    """
    probabilities, model, info = restore_probabilities(stack_khw, factor, settings, model, device=device,
                                                       out_dtype=probability_dtype)
    in_place = not keep_probabilities and probabilities.dtype == np.uint8
    restored = threshold_probabilities(probabilities, settings["PROBABILITY_THRESHOLD"], in_place=in_place)
    probabilities = None if in_place else probabilities
    if labels is not None:
        restored = assign_labels(restored, labels, factor)
    return restored, probabilities, model, info


def preview_figure(stack_khw: np.ndarray, restored_dhw: np.ndarray, factor: int, path: Path) -> None:
    """XZ section through the most populated Y row: the acquired slices drawn at
    their true Z spacing (each repeated ``factor`` times) beside the restoration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = int(np.argmax((stack_khw != 0).sum(axis=(0, 2))))
    before = np.repeat(stack_khw[:, y, :] != 0, factor, axis=0)[: restored_dhw.shape[0]]
    after = restored_dhw[:, y, :] != 0
    figure, axes = plt.subplots(2, 1, figsize=(10, 2 * 2.2 * max(after.shape[0] / after.shape[1], 0.25) + 1.2))
    for axis, image, title in zip(axes, (before, after), (f"acquired (Z step = {factor} px), XZ at y={y}",
                                                          "restored, isotropic")):
        axis.imshow(image, cmap="gray", interpolation="nearest", aspect="equal")
        axis.set_title(title, fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def expand_inputs(patterns: Sequence[str]) -> List[Path]:
    """Input paths from names or glob patterns; a clear error for each that matches nothing."""
    paths: List[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise FileNotFoundError(f"No input matches '{pattern}'.")
        paths.extend(Path(m) for m in matches)
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"Input '{path}' does not exist. Give a multipage TIFF or a folder of TIFF slices.")
    return paths


def output_path_for(input_path: Path, output: Path, n_inputs: int) -> Path:
    """Where the restored version of ``input_path`` goes."""
    if n_inputs == 1 and output.suffix.lower() in (".tif", ".tiff"):
        return output
    if output.suffix.lower() in (".tif", ".tiff"):
        raise ValueError(f"{n_inputs} inputs need an output folder, not the file '{output}'.")
    return output / f"{input_path.stem}_restored.tif"


def build_apply_parser() -> argparse.ArgumentParser:
    from eval import build_parser

    # Shared settings default to "not given", so that a saved model's recipe is only
    # overridden by flags the user actually typed.
    shared = build_parser(names=RESTORE_SETTING_NAMES, add_help=False, suppress_defaults=True)
    parser = argparse.ArgumentParser(
        parents=[shared], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Restore anisotropic binary or label stacks to isotropic voxels. Without --model, a network "
                    "is trained on each input itself (self-supervised, as in eval.py).")
    parser.add_argument("--input", nargs="+", required=True, help="multipage TIFF(s), slice folder(s) or a glob")
    parser.add_argument("--output", required=True, help="output .tif for one input, or a folder for several")
    parser.add_argument("--model", help="a model saved by eval.py or --save-model; skips training")
    parser.add_argument("--save-model", help="where to save the trained model (one input, no --model)")
    parser.add_argument("--z-step", type=float, help="Z step between slices (else read from the file's metadata)")
    parser.add_argument("--xy-size", type=float, help="lateral pixel size, same unit as --z-step")
    parser.add_argument("--unit", default=None, help="unit written to the output (default: the input's, else um)")
    parser.add_argument("--labels", choices=("auto", "yes", "no"), default="auto",
                        help="restore instance ids; auto = when an integer stack has more than two values")
    parser.add_argument("--save-probabilities", choices=("none", "uint8", "float16"), default="none",
                        help="also write the foreground probability stack next to the output: uint8 (0-255, one "
                             "byte per voxel) or float16 (held as float16, written as 32-bit float for ImageJ)")
    parser.add_argument("--preview", action="store_true",
                        help="also save <output>_preview.png: an XZ section before and after restoration")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--device", default="", help="cpu or cuda; default CUDA when available")
    return parser


def restore_files(args: argparse.Namespace) -> None:
    """Restore every input of the command line. Inputs, outputs, voxel sizes and
    settings are all checked before any long work starts."""
    from data import read_calibration, read_mask_or_labels, save_stack, stack_shape
    from eval import default_settings, model_config, validate_settings
    from model import load_model, save_model
    from train import check_crop_size

    inputs = expand_inputs(args.input)
    output = Path(args.output)
    if args.save_model and (len(inputs) > 1 or args.model):
        raise ValueError("--save-model keeps the model trained on one input; it cannot be combined with --model "
                         "or several inputs.")
    if (args.z_step is None) != (args.xy_size is None):
        raise ValueError("Give both --z-step and --xy-size, or neither (then they are read from the file).")
    targets = [output_path_for(p, output, len(inputs)) for p in inputs]
    if len(set(targets)) < len(targets):
        raise ValueError("Several inputs would be written to the same output name; give inputs with distinct "
                         "names or restore them in separate calls.")
    extra = [t.with_name(t.stem + "_probabilities.tif") for t in targets] if args.save_probabilities != "none" else []
    extra += [t.with_name(t.stem + "_preview.png") for t in targets] if args.preview else []
    extra += [Path(args.save_model)] if args.save_model else []
    clashes = [str(t) for t in targets + extra if t.exists()]
    if clashes and not args.overwrite:
        raise FileExistsError(f"Output exists: {', '.join(clashes)}. Choose another --output or pass --overwrite.")

    settings = default_settings()
    model, saved_config = load_model(args.model, args.device or None) if args.model else (None, {})
    # A saved model brings its own recipe (channels, interpolation, ...); flags typed by the user win.
    settings.update({key.upper(): value for key, value in saved_config.items() if key.upper() in settings})
    settings.update({name: getattr(args, name) for name in RESTORE_SETTING_NAMES if hasattr(args, name)})
    settings["DEVICE"] = args.device
    if model is not None:
        settings["TRAIN_Z_SIZE"] = model.architecture["in_channels"]
    validate_settings(settings)

    plans = []
    for path in inputs:
        calibration = read_calibration(path)
        if args.z_step is not None:
            z_step, y_size, xy_size = args.z_step, args.xy_size, args.xy_size
        elif calibration is None:
            raise ValueError(f"'{path}' carries no voxel size (ImageJ spacing + resolution, or OME "
                             "PhysicalSizeZ/X). Pass --z-step and --xy-size, or set the voxel size in "
                             "Fiji (Image > Properties) and save again.")
        else:
            z_step, y_size, xy_size = calibration[0]
        factor, out_z = factor_from_voxel_size(z_step, xy_size)
        shape = stack_shape(path)
        if model is None:
            check_crop_size(shape, (settings["TRAIN_Z_SIZE"], settings["TRAIN_XY_SIZE"], settings["TRAIN_XY_SIZE"]),
                            factor)
        elif saved_config.get("factor") not in (None, factor):
            warnings.warn(f"The model was trained at factor {saved_config['factor']}; '{path}' needs {factor}.")
        unit = args.unit or (calibration[1] if calibration else None) or "um"
        plans.append((path, factor, (out_z, y_size, xy_size), unit))

    threshold = settings["BINARIZE_THRESHOLD"] if settings["BINARIZE_THRESHOLD"] >= 0 else None
    for (path, factor, voxel, unit), target in zip(plans, targets):
        mask, labels = read_mask_or_labels(path, threshold, args.labels)
        print(f"{path.name}: {mask.shape} (Z, Y, X), factor {factor} -> {(mask.shape[0] - 1) * factor + 1} slices")
        restored, probabilities, used_model, info = restore_stack(
            mask, factor, settings, model=model, labels=labels,
            probability_dtype=np.float16 if args.save_probabilities == "float16" else np.uint8,
            keep_probabilities=args.save_probabilities != "none")
        save_stack(target, restored, voxel, unit, overwrite=args.overwrite)
        if args.save_probabilities != "none":
            save_stack(target.with_name(target.stem + "_probabilities.tif"), probabilities, voxel, unit,
                       overwrite=args.overwrite)
        if args.preview:
            preview_figure(mask, restored, factor, target.with_name(target.stem + "_preview.png"))
        if args.save_model:
            save_model(args.save_model, used_model, model_config(settings, factor), overwrite=args.overwrite)
        print(f"Wrote {target} (voxel {voxel[0]:.4g} x {voxel[1]:.4g} x {voxel[2]:.4g} {unit}); "
              f"training {info['train_s']:.0f} s, restoring {info['infer_s']:.0f} s.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python apply.py --input STACK --output OUT.tif``: see ``--help``."""
    from eval import run_cli

    return run_cli(restore_files, build_apply_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
