"""The restore engine: from the kept slices of a stack to its isotropic probabilities.

The network was trained on lateral crops degraded along their height. At
inference the stack is upsampled along Z with the same interpolation and cut
into 2D planes in which Z is the height axis: ``(Z, X)`` planes along Y and
``(Z, Y)`` planes along X. Both orientations are predicted with the one tiling
function, :func:`predict_tiled`, and their probabilities are averaged.

One kernel, :func:`restore_block`, restores one lateral *region* of the output
(all of Z) from a *read window* of the kept slices, on the global tile grid of
the whole stack: the in-memory restore is the block that covers everything, and
the block-wise restore of large volumes (``blocks.py``) runs the same kernel
block by block, so its result does not depend on the block size. The kernel is
written in torch: on a GPU the kept slices go to the device once and only the
probabilities come back; on a CPU the same code runs with bfloat16 where the
processor has native support.

``factor`` is the Z step of the kept slices in output slices: an integer (kept
slice k is output slice ``k * factor``, copied verbatim), or, for an isotropic
output at a non-integer Z/XY ratio, the ratio itself: kept slices then fall
between output slices (:func:`morph.kept_positions`), the upscaling blends
towards their true positions, and only those that land on an output slice
(:func:`morph.slices_on_grid`) are copied.

This module also holds the train-then-restore recipe shared by every script
(:func:`train_on_stack`, :func:`restore_probabilities`, :func:`restore_intensity`,
:func:`restore_dense_labels`, :func:`restore_stack`: the library a notebook calls, which checks its
arguments at the boundary, :func:`check_stack`, :func:`check_factor`, :func:`check_labels`,
:func:`check_model_for`) and the translation of the settings model (``settings.Settings``) into the
engine's arguments. The label ids of the restored voxels are ``labeling.py``'s
(:func:`labeling.assign_labels`, :func:`labeling.grow_labels`; the restore
functions here call them). It imports nothing above it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from data import INTEGER_RATIO_TOLERANCE, UserError
from kinds import refuse_non_finite
from labeling import assign_labels, grow_labels, is_dense_label_image
from settings import FIELDS, FITTED_TO, TRAINS_AS, Inference, Settings, SettingsLike, Training, as_settings
from model import autocast, compile_for_inference, fuse_for_inference, resolve_precision, select_device
from morph import (bracket, interpolate_along_axis, is_integer_factor, kept_positions, label_boundaries, mix_interfaces,
                   restored_depth, row_interfaces, slices_on_grid)

ORIENTATIONS = ("y", "x")
# Test-time flips of a tile (axes of its (H, W) plane: Z and the lateral axis), averaged by :func:`predict_tiled`.
TEST_TIME_FLIPS = ((), (-1,), (-2,), (-2, -1))
# Network inputs built at a time (values, 16 MB as float32): memory is the output plus a few of these.
CHUNK_VALUES = 4_000_000
# On a CPU, tiles per forward pass are capped at this many pixels (at least two tiles): the default
# network's full-resolution activations then stay in cache and under glibc's mmap threshold, above which
# every activation is freshly mapped, page-faulting memory (docs/speed.md, "Batches sized for the CPU's
# caches"). The default is settings.Inference.batch_pixels.
CPU_BATCH_PIXELS = Inference.batch_pixels

# --------------------------------------------------------------------------- #
# The recipe: settings.Settings as the engine's arguments
# --------------------------------------------------------------------------- #
def training_kwargs(settings: SettingsLike = None, kind: str = "mask") -> Dict[str, Any]:
    """The training recipe of ``settings`` as keyword arguments of ``train.fit_on_sparse_stack``.

    "By kind" values (``TRAIN_NB``, ``NUM_EPOCHS``, ``LEARNING_RATE``, ``CROP_POOL``) become the recipe of
    ``kind`` ('mask', 'dense labels' or 'intensity', :func:`training_kind`; :data:`settings.RECIPE_BY_KIND`,
    with :data:`settings.FINE_TUNING_EPOCHS` where the training starts from the phantom-trained model,
    :func:`training_start`; the crops at most 4 draws per distinct crop of the stack the settings were fitted
    to, :func:`train.training_recipe`); other values are used as given.
    """
    from train import training_recipe

    training, network = training_recipe(settings, kind)
    return {**dataclasses.asdict(training), **dataclasses.asdict(network)}


def training_start(recipe: SettingsLike = None, kind: str = "mask") -> Tuple[bool, str]:
    """Whether a training with ``recipe`` fine-tunes the phantom-trained starting model (else random
    weights), and the plan's line saying so."""
    from train import starting_point

    recipe = as_settings(recipe)
    state, reason = starting_point(recipe.training, recipe.network, kind)
    return state is not None, reason


def training_kind(kind: str, dense_labels: bool = False) -> str:
    """The kind whose "by kind" training recipe applies (``settings.RECIPE_BY_KIND``): the boundaries of a
    dense label image train as 'dense labels', other label images as the mask of their objects."""
    kind = inference_kind(kind, dense_labels)
    return TRAINS_AS.get(kind, kind)


def inference_kind(kind: str, dense_labels: bool = False) -> str:
    """The kind whose "by kind" inference settings apply (``settings.TTA_BY_KIND``): a dense label image
    restores the boundaries between its ids, 'dense labels'."""
    return "dense labels" if dense_labels else kind


def inference_kwargs(settings: SettingsLike = None, model: Optional[nn.Module] = None,
                     kind: str = "mask") -> Dict[str, Any]:
    """Keyword arguments of :func:`restore_block` from ``settings``; with ``model``, the channel planes
    are those the model takes (a recipe fitted to a small stack may have fewer). Test-time flips and the
    channel planes' spacing "by kind" (``settings.Inference.flips_for``, ``stride_fraction_for``) follow
    ``kind`` ('mask', 'labels', 'dense labels' or 'intensity'), which a model of the other output (grey
    values or not) overrules."""
    settings = as_settings(settings)
    training, inference = settings.training, settings.inference
    architecture = getattr(model, "architecture", {})
    if architecture and (architecture.get("output") == "intensity") != (kind == "intensity"):
        kind = "intensity" if architecture.get("output") == "intensity" else "mask"
    return dict(
        train_depth=architecture.get("in_channels", training.train_z_size), upscale_method=training.upscale_method,
        precision=training.precision, tile_size=max(inference.tile_size, training.train_xy_size),
        batch_size=inference.batch_size, batch_pixels=inference.batch_pixels,
        channel_stride=inference.channel_stride, stride_fraction=inference.stride_fraction_for(kind),
        orientations=tuple(inference.orientations),
        flips=TEST_TIME_FLIPS if inference.flips_for(kind) else ((),),
        keep_kept_slices=inference.keep_kept_slices, skip_empty=inference.skip_empty_tiles,
        compile=inference.compile, interfaces=uses_interfaces(settings, kind))


def tiles_per_batch(batch_size: int, batch_pixels: int, tile_pixels: int, device_type: str = "cpu") -> int:
    """Tiles the network runs at once: ``batch_size``, on a CPU at most ``batch_pixels`` pixels (at least 2 tiles),
    so that a batch stays in the caches; the memory estimates count the same batch."""
    if device_type == "cpu" and batch_pixels > 0:
        return min(batch_size, max(2, batch_pixels // tile_pixels))
    return batch_size


def uses_interfaces(settings: SettingsLike = None, kind: str = "mask") -> bool:
    """Whether a network of ``kind`` with these settings takes the input with interfaces: the boundaries of a
    dense label image ('dense labels') with ``BOUNDARY_INPUT`` 'interfaces'."""
    return kind == "dense labels" and as_settings(settings).training.boundary_input == "interfaces"


def fit_recipe_to_stack(settings: Union[Settings, Mapping[str, Any]], shape_khw: Sequence[int], factor: float,
                        typed: Sequence[str] = (), kind: str = "mask"
                        ) -> Tuple[Union[Settings, Dict[str, Any]], List[str]]:
    """The training recipe of ``settings`` fitted to a stack of kept slices ``shape_khw``.

    A stack smaller than the recipe trains on what it holds: ``TRAIN_XY_SIZE``
    becomes the largest crop edge that fits (a multiple the network accepts),
    ``TRAIN_Z_SIZE`` the largest odd number of kept slices, and a ``TRAIN_NB``
    set to a number at most ``train.DRAWS_PER_DISTINCT_CROP`` draws per distinct
    crop the stack offers (so a small stack trains in seconds; ``TRAIN_NB`` "by
    kind" stays ``None``, and :func:`train.training_recipe` caps the kind's number
    the same way). Settings named in ``typed`` (given by the user) are never
    changed: one that does not fit is an error.

    Parameters
    ----------
    settings : Settings, or a dict of ``eval.py``-style constants
    shape_khw : (K, H, W) of the kept slices
    factor : float
    typed : names of settings the user gave explicitly (``TRAIN_NB``, ...)
    kind : str
        What the network will be trained for ('mask', 'dense labels', 'intensity'), for the note on
        ``TRAIN_NB`` "by kind": that stays ``None`` in the settings, and :func:`train.training_recipe`
        caps the kind's number of crops the same way.

    Returns
    -------
    settings : a copy, fitted and marked as fitted (``Settings.fitted_to``); a dict for a dict
    notes : one sentence per setting changed, for the plan

    Raises
    ------
    UserError
        The stack is smaller than the smallest that trains (2 kept slices,
        :func:`train.smallest_crop_edge` pixels), or a typed setting does not fit.
    """
    if not isinstance(settings, Settings):  # the dict view in, the dict view out
        fitted, notes = fit_recipe_to_stack(Settings.from_dict(settings), shape_khw, factor, typed, kind)
        changed = ("TRAIN_XY_SIZE", "TRAIN_Z_SIZE", "TRAIN_NB", FITTED_TO)
        return dict(settings, **{name: fitted[name] for name in changed}), notes
    from train import DRAWS_PER_DISTINCT_CROP, check_crop_size, largest_crop_edge, most_draws, smallest_crop_edge

    n_kept, height, width = (int(s) for s in shape_khw)
    stack = (n_kept, height, width, factor_value(factor))
    if settings.fitted_to == stack:
        return settings, []  # fitted already, with the caller's typed names
    training, depth = settings.training, settings.network.depth
    smallest = smallest_crop_edge(factor, depth)
    if n_kept < 2 or min(height, width) < smallest:
        raise UserError(f"A stack of {n_kept} kept slices of {height} x {width} pixels is too small to train on at "
                        f"factor {factor}: it needs at least 2 slices of {smallest} x {smallest} pixels. Restore it "
                        "with a model trained on a larger stack of the same kind (--model).")
    fitted, notes = {}, []
    if training.train_z_size > n_kept and "TRAIN_Z_SIZE" not in typed:
        fitted["train_z_size"] = n_kept if n_kept % 2 else n_kept - 1
        notes.append(f"TRAIN_Z_SIZE {training.train_z_size} -> {fitted['train_z_size']}: the stack has "
                     f"{n_kept} slices")
    edge = largest_crop_edge(height, width, depth)
    if training.train_xy_size > edge and "TRAIN_XY_SIZE" not in typed:
        fitted["train_xy_size"] = edge
        notes.append(f"TRAIN_XY_SIZE {training.train_xy_size} -> {edge}: the slices are {height} x {width} pixels")
    crop_zyx = (fitted.get("train_z_size", training.train_z_size),) + (fitted.get("train_xy_size",
                                                                                 training.train_xy_size),) * 2
    check_crop_size((n_kept, height, width), crop_zyx, factor)
    most = most_draws((n_kept, height, width), crop_zyx, factor, training.lateral_axes, depth)
    # "By kind" (None) stays so, and train.training_recipe caps the kind's number the same way.
    wanted = training.for_kind(kind).train_nb
    if wanted > most and ("TRAIN_NB" not in typed or training.train_nb is None):  # typed 0 is "by kind"
        if training.train_nb is not None:
            fitted["train_nb"] = most
        notes.append(f"TRAIN_NB {wanted} -> {most}: the stack offers "
                     f"{most // DRAWS_PER_DISTINCT_CROP} distinct crops")
    return dataclasses.replace(settings, training=dataclasses.replace(training, **fitted), fitted_to=stack), notes


# The "by kind" training settings a model records as the numbers its training used (kind given to model_config).
RESOLVED_IN_RECORD = ("train_nb", "num_epochs", "learning_rate", "crop_pool")


def model_config(settings: SettingsLike, factor: float, kind: Optional[str] = None) -> Dict[str, Any]:
    """What a saved model keeps: the recipe it was trained with (:meth:`Settings.model_record`) and
    the factor; a restore reads back the settings marked ``model="read"``. With the training's ``kind``
    (:func:`training_kind`), the "by kind" training settings are recorded as the values it used (crops
    after the small-stack cap, epochs, learning rate, crop pool) instead of ``None``."""
    settings = as_settings(settings)
    record = settings.model_record()
    if kind is not None:
        trained = training_kwargs(settings, kind)
        record.update({name: trained[name] for name in RESOLVED_IN_RECORD})
    return dict(record, factor=factor_value(factor))


def factor_value(factor: float) -> Union[int, float]:
    """The factor as recorded (a saved model, a plan, an output's record): an int where it is one."""
    return int(round(factor)) if is_integer_factor(factor) else float(factor)


def channel_stride(factor: float, fraction: float = 1.0) -> int:
    """Spacing of the neighbouring planes fed as channels at inference, in whole voxels: ``fraction`` of the
    factor, rounded to the nearest (Python's ``round``: halves to even, 2.5 -> 2, 3.5 -> 4), at least 1. The
    kept slices the network trained on were ``factor`` voxels apart (``fraction`` 1, the training geometry,
    rounded as it always was); masks and labels are restored with planes half as far apart
    (``settings.STRIDE_BY_KIND``)."""
    return max(1, int(round(factor * fraction)))


def planes_apart(stride: Optional[int], factor: float, fraction: float = 1.0) -> int:
    """The channel planes' spacing in voxels as the kernel runs it: a set ``CHANNEL_STRIDE`` (``stride``; 0 and
    None mean the rule), else :func:`channel_stride` of the factor."""
    return int(stride) if stride else channel_stride(factor, fraction)


# --------------------------------------------------------------------------- #
# Geometry: upscaling, mirrored channel planes, the tile grid
# --------------------------------------------------------------------------- #
def upscale_height(sparse: np.ndarray, factor: float, original_depth: Optional[int] = None, axis: int = 0,
                   method: str = "linear") -> np.ndarray:
    """Upsample the sparse axis of a stack (kept slices at ``0, factor, ...``).

    The interpolation is :func:`morph.interpolate_along_axis`, the function
    that also degrades training inputs (``train.downscale_upscale_height``);
    :func:`upscale_along_z` is its torch twin used inside the engine.

    Parameters
    ----------
    sparse : ndarray, shape (K, ...) along ``axis``
    factor : float
    original_depth : int, optional
        Output length; default ``floor((K - 1) * factor) + 1`` (:func:`morph.restored_depth`). Slices
        after the last kept one copy it.
    axis : int
        The sparse axis.
    method : {'linear', 'nearest'}

    Returns
    -------
    ndarray of float32 ('linear') with ``axis`` of length ``original_depth``.
    """
    n_kept = sparse.shape[axis]
    depth = restored_depth(n_kept, factor) if original_depth is None else int(original_depth)
    return interpolate_along_axis(sparse, kept_positions(n_kept, factor), depth, axis=axis, method=method)


def upscale_along_z(sparse: torch.Tensor, factor: float, depth: int, method: str = "linear") -> torch.Tensor:
    """Torch twin of :func:`upscale_height` along dim 0, for the engine (any device).

    The arithmetic is the one of ``morph.interpolate_along_axis`` (``low +
    weight * (high - low)`` in float32), so both give the same values.
    """
    lower, upper, weight = bracket(kept_positions(sparse.shape[0], factor), depth)
    if method == "nearest":
        return sparse[torch.from_numpy(np.where(weight <= 0.5, lower, upper)).to(sparse.device)].float()
    if method != "linear":
        raise ValueError(f"The engine upscales with 'linear' or 'nearest', got '{method}'.")
    low = sparse[torch.from_numpy(lower).to(sparse.device)].float()
    out = sparse[torch.from_numpy(upper).to(sparse.device)].float()
    out -= low
    out *= torch.from_numpy(weight).to(sparse.device).view((-1,) + (1,) * (sparse.ndim - 1))
    out += low
    return out


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


@dataclass(frozen=True)
class TileGrid:
    """The tiles along one image axis that a region needs, on the axis' global grid.

    ``starts`` are relative to ``lo``: the image handed to :func:`predict_tiled`
    spans ``[lo, hi)`` of the global axis, the output keeps ``[keep_lo, keep_hi)``
    of that image.
    """
    lo: int
    hi: int
    tile: int
    starts: np.ndarray
    keep_lo: int
    keep_hi: int


MAX_OVERLAP = 64  # pixels of tile overlap: a few times the network's border effects, whatever the tile size


def default_overlap(tile_size: int) -> int:
    """Tile overlap used when none is given: a quarter tile, at most ``MAX_OVERLAP``."""
    return min(tile_size // 4, MAX_OVERLAP)


def fitted_tile(size: int, tile_size: int, overlap: int) -> Tuple[int, int]:
    """Tile length and overlap along an axis of ``size``: as few tiles as ``tile_size``
    allows, each shrunk so that together they just cover the axis.

    A 1024-pixel axis with 768-pixel tiles takes two tiles of 544 (overlap 64)
    rather than two of 768 (1.5 times the pixels): work follows the image, not
    the tile size.
    """
    tile = min(tile_size, size)
    overlap = min(overlap, tile // 2)
    if size <= tile:
        return size, overlap
    n_tiles = math.ceil((size - overlap) / (tile - overlap))
    return min(tile, math.ceil((size + (n_tiles - 1) * overlap) / n_tiles)), overlap


def tile_grid(size: int, tile_size: int, overlap: int, region: Tuple[int, int]) -> TileGrid:
    """Tiles of the global grid over ``[0, size)`` that overlap ``region = (start, stop)``.

    Every output pixel of the region then gets the blend of exactly the tiles
    that cover it in the whole image, so a region restores identically alone
    or as part of the whole.
    """
    tile, overlap = fitted_tile(size, tile_size, overlap)
    starts = tile_starts(size, tile, overlap)
    start, stop = region
    needed = starts[(starts < stop) & (starts + tile > start)]
    lo, hi = int(needed[0]), int(needed[-1]) + tile
    return TileGrid(lo, hi, tile, needed - lo, start - lo, stop - lo)


def channel_offsets(train_depth: int, stride: int) -> np.ndarray:
    """Plane offsets of the network's input channels: ``(c - C // 2) * stride``."""
    return (np.arange(train_depth) - train_depth // 2) * stride


def read_window(global_hw: Tuple[int, int], region_yx: Tuple[Tuple[int, int], Tuple[int, int]], train_depth: int,
                stride: int, tile_size: int, overlap: Optional[int] = None, orientations: Sequence[str] = ORIENTATIONS) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """The lateral window of kept slices that restoring ``region_yx`` reads.

    Along the plane axis of an orientation: the region's planes plus the
    channel planes (``train_depth // 2 * stride`` either side, mirrored at the
    stack's borders); along its image axis: the tiles of the global grid that
    overlap the region.

    Returns
    -------
    ((y0, y1), (x0, x1)) : global index ranges
    """
    overlap = default_overlap(tile_size) if overlap is None else overlap
    halo = (train_depth // 2) * stride
    ranges = [list(region_yx[0]), list(region_yx[1])]
    window = [[r[0], r[1]] for r in ranges]
    for orientation in orientations:
        plane_axis, image_axis = (0, 1) if orientation == "y" else (1, 0)
        lo, hi = ranges[plane_axis]
        window[plane_axis] = [min(window[plane_axis][0], max(0, lo - halo)),
                              max(window[plane_axis][1], min(global_hw[plane_axis], hi + halo))]
        grid = tile_grid(global_hw[image_axis], tile_size, overlap, tuple(ranges[image_axis]))
        window[image_axis] = [min(window[image_axis][0], grid.lo), max(window[image_axis][1], grid.hi)]
    return (window[0][0], window[0][1]), (window[1][0], window[1][1])


# The distance cap of the interfaces along a plane (morph.fill_label_rows): what a restored pixel's interfaces
# depend on stays local, as for the shape-based interfaces where the ids grow (SHAPE_PRIOR_CAP).
INTERFACES_CAP = 16.0


def interfaces_reach() -> int:
    """How far, in pixels along a plane's width, the interfaces at a pixel depend on the kept ids: the distance
    cap of :func:`morph.fill_label_rows`, one pixel for :func:`label_boundaries` and one to spare. Ids read that
    far around what the engine reads give the whole slices' interfaces."""
    return int(np.ceil(INTERFACES_CAP)) + 2


@dataclass(frozen=True)
class LabelWindow:
    """The kept ids of a dense label image over a lateral window, for a kernel that takes interfaces
    (:attr:`Kernel.interfaces`): ``ids`` (K, h, w) whose first row and column are global ``origin`` (y, x). It
    must hold the engine's read window and reach :func:`interfaces_reach` pixels beyond it wherever that is not
    the stack's edge."""
    ids: np.ndarray
    origin: Tuple[int, int] = (0, 0)


def _chunk_interfaces(labels: LabelWindow, orientation: str, planes_global: np.ndarray, columns: Tuple[int, int],
                      factor: float, depth: int, width_global: int) -> np.ndarray:
    """The interfaces half of the boundary input for some planes of one orientation (global plane indices,
    mirrored ones included; global ``columns`` along the planes' width): each plane is filled between its kept
    slices by per-label shape-based interpolation along its width (:func:`morph.row_interfaces`), the very
    degradation a training crop's rows get (``train.degrade_label_interfaces``), and the boundaries between its
    ids are marked in the plane. Returns bool ``(D, n, c1 - c0)``."""
    ids = labels.ids if orientation == "y" else labels.ids.transpose(0, 2, 1)
    origin_p, origin_l = labels.origin if orientation == "y" else labels.origin[::-1]
    reach = interfaces_reach()
    lo, hi = max(0, columns[0] - reach), min(width_global, columns[1] + reach)
    if lo < origin_l or hi > origin_l + ids.shape[2]:
        raise ValueError(f"The ids' window (columns {origin_l}..{origin_l + ids.shape[2]}) must reach "
                         f"{reach} pixels around the columns read ({columns[0]}..{columns[1]}).")
    # Neighbouring planes share their channel planes: each distinct plane is filled once.
    distinct, copies = np.unique(planes_global, return_inverse=True)
    rows = ids[:, distinct - origin_p, lo - origin_l:hi - origin_l].transpose(1, 0, 2)  # (planes, K, width)
    filled = row_interfaces(rows, kept_positions(ids.shape[0], factor), depth, INTERFACES_CAP)
    return filled[copies.ravel(), :, columns[0] - lo:columns[1] - lo].transpose(1, 0, 2)


# --------------------------------------------------------------------------- #
# Precision and the tiling function
# --------------------------------------------------------------------------- #
def _tile_sums(occupied: torch.Tensor, starts_h: np.ndarray, starts_w: np.ndarray, tile_h: int,
               tile_w: int) -> torch.Tensor:
    """Count of occupied pixels in every tile ``(N, n_h, n_w)`` from one summed-area table."""
    table = torch.nn.functional.pad(occupied.to(torch.int32).cumsum(1).cumsum(2), (1, 0, 1, 0))
    y0, x0 = (torch.from_numpy(s).to(occupied.device) for s in (starts_h, starts_w))
    y1, x1 = y0 + tile_h, x0 + tile_w
    return (table[:, y1][:, :, x1] - table[:, y0][:, :, x1] - table[:, y1][:, :, x0] + table[:, y0][:, :, x0])


@torch.inference_mode()
def predict_tiled(model: nn.Module, images_nchw: Union[np.ndarray, torch.Tensor], tile_size: int, overlap: int,
                  batch_size: int,
                  device: Optional[torch.device] = None, flips: Sequence[Tuple[int, ...]] = ((),),
                  precision: str = "fp32", skip_empty: bool = True, batch_pixels: int = CPU_BATCH_PIXELS,
                  grids: Optional[Tuple[TileGrid, TileGrid]] = None, activation=torch.sigmoid,
                  stats: Optional[Dict[str, int]] = None) -> Union[np.ndarray, torch.Tensor]:
    """Probabilities of 2D images, tiled with smooth blending.

    Every image is cut into ``tile_size`` tiles (smaller images are one tile)
    overlapping by ``overlap`` pixels; tiles of all images are batched
    together, and overlapping predictions are blended with a cosine window so
    no seams show. This is the one function that owns tiling, overlap and
    blending.

    Parameters
    ----------
    model : nn.Module returning logits ``(N, 1, h, w)``
    images_nchw : ndarray or tensor of float32, shape (N, C, H, W)
    tile_size, overlap, batch_size : int
    batch_pixels : int
        On a CPU, at most this many pixels per forward pass, but at least two
        tiles (:data:`CPU_BATCH_PIXELS`); 0 = ``batch_size`` tiles. Ignored on a GPU.
    flips : sequence of tuples of axes
        Test-time augmentation: each entry flips the tile along those axes
        (-2 = height, -1 = width) and the predictions are averaged.
    precision : {'fp32', 'bf16', 'auto'}
    skip_empty : bool
        A tile that is zero in every channel gives the output of the model on
        zeros, computed once: such tiles are not run (exact, not approximate).
    grids : (TileGrid, TileGrid), optional
        The tiles along height and width (see :func:`tile_grid`); default: the
        image's own grid. The output is cropped to the grids' kept range.
    activation : callable
        Applied to the logits (sigmoid: foreground probability).
    stats : dict, optional
        Counters to add to: ``tiles_run``, ``tiles_skipped``, ``pixels_run``
        (pixels through the network, flips included), for throughput reports.

    Returns
    -------
    probabilities : same type as ``images_nchw`` (ndarray or tensor on the
        images' device), float32, shape (N, keep_h, keep_w)
    """
    as_numpy = isinstance(images_nchw, np.ndarray)
    device = device or next(model.parameters()).device
    images = torch.from_numpy(images_nchw) if as_numpy else images_nchw
    images = images.to(device)
    n_images, n_channels, height, width = images.shape
    if grids is None:
        grids = (tile_grid(height, tile_size, overlap, (0, height)), tile_grid(width, tile_size, overlap, (0, width)))
    grid_h, grid_w = grids
    tile_h, tile_w = grid_h.tile, grid_w.tile
    compute_dtype = resolve_precision(precision, device)
    batch_size = tiles_per_batch(batch_size, batch_pixels, tile_h * tile_w, device.type)
    window = torch.from_numpy(blending_window(tile_h, tile_w)).to(device)
    weights = torch.zeros((height, width), device=device)
    for y in grid_h.starts:
        for x in grid_w.starts:
            weights[y:y + tile_h, x:x + tile_w] += window
    summed = torch.zeros((n_images, height, width), device=device)
    positions = [(i, int(y), int(x)) for i in range(n_images) for y in grid_h.starts for x in grid_w.starts]

    def run(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.contiguous(memory_format=torch.channels_last)
        out = torch.zeros((len(batch), tile_h, tile_w), device=device)
        with autocast(device, compute_dtype):
            for dims in flips:
                flipped = torch.flip(batch, dims) if dims else batch
                prediction = activation(model(flipped)[:, 0].float())
                out += torch.flip(prediction, dims) if dims else prediction
        return out / len(flips) * window

    if skip_empty:
        counts = _tile_sums(images.ne(0).any(dim=1), grid_h.starts, grid_w.starts, tile_h, tile_w).cpu().numpy()
        empty = counts.reshape(-1) == 0
        if empty.any():
            blank = run(torch.zeros((1, n_channels, tile_h, tile_w), device=device))[0]
            for (i, y, x) in (p for p, e in zip(positions, empty) if e):
                summed[i, y:y + tile_h, x:x + tile_w] += blank
        positions = [p for p, e in zip(positions, empty) if not e]
    if stats is not None:
        n_skipped = n_images * len(grid_h.starts) * len(grid_w.starts) - len(positions)
        stats["tiles_skipped"] = stats.get("tiles_skipped", 0) + n_skipped
        stats["tiles_run"] = stats.get("tiles_run", 0) + len(positions)
        stats["pixels_run"] = stats.get("pixels_run", 0) + len(positions) * tile_h * tile_w * len(flips)
    for start in range(0, len(positions), batch_size):
        batch = positions[start:start + batch_size]
        tiles = run(torch.stack([images[i, :, y:y + tile_h, x:x + tile_w] for i, y, x in batch]))
        for (i, y, x), tile in zip(batch, tiles):
            summed[i, y:y + tile_h, x:x + tile_w] += tile
    summed /= weights
    summed = summed[:, grid_h.keep_lo:grid_h.keep_hi, grid_w.keep_lo:grid_w.keep_hi]
    return summed.cpu().numpy() if as_numpy else summed


# --------------------------------------------------------------------------- #
# The kernel: one lateral region, every orientation, from its read window
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Kernel:
    """How :func:`restore_block` applies a network: the inference settings resolved for one model
    (:func:`inference_options` builds it from ``settings.Settings``).

    Attributes
    ----------
    train_depth : int
        Channels of the model (``TRAIN_Z_SIZE``), odd.
    tile_size : int
        Tile edge (``TRAIN_XY_SIZE`` or larger); planes larger than this are tiled.
    batch_size : int
        Tiles per forward pass (on a CPU, see ``batch_pixels``).
    channel_stride : int, optional
        Spacing of the neighbouring planes used as channels, in voxels. None:
        ``stride_fraction`` of the factor (:func:`channel_stride`).
    stride_fraction : float
        With ``channel_stride`` None, the spacing as a fraction of the factor: 1,
        the default here, is the geometry the network trained on (kept slices
        ``factor`` voxels apart); the command line restores masks and labels at
        0.5 (``settings.STRIDE_BY_KIND``).
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
        Tile overlap in pixels; default a quarter tile, at most ``MAX_OVERLAP``.
    precision : {'fp32', 'bf16', 'auto'}
        Compute dtype of the network ('auto': bfloat16 where native).
    skip_empty : bool
        Skip tiles that are zero in every channel (exact, see :func:`predict_tiled`).
    compile : bool
        Run the network compiled (:func:`model.compile_for_inference`): a faster
        forward pass after a compilation per tile shape, cached across calls.
    batch_pixels : int
        On a CPU, at most this many pixels per forward pass, but at least two
        tiles (:data:`CPU_BATCH_PIXELS`: activations that stay in cache); 0 = no cap.
    interfaces : bool
        The network restores a dense label image's boundaries from the input with interfaces
        (``BOUNDARY_INPUT`` 'interfaces', :func:`_chunk_interfaces`): :func:`restore_block` then needs the
        kept slices' ids.
    """
    train_depth: int
    tile_size: int
    batch_size: int = Inference.batch_size
    channel_stride: Optional[int] = None
    stride_fraction: float = 1.0
    orientations: Sequence[str] = ORIENTATIONS
    flips: Sequence[Tuple[int, ...]] = ((),)
    keep_kept_slices: bool = Inference.keep_kept_slices
    upscale_method: str = Training.upscale_method
    overlap: Optional[int] = None
    precision: str = "fp32"  # the library's reference arithmetic; the command line's is Training.precision
    skip_empty: bool = Inference.skip_empty_tiles
    compile: bool = Inference.compile
    batch_pixels: int = CPU_BATCH_PIXELS
    interfaces: bool = False

    def __post_init__(self) -> None:
        if self.train_depth % 2 == 0:
            raise UserError(f"train_depth (TRAIN_Z_SIZE) must be odd, got {self.train_depth}.")
        unknown = set(self.orientations) - set(ORIENTATIONS)
        if unknown or not self.orientations:
            raise UserError(f"orientations must be a non-empty subset of {ORIENTATIONS}, got {self.orientations}.")

    def stride_for(self, factor: float) -> int:
        """The channel planes' spacing in voxels at ``factor``."""
        return planes_apart(self.channel_stride, factor, self.stride_fraction)

    @property
    def tile_overlap(self) -> int:
        return default_overlap(self.tile_size) if self.overlap is None else self.overlap


def inference_options(settings: SettingsLike = None, model: Optional[nn.Module] = None,
                      kind: str = "mask") -> Kernel:
    """:class:`Kernel` of ``settings`` (see :func:`inference_kwargs`)."""
    return Kernel(**inference_kwargs(settings, model, kind))


def _kernel(kernel: Optional[Kernel], options: Dict[str, Any]) -> Kernel:
    """``kernel`` with ``options`` (Kernel fields given as keywords) applied; one of them at least."""
    if kernel is None:
        return Kernel(**options)
    return dataclasses.replace(kernel, **options) if options else kernel


def _as_engine_tensor(sparse: np.ndarray, device: torch.device) -> torch.Tensor:
    """Kept slices on the device: masks as one byte per voxel (0/1), intensities as float32."""
    array = np.asarray(sparse)
    if not np.issubdtype(array.dtype, np.floating):
        array = array != 0
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def _identity(values: torch.Tensor) -> torch.Tensor:
    return values


def _network_for_inference(model: nn.Module, kernel: Kernel, device: torch.device, out_dtype):
    """The network as it runs (compiled, or with BatchNorm folded, channels-last) and the activation of
    its output: sigmoid for a mask model, none for an intensity model (normalised grey values)."""
    if kernel.compile:
        network = compile_for_inference(model, device)
    else:
        network = fuse_for_inference(model).to(device, memory_format=torch.channels_last).eval()
    intensity = getattr(model, "architecture", {}).get("output") == "intensity"
    if intensity and np.dtype(out_dtype).kind != "f":
        raise ValueError("An intensity model restores float values: use a float out_dtype.")
    return network, _identity if intensity else torch.sigmoid


@dataclass
class _Pass:
    """What every chunk of one restore shares: the network, the kept slices on the device, the output
    (``(D, h, w)``, uint8 holding ``round(255 * p)`` or float), the Z tile grid, the counters and, for a
    kernel that takes interfaces, the kept ids."""
    network: nn.Module
    activation: Any
    kernel: Kernel
    sparse: torch.Tensor
    output: torch.Tensor
    factor: float
    depth: int
    grid_z: TileGrid
    device: torch.device
    stats: Optional[Dict[str, int]]
    labels: Optional[LabelWindow] = None

    @property
    def scale(self) -> float:
        return 255.0 if self.output.dtype == torch.uint8 else 1.0


def _restore_orientation(job: _Pass, orientation: str, n_done: int, window_origin: Tuple[int, int],
                         global_hw: Tuple[int, int], region_yx: Tuple[Tuple[int, int], Tuple[int, int]],
                         progress: bool) -> None:
    """Add one orientation's probabilities to ``job.output`` (a running mean over the ``n_done``
    orientations before it), chunk of planes by chunk of planes: read the channel planes, upscale Z
    (and mix in their interfaces, :func:`_chunk_interfaces`, for a kernel that takes them), tile and blend
    (:func:`predict_tiled`)."""
    kernel, depth, device = job.kernel, job.depth, job.device
    (y0, y1), (x0, x1) = region_yx
    # A transposed view turns planes along X into planes along Y, so one code path serves both.
    flip = orientation == "x"
    sparse_view = job.sparse.transpose(1, 2) if flip else job.sparse
    output_view = job.output.transpose(1, 2) if flip else job.output
    (p0, p1), (l0, l1) = ((x0, x1), (y0, y1)) if flip else ((y0, y1), (x0, x1))
    origin_p, origin_l = (window_origin[1], window_origin[0]) if flip else window_origin
    n_planes_global, width_global = (global_hw[1], global_hw[0]) if flip else global_hw
    grid_l = tile_grid(width_global, kernel.tile_size, kernel.tile_overlap, (l0, l1))
    columns = slice(grid_l.lo - origin_l, grid_l.hi - origin_l)
    offsets = channel_offsets(kernel.train_depth, kernel.stride_for(job.factor))
    chunk = max(1, CHUNK_VALUES // (kernel.train_depth * depth * (grid_l.hi - grid_l.lo)))
    bar = tqdm(total=p1 - p0, desc=f"Inference (planes along {orientation.upper()})", unit="plane",
               disable=not progress, leave=False)
    for start in range(p0, p1, chunk):
        planes = np.arange(start, min(start + chunk, p1))
        planes_global = reflect_indices(planes[:, None] + offsets[None, :], n_planes_global).ravel()
        gathered = sparse_view[:, torch.from_numpy(planes_global - origin_p).to(device), columns]  # (K, n*C, L)
        images = upscale_along_z(gathered, job.factor, depth, kernel.upscale_method)  # (D, n*C, L)
        del gathered
        if kernel.interfaces:
            interfaces = _chunk_interfaces(job.labels, orientation, planes_global, (grid_l.lo, grid_l.hi), job.factor,
                                           depth, width_global)
            images = mix_interfaces(images, torch.from_numpy(np.ascontiguousarray(interfaces)).to(device).float())
            del interfaces
        images = images.view(depth, len(planes), kernel.train_depth, -1).permute(1, 2, 0, 3)  # (n, C, D, L)
        probabilities = predict_tiled(job.network, images, kernel.tile_size, kernel.tile_overlap, kernel.batch_size,
                                      device, kernel.flips, kernel.precision, kernel.skip_empty, kernel.batch_pixels,
                                      grids=(job.grid_z, grid_l), activation=job.activation, stats=job.stats)
        del images  # else it lives on while the next chunk is built: two chunks at the peak, not one
        block = probabilities.transpose(0, 1)  # (D, n, L)
        target = output_view[:, planes[0] - p0:planes[-1] - p0 + 1, :]
        if n_done:  # running mean over orientations
            block = target.float() / job.scale + (block - target.float() / job.scale) / (n_done + 1)
        target.copy_(torch.round(block * job.scale) if job.scale != 1.0 else block)
        bar.update(len(planes))
    bar.close()


# The dtypes restore_block writes probabilities in (uint8 stores round(255 * p)), and their torch twins.
PROBABILITY_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float16): torch.float16,
                      np.dtype(np.float32): torch.float32}


def restore_block(model: nn.Module, sparse_window: np.ndarray, window_origin: Tuple[int, int],
                  global_hw: Tuple[int, int], region_yx: Tuple[Tuple[int, int], Tuple[int, int]], factor: float,
                  kernel: Optional[Kernel] = None, *, depth: Optional[int] = None, out_dtype=np.float32,
                  device: Optional[torch.device] = None, progress: bool = True,
                  stats: Optional[Dict[str, int]] = None, labels: Optional[LabelWindow] = None,
                  **options: Any) -> np.ndarray:
    """Probabilities of one lateral region of the restored stack, all of Z.

    Parameters
    ----------
    model : trained network with ``kernel.train_depth`` input channels
    sparse_window : ndarray, shape (K, wh, ww)
        The kept slices (Z step ``factor``) inside the read window, which must
        contain :func:`read_window` of the region: a mask (bool or integer,
        non-zero = foreground) for a mask model, normalised float32 grey values
        for an intensity model (``model.architecture['output'] == 'intensity'``).
    window_origin : (y, x)
        Global index of the window's first row and column.
    global_hw : (H, W)
        Lateral size of the whole stack (mirroring and the tile grid use it).
    region_yx : ((y0, y1), (x0, x1))
        The output region, global indices.
    factor : float
    kernel : Kernel
        How the network is applied (:func:`inference_options`).
    **options
        :class:`Kernel` fields, on top of ``kernel`` (or instead of it:
        ``train_depth=3, tile_size=64, ...``).
    depth : int, optional
        Output depth D; default ``floor((K - 1) * factor) + 1`` (:func:`morph.restored_depth`).
    out_dtype : numpy dtype
        float32, float16, or uint8 (stores ``round(255 * p)``).
    stats : dict, optional
        Tile and pixel counters (see :func:`predict_tiled`).
    labels : LabelWindow, optional
        With ``kernel.interfaces`` (and only then): the kept ids of the dense label image whose boundary mask
        ``sparse_window`` is, over a window that reaches :func:`interfaces_reach` pixels beyond the read
        window wherever that is not the stack's edge (so that the interfaces are the whole slices').

    Returns
    -------
    probabilities : ndarray of ``out_dtype``, shape (D, y1 - y0, x1 - x0)
        Foreground probabilities, or normalised grey values for an intensity model.
    """
    torch_out = PROBABILITY_DTYPES.get(np.dtype(out_dtype))
    if torch_out is None:
        raise ValueError(f"out_dtype must be one of {', '.join(str(d) for d in PROBABILITY_DTYPES)}, got "
                         f"{np.dtype(out_dtype)}.")
    kernel = _kernel(kernel, options)
    device = device or select_device()
    network, activation = _network_for_inference(model, kernel, device, out_dtype)
    n_kept = sparse_window.shape[0]
    depth = restored_depth(n_kept, factor) if depth is None else int(depth)
    (y0, y1), (x0, x1) = region_yx
    job = _Pass(network, activation, kernel, _as_engine_tensor(sparse_window, device),
                torch.zeros((depth, y1 - y0, x1 - x0), dtype=torch_out, device=device), factor, depth,
                tile_grid(depth, kernel.tile_size, kernel.tile_overlap, (0, depth)), device, stats, labels)
    if kernel.interfaces != (labels is not None):
        raise ValueError("The kept ids (labels) are given exactly when the kernel takes interfaces "
                         "(kernel.interfaces).")
    # cuDNN picks among algorithms, some not deterministic (transposed convolutions): a GPU restore repeats
    # bit for bit only with the deterministic ones, whatever flags the caller's process has set.
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True):
        for n_done, orientation in enumerate(kernel.orientations):
            _restore_orientation(job, orientation, n_done, window_origin, global_hw, region_yx, progress)
    if kernel.keep_kept_slices:
        rows = slice(y0 - window_origin[0], y1 - window_origin[0])
        cols = slice(x0 - window_origin[1], x1 - window_origin[1])
        for k, z in zip(*slices_on_grid(n_kept, factor, depth)):
            job.output[z] = job.sparse[k, rows, cols].float() * job.scale
    return job.output.cpu().numpy()


def apply_model_to_stack_tiled_slice_by_slice(
    model: nn.Module,
    sparse_dhw: np.ndarray,
    factor: float,
    train_depth: Optional[int] = None,
    tile_size: Optional[int] = None,
    *,
    kernel: Optional[Kernel] = None,
    original_depth: Optional[int] = None,
    out_dtype=np.float32,
    device: Optional[torch.device] = None,
    progress: bool = True,
    stats: Optional[Dict[str, int]] = None,
    label_ids: Optional[np.ndarray] = None,
    **options: Any,
) -> np.ndarray:
    """Restore the full-depth probability stack from the kept slices (in memory).

    This is :func:`restore_block` with one block covering the whole stack.

    Parameters
    ----------
    model : trained network with ``train_depth`` input channels
    sparse_dhw : ndarray, shape (K, H, W)
        The kept slices, Z step ``factor`` (bool or [0, 1] values).
    factor : float
    train_depth, tile_size : int
        Channels of the model (odd) and tile edge: the two :class:`Kernel` fields without a default
        (given here or in ``kernel``).
    kernel : Kernel, optional
        How the network is applied (:func:`inference_options`); ``**options`` (other
        :class:`Kernel` fields: ``batch_size``, default 32 here, ``orientations``, ``flips``,
        ``channel_stride``, ``precision``, ...) change it.
    original_depth : int, optional
        Output depth D; default ``floor((K - 1) * factor) + 1`` (:func:`morph.restored_depth`).
    out_dtype : numpy dtype
        float32 by default; float16 halves the memory of large outputs, and
        uint8 quarters it, storing ``round(255 * p)``.
    label_ids : ndarray of int, shape (K, H, W), optional
        The kept ids of the dense label image whose boundary mask ``sparse_dhw`` is, for a kernel that takes
        interfaces (:func:`restore_block`).

    Returns
    -------
    probabilities_dhw : ndarray of ``out_dtype``, shape (D, H, W), values in [0, 1]
        (0..255 for uint8; :data:`PROBABILITY_DTYPES` are the dtypes written)

    Memory stays bounded by one chunk of planes (about 16 MB of inputs, or one
    plane of ``C x D x W`` floats if that is larger) plus the output array: the
    upscaled stack is never built whole.
    """
    given = {name: value for name, value in (("train_depth", train_depth), ("tile_size", tile_size))
             if value is not None}
    if kernel is None:
        options.setdefault("batch_size", 32)
    kernel = _kernel(kernel, {**given, **options})
    _, height, width = sparse_dhw.shape
    return restore_block(model, sparse_dhw, (0, 0), (height, width), ((0, height), (0, width)), factor, kernel,
                         depth=original_depth, out_dtype=out_dtype, device=device, progress=progress, stats=stats,
                         labels=None if label_ids is None else LabelWindow(np.asarray(label_ids)))


# --------------------------------------------------------------------------- #
# Thresholds and the train-then-restore recipe
# --------------------------------------------------------------------------- #
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


# --------------------------------------------------------------------------- #
# Checks at the library's boundary: one clear error before any work
# --------------------------------------------------------------------------- #
RESTORE_KINDS = ("mask", "labels", "dense labels")


def check_stack(stack_khw: Any, name: str = "stack_khw", grey: bool = False) -> np.ndarray:
    """``stack_khw`` as a numeric ndarray of shape (K, H, W), or one ``UserError`` that names the problem and
    the fix: another number of axes (a single image, a singleton axis, channels or RGB), no values, a dtype
    that holds no numbers, NaN or infinite values, bool grey values. The array is not copied."""
    stack = np.asarray(stack_khw)
    if not (stack.dtype == bool or np.issubdtype(stack.dtype, np.integer) or np.issubdtype(stack.dtype, np.floating)):
        raise UserError(f"{name} must hold numbers (bool, integer or float), got dtype {stack.dtype}.")
    if stack.ndim != 3:
        if stack.ndim == 2:
            fix = "a single image is no stack; give the slices as one array of shape (K, H, W)"
        elif 1 in stack.shape:
            fix = f"drop the axis of length 1 (numpy.squeeze({name}))"
        elif stack.ndim == 4 and stack.shape[-1] in (3, 4):
            fix = f"this looks like RGB(A): pick one channel ({name}[..., 0]) or convert it to grey values"
        else:
            fix = f"pick one channel or time point ({name}[c])"
        raise UserError(f"{name} must be a stack of shape (K, H, W) (slices, rows, columns), got shape "
                        f"{stack.shape}: {fix}.")
    if not stack.size:
        raise UserError(f"{name} holds no values (shape {stack.shape}).")
    if grey and stack.dtype == bool:
        raise UserError(f"{name} is bool, a mask, not grey values: restore it with restore_stack, or pass "
                        f"{name}.astype(numpy.uint8) to restore it as grey values.")
    refuse_non_finite(stack, name)
    return stack


def check_factor(factor: Any) -> float:
    """``factor`` as a float, or one ``UserError``: it must be a finite number above 1 (the Z step of the kept
    slices in output slices; a stack whose Z step equals its pixel size has nothing to restore)."""
    value = None
    if not isinstance(factor, (str, bytes, bool, np.bool_)) and np.ndim(factor) == 0:
        try:
            value = float(factor)  # int, float, numpy scalars and 0-d arrays, fractions.Fraction, ...
        except (TypeError, ValueError):
            pass
    if value is None or not math.isfinite(value) or value <= 1:
        raise UserError(f"factor must be a number above 1 (the Z step over the XY pixel size, e.g. 4 or 3.125), got "
                        f"{factor!r}.")
    return value


def check_labels(labels_khw: Any, shape_khw: Optional[Tuple[int, ...]] = None) -> np.ndarray:
    """``labels_khw`` as an integer ndarray of shape (K, H, W) (that of the stack, ``shape_khw``, when given),
    or one ``UserError``."""
    labels = check_stack(labels_khw, "labels")
    if not (labels.dtype == bool or np.issubdtype(labels.dtype, np.integer)):
        raise UserError(f"labels must be integer ids (0 = background), got dtype {labels.dtype}: convert them with "
                        "labels.astype(numpy.uint32) if they are whole numbers.")
    if shape_khw is not None and tuple(labels.shape) != tuple(shape_khw):
        raise UserError(f"labels has shape {labels.shape} but the stack {tuple(shape_khw)}: give the ids of the same "
                        "slices (or leave out the stack: its foreground is labels != 0).")
    return labels


def same_factor(trained_at: Optional[float], factor: float) -> bool:
    """Whether a model trained at ``trained_at`` (None: not recorded) fits ``factor``: within 0.5 %, the
    tolerance of the factor rule (a ratio of 6.56 and one of 6.5625 are one geometry)."""
    return trained_at is None or abs(float(trained_at) - factor) <= INTEGER_RATIO_TOLERANCE * factor


# Settings that decide what the network sees as its input: a restore must build it as the training did.
INPUT_SETTINGS = {"UPSCALE_METHOD": ("mask", "labels", "dense labels", "intensity"),
                  "BOUNDARY_INPUT": ("dense labels",)}


def check_model_for(model: nn.Module, factor: float, kind: str, allow_factor_mismatch: bool = False,
                    settings: Optional[Settings] = None) -> None:
    """Refuse a model that cannot restore this stack, before any work: another output (grey values or masks,
    :func:`check_model_kind`), the other target of a label image (boundaries of a dense one or a foreground),
    unless ``allow_factor_mismatch`` another factor than the one it was trained at, or ``settings`` that build
    another input than the one it learned from (:data:`INPUT_SETTINGS`). What it was trained with is its
    ``config``, which :func:`train_on_stack` and ``model.load_model`` attach; a model without one is not checked."""
    check_model_kind(model, "intensity" if kind == "intensity" else "mask")
    config = getattr(model, "config", None) or {}
    if settings is not None:
        check_model_settings(config, kind, settings)
    if kind != "intensity" and "restores" in config:
        wanted = "boundaries" if kind == "dense labels" else "foreground"
        if config["restores"] != wanted:
            of = "dense label images" if wanted == "foreground" else "masks or sparse label images"
            raise UserError(f"The model restores the {config['restores']} of {of}, not the {wanted} this restore "
                            "needs: train a model on this stack (model=None).")
    trained_at = config.get("factor")
    if not allow_factor_mismatch and not same_factor(trained_at, factor):
        raise UserError(f"The model was trained at factor {trained_at}, this stack is restored at factor "
                        f"{factor_value(factor)}: train a model on this stack (model=None), or pass "
                        "allow_factor_mismatch=True to use it anyway (apply.py: --allow-factor-mismatch).")


def check_model_settings(config: Mapping[str, Any], kind: str, settings: Settings) -> None:
    """One ``UserError`` where ``settings`` would build another network input for a restore of ``kind`` than
    the one a model trained with ``config`` (its record) learned from (:data:`INPUT_SETTINGS`)."""
    if not config:
        return
    recorded = Settings().with_model_record(config)
    for constant, kinds in INPUT_SETTINGS.items():
        known = constant.lower() in config or FIELDS[constant][1].metadata["model_absent"] is not None
        if kind in kinds and known and settings[constant] != recorded[constant]:
            raise UserError(f"The model was trained with {constant} '{recorded[constant]}', these settings say "
                            f"'{settings[constant]}': the network would see another input than it learned from. "
                            "Restore with the model's (apply.py: leave out the flag; in Python: "
                            "settings.with_model_record(model.config), or no settings), or train a model with these "
                            "settings.")


def recipe_for(settings: SettingsLike, model: Optional[nn.Module]) -> Settings:
    """The settings a restore runs with: ``settings`` as given; without settings, those a model's ``config``
    records for a restore (``model="read"`` settings: tile size, interpolation, threshold, ...) on top of the
    defaults, as ``apply.py --model`` restores. Validated (:meth:`Settings.validate`)."""
    config = getattr(model, "config", None)
    if settings is None and config:
        return Settings().with_model_record(config).validate()
    return as_settings(settings).validate()


def _device(device: Union[str, torch.device, None], settings: Settings) -> torch.device:
    """``device`` (a name such as 'cpu' or 'cuda:0', a CUDA index, or a torch.device), else the settings' ``DEVICE``,
    resolved by ``model.select_device`` (one clear error for a device this machine lacks)."""
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"  # torch's own reading of a bare index
    return select_device(str(device) if device is not None else settings.inference.device)


TRAINING_KINDS = ("mask", "dense labels", "intensity")
# What a model trained as each training kind is saved as (apply.py's record: the kind of stack it restores and,
# for masks and label images, whether it restores a foreground or the boundaries of a dense label image).
SAVED_KIND = {"mask": ("mask", "foreground"), "dense labels": ("labels", "boundaries"),
              "intensity": ("intensity", None)}


def trained_config(settings: SettingsLike, factor: float, kind: str = "mask") -> Dict[str, Any]:
    """What :func:`train_on_stack` attaches to its model as ``config`` (and ``model.save_model`` saves by
    default): :func:`model_config` of the recipe the training used, with the kind of stack and the target."""
    saved_kind, restores = SAVED_KIND[kind]
    return dict(model_config(settings, factor, kind), kind=saved_kind,
                **({"restores": restores} if restores else {}))


def train_on_stack(sparse_khw: np.ndarray, factor: float, settings: SettingsLike = None,
                   device: Union[str, torch.device, None] = None, progress: bool = True, kind: str = "mask",
                   panel_width: Optional[int] = None, label_ids: Optional[np.ndarray] = None
                   ) -> Tuple[nn.Module, Dict[str, Any]]:
    """Train a model on the kept slices with ``settings``' recipe (default: the command line's).

    ``kind`` 'mask' (and 'dense labels': the boundary mask of a dense label image, trained with that kind's
    recipe) binarises ``sparse_khw`` (non-zero = foreground); 'intensity' takes it as normalised float32 grey values
    (``data.normalize_intensity``) and trains an intensity model. ``panel_width``: ``sparse_khw`` is
    separate windows of that many columns side by side (``blocks.training_stack``), and no training crop
    straddles two. ``label_ids``: the kept ids of the dense label image whose boundary mask ``sparse_khw`` is,
    given when the network takes interfaces (:func:`uses_interfaces`; ``train.create_cropped_image_dataset``).
    ``device``: 'cpu', 'cuda', 'cuda:N' or a ``torch.device`` (default: the settings' ``DEVICE``, else CUDA
    when available).

    Returns the model, with the recipe it was trained with attached as ``model.config``
    (:func:`trained_config`: what ``model.save_model`` saves and a restore checks the factor against), and
    ``info`` with ``train_s``, ``history`` and ``examples`` (three training and three validation samples for
    figures; the full sample arrays are freed before this returns).
    """
    from train import fit_on_sparse_stack

    settings = as_settings(settings).validate()
    factor = check_factor(factor)
    if kind not in TRAINING_KINDS:
        raise UserError(f"kind must be one of {', '.join(TRAINING_KINDS)}, got '{kind}'.")
    sparse_khw = check_stack(sparse_khw, "sparse_khw", grey=kind == "intensity")
    device = _device(device, settings)
    if kind != "intensity":
        sparse_khw = sparse_khw if sparse_khw.dtype == bool else sparse_khw != 0
    settings = fit_recipe_to_stack(settings, sparse_khw.shape, factor, kind=kind)[0]  # a no-op when fitted
    start = time.perf_counter()
    model, history, samples = fit_on_sparse_stack(sparse_khw, factor, settings, kind=kind, device=device,
                                                  progress=progress, panel_width=panel_width, label_ids=label_ids)
    model.config = trained_config(settings, factor, kind)
    examples = {name: (inputs[:3].copy(), labels[:3].copy()) for name, (inputs, labels) in samples.items()}
    del samples
    return model, {"train_s": time.perf_counter() - start, "history": history, "examples": examples}


def restore_probabilities(sparse_khw: np.ndarray, factor: float, settings: SettingsLike = None,
                          model: Optional[nn.Module] = None, original_depth: Optional[int] = None,
                          device: Union[str, torch.device, None] = None, out_dtype=np.uint8,
                          progress: bool = True, kind: str = "mask", label_ids: Optional[np.ndarray] = None,
                          allow_factor_mismatch: bool = False
                          ) -> Tuple[np.ndarray, nn.Module, Dict[str, Any]]:
    """Train on the kept slices (unless a model is given), then restore them.

    The one train-then-apply recipe shared by ``eval.py``, ``apply.py``,
    ``bench.py`` and ``ablation.py``.

    Parameters
    ----------
    sparse_khw : ndarray, shape (K, H, W)
        Kept slices, Z step ``factor`` (non-zero = foreground).
    factor : float
        The Z step of the kept slices in output slices (above 1; see the module's docstring).
    settings : Settings, optional
        Training and inference recipe (a dict of ``eval.py``-style constants
        is read as :meth:`Settings.from_dict`); default ``Settings()``, or, with a
        model that carries a ``config``, the settings it records for a restore (:func:`recipe_for`).
    model : nn.Module, optional
        A trained model (:func:`train_on_stack`, ``model.load_model``); without one, a model is trained on
        ``sparse_khw``. A model trained at another factor is refused unless ``allow_factor_mismatch``.
    original_depth : int, optional
        Output depth; default ``floor((K - 1) * factor) + 1`` (:func:`morph.restored_depth`).
    device : str or torch.device, optional
        'cpu', 'cuda' or 'cuda:N'; default the settings' ``DEVICE``, else CUDA when available.
    out_dtype : numpy dtype
        Probability dtype (uint8, the default, stores 0-255: one byte per voxel).
    progress : bool
        Show tqdm bars and the training's loss per epoch.
    kind : {'mask', 'labels', 'dense labels'}
        What the mask is of, for the settings that are "by kind" at inference (test-time flips:
        'dense labels' when it is the boundaries of a dense label image).
    label_ids : ndarray of int, shape (K, H, W), optional
        'dense labels': the kept ids whose boundary mask ``sparse_khw`` is; the network's input holds their
        interfaces where the settings (or the model's record) say so (:func:`uses_interfaces`).

    Returns
    -------
    probabilities : ndarray of ``out_dtype``, shape (D, H, W)
    model : the model used
    info : dict with ``train_s``, ``infer_s``, ``history`` and ``examples``
        (``None`` / 0 when a model was given) and ``inference`` (tile counters, see :func:`predict_tiled`)
    """
    settings = recipe_for(settings, model)
    factor = check_factor(factor)
    if kind not in RESTORE_KINDS:
        raise UserError(f"kind must be one of {', '.join(RESTORE_KINDS)}, got '{kind}'.")
    sparse_khw = check_stack(sparse_khw, "sparse_khw")
    if label_ids is not None:
        label_ids = check_labels(label_ids, sparse_khw.shape)
    if model is not None:
        check_model_for(model, factor, kind, allow_factor_mismatch, settings)
    device = _device(device, settings)
    foreground = sparse_khw if sparse_khw.dtype == bool else sparse_khw != 0
    info: Dict[str, Any] = {"train_s": 0.0, "history": None, "examples": None}
    interfaces = uses_interfaces(settings, kind)
    if interfaces and label_ids is None:
        raise ValueError("A dense label image's boundaries restored with interfaces need the kept ids (label_ids).")
    label_ids = label_ids if interfaces else None
    if model is None:
        model, info = train_on_stack(foreground, factor, settings, device, progress, kind=training_kind(kind),
                                     label_ids=label_ids)
    start = time.perf_counter()
    info["inference"] = {}
    probabilities = apply_model_to_stack_tiled_slice_by_slice(
        model, foreground, factor, kernel=inference_options(settings, model, kind), original_depth=original_depth,
        device=device, out_dtype=out_dtype, progress=progress, stats=info["inference"], label_ids=label_ids)
    info["infer_s"] = time.perf_counter() - start
    return probabilities, model, info


def check_model_kind(model: nn.Module, kind: str) -> None:
    """A mask model cannot restore grey values, nor the reverse: say so before any work."""
    output = getattr(model, "architecture", {}).get("output", "logits")
    if (output == "intensity") != (kind == "intensity"):
        grey = output == "intensity"
        trained, wanted = ("grey-scale values", "a mask or label") if grey else ("masks", "a grey-scale")
        raise UserError(f"The model was trained on {trained}; it cannot restore {wanted} stack. Train a model on "
                        "this kind of stack (apply.py: leave out --model; in Python: model=None) or restore the "
                        "matching kind (apply.py: --kind).")


def copy_kept_slices(restored_dhw: np.ndarray, kept_khw: np.ndarray, factor: float) -> None:
    """Write the kept grey values verbatim at ``0, factor, ...`` of ``restored_dhw`` (in place; those
    within its depth that fall on an output slice, :func:`morph.slices_on_grid`). The engine's own copy
    holds normalised values, and the way back to grey values is not exact in floating point."""
    kept, on_grid = slices_on_grid(len(kept_khw), factor, len(restored_dhw))
    restored_dhw[on_grid] = kept_khw[kept]


def restore_intensity(stack_khw: np.ndarray, factor: float, settings: SettingsLike = None,
                      model: Optional[nn.Module] = None, original_depth: Optional[int] = None,
                      device: Union[str, torch.device, None] = None, out_dtype=None, progress: bool = True,
                      allow_factor_mismatch: bool = False
                      ) -> Tuple[np.ndarray, nn.Module, Dict[str, Any]]:
    """Train on the kept grey-scale slices (unless a model is given), then restore them.

    The stack is normalised by its own robust range (``data.intensity_range``:
    1st and 99.8th percentiles), restored by the same engine as masks (with an
    intensity model, no sigmoid), mapped back to grey values, and the kept
    slices are copied verbatim.

    Parameters
    ----------
    stack_khw : ndarray, shape (K, H, W), any integer or float dtype (finite values)
    factor : float
    settings, model, original_depth, device, progress, allow_factor_mismatch : see :func:`restore_probabilities`
        (``model``: an intensity model)
    out_dtype : numpy dtype, optional
        Default ``data.grey_dtype`` of the input's dtype and ``GREY_DTYPE``: the input's
        dtype (integer grey values are rounded and clipped to its range; float32 and float64 stay), else float32.

    Returns
    -------
    restored : ndarray of ``out_dtype``, shape (D, H, W)
    model : the model used
    info : as :func:`restore_probabilities`, plus ``value_range``
    """
    from data import denormalize_intensity, grey_dtype, intensity_range, normalize_intensity

    settings = recipe_for(settings, model)
    factor = check_factor(factor)
    stack_khw = check_stack(stack_khw, "stack_khw", grey=True)
    if model is not None:
        check_model_for(model, factor, "intensity", allow_factor_mismatch, settings)
    device = _device(device, settings)
    value_range = intensity_range(stack_khw)
    normalized = normalize_intensity(stack_khw, value_range)
    info: Dict[str, Any] = {"train_s": 0.0, "history": None, "examples": None}
    if model is None:
        model, info = train_on_stack(normalized, factor, settings, device, progress, kind="intensity")
    start = time.perf_counter()
    info["inference"] = {}
    restored = apply_model_to_stack_tiled_slice_by_slice(
        model, normalized, factor, kernel=inference_options(settings, model, "intensity"),
        original_depth=original_depth, device=device, out_dtype=np.float32, progress=progress,
        stats=info["inference"])
    del normalized
    restored = denormalize_intensity(restored, value_range,
                                     out_dtype or grey_dtype(stack_khw.dtype, settings.inference.grey_dtype),
                                     in_place=True)
    if settings.inference.keep_kept_slices:
        copy_kept_slices(restored, stack_khw, factor)
    info["infer_s"] = time.perf_counter() - start
    info["value_range"] = value_range
    return restored, model, info


def restore_dense_labels(labels_khw: np.ndarray, factor: float, settings: SettingsLike = None,
                         model: Optional[nn.Module] = None, original_depth: Optional[int] = None,
                         device: Union[str, torch.device, None] = None, out_dtype=np.uint8, progress: bool = True,
                         allow_factor_mismatch: bool = False
                         ) -> Tuple[np.ndarray, np.ndarray, nn.Module, Dict[str, Any]]:
    """A dense label image restored from its boundaries: the network restores :func:`label_boundaries`
    of the kept slices (trained on them unless ``model`` is given; with ``BOUNDARY_INPUT`` 'interfaces', from
    an input that also holds where per-label shape-based interpolation puts them, :func:`_chunk_interfaces`),
    the ids grow between them (:func:`grow_labels`). The other arguments as :func:`restore_probabilities`.

    Returns
    -------
    labels_dhw : ndarray, dtype of ``labels_khw``, shape (D, H, W)
    probabilities : ndarray of ``out_dtype``, shape (D, H, W): the boundaries'
    model : the model used
    info : dict of :func:`restore_probabilities`, plus ``labels_s`` (seconds growing the ids)
    """
    settings = recipe_for(settings, model)
    factor = check_factor(factor)
    labels_khw = check_labels(labels_khw)
    probabilities, model, info = restore_probabilities(label_boundaries(labels_khw), factor, settings, model,
                                                       original_depth=original_depth, device=device,
                                                       out_dtype=out_dtype, progress=progress,
                                                       kind=inference_kind("labels", dense_labels=True),
                                                       label_ids=labels_khw,
                                                       allow_factor_mismatch=allow_factor_mismatch)
    start = time.perf_counter()
    labels_dhw = grow_labels(probabilities, labels_khw, factor, settings.inference.probability_threshold,
                             progress=progress, shape_prior=settings.inference.shape_prior)
    info["labels_s"] = time.perf_counter() - start
    return labels_dhw, probabilities, model, info


def restore_stack(stack_khw: Optional[np.ndarray], factor: float, settings: SettingsLike = None,
                  model: Optional[nn.Module] = None,
                  labels: Optional[np.ndarray] = None, device: Union[str, torch.device, None] = None,
                  probability_dtype=np.uint8, keep_probabilities: bool = True,
                  dense_labels: Optional[bool] = None, original_depth: Optional[int] = None,
                  progress: bool = True, allow_factor_mismatch: bool = False
                  ) -> Tuple[np.ndarray, Optional[np.ndarray], nn.Module, Dict[str, Any]]:
    """Restore an anisotropic stack to ``floor((K - 1) * factor) + 1`` slices.

    Parameters
    ----------
    stack_khw : ndarray, shape (K, H, W), or None
        The acquired slices: a mask (bool, or any numbers: non-zero = foreground). None with ``labels``:
        their foreground (``labels != 0``).
    factor : float
        The Z step of the kept slices in output slices, above 1: an integer, or a non-integer Z/XY ratio for an
        isotropic output (see the module's docstring).
    settings : Settings, optional (see :func:`restore_probabilities`)
    model : nn.Module, optional
        A trained model; without one, a model is trained on ``stack_khw``
        itself, exactly as ``eval.py`` trains.
    labels : ndarray of int, shape (K, H, W), optional
        Instance ids of the acquired slices: ids are restored too (see :func:`assign_labels`). A dense
        label image (:func:`is_dense_label_image`) is restored from its boundaries instead: the network
        restores :func:`label_boundaries` and the ids grow between them (:func:`grow_labels`);
        ``stack_khw`` is then not used and the probabilities returned are the boundaries'.
    device : str or torch.device, optional (see :func:`restore_probabilities`)
    probability_dtype : numpy dtype
        uint8 (0-255) keeps memory at one byte per output voxel.
    keep_probabilities : bool
        False (with uint8) thresholds in place: peak memory about one byte per
        output voxel, and ``None`` is returned for the probabilities.
    dense_labels : bool, optional
        Whether ``labels`` is restored by the dense rule; default
        :func:`is_dense_label_image` of ``labels``. ``apply.py`` passes the
        decision its plan printed (made on a sample of the file, as the
        block-wise restore uses it), so what the plan says is what runs.
    original_depth, progress, allow_factor_mismatch : see :func:`restore_probabilities`

    Returns
    -------
    restored : ndarray, shape (D, H, W)
        bool mask, or labels of ``labels``' dtype. Input slices sit verbatim at
        ``0, factor, 2*factor, ...``.
    probabilities : ndarray of ``probability_dtype``, shape (D, H, W), or None
    model : the model used
    info : dict with ``train_s``, ``infer_s``, ``history``
    """
    settings = recipe_for(settings, model)
    factor = check_factor(factor)
    if stack_khw is None and labels is None:
        raise UserError("Give the acquired slices (stack_khw, a mask) or their ids (labels).")
    if labels is not None:
        labels = check_labels(labels, None if stack_khw is None else np.shape(stack_khw))
    if labels is not None and (is_dense_label_image(labels) if dense_labels is None else dense_labels):
        return restore_dense_labels(labels, factor, settings, model, original_depth=original_depth, device=device,
                                    out_dtype=probability_dtype, progress=progress,
                                    allow_factor_mismatch=allow_factor_mismatch)
    stack_khw = labels != 0 if stack_khw is None else stack_khw
    probabilities, model, info = restore_probabilities(stack_khw, factor, settings, model,
                                                       original_depth=original_depth, device=device,
                                                       out_dtype=probability_dtype, progress=progress,
                                                       kind="mask" if labels is None else "labels",
                                                       allow_factor_mismatch=allow_factor_mismatch)
    in_place = not keep_probabilities and probabilities.dtype == np.uint8
    restored = threshold_probabilities(probabilities, settings.inference.probability_threshold, in_place=in_place)
    probabilities = None if in_place else probabilities
    if labels is not None:
        restored = assign_labels(restored, labels, factor, progress=progress)
    return restored, probabilities, model, info
