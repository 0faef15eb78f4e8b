"""What a restore will do, decided before any work and printed as ``name: value`` lines.

``apply.py`` builds one :class:`RestorePlan` per input from the file's metadata
and a small sample of its values (kind, factor, geometry), prints it at the
start of every run and, with ``--dry-run``, stops there. The plan also
estimates the output's size, the memory a worker needs and, once a run on this
machine class has been measured (:func:`record_throughput`, kept in
:func:`throughput_file`), the expected time.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

import blocks
import labeling
import restore
import zarr_io
from data import INTEGER_RATIO_TOLERANCE, SMALLEST_FRACTIONAL_RATIO, MaskValues, grey_dtype
from machine import machine_key
from model import precision_reason, resolve_precision, select_device
from morph import is_integer_factor, restored_depth, slices_on_grid
from settings import Settings
from tiff_io import StackChoice, is_ome_tiff_path, tiff_grey_dtype

# Block work above this (blocks.tile_work) is named in the plan, with the one of these smaller tile sizes that
# computes fewest tile pixels.
TILE_WORK_NOTED = 1.2
TILE_SIZES_SUGGESTED = (256, 512)
# Memory of the Python process itself (torch, the model), as blocks.PROCESS_BYTES counts it.
PROCESS_BYTES = blocks.PROCESS_BYTES
# Training memory per crop pixel of a batch (activations kept for the backward pass, gradients, Adam's state):
# 2026-12-02, a 9 x 512 x 512 mask, batches of 8 crops of 128 px, peaked 160 MiB above the same restore with --model
# (/usr/bin/time -v; AMD EPYC Zen 4, bfloat16).
TRAINING_PIXEL_BYTES = 1280


@dataclass
class RestorePlan:
    """One input's restore, as decided before any work.

    ``factor`` 1 (already isotropic, or a Z/XY ratio below 1.5: :meth:`conversion_reason`)
    means the stack is converted to the output's format, not restored. ``settings`` is the recipe fitted to the
    stack (``restore.fit_recipe_to_stack``), ``notes`` what the fitting changed.
    """
    path: Path
    target: Path
    kind: str
    kind_reason: str
    factor: float  # an int, or the Z/XY ratio itself at a non-integer ratio (data.factor_from_voxel_size)
    factor_reason: str
    shape_khw: Tuple[int, int, int]
    dtype: np.dtype
    voxel_in_zyx: Tuple[float, float, float]
    unit: str
    translation_zyx: Tuple[float, float, float]
    settings: Settings
    trained: bool  # False: a model was given
    block_size: Optional[int] = None  # block-wise into OME-Zarr, else None (in memory)
    workers: int = 0
    probabilities: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    label_rule: Optional[str] = None  # label images: how the ids are restored
    other_images: List[Tuple[int, ...]] = field(default_factory=list)  # a TIFF's further series, not restored
    dense_labels: bool = False  # a dense label image (labeling.is_dense_label_image of a sample): the boundary rule
    mask_values: Optional[MaskValues] = None  # masks: the two values the output is written in
    levels: int = 1  # an OME-Zarr input's resolution levels (level 0 is read)
    label_images: Tuple[str, ...] = ()  # the paths of an OME-Zarr image's label images, not restored with it
    label_name: Optional[str] = None  # label ids into OME-Zarr: the output's label image, labels/<label_name>

    @property
    def written_mask_values(self) -> MaskValues:
        """``mask_values``, or the default 0/255 (``data.MaskValues()``) where the output is no mask: a label
        image's foreground image in an OME-Zarr output."""
        return self.mask_values if self.mask_values is not None else MaskValues()

    @property
    def choice(self) -> StackChoice:
        """The channel and time point read from the input (``CHANNEL``, ``TIMEPOINT``)."""
        return self.settings.data.stack_choice()

    @property
    def binarize_threshold(self) -> Optional[float]:
        """``BINARIZE_THRESHOLD`` as the readers take it: None means foreground = non-zero."""
        return self.settings.data.binarize_threshold

    @property
    def output_shape(self) -> Tuple[int, int, int]:
        n_kept, height, width = self.shape_khw
        return (restored_depth(n_kept, self.factor), height, width)

    @property
    def voxel_out_zyx(self) -> Tuple[float, float, float]:
        z, y, x = self.voxel_in_zyx
        # A non-integer factor is the Z/XY ratio itself: the output Z step is the pixel size, exactly.
        return (z / self.factor if is_integer_factor(self.factor) else x, y, x)

    @property
    def grey_out_dtype(self) -> np.dtype:
        """Grey values: the dtype written (``GREY_DTYPE``: the input's, or float32; ``data.grey_dtype``)."""
        return grey_dtype(self.dtype, self.settings.inference.grey_dtype)

    def grey_written(self) -> str:
        """What grey values are written as, for the plan: :attr:`grey_out_dtype`, in a TIFF the type that
        holds it (``tiff_io.tiff_grey_dtype``), or the rule where the values decide."""
        dtype = self.grey_out_dtype
        if zarr_io.is_zarr_path(self.target):
            return str(dtype)
        if not np.issubdtype(dtype, np.integer):
            return "float32"  # every TIFF output holds floats as 32-bit ones
        written = tiff_grey_dtype(dtype, is_ome_tiff_path(self.target))
        return str(written) if written is not None else "uint16, int16 or float32 (the ImageJ type that holds them)"

    @property
    def output_voxels(self) -> int:
        return int(np.prod(self.output_shape, dtype=np.int64))

    def output_bytes(self) -> int:
        """Uncompressed bytes written: the image (mask or grey values), label ids, probabilities."""
        per_voxel = self.grey_out_dtype.itemsize if self.kind == "intensity" else 1
        if self.kind == "labels":
            per_voxel = self.label_bytes() + (1 if self.block_size else 0)  # OME-Zarr: mask + ids
        if self.probabilities:
            per_voxel += 1 if self.probabilities == "uint8" else 4
        return self.output_voxels * per_voxel

    def label_bytes(self) -> int:
        """Bytes per id written: uint16 in a TIFF, at least that in OME-Zarr (``data.as_label_image``)."""
        return 2 if not self.block_size else max(2, np.dtype(self.dtype).itemsize)

    def memory_bytes(self) -> int:
        """Peak memory of the process (in memory) or of one worker (block-wise), an estimate."""
        n_kept, height, width = self.shape_khw
        inference = self.inference()
        grey = str(self.grey_out_dtype) if self.kind == "intensity" else None
        device_type = select_device(self.settings.inference.device or None).type
        if self.block_size:
            plan = blocks.BlockPlan(self.output_shape, self.block_size)
            kernel = "float32" if grey else ("float32" if self.probabilities in ("float16", "float32") else "uint8")
            return blocks.estimate_worker_memory(plan, n_kept, self.factor, inference, kernel, grey,
                                                 self.dtype if self.dense_labels else None, device_type)
        if self.kind == "intensity":  # float32 restore, grey values out
            held = self.input_held_bytes() + self.output_voxels * (4 + self.grey_out_dtype.itemsize)
        else:  # uint8 probabilities, the mask (and ids)
            labels = self.label_bytes() if self.kind == "labels" else 0
            held = self.input_held_bytes() + self.output_voxels * (2 + labels)
        one_tile = min(self.output_shape[0] * max(height, width), inference["tile_size"] ** 2)
        working = restore.tiles_per_batch(inference["batch_size"], inference["batch_pixels"], one_tile,
                                          device_type) * one_tile * blocks.ACTIVATION_BYTES
        if self.dense_labels:  # the ids grow after the restore, on whole slices
            working = max(working, labeling.grow_labels_memory(self.factor, height * width))
        return int(held + max(working, self.training_bytes()) + PROCESS_BYTES)

    def input_held_bytes(self) -> int:
        """The kept slices a run holds whole: the values read and the engine's copy (bool for masks and labels,
        with the ids; normalised float32 for grey values)."""
        n_kept, height, width = self.shape_khw
        item = np.dtype(self.dtype).itemsize
        if self.kind == "intensity":
            return n_kept * height * width * (item + 4)
        return n_kept * height * width * (item + 1 + (self.label_bytes() if self.kind == "labels" else 0))

    def process_bytes(self) -> int:
        """Peak memory of this process in a block-wise run, an estimate: the input it holds (a file is read whole;
        of a store, the kept slices' windows the training reads, ``blocks.TRAINING_BYTES`` at most) beside the
        training, or, where the blocks run in this process too (no ``--workers``, no ``--scheduler``), beside the
        largest block task; a conversion (factor 1) reads the whole input, store or file."""
        if self.factor == 1:  # a conversion reads the whole input and runs no network
            return int(self.input_held_bytes() + PROCESS_BYTES)
        if zarr_io.is_zarr_path(self.path):
            held = min(blocks.TRAINING_BYTES, self.input_held_bytes()) if self.trained else 0
        else:
            held = self.input_held_bytes()
        working = self.training_bytes()
        if self.in_process():
            working = max(working, self.memory_bytes() - PROCESS_BYTES)
        return int(held + working + PROCESS_BYTES)

    def in_process(self) -> bool:
        """Whether a block-wise run restores its blocks in this process (no ``--workers``, no ``--scheduler``)."""
        return not self.workers and not self.settings.large.scheduler

    def memory_lines(self) -> List[str]:
        """The plan's memory: in memory, the process's peak; block-wise, a worker's and this process's (which
        reads the input and trains), or one figure where the blocks run in this process."""
        if not self.block_size:
            return [f"memory: about {human_bytes(self.memory_bytes())} (estimate)"]
        if self.factor == 1:  # a conversion: no block is restored
            return [f"memory: about {human_bytes(self.process_bytes())} (estimate)"]
        if self.in_process():
            beside = "the largest block or the training" if self.trained else "the largest block"
            return [f"memory: about {human_bytes(self.process_bytes())} (estimate: the input this process holds, "
                    f"with {beside}; --workers N runs the blocks apart)"]
        return [f"memory per worker: about {human_bytes(self.memory_bytes())} (estimate)",
                f"memory of this process: about {human_bytes(self.process_bytes())} (estimate: the input it "
                f"holds{' and the training' if self.trained else ''})"]

    def training_bytes(self) -> int:
        """Memory of the training beside the stack: its samples (the training line's figure) and one batch's
        activations, gradients and Adam's state (:data:`TRAINING_PIXEL_BYTES` per crop pixel of a batch)."""
        if not self.trained or self.factor == 1:
            return 0
        recipe = restore.training_kwargs(self.settings, self.training_kind())
        return training_sample_bytes(recipe) + recipe["batch_size"] * recipe["train_xy_size"] ** 2 * TRAINING_PIXEL_BYTES

    def training_crop_pixels(self) -> int:
        """Crop pixels the training pushes through the network (crops x area x epochs)."""
        if not self.trained or self.factor == 1:
            return 0
        recipe = restore.training_kwargs(self.settings, self.training_kind())
        return int(recipe["train_nb"] * recipe["train_xy_size"] ** 2 * recipe["num_epochs"])

    def expected_seconds(self) -> Optional[float]:
        """Training plus restore time from the throughputs recorded on this machine class, or None."""
        if self.factor == 1:
            return None
        rates = recorded_throughput(self.kind, self.settings.inference.device or "", self.network_shape(),
                                    self.settings.training.precision)
        if (rates is None or not rates.get("restore_voxel_passes_per_s")
                or (self.trained and not rates.get("train_pixels_per_s"))):
            return None
        train = self.training_crop_pixels() / rates["train_pixels_per_s"] if self.trained else 0.0
        return train + self.output_voxels * self.network_work() / rates["restore_voxel_passes_per_s"]

    def network_passes(self) -> int:
        """Network passes per output voxel: one per orientation and test-time flip. The restore rate is
        recorded per pass, so that a run with flips predicts one without, and a dense label image (flips on
        by kind) one of a mask."""
        inference = self.inference()
        return len(inference["orientations"]) * len(inference["flips"])

    def tile_work(self) -> float:
        """The network's work block by block relative to the same restore in memory (``blocks.tile_work``);
        1 in memory."""
        if not self.block_size:
            return 1.0
        return blocks.tile_work(self.output_shape, self.block_size, self.inference())

    def network_shape(self) -> Tuple[int, int]:
        """The network's first-level width and depth (``BASE_FILTERS``, ``DEPTH``; a given model's own,
        ``apply.run_settings``): its cost per pixel, so the key its rates are recorded under."""
        network = self.settings.network
        return network.base_filters, network.depth

    def arithmetic_line(self) -> str:
        """The network's arithmetic (``PRECISION``) on this run's device, and why."""
        device = select_device(self.settings.inference.device or None)
        precision = self.settings.training.precision
        dtype = resolve_precision(precision, device)
        return f"{_dtype_name(dtype)} ({precision_reason(precision, device, self.kind)})"

    def network_work(self) -> float:
        """Network work per output voxel, in passes over each voxel once: :meth:`network_passes` times the
        tile pixels computed per output pixel (``blocks.network_tile_pixels``: the tiles' overlaps, and the
        tiles blocks repeat). The recorded restore rate is per this unit, so that runs with other tiles,
        blocks or flips predict each other."""
        inference = self.inference()
        _, height, width = self.output_shape
        per_pixel = blocks.network_tile_pixels(self.output_shape, self.block_size, inference) / (
            len(inference["orientations"]) * height * width)
        return self.network_passes() * per_pixel

    def tile_work_line(self) -> Optional[str]:
        """Where blocks make the network repeat tiles (more than 1.2x the in-memory work), by how much, and the
        smaller ``--inference-tile-size`` (of :data:`TILE_SIZES_SUGGESTED`, as the restore takes it: at least
        the training crop) that computes fewest tile pixels at this block size."""
        work = self.tile_work()
        if self.factor == 1 or work <= TILE_WORK_NOTED:
            return None
        inference = self.inference()

        def block_pixels(settings: Settings) -> int:
            return blocks.network_tile_pixels(self.output_shape, self.block_size,
                                              restore.inference_kwargs(settings, kind=self.inference_kind()))

        now = block_pixels(self.settings)
        options = {size: block_pixels(self.settings.with_values(INFERENCE_TILE_SIZE=size)) / now
                   for size in TILE_SIZES_SUGGESTED if size < inference["tile_size"]}
        options = {size: share for size, share in options.items() if share < 0.9}
        hint = "" if not options else (f"; --inference-tile-size {min(options, key=options.get)} computes "
                                       f"{1 - min(options.values()):.0%} fewer tile pixels")
        return (f"{work:.1f}x the network work of the same restore in memory: each block of {self.block_size} px "
                f"computes every network tile ({inference['tile_size']} px) that overlaps it, so that it restores "
                f"exactly as the whole stack does{hint}; a larger --block-size repeats less")

    def lines(self) -> List[str]:
        """The plan, one ``name: value`` per line."""
        unit = self.unit
        triple = " x ".join
        block_work = self.tile_work_line() if self.block_size else None
        where = (f"OME-Zarr, blocks of {self.block_size} x {self.block_size} pixels"
                 + (f" on {self.workers} worker(s)" if self.workers else "") if self.block_size else "in memory")
        lines = [
            f"input: {self.path}" + (f" ({self.choice.describe()})" if self.choice.describe() else "")
            + (f" (level 0 of {self.levels}: full resolution)" if self.levels > 1 else ""),
            *([f"other images: the file holds {len(self.other_images)} more (shapes "
               f"{', '.join(' x '.join(map(str, shape)) for shape in self.other_images)}); the first is restored"]
              if self.other_images else []),
            *([f"other images: the store's label images {', '.join(Path(p).name for p in self.label_images)} are "
               f"not restored with the image (give {self.label_images[0]} to restore one)"]
              if self.label_images else []),
            f"kind: {self.kind} ({self.kind_reason})"
            + (f"; written as {self.mask_values.describe()}" if self.mask_values is not None else "")
            + (f"; written as {self.grey_written()}" if self.kind == "intensity" else ""),
            f"factor: {self.factor_line()}",
            f"input shape: {triple(str(s) for s in self.shape_khw)} (Z, Y, X), {np.dtype(self.dtype)}",
            f"input voxel size: {triple(f'{v:.6g}' for v in self.voxel_in_zyx)} {unit}",
            f"output: {self.target} ({where})" + (f"; the ids in {self.target}/labels/{self.label_name}, the "
                                                   "image their foreground" if self.label_name else ""),
            f"output shape: {triple(str(s) for s in self.output_shape)} (Z, Y, X)",
            f"output voxel size: {triple(f'{v:.6g}' for v in self.voxel_out_zyx)} {unit}",
            f"translation: {triple(f'{v:.6g}' for v in self.translation_zyx)} {unit}"
            + ("" if zarr_io.is_zarr_path(self.target) or not any(self.translation_zyx) else
               " (not written: a TIFF holds no origin; an .ome.zarr output keeps it)"),
            f"output bytes: {human_bytes(self.output_bytes())} (uncompressed)",
            *self.memory_lines(),
            *([f"block work: {block_work}"] if block_work else []),
            f"training: {self.training_line()}",
            *([f"arithmetic: {self.arithmetic_line()}"] if self.factor != 1 else []),
            *([f"test-time flips: {self.flips_line()}"] if self.factor != 1 else []),
            *([f"label ids: {self.label_rule}"] if self.label_rule and self.factor != 1 else []),
            f"expected time: {self.expected_line()}",
        ]
        return lines + [f"recipe fitted to the stack: {note}" for note in self.notes]

    def expected_line(self) -> str:
        """The expected time, from the throughputs recorded on this machine class."""
        if self.factor == 1:
            return "seconds: a conversion, no network runs"
        expected = self.expected_seconds()
        if expected is None:
            return "not known yet (no run of this network and arithmetic measured on this machine class)"
        return f"about {expected:.0f} s on {machine_key(self.settings.inference.device or '')} (from earlier runs here)"

    def factor_line(self) -> str:
        """The factor, where it comes from and what it does to the Z grid."""
        said = f"{self.factor:g} from {self.factor_reason}"
        if self.factor == 1:
            return f"{said}: {self.conversion_reason()}; the stack is converted, not restored"
        if is_integer_factor(self.factor):
            ratio = self.voxel_in_zyx[0] / self.voxel_in_zyx[2]
            if abs(ratio - self.factor) <= INTEGER_RATIO_TOLERANCE * ratio:
                return said
            return (said + f": the Z/XY ratio {ratio:.6g} rounded (--factor-rounding nearest), so every kept slice is "
                    f"kept verbatim and the output Z step is {ratio / self.factor:.3f} times the pixel size")
        n_kept = self.shape_khw[0]
        on_grid = len(slices_on_grid(n_kept, self.factor, self.output_shape[0])[0])
        falls = "falls on an output slice and is" if on_grid == 1 else "fall on an output slice and are"
        return (said + f": not an integer, so the output grid is isotropic (Z step = XY pixel size); {on_grid} of "
                f"the {n_kept} kept slices {falls} kept verbatim, the others fall between "
                "two and are restored around (--factor-rounding nearest rounds the factor and keeps every slice verbatim)")

    def conversion_reason(self) -> str:
        """Why a factor-1 stack is converted: already isotropic, a Z step finer than the pixels, or a Z/XY ratio
        below 1.5 (rounded to 1 by ``data.factor_from_voxel_size``: less than half a slice would be added per step);
        in the last two the input's Z step stays."""
        ratio = self.voxel_in_zyx[0] / self.voxel_in_zyx[2]
        if abs(ratio - 1) <= INTEGER_RATIO_TOLERANCE * ratio:
            return "already isotropic"
        if ratio < 1:
            return (f"the Z step is finer than the pixel size (Z/XY ratio {ratio:.3g}): nothing is missing along Z, so "
                    "the output keeps the input's Z step")
        return (f"the Z/XY ratio {ratio:.3g} is below {SMALLEST_FRACTIONAL_RATIO:g}: less than half a slice would be "
                f"added per step, so the output keeps the input's Z step, {ratio:.3g} times the pixel size")

    def training_line(self) -> str:
        if self.factor == 1:
            return "none (nothing to restore)"
        if not self.trained:
            return "none (--model)"
        kind = self.training_kind()
        recipe = restore.training_kwargs(self.settings, kind)
        sample_bytes = training_sample_bytes(recipe)
        return (f"{recipe['train_nb']} crops of {recipe['train_z_size']} x {recipe['train_xy_size']} x "
                f"{recipe['train_xy_size']} ({human_bytes(sample_bytes)} in memory), {recipe['num_epochs']} epochs, "
                f"from {restore.training_start(self.settings, kind)[1]}")

    def training_kind(self) -> str:
        """The kind whose "by kind" training recipe applies (``restore.training_kind``)."""
        return restore.training_kind(self.kind, self.dense_labels)

    def inference_kind(self) -> str:
        """The kind whose "by kind" inference settings apply (``restore.inference_kind``)."""
        return restore.inference_kind(self.kind, self.dense_labels)

    def inference(self) -> Dict[str, Any]:
        """The restore's kernel options (``restore.inference_kwargs`` of this plan's settings and kind)."""
        return restore.inference_kwargs(self.settings, kind=self.inference_kind())

    def flips_line(self) -> str:
        """Whether the restore averages four flipped passes, and how to change that."""
        flips = self.settings.inference.flips_for(self.inference_kind())
        why = "by kind" if self.settings.inference.tta_flips is None else "--tta-flips or the model's recipe"
        return (f"on ({why}; --no-tta-flips restores about 4x faster)" if flips else
                f"off ({why}; --tta-flips averages four flipped passes, about 4x the restore time)")


def training_sample_bytes(recipe: Dict[str, Any]) -> int:
    """Bytes of a training's samples, held in memory while it runs: ``train_nb`` float32 crops of
    ``train_z_size`` planes and their centre-slice targets (``restore.training_kwargs``)."""
    return int(recipe["train_nb"] * (recipe["train_z_size"] + 1) * recipe["train_xy_size"] ** 2 * 4)


def human_bytes(count: float) -> str:
    """``1.5 GiB``-style sizes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


# --------------------------------------------------------------------------- #
# Throughput measured on this machine class, for the expected time
# --------------------------------------------------------------------------- #
def throughput_file() -> Path:
    """Where measured throughputs are kept: ``$AXIAL_SR_CACHE``, else ``$XDG_CACHE_HOME/axial-sr``,
    else ``~/.cache/axial-sr``; the file ``throughput.json``."""
    folder = os.environ.get("AXIAL_SR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "axial-sr")
    return Path(folder) / "throughput.json"


def _throughput_key(kind: str, device: str, network_shape: Tuple[int, int] = (16, 3), precision: str = "auto") -> str:
    """The cache's key: the machine class, the kind's recipe family, the network's width and depth (a network
    of 4 filters runs about 10x faster than the default 16, so its rates would mislead a default plan) and its
    arithmetic (``precision`` resolved on ``device``: bfloat16 runs 1.4-2.5x faster or slower than float32,
    by CPU)."""
    base_filters, depth = network_shape
    arithmetic = _dtype_name(resolve_precision(precision, select_device(device or None)))
    return (f"{machine_key(device)} | {'intensity' if kind == 'intensity' else 'mask'} | "
            f"{base_filters} filters, depth {depth} | {arithmetic}")


def _dtype_name(dtype: Any) -> str:
    """'float32' for torch.float32, 'bfloat16' for torch.bfloat16."""
    return str(dtype).replace("torch.", "")


# Runs kept per rate: the expected time uses their median, so that one run slowed by another job on the machine
# (or a stack so small that fixed costs dominate) does not mislead the next plan.
THROUGHPUT_RUNS = 5
# A training or restore shorter than this is mostly fixed costs (start-up, the starting model, the first batches):
# its rate is not kept, as it would make the plan of a full run several times too long (a few trainings of 32
# crops, 9 s each, recorded 2,000 crop pixels/s and predicted 2,563 s for a default training of 12 s).
MIN_TIMED_S = 10.0


def recorded_throughput(kind: str, device: str = "", network_shape: Tuple[int, int] = (16, 3),
                        precision: str = "auto") -> Optional[Dict[str, float]]:
    """``train_pixels_per_s`` and ``restore_voxel_passes_per_s`` measured here for ``kind``, a network of
    ``network_shape`` (base filters, depth) and ``precision`` (``PRECISION``): the median of the last
    :data:`THROUGHPUT_RUNS` runs of each, or None."""
    runs = _recorded_runs(_throughput_table(throughput_file()),
                          _throughput_key(kind, device, network_shape, precision))
    return {name: float(np.median(values)) for name, values in runs.items()} if runs else None


def _recorded_runs(table: Dict[str, Any], key: str) -> Dict[str, List[float]]:
    """The rates of the last runs under ``key``, each a list (a single number, as earlier versions kept, is
    one run); entries that are not positive numbers are left out."""
    entry = table.get(key)
    if not isinstance(entry, dict):
        return {}
    runs = {}
    for name, values in entry.items():
        values = [v for v in (values if isinstance(values, list) else [values])
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0]
        if values:
            runs[name] = values
    return runs


def _throughput_table(path: Path) -> Dict[str, Any]:
    """The cache's table; one that is missing, unreadable or not a JSON object is empty (it is only a cache)."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def record_throughput(plan: RestorePlan, train_s: float, restore_s: float) -> None:
    """Keep the throughputs of a finished run, of each phase that took at least :data:`MIN_TIMED_S` (a cache:
    a failure to write it is no error)."""
    if plan.factor == 1:
        return
    measured = {}
    if restore_s >= MIN_TIMED_S:
        measured["restore_voxel_passes_per_s"] = plan.output_voxels * plan.network_work() / restore_s
    if plan.trained and train_s >= MIN_TIMED_S:
        measured["train_pixels_per_s"] = plan.training_crop_pixels() / train_s
    if not measured:
        return
    path = throughput_file()
    key = _throughput_key(plan.kind, plan.settings.get("DEVICE", ""), plan.network_shape(),
                          plan.settings.get("PRECISION", "auto"))
    table = _throughput_table(path)
    runs = _recorded_runs(table, key)
    for name, rate in measured.items():
        runs[name] = (runs.get(name, []) + [rate])[-THROUGHPUT_RUNS:]
    try:
        table[key] = runs
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1))
    except (OSError, ValueError):
        pass
