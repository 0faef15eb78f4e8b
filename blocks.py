"""Block-wise restore of large volumes on Dask: plan output blocks, read each
block's input window, write its region, retries, resume.

The restored stack is cut into *blocks*: all of Z by ``block_size`` x
``block_size`` lateral pixels, aligned to the output's chunks so that no two
blocks write the same chunk. A block reads only its *read window* of kept
slices (:func:`restore.read_window`), runs the in-memory engine's own kernel
(:func:`restore.restore_block`, on the global tile grid, so the result does not
depend on the block size), thresholds it (masks) or maps it back to grey values
(grey-scale stacks, normalised by one range of the whole volume,
:func:`volume_intensity_range`) and writes its region into an OME-Zarr output
(``zarr_io.py``). Memory per block is set by the block size and the depth,
never by the lateral size of the volume.

Passes, each a list of independent tasks: (1) probabilities and mask, or grey
values, per block (for a dense label image, the probabilities of the
boundaries between its ids, :class:`LabelBoundaries`); (2) for label images, ids
per block from the mask of the block and a halo around it
(:func:`labeling.assign_labels` works on 2D components and distances, so the
halo grows until the conditions under which the block's ids match the
whole-slice ones hold, see :func:`_ids_could_differ`), or for a dense label
image the ids grown between the restored boundaries over the block and a halo
(:func:`dense_label_block`, :func:`labeling.grow_labels`); (3) the pyramid,
level by level.

Tasks run in this process one after the other (``workers=0``), on a local
Dask cluster of worker processes, or on an existing cluster
(``scheduler='tcp://host:port'``). Workers read and write the stores
themselves (only task descriptions pass through the scheduler) and load the
model once each from the model file kept in the output. An existing cluster
needs the dependencies only, not this checkout: the project's code travels
with the tasks (:func:`_ship`). A failing task is retried; every finished block
is recorded in the output right after its data, so an interrupted run
continues with ``resume=True`` and gives the same result.

Crash safety (a run killed at any moment, SIGKILL included): a new output is
laid out in a hidden folder beside it and renamed into place with its record
(state 'running'), so an output never exists without one; the record is
replaced atomically (:func:`_save_record`); blocks, label blocks and pyramid
levels are recorded after their data; completion is recorded before the run's
scaffolding (markers, model file) is removed, and that removal may be cut
short: a complete output with leftovers is complete, and a resume of it
finishes the removal.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import math
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import types
import uuid
import warnings
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import cloudpickle
import numpy as np
import torch
import zarr
from dask.utils import parse_bytes
from torch import nn
from tqdm.auto import tqdm

import labeling
import restore
import zarr_io
from data import (MaskValues, OutputExistsError, ToolWarning, UserError, denormalize_intensity, grey_dtype,
                  intensity_range, normalize_intensity, refuse_non_finite)
from model import fuse_for_inference, load_model, save_model, select_device
from morph import ON_GRID_TOLERANCE, bracket, kept_positions, label_boundaries, restored_depth, slices_on_grid
from settings import LargeVolumes, Settings, SettingsLike, as_settings
from zarr_io import OmeZarrImage, ZarrImage

# Lateral edge of a block (settings.LargeVolumes states the default; memory per block: docs/).
BLOCK_SIZE = LargeVolumes.block_size
RETRIES = 2  # extra attempts of a failing block before the run stops
LABEL_RULES = ("sparse", "dense")  # how label ids are restored (restore_to_ome_zarr's label_rule)
BOUNDARIES_ARRAY = "boundaries"  # dense label rule: the boundary probabilities, in the progress group
LABEL_HALO = 64  # first halo (pixels) of the label-id pass; doubled while a block's ids could still differ
MAX_LABEL_HALO_BLOCKS = 4  # largest halo, in blocks: beyond it a block's ids are accepted and reported
LABEL_SLAB_VOXELS = 16_000_000  # voxels of mask per label-id step (a few kept-slice intervals at a time)
TRAINING_BYTES = 256 * 2**20  # kept-slice bytes read from a large store to train on
# An input store's values checksummed for --resume (values_checksum): 4 x 4 windows of 64 px on about 8 slices.
CHECKSUM_SLICES, CHECKSUM_WINDOWS, CHECKSUM_EDGE = 8, 4, 64
INTENSITY_SAMPLE_VALUES = 10_000_000  # grey values read to find a store's range (data.intensity_range's sample)
# Host memory a worker using CUDA adds (context and libraries, docs/gpu.md); such workers need a larger
# --worker-memory than CPU workers.
CUDA_HOST_BYTES = 1 * 2**30
# Network activations per tile pixel at inference: about 64 float32 values (the widest level's features,
# its skip and the blend), a generous bound for the default network.
ACTIVATION_BYTES = 256
PROCESS_BYTES = 300 * 2**20  # Python, torch and the model in a worker
SCHEDULER_TIMEOUT = "10s"  # how long a --scheduler address is tried before the run is refused
PROGRESS_GROUP = "restore_progress"  # markers of finished blocks (and staged inputs), removed when complete
MODEL_FILE = "restore_model.pt"  # the model of a run, in the output until it completes (resume, workers)
ERROR_FILE = "restore_error.txt"  # full traceback of the task that stopped a run, in the output until it completes
Region = Tuple[Tuple[int, int], Tuple[int, int]]
Source = Union[ZarrImage, np.ndarray]


# --------------------------------------------------------------------------- #
# The plan
# --------------------------------------------------------------------------- #
def chunk_edge(block_size: int) -> int:
    """Lateral chunk edge of the output for ``block_size``: 256, or the block itself when smaller.

    Raises
    ------
    UserError
        A block size that is not positive, or above 256 and not a multiple of
        256 (blocks must cover whole chunks so that no two write one chunk).
    """
    if block_size < 1:
        raise UserError(f"--block-size must be positive, got {block_size}.")
    if block_size <= zarr_io.CHUNK_XY:
        return block_size
    if block_size % zarr_io.CHUNK_XY:
        raise UserError(f"--block-size {block_size} is not a multiple of the output chunk edge {zarr_io.CHUNK_XY}; "
                        f"use e.g. {zarr_io.CHUNK_XY * max(1, round(block_size / zarr_io.CHUNK_XY))}.")
    return zarr_io.CHUNK_XY


@dataclass(frozen=True)
class BlockPlan:
    """The output's lateral blocks: all of Z by ``block_size`` x ``block_size`` pixels, row by row."""
    shape_dhw: Tuple[int, int, int]
    block_size: int

    @property
    def grid(self) -> Tuple[int, int]:
        """Blocks along Y and X."""
        return tuple(math.ceil(size / self.block_size) for size in self.shape_dhw[1:])

    def __len__(self) -> int:
        return self.grid[0] * self.grid[1]

    def region(self, index: int) -> Region:
        """``((y0, y1), (x0, x1))`` of block ``index`` (global output pixels)."""
        by, bx = divmod(index, self.grid[1])
        _, height, width = self.shape_dhw
        size = self.block_size
        return (by * size, min((by + 1) * size, height)), (bx * size, min((bx + 1) * size, width))

    def middle_region(self) -> Region:
        """The region of the middle block: the widest read window, the memory estimates' block."""
        grid_y, grid_x = self.grid
        return self.region((grid_y // 2) * grid_x + grid_x // 2)


def network_tile_pixels(shape_dhw: Tuple[int, int, int], block_size: Optional[int], inference: Dict[str, Any]
                        ) -> int:
    """Pixels of network tiles along the planes' image axes, times the planes, summed over the orientations:
    the network's work up to the Z tiling, which blocks do not change. Block by block (``block_size``) each
    block computes every tile of the global grid that overlaps it (:func:`restore.tile_grid`), so that it
    restores exactly as the whole stack does; ``None``: the whole stack in memory."""
    _, height, width = shape_dhw
    kernel = restore.Kernel(**inference)

    def along(size: int, region: Tuple[int, int]) -> int:
        grid = restore.tile_grid(size, kernel.tile_size, kernel.tile_overlap, region)
        return len(grid.starts) * grid.tile

    total = 0
    for orientation in kernel.orientations:
        planes, image = (height, width) if orientation == "y" else (width, height)
        step = block_size or image
        total += planes * sum(along(image, (start, min(start + step, image))) for start in range(0, image, step))
    return total


def tile_work(shape_dhw: Tuple[int, int, int], block_size: int, inference: Dict[str, Any]) -> float:
    """The network's work block by block relative to the same restore in memory (1.0: no tile repeated):
    blocks narrower than a tile, or cut across tiles, compute tiles their neighbours compute too."""
    return network_tile_pixels(shape_dhw, block_size, inference) / network_tile_pixels(shape_dhw, None, inference)


def _read_kept(source: Source, rows: slice, cols: slice, z: slice = slice(None)) -> np.ndarray:
    """Kept slices of a window, as stored (a Zarr image reads only the chunks it touches)."""
    if isinstance(source, np.ndarray):
        return source[z, rows, cols]
    return source.read(z, rows, cols)


@dataclass(frozen=True)
class LabelBoundaries:
    """The boundary mask of a dense label image's kept slices (:func:`morph.label_boundaries`), read
    like a kept-slice source: what the dense label rule restores, block by block.

    A window is read one pixel larger on each side, so that two ids touching across the window's edge
    mark their boundary as on whole slices: the mask of any window is the whole-slice mask's window.
    """
    labels: Any  # ZarrImage or ndarray of ids, shape (K, H, W)

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.labels.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(bool)

    def read(self, z: slice, rows: slice, cols: slice) -> np.ndarray:
        return self.ids_and_boundaries(z, rows, cols)[1]

    def ids_and_boundaries(self, z: slice, rows: slice, cols: slice) -> Tuple[np.ndarray, np.ndarray]:
        """The ids of a window and their boundary mask, from one read of the window one pixel wider."""
        _, height, width = self.shape
        (r0, r1), (c0, c1) = (rows.indices(height)[:2], cols.indices(width)[:2])
        g0, g1, h0, h1 = max(0, r0 - 1), min(height, r1 + 1), max(0, c0 - 1), min(width, c1 + 1)
        ids = _read_kept(self.labels, slice(g0, g1), slice(h0, h1), z)
        inner = (slice(None), slice(r0 - g0, r1 - g0), slice(c0 - h0, c1 - h0))
        return ids[inner], label_boundaries(ids)[inner]


def _engine_input(values: np.ndarray, threshold: Optional[float],
                  value_range: Optional[Tuple[float, float]]) -> np.ndarray:
    """What the kernel takes of stored values: their mask (``zarr_io.foreground``), or with
    ``value_range`` the grey values normalised by it (float32, ``data.normalize_intensity``). NaN or
    infinite values are refused (``data.refuse_non_finite``) in every window, as a whole stack's are."""
    refuse_non_finite(values, "the input")
    if value_range is None:
        return zarr_io.foreground(values, threshold)
    return normalize_intensity(values, value_range)


def _read_engine_input(source: Source, rows: slice, cols: slice, threshold: Optional[float],
                       value_range: Optional[Tuple[float, float]] = None, slices_per_read: int = 16) -> np.ndarray:
    """:func:`_engine_input` of a window of kept slices ``(K, h, w)`` (bool, or float32 with
    ``value_range``), read a few slices at a time so that the stored values (an id image: 4 or 8
    bytes per voxel) are never held whole next to it."""
    depth = source.shape[0]
    out = np.empty((depth, rows.stop - rows.start, cols.stop - cols.start),
                   dtype=bool if value_range is None else np.float32)
    for k0 in range(0, depth, slices_per_read):
        z = slice(k0, min(k0 + slices_per_read, depth))
        out[z] = _engine_input(_read_kept(source, rows, cols, z), threshold, value_range)
    return out


# --------------------------------------------------------------------------- #
# Markers of finished blocks
# --------------------------------------------------------------------------- #
def _marker_path(name: str) -> str:
    return f"{PROGRESS_GROUP}/{name}"


def create_markers(output: str, name: str, count: int) -> None:
    """One byte per block, one chunk per byte: workers mark their own blocks without sharing a chunk."""
    zarr.open_group(output, mode="r+").require_group(PROGRESS_GROUP).create_array(
        name, shape=(count,), chunks=(1,), dtype="uint8", fill_value=0, overwrite=True)


def mark_finished(output: str, name: str, index: int) -> None:
    """Record block ``index`` as finished (called after its data is written)."""
    zarr.open_array(store=output, path=_marker_path(name), mode="r+")[index] = 1


def finished_blocks(output: str, name: str) -> set:
    """Indices of the blocks recorded as finished; an unreadable marker (a run killed while writing
    it) counts as not finished, so its block is done again."""
    markers = zarr.open_array(store=output, path=_marker_path(name), mode="r")
    try:
        return set(np.flatnonzero(markers[:]).tolist())
    except Exception:  # one damaged marker chunk: read them one by one
        done = set()
        for index in range(markers.shape[0]):
            with contextlib.suppress(Exception):
                if markers[index]:
                    done.add(index)
        return done


# --------------------------------------------------------------------------- #
# Worker side: the model, pass 1 (probabilities and mask), pass 2 (ids), pass 3 (pyramid)
# --------------------------------------------------------------------------- #
def _model_cache() -> Dict[Tuple[str, int, int, str], nn.Module]:
    """The process' model cache. It lives in ``sys``, not in this module: on a cluster the module's
    functions arrive by value with each pass (:func:`_ship`), each time with fresh globals."""
    return sys.__dict__.setdefault("_axial_restore_models", {})


def cached_model(path: str, device: Optional[str] = None) -> nn.Module:
    """The model saved at ``path``, loaded (and BatchNorm-folded) once per worker process."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size, str(device))
    models = _model_cache()
    if key not in models:
        models.clear()  # one model at a time
        model, _ = load_model(path, device or None)
        models[key] = fuse_for_inference(model)
    return models[key]


@dataclass(frozen=True)
class RestoreJob:
    """Everything a worker needs to restore any block of one volume (small and picklable,
    except an in-memory ``source``, which only this process' own runs accept).

    Attributes
    ----------
    source : ZarrImage or ndarray, shape (K, H, W)
        The kept slices (masks, grey values or ids: foreground by
        ``binarize_threshold``; grey values restored as such with ``value_range``).
    plan : BlockPlan of the output ``(D, H, W)``
    factor : float
    inference : dict
        Keyword arguments of :func:`restore.restore_block` (``restore.inference_kwargs``).
    probability_threshold : float
    kernel_dtype : str
        dtype the kernel computes probabilities into (uint8 stores ``round(255 p)``);
        float32 for grey values.
    image : OmeZarrImage
        The output image: the mask (in ``mask_values``), or grey values of the input's
        dtype (``data.grey_dtype``).
    probabilities : OmeZarrImage or None
        Where probabilities go, when they are kept (masks only).
    output : str
        The output store (markers, model file).
    model_path : str
    device : str or None
    binarize_threshold : float or None
    value_range : (lo, hi) or None
        Grey-scale stacks: the range of the whole volume that normalises every
        block (:func:`volume_intensity_range`); None for masks.
    """
    source: Any
    plan: BlockPlan
    factor: float
    inference: Dict[str, Any]
    probability_threshold: float
    kernel_dtype: str
    image: OmeZarrImage
    probabilities: Optional[OmeZarrImage]
    output: str
    model_path: str
    device: Optional[str] = None
    binarize_threshold: Optional[float] = None
    value_range: Optional[Tuple[float, float]] = None
    boundaries: Optional[str] = None  # dense label rule: the scratch array of boundary probabilities
    mask_values: MaskValues = MaskValues()  # the values a restored mask is written in (the input's own)


def read_window_for(global_hw: Tuple[int, int], region: Region, factor: float, inference: Dict[str, Any]) -> Region:
    """The kept-slice window that restoring ``region`` reads: :func:`restore.read_window` with the
    geometry :func:`restore.restore_block` uses for ``inference`` (its keyword arguments)."""
    tile = inference["tile_size"]
    overlap = inference.get("overlap")  # None: restore_block's default
    stride = restore.planes_apart(inference.get("channel_stride"), factor, inference.get("stride_fraction", 1.0))
    return restore.read_window(global_hw, region, inference["train_depth"], stride, tile, overlap,
                               inference.get("orientations", restore.ORIENTATIONS))


def release_freed_memory() -> None:
    """Give the pages the heap holds free back to the operating system (glibc's ``malloc_trim``; nothing
    where there is no glibc).

    Called after each block. A worker that reuses its heap (started without Dask's
    ``MALLOC_TRIM_THRESHOLD_``, docs/large-volumes.md) keeps its last block's freed tensors there, and Dask's
    memory monitor would count them against ``--worker-memory`` while the worker waits for its next block.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def restore_one_block(job: RestoreJob, index: int) -> Dict[str, Any]:
    """Pass 1 for block ``index``: read its window, run the kernel, threshold it (masks) or map it back
    to grey values, write, mark it finished.

    Returns
    -------
    dict with ``index``, ``seconds`` and, for masks, ``foreground`` (voxels)
    """
    start = time.perf_counter()
    region = job.plan.region(index)
    write = _write_grey_values if job.value_range is not None else (_write_boundaries if job.boundaries
                                                                     else _write_mask)
    # The kernel's output goes straight to the writer (no reference kept here), which frees it early.
    result = write(job, region, _restore_region(job, region))
    mark_finished(job.output, "restore", index)
    release_freed_memory()
    return dict(result, index=index, seconds=time.perf_counter() - start)


def _restore_region(job: RestoreJob, region: Region) -> np.ndarray:
    """The kernel's output for ``region`` (all of Z): probabilities of ``job.kernel_dtype``, or
    normalised grey values (float32); its read window is freed on return."""
    (wy0, wy1), (wx0, wx1) = read_window_for(job.plan.shape_dhw[1:], region, job.factor, job.inference)
    if job.inference.get("interfaces"):  # the ids, read once, give both the boundary mask and the interfaces
        labels, kept = _label_window(job.source, (wy0, wy1), (wx0, wx1))
    else:
        labels, kept = None, _read_engine_input(job.source, slice(wy0, wy1), slice(wx0, wx1),
                                                job.binarize_threshold, job.value_range)
    model = cached_model(job.model_path, job.device)
    return restore.restore_block(model, kept, (wy0, wx0), job.plan.shape_dhw[1:], region, job.factor,
                                 depth=job.plan.shape_dhw[0], out_dtype=np.dtype(job.kernel_dtype),
                                 device=torch.device(job.device) if job.device else None, progress=False,
                                 labels=labels, **job.inference)


def _label_window(source: "LabelBoundaries", rows: Tuple[int, int], cols: Tuple[int, int]
                  ) -> Tuple[restore.LabelWindow, np.ndarray]:
    """For a kernel that takes interfaces: the kept ids around a read window, :func:`restore.interfaces_reach`
    wider on every side (within the slices), and the boundary mask of the read window itself, from one read."""
    _, height, width = source.shape
    reach = restore.interfaces_reach()
    y0, y1 = max(0, rows[0] - reach), min(height, rows[1] + reach)
    x0, x1 = max(0, cols[0] - reach), min(width, cols[1] + reach)
    ids, boundaries = source.ids_and_boundaries(slice(None), slice(y0, y1), slice(x0, x1))
    window = boundaries[:, rows[0] - y0:rows[1] - y0, cols[0] - x0:cols[1] - x0]
    return restore.LabelWindow(np.asarray(ids), (y0, x0)), np.ascontiguousarray(window)


def _write_mask(job: RestoreJob, region: Region, probabilities: np.ndarray) -> Dict[str, Any]:
    """Write a block's probabilities (when kept) and its mask (in ``job.mask_values``: the input's values, 0/255 by
    default); returns ``foreground`` (voxels)."""
    (y0, y1), (x0, x1) = region
    target = (slice(None), slice(y0, y1), slice(x0, x1))
    if job.probabilities is not None:
        stored = np.dtype(job.probabilities.dtype)
        job.probabilities.write(target, probabilities.astype(stored, copy=False))
    # Without kept probabilities the uint8 ones are overwritten by the mask: one output-sized array per block.
    in_place = job.probabilities is None and probabilities.dtype == np.uint8
    mask = restore.threshold_probabilities(probabilities, job.probability_threshold, in_place=in_place)
    del probabilities
    if job.mask_values == MaskValues():  # 0/255, in place: no second output-sized array
        values = mask.view(np.uint8)
        values *= 255
    else:
        values = job.mask_values.encode(mask)
    job.image.write(target, values)
    return {"foreground": int(np.count_nonzero(values))}


def _write_boundaries(job: RestoreJob, region: Region, probabilities: np.ndarray) -> Dict[str, Any]:
    """Dense label rule, pass 1: write a block's boundary probabilities into the run's scratch array
    (and the probabilities' output, when kept); the mask and the ids come in the label pass."""
    (y0, y1), (x0, x1) = region
    target = (slice(None), slice(y0, y1), slice(x0, x1))
    if job.probabilities is not None:
        job.probabilities.write(target, probabilities.astype(np.dtype(job.probabilities.dtype), copy=False))
    zarr.open_array(store=job.output, path=job.boundaries, mode="r+")[target] = probabilities
    return {}


def _write_grey_values(job: RestoreJob, region: Region, normalized: np.ndarray,
                       slices_per_step: int = 16) -> Dict[str, Any]:
    """Write a block's grey values: the kernel's normalised values mapped back with the volume's range
    to the output's dtype, the kept slices copied verbatim, as ``restore.restore_intensity`` does.
    Returns no counters."""
    (y0, y1), (x0, x1) = region
    values = np.empty(normalized.shape, dtype=job.image.dtype)
    # A few slices at a time: the way back makes float32 temporaries, which whole would triple the block.
    for z0 in range(0, len(values), slices_per_step):
        z = slice(z0, z0 + slices_per_step)
        values[z] = denormalize_intensity(normalized[z], job.value_range, values.dtype)
    del normalized
    if job.inference.get("keep_kept_slices", True):
        restore.copy_kept_slices(values, _read_kept(job.source, slice(y0, y1), slice(x0, x1)), job.factor)
    job.image.write((slice(None), slice(y0, y1), slice(x0, x1)), values)
    return {}


@dataclass(frozen=True)
class LabelJob:
    """Everything a worker needs to give the ids of any block (see :func:`label_block`)."""
    labels_source: Any
    plan: BlockPlan
    factor: float
    mask: OmeZarrImage
    labels: OmeZarrImage
    output: str
    halo: int = LABEL_HALO
    max_halo: int = LABEL_HALO * 8


def _slabs(n_kept: int, factor: float, window_pixels: int) -> List[Tuple[int, int]]:
    """Kept-slice ranges ``(ka, kb)`` (inclusive) covering the stack, a few intervals each."""
    intervals = max(1, int(LABEL_SLAB_VOXELS // max(1, factor * window_pixels)))
    return [(ka, min(ka + intervals, n_kept - 1)) for ka in range(0, n_kept - 1, intervals)]


def _slab_slices(ka: int, kb: int, factor: float) -> Tuple[slice, float]:
    """The output slices from kept slice ``ka`` to ``kb`` (each included where it lands on one), and
    kept slice ``ka``'s position relative to the first of them (``assign_labels``' ``offset``)."""
    first = int(np.ceil(ka * factor - ON_GRID_TOLERANCE))
    last = int(np.floor(kb * factor + ON_GRID_TOLERANCE))
    return slice(first, last + 1), ka * factor - first


def _ids_could_differ(mask_slab: np.ndarray, labels_slab: np.ndarray, factor: float, inner: Tuple[slice, slice],
                      open_edges: Dict[str, bool], halo: int, offset: float = 0.0) -> bool:
    """Whether :func:`labeling.assign_labels` on this window could give the region other ids than on
    whole slices.

    The ids of a region's voxel depend on (a) its 2D connected component and
    (b) the nearest labelled pixel of the two kept slices around it. Both are
    the same as on whole slices when (a) no component in the region reaches
    an edge of the window that is not the image's edge, and (b) every
    foreground voxel of the region has a labelled pixel closer than ``halo``
    (pixels outside the window are farther than that). Not covered: equal
    distances to two ids (ties), and the restricted search for voxels whose
    nearest id is not one their component touches.
    """
    from scipy import ndimage

    edges = [(0, slice(None)) if open_edges["top"] else None, (-1, slice(None)) if open_edges["bottom"] else None,
             (slice(None), 0) if open_edges["left"] else None, (slice(None), -1) if open_edges["right"] else None]
    edges = [e for e in edges if e is not None]
    if not edges:
        return False
    n_kept = labels_slab.shape[0]
    squared: List[Optional[np.ndarray]] = [None] * n_kept  # squared distance to the nearest labelled pixel

    def nearest_squared(k: int) -> Optional[np.ndarray]:
        if squared[k] is None and labels_slab[k].any():
            squared[k] = ndimage.distance_transform_edt(labels_slab[k] == 0).astype(np.float32) ** 2
        return squared[k]

    positions = kept_positions(n_kept, factor) + offset
    lower_of, upper_of, _ = bracket(positions, mask_slab.shape[0])
    kept_z = set(slices_on_grid(n_kept, factor, mask_slab.shape[0], offset)[1].tolist())
    for z in range(mask_slab.shape[0]):
        region_mask = mask_slab[z][inner]
        if z in kept_z or not region_mask.any():
            continue  # a kept slice keeps its ids verbatim
        components, _ = ndimage.label(mask_slab[z])  # assign_labels' components (4-connected)
        on_edges = np.unique(np.concatenate([components[e].ravel() for e in edges]))
        in_region = np.unique(components[inner][region_mask])
        if np.intersect1d(on_edges[on_edges > 0], in_region).size:
            return True
        best = np.full(region_mask.shape, np.inf, dtype=np.float32)
        for k in {int(lower_of[z]), int(upper_of[z])}:
            dz = z - positions[k]
            distances = nearest_squared(k)
            if distances is not None:
                np.minimum(best, distances[inner] + float(dz) ** 2, out=best)
        if np.any(best[region_mask] >= halo ** 2):
            return True
    return False


@dataclass(frozen=True)
class DenseLabelJob:
    """Everything a worker needs to grow the ids of any block of a dense label image
    (see :func:`dense_label_block`)."""
    labels_source: Any
    plan: BlockPlan
    factor: float
    boundaries: str  # the scratch array of boundary probabilities (pass 1), a path in ``output``
    mask: OmeZarrImage
    labels: OmeZarrImage
    output: str
    probability_threshold: float
    drawn_boundaries: bool  # the kept slices hold id 0 somewhere (labeling.grow_labels)
    shape_prior: float  # weight of the shape-based interfaces (labeling.grow_labels)
    halo: int = LABEL_HALO
    max_halo: int = LABEL_HALO * 8


def dense_label_block(job: DenseLabelJob, index: int) -> Dict[str, Any]:
    """Pass 2 of the dense label rule for block ``index``: :func:`labeling.grow_labels` on the block plus a
    halo, a few kept-slice intervals at a time (each gap grows from its own two kept slices, so the
    intervals are independent), its ids and their foreground (0/255) written.

    A seeded watershed reaches a voxel along the path of least boundary, which may leave the window: the
    halo doubles until two halos give the block the same ids (or it covers the whole slice, which is
    exact), up to ``max_halo``; a block accepted at that limit is reported (``exact`` False).
    """
    start = time.perf_counter()
    depth, height, width = job.plan.shape_dhw
    (y0, y1), (x0, x1) = job.plan.region(index)
    boundaries = zarr.open_array(store=job.output, path=job.boundaries, mode="r")
    ids = np.zeros((depth, y1 - y0, x1 - x0), dtype=np.dtype(job.labels.dtype))
    exact, largest = True, 0
    window_pixels = (y1 - y0 + 2 * job.halo) * (x1 - x0 + 2 * job.halo)
    for ka, kb in _slabs(job.labels_source.shape[0], job.factor, window_pixels):
        z, offset = _slab_slices(ka, kb, job.factor)
        # The shape-based interfaces and the share of 0 among the boundaries of a window are those of the whole
        # slices beyond their reach from its edge.
        reach = max(labeling.shape_prior_reach() if job.shape_prior else 0,
                    labeling.zero_share_reach() if job.drawn_boundaries else 0)
        halo, previous = max(min(job.halo, job.max_halo), reach), None
        while True:
            rows = slice(max(0, y0 - halo), min(height, y1 + halo))
            cols = slice(max(0, x0 - halo), min(width, x1 + halo))
            ids_kept, boundaries_kept = LabelBoundaries(job.labels_source).ids_and_boundaries(slice(ka, kb + 1),
                                                                                              rows, cols)
            grown = labeling.grow_labels(boundaries[z, rows, cols], ids_kept, job.factor, job.probability_threshold,
                                        progress=False, drawn_boundaries=job.drawn_boundaries,
                                        boundaries_khw=boundaries_kept, offset=offset,
                                        origin_zyx=(z.start, rows.start, cols.start), shape_prior=job.shape_prior)
            inner = grown[:, y0 - rows.start:y1 - rows.start, x0 - cols.start:x1 - cols.start]
            whole = (rows.start, rows.stop, cols.start, cols.stop) == (0, height, 0, width)
            stable = whole or (previous is not None and np.array_equal(inner, previous))
            if stable or halo >= job.max_halo:
                break
            previous, halo = inner, min(2 * halo, job.max_halo)
        ids[z] = inner
        exact, largest = exact and stable, max(largest, halo)
    target = (slice(None), slice(y0, y1), slice(x0, x1))
    job.labels.write(target, ids)
    job.mask.write(target, (ids != 0).astype(np.uint8) * 255)
    mark_finished(job.output, "labels", index)
    release_freed_memory()
    return {"index": index, "seconds": time.perf_counter() - start, "halo": largest, "exact": exact}


def label_block(job: LabelJob, index: int) -> Dict[str, Any]:
    """Pass 2 for block ``index``: ids of its restored voxels, written into the label image.

    :func:`labeling.assign_labels` runs on the block plus a halo, a few
    kept-slice intervals at a time (each restored slice only looks at the two
    kept slices around it, so the intervals are independent). The halo doubles
    while :func:`_ids_could_differ` says the block's ids could differ from
    the whole-slice ones, up to ``max_halo``; a block accepted at that limit
    is reported (``exact`` False).
    """
    start = time.perf_counter()
    depth, height, width = job.plan.shape_dhw
    (y0, y1), (x0, x1) = job.plan.region(index)
    n_kept = job.labels_source.shape[0]
    halo = min(job.halo, job.max_halo)
    while True:
        wy0, wy1, wx0, wx1 = max(0, y0 - halo), min(height, y1 + halo), max(0, x0 - halo), min(width, x1 + halo)
        open_edges = {"top": wy0 > 0, "bottom": wy1 < height, "left": wx0 > 0, "right": wx1 < width}
        inner = (slice(y0 - wy0, y1 - wy0), slice(x0 - wx0, x1 - wx0))
        ids = np.zeros((depth, y1 - y0, x1 - x0), dtype=np.dtype(job.labels.dtype))
        could_differ = False
        for ka, kb in _slabs(n_kept, job.factor, (wy1 - wy0) * (wx1 - wx0)):
            z, offset = _slab_slices(ka, kb, job.factor)
            mask_slab = job.mask.level(0, mode="r")[z, wy0:wy1, wx0:wx1] != 0
            labels_slab = _read_kept(job.labels_source, slice(wy0, wy1), slice(wx0, wx1), slice(ka, kb + 1))
            if _ids_could_differ(mask_slab, labels_slab, job.factor, inner, open_edges, halo, offset):
                could_differ = True
                if halo < job.max_halo:
                    break  # try again with a larger halo
            ids[z] = labeling.assign_labels(mask_slab, labels_slab, job.factor, progress=False,
                                           offset=offset)[(slice(None),) + inner]  # our bar counts blocks
        if not could_differ or halo >= job.max_halo:
            break
        halo = min(2 * halo, job.max_halo)
    job.labels.write((slice(None), slice(y0, y1), slice(x0, x1)), ids)
    mark_finished(job.output, "labels", index)
    release_freed_memory()
    return {"index": index, "seconds": time.perf_counter() - start, "halo": halo, "exact": not could_differ}


# --------------------------------------------------------------------------- #
# Running tasks: in this process, or on a Dask cluster
# --------------------------------------------------------------------------- #
RESUME_ADVICE = ("Finished blocks are kept: run the same command again with --resume added (resume=True in "
                 "Python) to continue.")


class BlockFailedError(UserError, RuntimeError):
    """A task failed on every attempt; the blocks finished before it stay recorded.

    A :class:`data.UserError`, so that the command line prints its message as one line (exit status
    2): it names the task's exception (type, text, innermost frame) and the way to continue
    (:data:`RESUME_ADVICE`). The task's exception is the ``__cause__``, and its full traceback is
    written to :data:`ERROR_FILE` in the output (named in the message).
    """


def _failure(desc: str, item: Any, attempts: int, error: BaseException, tb, output: Optional[str],
             hint: str = "") -> BlockFailedError:
    """The :class:`BlockFailedError` for ``error`` (raised with traceback ``tb``) of task ``item``;
    writes the traceback to :data:`ERROR_FILE` in ``output`` when it can."""
    frames = traceback.extract_tb(tb) if tb is not None else []
    where = ""
    if frames:  # code shipped to a cluster may not name its file ('<dynamic-code>')
        source = os.path.basename(frames[-1].filename)
        where = (f" at {'line ' if source.startswith('<') else source + ':'}{frames[-1].lineno} in "
                 f"{frames[-1].name}")
    report = ""
    if output and os.path.isdir(output):
        path = os.path.join(output, ERROR_FILE)
        with contextlib.suppress(OSError):
            with open(path, "w") as file:
                file.write(f"{desc}: task {item} failed {attempts} times; the last attempt raised:\n\n")
                file.write("".join(traceback.format_exception(type(error), error, tb)))
            report = f" Full traceback in {path}."
    return BlockFailedError(f"{desc}: task {item} failed {attempts} times ({type(error).__name__}: {error}{where})."
                            f"{hint}{report} {RESUME_ADVICE}")


# Shipping the project's code to a cluster. The task functions, the jobs (their classes) and every
# function and module of this project they reach are pickled *by value* (cloudpickle) into one payload
# per pass; the task is a small function that unpickles it once per worker process and runs it. The
# scheduler (which unpickles task graphs) sees only that function and bytes; workers need the
# dependencies, never this checkout, and always run the code of the client that submitted.
_SHIP_LOCK = threading.Lock()
_PROJECT_DIR = os.path.dirname(os.path.realpath(__file__))


def _project_modules() -> List[types.ModuleType]:
    """This project's modules imported here (the flat layout: every ``*.py`` beside this file)."""
    modules = []
    for name in sorted(os.listdir(_PROJECT_DIR)):
        module = sys.modules.get(name[:-3]) if name.endswith(".py") else None
        file = getattr(module, "__file__", None)
        if file and os.path.dirname(os.path.realpath(file)) == _PROJECT_DIR:
            modules.append(module)
    return modules


class _CodePickler(cloudpickle.Pickler):
    """cloudpickle, plus what a module pickled whole may hold: weak caches and locks arrive new and
    empty, and module objects of a subclass (``torch.backends.cpu``) are imported on arrival."""

    def __init__(self, file, shipped: set):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.shipped = shipped
        # Process-local state: a new, empty one on the worker. (Made here, not held by the module: the
        # type of a lock is not importable by its name, so a module holding it could not be shipped.)
        self.fresh = {weakref.WeakKeyDictionary: weakref.WeakKeyDictionary,
                      weakref.WeakValueDictionary: weakref.WeakValueDictionary, weakref.WeakSet: weakref.WeakSet,
                      type(threading.Lock()): threading.Lock, type(threading.RLock()): threading.RLock}

    def reducer_override(self, obj):
        fresh = self.fresh.get(type(obj))
        if fresh is not None:
            return fresh, ()
        if (isinstance(obj, types.ModuleType) and type(obj) is not types.ModuleType
                and obj.__name__ not in self.shipped):
            return importlib.import_module, (obj.__name__,)
        return super().reducer_override(obj)


def _ship(function: Callable, job: Any) -> Tuple[str, bytes]:
    """``(digest, payload)``: ``(function, job)`` pickled with this project's code by value."""
    modules = _project_modules()
    with _SHIP_LOCK:
        registered = cloudpickle.list_registry_pickle_by_value()
        added = [m for m in modules if m.__name__ not in registered]
        for module in added:
            cloudpickle.register_pickle_by_value(module)
        try:
            buffer = io.BytesIO()
            _CodePickler(buffer, {m.__name__ for m in modules}).dump((function, job))
        finally:
            for module in added:
                cloudpickle.unregister_pickle_by_value(module)
    payload = buffer.getvalue()
    return hashlib.sha256(payload).hexdigest(), payload


def _shipped_task_runner() -> Callable[..., Dict[str, Any]]:
    """The task function of shipped passes. Local to this factory, so that cloudpickle pickles it by
    value; it refers to nothing of this project (the scheduler unpickles it without the project)."""
    def run_shipped_task(item, digest, payload):
        import pickle as unpickler
        import sys as process

        unpickled = process.__dict__.setdefault("_axial_restore_shipped_code", {})
        entry = unpickled.get(digest)
        if entry is None:
            entry = unpickler.loads(payload)
            for old in list(unpickled)[:-1]:  # keep this pass and the one before
                unpickled.pop(old, None)
            unpickled[digest] = entry
        function, job = entry
        return function(job, item)

    return run_shipped_task


def _ignore_interrupts() -> None:
    """SIGINT ignored in this process (its main thread: handlers cannot be set elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _workers_ignore_interrupts(client) -> None:
    """Make a local cluster's workers, and any the nanny restarts, ignore Ctrl-C: a terminal sends it to every
    process of the job, and each worker would print a KeyboardInterrupt traceback; this process takes it,
    keeps the blocks written and closes the workers. (Until the plugin reaches a starting worker, Ctrl-C
    stops it as before; ignoring it here while they start would lose a Ctrl-C typed then.)"""
    from distributed import WorkerPlugin

    class IgnoreInterrupts(WorkerPlugin):
        def setup(self, worker) -> None:
            _ignore_interrupts()

    client.register_plugin(IgnoreInterrupts(), name="axial-restore-ignore-interrupts")


@contextlib.contextmanager
def dask_client(workers: int = 0, worker_memory: str = "1GiB", scheduler: Optional[str] = None,
                processes: bool = True) -> Iterator[Optional[Any]]:
    """A ``distributed.Client``: on ``scheduler`` when given, else on a new local cluster of
    ``workers`` processes (one thread each, ``worker_memory`` each), else None (run here)."""
    if not scheduler and workers <= 0:
        yield None
        return
    from distributed import Client, LocalCluster

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 'dashboard needs bokeh' and port notices
        if scheduler:
            client, cluster = connect_scheduler(scheduler, timeout="30s"), None
        else:
            # Threads (processes=False, for tests) share this process, whose memory a per-worker limit
            # would misread as theirs (and pause them): they get none.
            # The workers take the user's Dask configuration, its malloc setting included
            # (docs/large-volumes.md#worker-processes-and-glibcs-malloc).
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1,
                                   memory_limit=worker_memory if processes else 0, processes=processes,
                                   dashboard_address=":0")
            try:
                client = Client(cluster)
                if processes:
                    _workers_ignore_interrupts(client)
            except BaseException:  # the cluster's worker processes must not outlive a failed connection
                cluster.close()
                raise
    try:
        n_workers = len(client.scheduler_info(n_workers=-1).get("workers", {}))
        dashboard = client.dashboard_link if importlib.util.find_spec("bokeh") or scheduler else \
            "none (pip install bokeh for one)"
        print(f"Dask: {'scheduler ' + scheduler if scheduler else 'local cluster'} with {n_workers} worker(s); "
              f"dashboard: {dashboard}", flush=True)
        yield client
    finally:
        if cluster is None:
            client.close()
        else:
            _close_quietly(client, cluster)


def _silence_distributed_logs() -> None:
    """Only critical messages from ``distributed`` in this process from now on."""
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


def _close_quietly(client, cluster) -> None:
    """Close a local cluster without the notices its shutdown races print after a finished or
    interrupted run (a task cancelled, a heartbeat to a scheduler already gone, a worker killed after
    4 s): the run's own outcome is reported by then, and they read like errors. A user's own scheduler
    and its workers keep their logging."""
    logger = logging.getLogger("distributed")
    level = logger.level
    with contextlib.suppress(Exception):  # the workers may already be gone
        client.run(_silence_distributed_logs)
    logger.setLevel(logging.CRITICAL)  # the scheduler and nannies run in this process
    try:
        client.close()
        cluster.close()
    finally:
        logger.setLevel(level)


def run_tasks(function: Callable[..., Dict[str, Any]], job: Any, items: Sequence[Any], client=None,
              retries: int = RETRIES, desc: str = "Blocks", progress: bool = True,
              bar: Optional[tqdm] = None, *, ship_code: bool = False,
              output: Optional[str] = None) -> List[Dict[str, Any]]:
    """``function(job, item)`` for every item, with one progress bar (``bar``, or a new one); each
    failure is retried ``retries`` times (Dask's ``retries=`` on a cluster), then the run stops with
    :class:`BlockFailedError` (its traceback written into ``output``). ``ship_code``: send this
    project's code with the tasks (:func:`_ship`), for a cluster whose workers do not have it."""
    results: List[Dict[str, Any]] = []
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=len(items), desc=desc, unit="block", disable=not progress or not items)
    try:
        if client is None:
            for item in items:
                for attempt in range(retries + 1):
                    try:
                        results.append(function(job, item))
                        break
                    except Exception as error:
                        if attempt == retries:
                            raise _failure(desc, item, retries + 1, error, error.__traceback__,
                                           output) from error
                bar.update(1)
            return results
        from distributed import as_completed

        if ship_code and items:
            digest, payload = _ship(function, job)
            token = uuid.uuid4().hex
            # The code is one task of its own (its result fetched once per worker), not a copy in every task.
            code = client.submit(bytes, payload, key=f"code-{function.__name__}-{token}", pure=False)
            futures = client.map(_shipped_task_runner(), list(items), digest=digest, payload=code,
                                 key=[f"{function.__name__}-{token}-{i}" for i in range(len(items))],
                                 retries=retries, pure=False)
        else:
            futures = [client.submit(function, job, item, retries=retries, pure=False) for item in items]
        item_of = {future.key: item for future, item in zip(futures, items)}
        try:
            for future in as_completed(futures):
                if future.status == "error":
                    error = future.exception()
                    hint = (" Workers died while running it: most often a block needs more memory than "
                            "--worker-memory; give more or a smaller --block-size." if
                            type(error).__name__ == "KilledWorker" else "")
                    raise _failure(desc, item_of[future.key], retries + 1, error, future.traceback(), output,
                                   hint) from error
                results.append(future.result())
                bar.update(1)
        finally:
            client.cancel([f for f in futures if not f.done()])
            futures.clear()  # releases the code task with its last dependent
        return results
    finally:
        if own_bar:
            bar.close()


# --------------------------------------------------------------------------- #
# Training on a large store
# --------------------------------------------------------------------------- #
def training_stack(source: Source, settings: SettingsLike, binarize_threshold: Optional[float] = None,
                   max_bytes: int = TRAINING_BYTES, value_range: Optional[Tuple[float, float]] = None,
                   kind: str = "mask", with_ids: bool = False
                   ) -> Tuple[np.ndarray, int, Optional[np.ndarray]]:
    """Kept slices to train on, at most ``max_bytes`` of them read from the store.

    An in-memory source, or a store that small, is used whole (the training is
    then exactly the in-memory one). A larger store gives random lateral
    windows of all K slices, ``8 x TRAIN_XY_SIZE`` wide, as many as hold about
    ``2 x TRAIN_NB`` training crops (and fit in ``max_bytes``), laid side by
    side along X: training draws each crop within one window (``panel_width``
    of :func:`restore.train_on_stack`), as a crop across two would hold an edge
    that is in no image. For a mask, a window whose middle slice has less foreground
    than ``MIN_CONTENT_RATIO`` is drawn again (a few times); grey values take
    every window (training takes every grey-value crop too).

    Parameters
    ----------
    source : ndarray (K, H, W), ZarrImage or LabelBoundaries
        The kept slices.
    settings : Settings or mapping
        ``TRAIN_XY_SIZE``, ``TRAIN_NB``, ``MIN_CONTENT_RATIO`` and ``RANDOM_STATE`` are used.
    binarize_threshold : float, optional
        A mask's foreground is ``value > threshold``; default ``value != 0``.
    max_bytes : int
        The most bytes of kept slices read for training.
    value_range : (lo, hi), optional
        Grey-scale stacks: read grey values normalised by this range (the
        volume's, :func:`volume_intensity_range`) instead of a mask.
    kind : str
        The training's kind (:func:`restore.training_kind`), whose ``TRAIN_NB`` "by kind" applies.
    with_ids : bool
        ``source`` is a :class:`LabelBoundaries` whose network takes interfaces: return the kept ids of the
        same windows too.

    Returns
    -------
    stack : ndarray of bool (masks) or float32 (normalised grey values), shape (K, h, w)
    panel_width : int
        The width of one window (``w`` when the source is used whole).
    ids : ndarray of int, shape (K, h, w), or None (without ``with_ids``)
    """
    if isinstance(source, np.ndarray):
        return _engine_input(source, binarize_threshold, value_range), source.shape[2], None
    n_kept, height, width = source.shape
    itemsize = 1 if value_range is None else 4  # bytes per voxel of what is returned
    if with_ids:  # the ids beside the boundary mask
        itemsize += np.dtype(source.labels.dtype).itemsize

    def read(rows: slice, cols: slice) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        if with_ids:
            ids, boundaries = source.ids_and_boundaries(slice(None), rows, cols)
            return boundaries, np.asarray(ids)
        return _read_engine_input(source, rows, cols, binarize_threshold, value_range), None

    if n_kept * height * width * itemsize <= max_bytes:
        stack, ids = read(slice(0, height), slice(0, width))
        return stack, width, ids
    recipe = restore.training_kwargs(settings, kind)
    crop = int(recipe["train_xy_size"])
    side = min(height, width, 8 * crop)
    wanted = math.ceil(2 * recipe["train_nb"] * crop ** 2 / side ** 2)
    count = max(1, min(wanted, max_bytes // (n_kept * side * side * itemsize)))
    rng = np.random.default_rng(recipe["random_state"])
    windows, window_ids = [], []
    for _ in range(count):
        for _attempt in range(4):
            y0, x0 = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            window, ids = read(slice(y0, y0 + side), slice(x0, x0 + side))
            if value_range is not None or window[n_kept // 2].mean() >= recipe["min_content_ratio"]:
                break
        windows.append(window)
        window_ids.append(ids)
    return np.concatenate(windows, axis=2), side, np.concatenate(window_ids, axis=2) if with_ids else None


def volume_intensity_range(source: Source, max_values: int = INTENSITY_SAMPLE_VALUES) -> Tuple[float, float]:
    """One grey-value range ``(lo, hi)`` for the whole volume (``data.intensity_range``), found once
    before any block so that every block is normalised alike.

    An in-memory source gives exactly ``data.intensity_range`` of it (so the
    block-wise restore equals the in-memory one), and so does a store of at
    most ``max_values`` values. A larger store gives the range of a sample of
    about ``max_values`` values: every n-th kept slice and every m-th row of
    those (as many slices as rows are skipped), read slice by slice.
    """
    if isinstance(source, np.ndarray):
        return intensity_range(source)
    sample = zarr_io.sample_values(source, max_values)
    refuse_non_finite(sample, getattr(source, "path", "the input"))
    return intensity_range(sample)


# --------------------------------------------------------------------------- #
# The driver
# --------------------------------------------------------------------------- #
def _json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparing plans."""
    return json.loads(json.dumps(value))


def _resolved(name: Optional[str]) -> Optional[str]:
    """``name`` as a resolved path when it names an existing file or folder (``./a`` and ``a``, or a
    link and its target, are one input), else as given."""
    return os.path.realpath(name) if name and os.path.exists(name) else name


def _describe(source: Source, name: Optional[str], stack: str = "") -> Dict[str, Any]:
    """The identity of an input, recorded to check that a resumed run reads the same one: its resolved
    path (a Zarr image's own path; an in-memory stack's ``name``, e.g. its TIFF), the ``stack`` of that file
    (its channel and time point, :class:`OutputMetadata`), array, shape, dtype and, for a Zarr image, the
    index of its channel and time point, its voxel size, unit and translation."""
    if isinstance(source, np.ndarray):
        return {"path": _resolved(name), "stack": stack, "shape": list(source.shape), "dtype": str(source.dtype),
                "values_crc32": values_checksum(source)}
    def floats(values):
        return None if values is None else [float(v) for v in values]

    return {"path": os.path.realpath(source.path), "component": source.component,
            "leading_index": list(source.leading_index), "shape": list(source.shape),
            "dtype": str(source.dtype), "voxel_size_zyx": floats(source.voxel_size_zyx), "unit": source.unit,
            "translation_zyx": floats(source.translation_zyx), "values_crc32": values_checksum(source)}


def values_checksum(source: Source, slices: int = CHECKSUM_SLICES, windows: int = CHECKSUM_WINDOWS,
                    edge: int = CHECKSUM_EDGE) -> int:
    """A CRC-32 of an input's values, recorded so that ``--resume`` notices an input rewritten since the
    interrupted run (a segmentation proofread and exported again under the same name). An array (a file
    read whole) is checksummed whole; a store, which may be far larger than memory, on a sample: ``windows``
    x ``windows`` windows of ``edge`` pixels, evenly spread, each read once through about ``slices`` evenly
    spaced slices (so each chunk they touch is decoded once), so an edit between the windows goes unnoticed."""
    if isinstance(source, np.ndarray):
        return zlib.crc32(memoryview(np.ascontiguousarray(source)).cast("B"))
    depth, height, width = source.shape
    every = slice(0, depth, max(1, math.ceil(depth / slices)))
    checksum = 0
    for y in np.unique(np.linspace(0, max(height - edge, 0), windows).round().astype(int)):
        for x in np.unique(np.linspace(0, max(width - edge, 0), windows).round().astype(int)):
            window = source.read(every, slice(y, y + edge), slice(x, x + edge))
            checksum = zlib.crc32(memoryview(np.ascontiguousarray(window)).cast("B"), checksum)
    return checksum


def _stack_read(stack: str) -> set:
    """The parts of a recorded stack choice (``'channel 1, time point 0'``) that pick other than the first."""
    return {part for part in stack.split(", ") if part and not part.endswith(" 0")}


def _input_differences(recorded: Optional[Dict[str, Any]], current: Optional[Dict[str, Any]]) -> List[str]:
    """What differs between a recorded input (:func:`_describe`) and this run's, in words. A record of an
    earlier version (a ``name`` as typed, no metadata) is compared on what it holds."""
    if recorded is None or current is None:
        return [] if recorded is None and current is None else ["given in one run only"]
    differences = []
    path = recorded["path"] if "path" in recorded else recorded.get("name")
    if _resolved(path) != current["path"]:
        differences.append(f"path '{path}' -> '{current['path']}'")
    for key in ("component", "shape", "dtype", "voxel_size_zyx", "unit", "translation_zyx"):
        if key in recorded and recorded[key] != current.get(key):
            differences.append(f"{key} {recorded[key]} -> {current.get(key)}")
    if "values_crc32" in recorded and recorded["values_crc32"] != current.get("values_crc32") and not differences:
        differences.append("values changed since the interrupted run")
    # Records from before channels could be chosen read the file's only stack: '' and index 0 throughout. A stack
    # chosen at 0 along an axis is the same read as none chosen (a file with several is refused without a choice).
    if _stack_read(recorded.get("stack", "")) != _stack_read(current.get("stack", "")):
        differences.append(f"stack '{recorded.get('stack', '')}' -> '{current.get('stack', '')}'")
    if "leading_index" in current and recorded.get("leading_index", [0] * len(current["leading_index"])) != \
            current["leading_index"]:
        differences.append(f"channel / time point index {recorded.get('leading_index')} -> {current['leading_index']}")
    return differences


def _inference_as_run(inference: Dict[str, Any], factor: Optional[float]) -> Dict[str, Any]:
    """A recorded kernel's options with the channel planes' spacing in voxels, as the kernel runs it: a
    record of an earlier version has no ``stride_fraction`` (its planes were the factor apart), and a
    typed ``--channel-stride`` equal to the spacing a rule gives is the same run."""
    if factor is None or "channel_stride" not in inference:
        return inference
    as_run = {name: value for name, value in inference.items() if name != "stride_fraction"}
    as_run["channel_stride"] = restore.planes_apart(inference["channel_stride"], factor,
                                                    inference.get("stride_fraction", 1.0))
    return as_run


def _plan_differences(recorded: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """The settings of this run that differ from the recorded plan of the interrupted one (keys an
    earlier version did not record are not compared, except the shape prior of a dense label image: a
    version without it grew the ids on the boundaries alone, weight 0)."""
    if recorded.get("label_rule") == "dense":
        recorded = {"shape_prior": 0.0, **recorded}
    differences = []
    for key, value in current.items():
        if key in ("input", "labels_input"):
            changed = _input_differences(recorded.get(key), value)
            if changed:
                differences.append(f"{key} ({'; '.join(changed)})")
        elif key == "inference" and isinstance(recorded.get(key), dict) and isinstance(value, dict):
            before = _inference_as_run(recorded[key], recorded.get("factor"))
            after = _inference_as_run(value, current.get("factor"))
            changed = [f"{name} {before.get(name)} -> {item}" for name, item in after.items()
                       if name in before and before[name] != item]  # name what changed
            if changed:
                differences.append(f"{key} ({'; '.join(changed)})")
        elif key in recorded and recorded[key] != value:
            differences.append(key)
    return differences


def _stage(output: str, name: str, values: np.ndarray) -> ZarrImage:
    """An in-memory input written into the output's progress group, so that worker processes can read it."""
    group = zarr.open_group(output, mode="r+").require_group(PROGRESS_GROUP)
    chunks = (1,) + tuple(min(s, zarr_io.CHUNK_XY * 4) for s in values.shape[1:])
    array = group.create_array(name, shape=values.shape, chunks=chunks, dtype=values.dtype, fill_value=0,
                               overwrite=True)
    array[:] = values
    return ZarrImage(os.path.join(output, PROGRESS_GROUP, name), "", (), tuple(values.shape), str(values.dtype))


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def same_weights(first: nn.Module, second: nn.Module) -> bool:
    """Same architecture and identical weights."""
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def finished_output(output: Union[str, Path]) -> bool:
    """Whether ``output`` is an output of this tool whose run completed (its record says so)."""
    try:
        return zarr_io.open_output(output, mode="r")[1].get("state") == "complete"
    except (OSError, ValueError):  # nothing there, or an array, not a group (zarr's errors are ValueErrors)
        return False


def interrupted_run_model(output: Union[str, Path]) -> Optional[nn.Module]:
    """The model an unfinished run keeps in its output ``output`` (:data:`MODEL_FILE`), or None (not an
    output of an unfinished run, or a finished one: its model file is removed when it completes)."""
    model_file = Path(output) / MODEL_FILE
    return load_model(model_file, "cpu")[0] if model_file.is_file() else None


def estimate_dense_label_memory(plan: BlockPlan, n_kept: int, factor: float, label_dtype: Any,
                                halo: int = 2 * LABEL_HALO) -> int:
    """Rough peak bytes of one task of the dense label pass (:func:`dense_label_block`).

    The block's ids and the mask written from them; a slab of its window
    (:func:`_slabs`, sized for the first halo): the boundary probabilities read
    and the ids grown with two successive halos; one gap flooded on the window
    (:func:`labeling.grow_labels_memory`); and the process. The window is a
    middle block with ``halo`` pixels around it, by default the second halo
    tried: the first at which a block that does not span the slices can be
    accepted (two halos must agree). A block whose halo doubles further needs
    more: about the square of its window's edge.
    """
    depth, height, width = plan.shape_dhw
    (y0, y1), (x0, x1) = plan.middle_region()

    def window_pixels(margin: int) -> int:
        return min(height, y1 - y0 + 2 * margin) * min(width, x1 - x0 + 2 * margin)

    # The slabs are cut for the first halo's window, as dense_label_block cuts them.
    first_window = (y1 - y0 + 2 * LABEL_HALO) * (x1 - x0 + 2 * LABEL_HALO)
    intervals = max((kb - ka for ka, kb in _slabs(n_kept, factor, first_window)), default=1)
    slab_voxels = min(depth, int(np.ceil(intervals * factor)) + 1) * window_pixels(halo)
    item = np.dtype(label_dtype).itemsize
    block_voxels = depth * (y1 - y0) * (x1 - x0)
    return int(block_voxels * (item + 2) + slab_voxels * (1 + 2 * item)
               + labeling.grow_labels_memory(factor, window_pixels(halo)) + PROCESS_BYTES)


def estimate_worker_memory(plan: BlockPlan, n_kept: int, factor: float, inference: Dict[str, Any],
                           kernel_dtype: str, grey_values: Optional[str] = None,
                           dense_label_dtype: Optional[Any] = None, device_type: str = "cpu") -> int:
    """Rough peak bytes of a worker: its largest task, a restore (:func:`estimate_block_memory`) or, for the
    ids of a dense label image of ``dense_label_dtype``, a dense label task (:func:`estimate_dense_label_memory`)."""
    need = estimate_block_memory(plan, n_kept, factor, inference, kernel_dtype, grey_values, dense_label_dtype,
                                 device_type)
    if dense_label_dtype is not None:
        need = max(need, estimate_dense_label_memory(plan, n_kept, factor, dense_label_dtype))
    return int(need)


def estimate_block_memory(plan: BlockPlan, n_kept: int, factor: float, inference: Dict[str, Any], kernel_dtype: str,
                          grey_values: Optional[str] = None, label_dtype: Optional[Any] = None,
                          device_type: str = "cpu") -> int:
    """Rough peak bytes of one restore task.

    The block's kernel output and what is written of it (the mask, or grey
    values of dtype ``grey_values``); the read window of a middle block (the
    widest, :func:`read_window_for`) twice: stored values and the engine's
    copy (bytes for a mask, float32 for normalised grey values); a batch of
    network tiles as the engine cuts and batches them (fitted to the planes,
    ``restore.fitted_tile``; on a CPU as many as ``restore.tiles_per_batch``
    runs at once) at :data:`ACTIVATION_BYTES` per tile pixel; and the process
    itself. A 161 x 512 x 512 grey-scale block (uint8, default network) is
    estimated at 584 MiB and measured at 638 MiB for the whole ``apply.py``
    process (2026-12-02). A kernel that takes interfaces (a dense label image's
    ids of ``label_dtype``) also holds the ids of its window, widened by
    ``restore.interfaces_reach``, and one chunk of planes' interfaces being filled
    (``restore.CHUNK_VALUES`` output voxels: a float32 distance, an id and a few
    bytes of masks each).
    """
    depth, height, width = plan.shape_dhw
    region = plan.middle_region()
    (wy0, wy1), (wx0, wx1) = read_window_for((height, width), region, factor, inference)
    block_voxels = depth * (region[0][1] - region[0][0]) * (region[1][1] - region[1][0])
    tile = inference["tile_size"]
    overlap = restore.Kernel(**inference).tile_overlap
    one_tile = (restore.fitted_tile(depth, tile, overlap)[0]
                * restore.fitted_tile(max(height, width), tile, overlap)[0])
    written, kept = (1, 1) if grey_values is None else (np.dtype(grey_values).itemsize, 4)
    interfaces = 0
    if inference.get("interfaces") and label_dtype is not None:
        item, reach = np.dtype(label_dtype).itemsize, restore.interfaces_reach()
        window = min(height, wy1 - wy0 + 2 * reach) * min(width, wx1 - wx0 + 2 * reach)
        interfaces = n_kept * window * item + restore.CHUNK_VALUES * (4 + item + 6)
    return (block_voxels * (np.dtype(kernel_dtype).itemsize + written)
            + 2 * n_kept * (wy1 - wy0) * (wx1 - wx0) * kept + interfaces
            + restore.tiles_per_batch(inference["batch_size"], inference.get("batch_pixels", 0), one_tile,
                                      device_type) * one_tile * ACTIVATION_BYTES + PROCESS_BYTES)


@dataclass(frozen=True)
class OutputMetadata:
    """What a block-wise output says about itself and its input (written into its metadata and its run's
    record), as opposed to how it is restored (the settings).

    Attributes
    ----------
    voxel_size_zyx : (3,) floats
        The output's voxel size (isotropic-ish), in ``unit``.
    unit : short (``um``) or NGFF (``micrometer``) unit name
    translation_zyx : (3,) floats
        The input's origin, written to the output (voxel 0 of the output is voxel 0 of the input).
    label_name : name of the output's label image, ``labels/<label_name>`` (with ``labels_source``)
    source_name : the input's path as the run's record names it (an in-memory stack's TIFF), optional
    source_stack : which stack of that file (``'channel 1'``: ``tiff_io.StackChoice.describe``), '' for its
        only one: a resumed run must read the same
    """
    voxel_size_zyx: Sequence[float]
    unit: str
    translation_zyx: Sequence[float] = (0.0, 0.0, 0.0)
    label_name: str = "restored"
    source_name: Optional[str] = None
    source_stack: str = ""
    mask_values: MaskValues = MaskValues()  # a restored mask's two values: the input mask's own


def restore_to_ome_zarr(
    source: Source,
    output: Union[str, Path],
    factor: float,
    settings: SettingsLike,
    described: OutputMetadata,
    *,
    kind: str = "mask",
    model: Optional[nn.Module] = None,
    model_config: Optional[Dict[str, Any]] = None,
    labels_source: Optional[Source] = None,
    label_rule: str = "sparse",
    probabilities: Optional[str] = None,
    probabilities_output: Optional[Union[str, Path]] = None,
    overwrite: bool = False,
    processes: bool = True,
    retries: int = RETRIES,
    label_halo: int = LABEL_HALO,
    progress: bool = True,
) -> Dict[str, Any]:
    """Restore the kept slices ``source`` block by block into an OME-Zarr output.

    Parameters
    ----------
    source : ZarrImage or ndarray, shape (K, H, W)
        Kept slices (Z step ``factor``); foreground is non-zero (or
        ``> settings.data.binarize_threshold``), or grey values. An ndarray is
        staged into the output when worker processes are used.
    output : path of the new ``.ome.zarr``
    factor : float
    settings : Settings
        Training, inference and large-volume settings: ``settings.large`` gives
        the block size (lateral block edge, 256 or less or a multiple of 256),
        the NGFF version ('0.4', Zarr v2, or '0.5', Zarr v3), the workers, worker
        memory and scheduler (``workers=0`` and no scheduler: run here, block
        after block; else a Dask cluster, see :func:`dask_client`), ``resume``
        (continue an interrupted run into the existing ``output``, same plan and
        model, skipping its finished blocks; a missing output starts afresh) and
        ``max_blocks`` (restore at most this many blocks now, then stop;
        ``resume`` continues). Change them with ``settings.with_values(BLOCK_SIZE=..)``.
        A dict of ``eval.py``-style constants is read as ``Settings.from_dict``,
        None is ``Settings()``.
    described : OutputMetadata
        The output's voxel size, unit and translation, the name of its label
        image and the input's name in the run's record.
    kind : {'mask', 'intensity'}
        'intensity': ``source`` holds grey values, restored as
        ``restore.restore_intensity`` restores them (one range for the whole
        volume, :func:`volume_intensity_range`, kept in the run's record) into
        an image of the input's dtype (``data.grey_dtype``) with an averaged
        pyramid; no labels, no probabilities. Label ids come with ``labels_source``.
    model : nn.Module, optional
        A trained model (of ``kind``); without one, a model is trained on (a
        bounded part of) ``source`` (:func:`training_stack`).
    model_config : dict, optional
        Stored with the model file (``model.save_model``'s ``config``).
    labels_source : ZarrImage or ndarray of uint, shape (K, H, W), optional
        Instance ids of the kept slices: the output gets ``labels/<described.label_name>``.
    label_rule : {'sparse', 'dense'}
        How the ids are restored. 'sparse' (separate objects): the foreground
        ``source`` is restored and each voxel takes the nearest id
        (:func:`label_block`). 'dense' (ids on most voxels,
        ``labeling.is_dense_label_image``): the network restores the boundaries
        between ids (:class:`LabelBoundaries`; ``source`` is not read) and the
        ids grow between them (:func:`dense_label_block`), as
        ``restore.restore_dense_labels`` does in memory; the probabilities kept
        are the boundaries'.
    probabilities : {'uint8', 'float16', 'float32'}, optional
        Also write the probabilities (float16 is computed in float16, stored as
        float32 for Fiji) to ``probabilities_output``.
    probabilities_output : str or Path, optional
        The OME-Zarr store of the probabilities (given exactly when ``probabilities`` is).
    overwrite : bool
        Replace an existing output.
    processes : bool
        A local cluster (``settings.large.workers``) of processes, else of threads.
    retries : int
        Extra attempts per failing task.
    label_halo : int
        First halo of the label-id pass.
    progress : bool
        Show progress bars.

    Returns
    -------
    dict with ``state`` ('complete' or 'partial'), ``blocks``, ``skipped``,
    ``restored`` (blocks restored by this call), ``train_s``, ``restore_s``,
    ``label_blocks_inexact``, ``model`` (the model used), ``layout``
    (:class:`zarr_io.OutputLayout`), ``value_range`` (grey values, else None).
    """
    settings = as_settings(settings)
    large = settings.large
    output = os.path.abspath(str(output))
    chunk_edge(large.block_size)
    zarr_io.ngff_format(large.ngff_version)  # validates the version
    _check_flags(probabilities, probabilities_output, large.resume, overwrite)
    _check_kind(kind, model, labels_source, probabilities, label_rule)
    targets, resuming = _check_targets(output, probabilities, probabilities_output, large.resume, overwrite)
    if labels_source is not None and tuple(labels_source.shape) != tuple(source.shape):
        raise UserError(f"Labels of shape {labels_source.shape} do not match the kept slices {source.shape}.")
    run = _plan_run(source, factor, settings, model, kind, probabilities, labels_source, targets, described,
                    label_rule)
    train_s = 0.0
    if resuming:
        record, model = _resumed_run(output, run.plan_record, model, run.probabilities_output)
        if record["state"] == "complete":
            return _already_complete(run, record, model)
    else:
        if model is None:
            model, train_s = _train(run, LabelBoundaries(labels_source) if run.dense_labels else source, factor,
                                    settings, kind, progress)
        record = _new_run(run, model, model_config, None if labels_source is None else labels_source.dtype)
    with dask_client(large.workers, large.worker_memory, large.scheduler, processes) as client:
        if client is not None:  # worker processes read inputs from a store, never from this process' memory
            if isinstance(source, np.ndarray) and not run.dense_labels:
                source = _stage(output, "input", source)
            if isinstance(labels_source, np.ndarray):
                labels_source = _stage(output, "labels_input", labels_source)
        if run.dense_labels:  # the dense rule restores the boundaries between the kept slices' ids
            source = LabelBoundaries(labels_source)
        summary = _run_passes(run, record, model, source, labels_source, factor, settings, client, retries,
                              label_halo, progress)
        summary["train_s"] = train_s
    if summary["state"] == "complete":
        _finish(output, record)
    return summary


@dataclass
class _Run:
    """One block-wise restore as planned (:func:`_plan_run`), before any output is written."""
    output: str
    probabilities_output: Optional[str]
    large: LargeVolumes
    plan: BlockPlan
    inference: Dict[str, Any]
    kernel_dtype: str
    grey_values: Optional[str]  # the output's dtype for grey values, else None
    value_range: Optional[Tuple[float, float]]
    window: Optional[Tuple[float, float]]
    plan_record: Dict[str, Any]
    described: OutputMetadata
    probabilities_dtype: Optional[str]  # the probabilities' stored dtype (float16 is stored as float32), else None
    dense_labels: bool = False  # label_rule 'dense'
    drawn_boundaries: bool = False  # dense labels: the kept slices hold id 0 somewhere


def _check_flags(probabilities: Optional[str], probabilities_output, resume: bool, overwrite: bool) -> None:
    """Refuse flags that contradict each other, before any work."""
    if resume and overwrite:
        raise UserError("--resume continues an existing output and --overwrite replaces it: give one of them.")
    if probabilities not in (None, "uint8", "float16", "float32"):
        raise UserError(f"probabilities must be uint8, float16 or float32, got '{probabilities}'.")
    if probabilities and not probabilities_output:
        raise UserError("Probabilities need a probabilities_output path.")


def _check_targets(output: str, probabilities: Optional[str], probabilities_output, resume: bool,
                   overwrite: bool) -> Tuple[List[str], bool]:
    """The outputs this run writes and whether it resumes one; outputs that exist are refused (unless
    --overwrite, or --resume), before any work."""
    targets = [output] + ([os.path.abspath(str(probabilities_output))] if probabilities else [])
    exists = [t for t in targets if os.path.exists(t)]
    resuming = resume and os.path.exists(output)
    if exists and resume and not resuming:
        raise OutputExistsError(f"--resume: '{output}' does not exist, so the run would start afresh, but "
                                f"{', '.join(exists)} exists: pass --overwrite to replace it, or remove it.")
    if exists and not (overwrite or resuming):
        raise OutputExistsError(f"Output exists: {', '.join(exists)}. Choose another --output, pass --overwrite to "
                                "replace it or --resume to continue an interrupted run.")
    if overwrite:  # before any work: --overwrite replaces Zarr stores only
        for target in exists:
            if not zarr_io.is_zarr_store(target):
                raise OutputExistsError(f"'{target}' exists and is not a Zarr store; it is not replaced. Choose "
                                        "another output.")
    return targets, resuming


def _plan_run(source: Source, factor: float, settings: Settings, model: Optional[nn.Module], kind: str,
              probabilities: Optional[str], labels_source: Optional[Source], targets: List[str],
              described: OutputMetadata, label_rule: str = "sparse") -> _Run:
    """The blocks, the kernel's options, the grey-value range and the plan recorded in the output (which
    ``--resume`` compares with the plan of the run it continues); the worker memory is checked here."""
    n_kept, height, width = source.shape
    large = settings.large
    plan = BlockPlan((restored_depth(n_kept, factor), height, width), large.block_size)
    dense = labels_source is not None and label_rule == "dense"
    inference = restore.inference_kwargs(_fitted(settings, source, factor, model), model,
                                         restore.inference_kind(kind, dense))
    grey_values = str(grey_dtype(source.dtype, settings.inference.grey_dtype)) if kind == "intensity" else None
    kernel_dtype = "float32" if grey_values else {"float16": "float16", "float32": "float32"}.get(probabilities,
                                                                                                  "uint8")
    _check_worker_memory(plan, n_kept, factor, inference, kernel_dtype, large.worker_memory,
                         bool(large.workers or large.scheduler), settings.inference.device, grey_values,
                         labels_source.dtype if dense else None)
    # Read before anything is written; recorded, so that --resume refuses a volume whose range changed.
    value_range = volume_intensity_range(source) if grey_values else None
    window = zarr_io.display_window(source) if grey_values else None  # what a viewer opens the output at
    input_record = _describe(source, described.source_name, described.source_stack)
    # A label image read as its own source (a store's labels) is described, and its values checksummed, once.
    labels_record = (None if labels_source is None else input_record if labels_source is source
                     else _describe(labels_source, described.source_name, described.source_stack))
    plan_record = _json({
        "input": input_record, "kind": kind, "value_range": value_range,
        "labels_input": labels_record,
        "factor": restore.factor_value(factor), "shape": list(plan.shape_dhw), "block_size": int(large.block_size),
        "output_voxel_size_zyx": [float(v) for v in described.voxel_size_zyx], "output_unit": described.unit,
        "output_translation_zyx": [float(v) for v in described.translation_zyx],
        "ngff_version": large.ngff_version, "probabilities": probabilities,
        "binarize_threshold": settings.data.binarize_threshold,
        "probability_threshold": float(settings.inference.probability_threshold),
        "inference": _recorded_inference(inference),
        **({"label_rule": label_rule} if labels_source is not None else {}),
        **({"shape_prior": float(settings.inference.shape_prior)} if dense else {}),
        **({"grey_values": grey_values} if grey_values else {})})
    probabilities_dtype = probabilities and ("float32" if probabilities in ("float16", "float32") else "uint8")
    return _Run(targets[0], targets[1] if probabilities else None, large, plan, inference, kernel_dtype,
                grey_values, value_range, window, plan_record, described, probabilities_dtype, dense,
                dense and _holds_zero(labels_source))


def _holds_zero(labels_source: Source) -> bool:
    """Whether any kept slice holds id 0 (read slice by slice: an id image can be large)."""
    _, height, width = labels_source.shape
    return any(bool((_read_kept(labels_source, slice(0, height), slice(0, width), slice(k, k + 1)) == 0).any())
               for k in range(labels_source.shape[0]))


def _fitted(settings: Settings, source: Source, factor: float, model: Optional[nn.Module]) -> Settings:
    """A small stack trains on what it holds (a no-op when the caller fitted the recipe, or with a model)."""
    return settings if model is not None else restore.fit_recipe_to_stack(settings, source.shape, factor)[0]


def _recorded_inference(inference: Dict[str, Any]) -> Dict[str, Any]:
    """The kernel's options as the plan records them: batching (tiles, pixels per batch) changes the
    speed, not the result, so it is left out."""
    return _json({k: v for k, v in inference.items() if k not in ("batch_size", "batch_pixels")})


def _train(run: _Run, source: Source, factor: float, settings: Settings, kind: str, progress: bool
           ) -> Tuple[nn.Module, float]:
    """Train on (a bounded part of) the kept slices; the plan then records the channels the model takes."""
    settings = _fitted(settings, source, factor, None)
    training_kind = restore.training_kind(kind, run.dense_labels)
    with_ids = restore.uses_interfaces(settings, training_kind)
    stack, panel_width, ids = training_stack(source, settings, settings.data.binarize_threshold, TRAINING_BYTES,
                                             value_range=run.value_range, kind=training_kind, with_ids=with_ids)
    windows = stack.shape[2] // panel_width
    print(f"Training on kept slices {stack.shape} (K, Y, X)"
          + (f", {windows} windows of {panel_width} x {panel_width} pixels" if windows > 1 else "") + " ...",
          flush=True)
    model, info = restore.train_on_stack(stack, factor, settings, progress=progress, kind=training_kind,
                                         panel_width=panel_width, label_ids=ids)
    del stack, ids
    run.inference = restore.inference_kwargs(settings, model, restore.inference_kind(kind, run.dense_labels))
    run.plan_record["inference"] = _recorded_inference(run.inference)
    return model, info["train_s"]


def _already_complete(run: _Run, record: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """``--resume`` of a complete output: only the leftovers of its run are removed."""
    try:
        _remove_scaffolding(run.output)  # a run killed while removing it leaves some
    except OSError as error:  # e.g. a complete output one may read, not write
        warnings.warn(f"'{run.output}' is complete, but the leftovers of its run could not be removed: {error}",
                      ToolWarning)
    print(f"'{run.output}' is already complete; nothing to resume.")
    return {"state": "complete", "already_complete": True, "blocks": len(run.plan), "skipped": len(run.plan),
            "restored": 0, "train_s": 0.0,
            "restore_s": 0.0, "label_blocks_inexact": 0, "model": model,
            "layout": zarr_io.layout_from_record(record["layout"], run.output), "value_range": run.value_range}


def _run_passes(run: _Run, record: Dict[str, Any], model: nn.Module, source: Source,
                labels_source: Optional[Source], factor: float, settings: Settings, client, retries: int,
                label_halo: int, progress: bool) -> Dict[str, Any]:
    """The passes over the blocks: restore (at most ``max_blocks`` now), label ids, pyramids. Returns
    the summary of :func:`restore_to_ome_zarr` ('partial' when ``max_blocks`` stopped it)."""
    output, plan = run.output, run.plan
    layout = zarr_io.layout_from_record(record["layout"], output)
    prob_layout = (zarr_io.layout_from_record(record["probabilities_layout"], run.probabilities_output)
                   if run.probabilities_output else None)
    job = RestoreJob(source, plan, factor, run.inference, float(settings.inference.probability_threshold),
                     run.kernel_dtype, layout.image, prob_layout.image if prob_layout else None, output,
                     str(Path(output) / MODEL_FILE), settings.inference.device,
                     settings.data.binarize_threshold, run.value_range,
                     _marker_path(BOUNDARIES_ARRAY) if run.dense_labels else None, run.described.mask_values)
    done = finished_blocks(output, "restore")
    todo = [i for i in range(len(plan)) if i not in done]
    now = todo if run.large.max_blocks is None else todo[:max(0, run.large.max_blocks)]
    start = time.perf_counter()
    ship = dict(ship_code=bool(run.large.scheduler), output=output)
    results = run_tasks(restore_one_block, job, now, client, retries, "Restoring blocks", progress, **ship)
    summary = {"state": "partial", "blocks": len(plan), "skipped": len(done), "restored": len(results),
               "restore_s": time.perf_counter() - start, "label_blocks_inexact": 0,
               "label_halos": [], "model": model, "layout": layout, "probabilities_layout": prob_layout,
               "value_range": run.value_range}
    if len(now) < len(todo):
        print(f"{len(done) + len(results)} of {len(plan)} blocks restored; continue with --resume.")
        return summary
    if labels_source is not None:
        max_halo = max(label_halo, MAX_LABEL_HALO_BLOCKS * run.large.block_size)
        if run.dense_labels:
            label_job = DenseLabelJob(labels_source, plan, factor, _marker_path(BOUNDARIES_ARRAY), layout.image,
                                      layout.labels, output, float(settings.inference.probability_threshold),
                                      run.drawn_boundaries, float(settings.inference.shape_prior), label_halo,
                                      max_halo)
        else:
            label_job = LabelJob(labels_source, plan, factor, layout.image, layout.labels, output, label_halo,
                                 max_halo)
        labelled = finished_blocks(output, "labels")
        label_results = run_tasks(dense_label_block if run.dense_labels else label_block, label_job,
                                  [i for i in range(len(plan)) if i not in labelled], client, retries, "Label ids",
                                  progress, **ship)
        summary["label_blocks_inexact"] = sum(not r["exact"] for r in label_results)
        summary["label_halos"] = sorted(r["halo"] for r in label_results)
        if summary["label_blocks_inexact"]:
            warnings.warn(f"{summary['label_blocks_inexact']} block(s) reached the largest label halo; their ids "
                          "near the block borders may differ from a whole-slice assignment.", ToolWarning)
    _write_pyramids(output, record, [("image", layout.image), ("labels", layout.labels),
                                     ("probabilities", prob_layout.image if prob_layout else None)],
                    client, retries, progress, ship["ship_code"])
    summary["state"] = "complete"
    return summary


def _check_kind(kind: str, model: Optional[nn.Module], labels_source: Optional[Source],
                probabilities: Optional[str], label_rule: str = "sparse") -> None:
    """Refuse, before any work, a kind that is not restored block-wise, a model of the other kind, and
    label ids or probabilities of grey values."""
    if kind not in ("mask", "intensity"):
        raise UserError(f"kind must be 'mask' or 'intensity' (label ids come with labels_source), got '{kind}'.")
    if label_rule not in LABEL_RULES:
        raise UserError(f"label_rule must be one of {', '.join(LABEL_RULES)}, got '{label_rule}'.")
    if model is not None:
        restore.check_model_kind(model, kind)
    if kind == "intensity" and (labels_source is not None or probabilities):
        raise UserError("Grey-scale stacks (--kind intensity) are restored as grey values: they have no label ids "
                        "and no probabilities (--save-probabilities).")


def worker_memory_bytes(worker_memory: str) -> int:
    """``--worker-memory`` in bytes (0: no limit, as Dask reads it); one error for what is no size."""
    try:
        return int(parse_bytes(worker_memory)) if str(worker_memory).strip() not in ("0", "") else 0
    except (ValueError, TypeError) as error:
        raise UserError(f"--worker-memory '{worker_memory}' is not a size (e.g. 1GiB, 800MB): {error}") from None


def check_worker_memory_floor(worker_memory: str) -> None:
    """One error for a ``--worker-memory`` that is no size, or below what a worker process holds before any
    block (``PROCESS_BYTES``: Python, torch and the model): Dask would restart such workers for ever. 0 is
    Dask's 'no limit'."""
    limit = worker_memory_bytes(worker_memory)
    if 0 < limit < PROCESS_BYTES:
        raise UserError(f"--worker-memory {worker_memory} is less than a worker process needs before any block (about "
                        f"{PROCESS_BYTES // 2**20} MiB for Python, torch and the model), so Dask would restart the "
                        "workers for ever. Give at least 1GiB (the plan's 'memory per worker' line estimates a block's "
                        "need), or fewer --workers with more memory each.")


def connect_scheduler(address: str, timeout: Optional[str] = None, as_default: bool = True):
    """A ``distributed.Client`` on the scheduler at ``address`` (Dask's default client with ``as_default``, as the
    run's task loop wants it); one error for an address that is malformed or cannot be reached within
    ``timeout`` (default ``SCHEDULER_TIMEOUT``)."""
    from distributed import Client
    from distributed.comm import get_address_host_port

    if "://" not in address or address.split("://")[0] in ("tcp", "tls"):
        try:  # checked before a Client exists: a half-made one waits 20 s at exit to close
            get_address_host_port(address if "://" in address else "tcp://" + address)
        except (ValueError, TypeError) as error:
            raise UserError(f"--scheduler {address} is not an address ({error}): give it as the scheduler prints "
                            "it, tcp://HOST:8786.") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            return Client(address, timeout=timeout or SCHEDULER_TIMEOUT, set_as_default=as_default)
        except (OSError, ValueError, TypeError) as error:  # unreachable; no port, an unknown protocol
            raise UserError(f"Cannot reach the Dask scheduler at {address} ({type(error).__name__}: {error}). Check "
                            "the address (as the scheduler prints it, tcp://HOST:8786) and that it is running.") from None


def check_scheduler(address: str) -> None:
    """One error, before any work, when the Dask scheduler at ``address`` cannot be reached. Not as the default
    client: one that fails to connect would leave Dask's scheduler setting pointing at it in this process."""
    connect_scheduler(address, as_default=False).close()


def _check_worker_memory(plan: BlockPlan, n_kept: int, factor: float, inference: Dict[str, Any], kernel_dtype: str,
                         worker_memory: str, on_workers: bool, device: Optional[str],
                         grey_values: Optional[str] = None, dense_label_dtype: Optional[Any] = None) -> None:
    """Reject a worker memory that is no size (or too small for any worker, :func:`check_worker_memory_floor`);
    warn when a block likely needs more than it (:func:`estimate_worker_memory`)."""
    if on_workers:
        check_worker_memory_floor(worker_memory)
    limit = worker_memory_bytes(worker_memory)
    device_type = select_device(device).type
    need = estimate_worker_memory(plan, n_kept, factor, inference, kernel_dtype, grey_values, dense_label_dtype,
                                  device_type)
    if device_type == "cuda":
        need += CUDA_HOST_BYTES
    if on_workers and 0 < limit < need:
        warnings.warn(f"A block of {plan.block_size} x {plan.block_size} x {plan.shape_dhw[0]} slices may need about "
                      f"{need / 2**20:.0f} MiB, more than --worker-memory {worker_memory}; pass a smaller "
                      "--block-size if workers are restarted.", ToolWarning)


def _resumed_run(output: str, plan_record: Dict[str, Any], model: Optional[nn.Module],
                 probabilities_output: Optional[str] = None) -> Tuple[Dict[str, Any], nn.Module]:
    """The record and model of the interrupted run in ``output``, after checking that this run is the same
    (and finishing the move of its probabilities' output into place, when a kill came in between)."""
    _, record = zarr_io.open_output(output)
    if not record:
        raise UserError(f"'{output}' was not written by apply.py (no '{zarr_io.RESTORE_ATTRIBUTE}' record); it "
                        "cannot be resumed. Pass --overwrite to replace it.")
    if record.get("state") == "complete":
        return record, model
    differences = _plan_differences(record.get("plan", {}), plan_record)
    if differences:
        raise UserError(f"--resume: this run differs from the interrupted one in {', '.join(differences)}; run "
                        "with the same input and settings, or pass --overwrite.")
    model_file = Path(output) / MODEL_FILE
    if not model_file.exists():
        raise UserError(f"'{output}' has no model file ({MODEL_FILE}) to resume with; pass --overwrite.")
    if probabilities_output and not os.path.exists(probabilities_output):
        staged = record.get("probabilities_staging")
        staged = staged and os.path.join(os.path.dirname(probabilities_output), staged)
        if not staged or not os.path.isdir(staged):
            raise UserError(f"The probabilities of the interrupted run ('{probabilities_output}') are missing; "
                            "pass --overwrite to start again.")
        os.rename(staged, probabilities_output)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(staged))
    stored_model = load_model(model_file)[0]
    if model is not None and not same_weights(model, stored_model):
        raise UserError("--resume: --model is not the model of the interrupted run; pass --overwrite.")
    return record, stored_model if model is None else model


# Scratch folders beside an output (same file system, so that renames are atomic), named
# '.<output name>.<pid>.<random>.<what>': a new output being laid out, a replaced one being deleted,
# a finished run's markers being deleted. A kill leaves them; later runs remove those of dead processes.
_SCRATCH_KINDS = ("creating", "replaced", "removing")


def _scratch_folder(target: str, what: str) -> str:
    """A new scratch folder beside ``target``."""
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=f".{what}", dir=parent)


def _remove_stale_scratch(target: str) -> None:
    """Remove the scratch folders of ``target`` left by processes that no longer run (POSIX only)."""
    parent, name = os.path.split(target)
    if os.name != "posix" or not os.path.isdir(parent):
        return
    prefix = f".{name}."
    for entry in os.listdir(parent):
        parts = entry[len(prefix):].split(".")
        if not entry.startswith(prefix) or len(parts) != 3 or parts[2] not in _SCRATCH_KINDS or \
                not parts[0].isdigit():
            continue
        pid = int(parts[0])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except OSError:  # another user's live process
            continue
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _new_run(run: _Run, model: nn.Module, model_config: Optional[Dict[str, Any]], label_dtype=None
             ) -> Dict[str, Any]:
    """Lay out the output (and the probabilities' output) that ``run`` plans, keep the model in it,
    create the markers and the run's record; returns the record. The image is a mask (uint8,
    max-pooled pyramid) or, with ``run.grey_values`` (a dtype), grey values with an averaged pyramid,
    opened by viewers at ``run.window`` (the input's 0.1 / 99.9 percentiles); with ``label_dtype``
    (the ids' dtype) the output has a label image.

    Everything is made in scratch folders beside the targets and renamed into place, the output
    first (with its record: an output never exists without one), replacing an existing target only
    then (``--overwrite`` was checked by the caller). A kill between the two renames leaves the
    probabilities in their scratch folder, named in the record: a resume moves them.
    """
    output, probabilities_output = run.output, run.probabilities_output
    targets = [output] + ([probabilities_output] if run.probabilities_dtype else [])
    for target in targets:
        _remove_stale_scratch(target)
    scratch = {target: _scratch_folder(target, "creating") for target in targets}
    staged = {target: os.path.join(scratch[target], os.path.basename(target)) for target in targets}
    try:
        layout, prob_layout = _lay_out(run, staged, label_dtype)
        model_file = save_model(Path(staged[output]) / MODEL_FILE, model, model_config or {}, overwrite=True)
        create_markers(staged[output], "restore", len(run.plan))
        if label_dtype is not None:
            create_markers(staged[output], "labels", len(run.plan))
        if run.dense_labels:  # read by the label pass across block borders, so kept apart from the mask
            edge = chunk_edge(run.large.block_size)
            zarr.open_group(staged[output], mode="r+").require_group(PROGRESS_GROUP).create_array(
                BOUNDARIES_ARRAY, shape=run.plan.shape_dhw, chunks=(min(32, run.plan.shape_dhw[0]), edge, edge),
                dtype=run.kernel_dtype, fill_value=0)
        record = {"state": "running", "plan": run.plan_record, "model_sha256": _file_sha256(model_file),
                  "layout": zarr_io.layout_record(layout), "pyramid_levels_done": {},
                  "probabilities_layout": zarr_io.layout_record(prob_layout) if prob_layout else None,
                  "probabilities_staging": (os.path.relpath(staged[probabilities_output],
                                                            os.path.dirname(probabilities_output))
                                            if run.probabilities_dtype else None)}
        _save_record(staged[output], record)
    except BaseException:
        for folder in scratch.values():
            shutil.rmtree(folder, ignore_errors=True)
        raise
    for target in targets:  # once the output is in place, its record names what is still staged
        _move_into_place(staged[target], target)
        with contextlib.suppress(OSError):
            os.rmdir(scratch[target])
    return _json(record)


def _lay_out(run: _Run, staged: Dict[str, str], label_dtype=None
             ) -> Tuple[zarr_io.OutputLayout, Optional[zarr_io.OutputLayout]]:
    """The empty arrays and metadata of the output and, when asked for, of the probabilities' output,
    at their ``staged`` paths (``{target: scratch path}``)."""
    described, version, chunk_xy = run.described, run.large.ngff_version, chunk_edge(run.large.block_size)
    place = (run.plan.shape_dhw, described.voxel_size_zyx, described.unit, described.translation_zyx, version)
    image_format = (zarr_io.ImageFormat(run.grey_values, "mean", run.window) if run.grey_values
                    else zarr_io.ImageFormat(np.dtype(described.mask_values.dtype)))
    layout = zarr_io.create_output(staged[run.output], *place, label_dtype=label_dtype,
                                   label_name=described.label_name, image_format=image_format, chunk_xy=chunk_xy)
    prob_layout = None
    if run.probabilities_dtype:
        prob_layout = zarr_io.create_output(staged[run.probabilities_output], *place,
                                            image_format=zarr_io.ImageFormat(run.probabilities_dtype, "stride"),
                                            chunk_xy=chunk_xy)
    return layout, prob_layout


def _move_into_place(staged: str, target: str) -> None:
    """Rename ``staged`` to ``target``; an existing ``target`` is first renamed aside, then deleted."""
    if not os.path.exists(target):
        os.rename(staged, target)
        return
    aside = _scratch_folder(target, "replaced")
    os.rename(target, os.path.join(aside, os.path.basename(target)))
    os.rename(staged, target)
    shutil.rmtree(aside, ignore_errors=True)


def _write_pyramids(output: str, record: Dict[str, Any], images: Sequence[Tuple[str, Optional[OmeZarrImage]]],
                    client, retries: int, progress: bool, ship_code: bool = False) -> None:
    """Pass 3 for every image, level after level (each is made from the one before), one progress bar;
    each finished level is recorded so that a resumed run starts at the next."""
    levels = [(name, image, level) for name, image in images if image is not None
              for level in range(record["pyramid_levels_done"].get(name, 0) + 1, len(image.levels))]
    total = sum(len(zarr_io.pyramid_regions(image, level)) for _, image, level in levels)
    with tqdm(total=total, desc="Pyramid", unit="chunk", disable=not progress or not levels) as bar:
        for name, image, level in levels:
            run_tasks(pyramid_region_task, (image, level), zarr_io.pyramid_regions(image, level), client, retries,
                      "Pyramid", progress, bar, ship_code=ship_code, output=output)
            record["pyramid_levels_done"][name] = level
            _save_record(output, record)


def pyramid_region_task(image_and_level: Tuple[OmeZarrImage, int], region: Tuple[slice, slice, slice]
                        ) -> Dict[str, Any]:
    """Pass 3: one chunk of a pyramid level from the level before (``function(job, item)`` form)."""
    image, level = image_and_level
    zarr_io.write_pyramid_region(image, level, region)
    return {"level": level}


def _save_record(output: str, record: Dict[str, Any]) -> None:
    """Write the run's record into the output's root attributes (only this process writes them).

    The root's metadata document (``.zattrs`` of Zarr v2, ``zarr.json`` of v3) is replaced
    atomically: a kill while writing leaves the record before or after, never a damaged root.
    """
    root = Path(output)
    document = root / "zarr.json"
    if document.exists():  # Zarr v3: the group's one document holds its attributes
        content = json.loads(document.read_text())
        content.setdefault("attributes", {})[zarr_io.RESTORE_ATTRIBUTE] = _json(record)
    else:  # Zarr v2 (a group with its .zgroup)
        if not (root / ".zgroup").exists():
            raise UserError(f"'{output}' is not a Zarr group; the run's record cannot be written.")
        document = root / ".zattrs"
        content = json.loads(document.read_text()) if document.exists() else {}
        content[zarr_io.RESTORE_ATTRIBUTE] = _json(record)
    partial = document.with_name(f"{document.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(partial, "w") as file:
            json.dump(content, file, indent=2)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, document)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def _finish(output: str, record: Dict[str, Any]) -> None:
    """Record the output as complete, then remove the run's scaffolding (:func:`_remove_scaffolding`):
    in this order, so that a kill in between leaves a complete output (with leftovers), never an
    incomplete one without its markers or model."""
    _save_record(output, dict(record, state="complete"))
    _remove_scaffolding(output)


def _remove_scaffolding(output: str) -> None:
    """Remove what only an unfinished run needs: the model file, the error report, the markers (and
    staged inputs), and scratch folders of dead processes. Idempotent, and safe to cut short: the
    markers' group leaves the output by one rename before it is deleted."""
    for name in (MODEL_FILE, ERROR_FILE):
        with contextlib.suppress(FileNotFoundError):
            (Path(output) / name).unlink()
    progress = Path(output) / PROGRESS_GROUP
    if progress.exists():
        aside = _scratch_folder(output, "removing")
        try:
            os.rename(progress, os.path.join(aside, PROGRESS_GROUP))
        except OSError:  # e.g. the output is a mount point: delete in place
            shutil.rmtree(progress, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
    _remove_stale_scratch(output)
