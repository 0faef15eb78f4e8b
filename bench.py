"""Benchmark every Z-restoration method on the same sparse stacks.

``python bench.py`` runs on every TIFF in ``../shared/data/`` (or the built-in
sample when that folder is absent) at factors 4, 8 and 10, and writes a
Markdown table, ``bench_results.json`` and an IoU-vs-factor plot into a new
folder under ``bench_runs/``.

Methods, each on the identical sparse stack (slices ``0, f, 2f, ...`` kept):
``nearest`` (nearest kept slice), ``linear`` (intensity interpolation,
threshold 0.5), ``sdf`` (shape-based interpolation, ``morph.py``), ``itk_mci``
(ITK MorphologicalContourInterpolation, optional, run in a child process) and
``network`` (train on the sparse stack exactly as eval.py does, then apply).
Scores are computed on the reconstructed slices only (kept slices and slices
after the last kept one excluded), plus IoU over the whole stack.

Label-image inputs (integer stacks with more than two values, e.g. the dense
FIB-25 neuron crop) get a second table: voxel accuracy, mean per-label IoU and
adapted Rand error of the restored ids (``metrics.score_label_reconstruction``).
``nearest`` copies the nearest kept slice's ids; ``sdf`` adds the row
``sdf-labels``, per-label shape-based interpolation (``morph.interpolate_labels_sdf``);
every other method's ids come from its restored mask through ``labeling.assign_labels``, except the
network's on a dense label image, which restores the boundaries between ids and grows the ids between
them (``labeling.grow_labels``), as apply.py does.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from data import (InputNotFoundError, OutputExistsError, UserError, as_grey_values, check_factor, downsample_z,
                  grey_dtype, list_tiff_files, make_sample_labels, read_mask_or_labels, read_voxel_size,
                  simulate_isotropic_grid)
from metrics import (calculate_dice, calculate_iou, mean_surface_distance, reconstructed_indices,
                     score_label_reconstruction)
from morph import (interpolate_along_axis, interpolate_labels_sdf, is_integer_factor, kept_positions,
                   morph_stack_interpolated)
from labeling import assign_labels, is_dense_label_image
from restore import (factor_value, restore_dense_labels, restore_probabilities, threshold_probabilities,
                     training_kwargs)
from settings import Settings

METHODS = ("nearest", "linear", "sdf", "itk_mci", "network")
INTENSITY_METHODS = ("linear", "cubic", "network")
INTENSITY_ROW_KEYS = ("stack", "factor", "method", "psnr_recon", "ssim_recon", "train_s", "infer_s", "voxels_per_s",
                      "infer_gflop_per_s", "train_gflop_per_s", "peak_rss_mb")
ROW_KEYS = ("stack", "factor", "method", "iou_recon", "dice_recon", "iou_stack", "assd_vox", "train_s", "infer_s",
            "voxels_per_s", "infer_gflop_per_s", "train_gflop_per_s", "peak_rss_mb")
LABEL_ROW_KEYS = ("stack", "factor", "method", "accuracy_recon", "label_iou_recon", "are_recon", "labels_s")
LABEL_SDF_METHOD = "sdf-labels"  # the label row added next to 'sdf': per-label shape-based interpolation
SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"
QUICK_SHAPE = (96, 128, 128)  # central crop (D, H, W) for --quick
QUICK_SETTINGS = {"TRAIN_NB": 480, "NUM_EPOCHS": 3}
OUT_OF_CORE_SHAPE = (61, 3072, 3072)  # kept slices at factor 8: the restored stack has 481 x 3072 x 3072 = 4.5e9 voxels


def peak_rss_mb(children_only: bool = False) -> float:
    """Peak resident memory of this process and its finished children (or of
    the children only), in MiB."""
    own = 0 if children_only else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    divisor = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB on Linux
    return max(own, children) / divisor


def central_crop(stack_dhw: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The centre ``shape`` box of a stack (whole axes where the stack is smaller)."""
    slices = []
    for size, want in zip(stack_dhw.shape, shape):
        want = min(size, want)
        start = (size - want) // 2
        slices.append(slice(start, start + want))
    return stack_dhw[tuple(slices)]


def run_itk_mci(sparse_dhw: np.ndarray, kept_indices: np.ndarray, depth: int, timeout: float = 3600) -> np.ndarray:
    """ITK MorphologicalContourInterpolation in a child process (its Python
    wrapping can crash at interpreter exit). Raises ImportError when absent."""
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "in.npy", Path(tmp) / "out.npy"
        volume = np.zeros((depth,) + sparse_dhw.shape[1:], dtype=np.uint8)
        volume[kept_indices] = sparse_dhw != 0
        np.save(source, volume)
        result = subprocess.run([sys.executable, __file__, "--itk-worker", str(source), str(target)],
                                capture_output=True, text=True, timeout=timeout)
        if not target.exists():
            if "No module named 'itk'" in result.stderr or "has no attribute 'morphological" in result.stderr:
                raise ImportError("itk-morphologicalcontourinterpolation is not installed "
                                  "(pip install itk-morphologicalcontourinterpolation)")
            raise RuntimeError(f"ITK worker failed: {result.stderr[-2000:]}")
        restored = np.load(target) != 0
    last = int(kept_indices[-1])
    restored[last + 1:] = restored[last]  # ITK does not extrapolate; same convention as the other methods
    return restored


def _itk_worker(source: str, target: str) -> None:
    import itk

    volume = np.load(source)
    image = itk.image_view_from_array(volume)  # numpy (Z, Y, X) -> ITK index (X, Y, Z): Z is ITK axis 2
    restored = itk.morphological_contour_interpolator(image, axis=2)
    np.save(target, itk.array_from_image(restored))


def describe_device(device) -> str:
    """The compute device in words, for reports: the GPU's name, or the CPU model, its instruction-set
    class as torch and oneDNN see it now (emulation included) and torch's threads."""
    import torch

    from machine import describe_machine

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)}, torch {torch.__version__})"
    facts = describe_machine("cpu")
    return (f"cpu ({facts['cpu']}; ISA class {facts['isa']}, torch capability "
            f"{torch.backends.cpu.get_cpu_capability()}; {facts['threads']} threads; torch {torch.__version__})")


def model_flops(model, input_nchw: Sequence[int], backward: bool = False) -> int:
    """Floating-point operations of one forward (and backward) pass of ``model`` on
    a float32 input of shape ``input_nchw``, counted by ``torch.utils.flop_counter``
    (convolutions and matrix products; a multiply-add counts 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    x = torch.zeros(tuple(input_nchw), device=next(model.parameters()).device)
    was_training = model.training
    model.train(backward)
    with counter:
        out = model(x)
        if backward:
            out.sum().backward()
    model.train(was_training)
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def network_throughput(model, settings: Settings, info: Dict[str, Any], kind: str = "mask"
                       ) -> Dict[str, Optional[float]]:
    """Achieved GFLOP/s of inference (the tiles actually run, see ``restore.predict_tiled``)
    and of training (samples seen, forward + backward, with the recipe of the training's ``kind``),
    from counted model FLOPs."""
    recipe = training_kwargs(settings, kind)
    channels, crop = recipe["train_z_size"], recipe["train_xy_size"]
    per_pixel = model_flops(model, (1, channels, crop, crop)) / crop**2
    pixels_run = info.get("inference", {}).get("pixels_run", 0)
    result = {"infer_gflop_per_s": round(per_pixel * pixels_run / info["infer_s"] / 1e9, 1) if info["infer_s"] else None,
              "train_gflop_per_s": None}
    if info.get("history"):
        n_train = round(recipe["train_nb"] * (1 - recipe["val_split"]))
        n_val = recipe["train_nb"] - n_train
        epochs = len(info["history"]["train"])
        per_sample = model_flops(model, (1, channels, crop, crop), backward=True)
        flops = epochs * (n_train * per_sample + n_val * per_pixel * crop**2)
        result["train_gflop_per_s"] = round(flops / info["train_s"] / 1e9, 1)
    return result


def restore_with(method: str, sparse: np.ndarray, kept: np.ndarray, depth: int, factor: int,
                 settings: Settings, device, sparse_labels: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Run one method; returns the restored bool stack and its costs. The network restores a dense label
    image (``sparse_labels``, :func:`labeling.is_dense_label_image`) as apply.py does, from its boundaries:
    ``labels`` then holds the ids and the restored mask is their foreground."""
    train_s = None
    start = time.perf_counter()
    if method == "nearest":
        restored = interpolate_along_axis(sparse, kept, depth, method="nearest")
    elif method == "linear":
        restored = interpolate_along_axis(sparse, kept, depth, method="linear") >= 0.5
    elif method == "sdf":
        restored = morph_stack_interpolated(sparse, kept, depth, progress=True)
    elif method == "itk_mci":
        restored = run_itk_mci(sparse, kept, depth)
    elif method == "network":
        if sparse_labels is not None and is_dense_label_image(sparse_labels):
            labels, _, model, info = restore_dense_labels(sparse_labels, factor, settings, original_depth=depth,
                                                          device=device)
            return {"restored": labels != 0, "labels": labels, "labels_s": info["labels_s"], "train_s": info["train_s"],
                    "infer_s": info["infer_s"], **network_throughput(model, settings, info, "dense labels")}
        probabilities, model, info = restore_probabilities(sparse, factor, settings, original_depth=depth,
                                                           device=device)
        restored = threshold_probabilities(probabilities, settings.inference.probability_threshold, in_place=True)
        return {"restored": restored, "train_s": info["train_s"], "infer_s": info["infer_s"],
                **network_throughput(model, settings, info)}
    else:
        raise UserError(f"Unknown method '{method}'; choose from {METHODS}.")
    return {"restored": restored, "train_s": train_s, "infer_s": time.perf_counter() - start}


def score_row(stack_name: str, factor: int, method: str, restored: np.ndarray, truth: np.ndarray,
              kept: np.ndarray, train_s: Optional[float], infer_s: float, infer_gflop_per_s: Optional[float] = None,
              train_gflop_per_s: Optional[float] = None) -> Dict[str, Any]:
    """One result row, every score computed from the arrays."""
    recon = reconstructed_indices(kept, truth.shape[0])
    return {
        "stack": stack_name, "factor": factor_value(factor), "method": method,
        "iou_recon": round(calculate_iou(restored[recon], truth[recon]), 5),
        "dice_recon": round(calculate_dice(restored[recon], truth[recon]), 5),
        "iou_stack": round(calculate_iou(restored, truth), 5),
        "assd_vox": round(mean_surface_distance(restored, truth, recon), 4),
        "train_s": None if train_s is None else round(train_s, 2),
        "infer_s": round(infer_s, 3),
        "voxels_per_s": round(truth.size / infer_s) if infer_s > 0 else None,
        "infer_gflop_per_s": infer_gflop_per_s,
        "train_gflop_per_s": train_gflop_per_s,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def restore_label_ids(method: str, restored: Optional[np.ndarray], sparse_labels: np.ndarray, kept: np.ndarray,
                      depth: int, factor: int) -> np.ndarray:
    """The restored label image of one method: ``nearest`` copies the nearest kept slice's ids (the
    same as ``labeling.assign_labels`` of its mask, without the search), :data:`LABEL_SDF_METHOD`
    interpolates each id's shape (``morph.interpolate_labels_sdf``), any other method's restored
    mask ``restored`` gets its ids from ``labeling.assign_labels``."""
    if method == "nearest":
        return interpolate_along_axis(sparse_labels, kept, depth, method="nearest")
    if method == LABEL_SDF_METHOD:
        return interpolate_labels_sdf(sparse_labels, kept, depth, progress=True)
    return assign_labels(restored, sparse_labels, factor)


def label_row(stack_name: str, factor: int, method: str, restored_labels: np.ndarray, true_labels: np.ndarray,
              kept: np.ndarray, labels_s: float) -> Dict[str, Any]:
    """One label-table row: ``metrics.score_label_reconstruction`` of the restored ids (None for NaN),
    and ``labels_s``, the seconds spent making the ids (after the mask, for mask-based methods)."""
    scores = score_label_reconstruction(restored_labels, true_labels, kept)
    row = {"stack": stack_name, "factor": factor_value(factor), "method": method}
    row.update({key: None if np.isnan(value) else round(value, 5) for key, value in scores.items()})
    row["labels_s"] = round(labels_s, 3)
    return row


def unavailable_row(stack_name: str, factor: int, method: str) -> Dict[str, Any]:
    row = dict.fromkeys(ROW_KEYS)
    row.update(stack=stack_name, factor=factor_value(factor), method=method)
    return row


def markdown_table(rows: List[Dict[str, Any]], keys: Sequence[str] = ROW_KEYS) -> str:
    header = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    lines = ["| " + " | ".join("n/a" if row[k] is None else str(row[k]) for k in keys) + " |" for row in rows]
    return header + "\n".join(lines)


def plot_iou_vs_factor(rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stacks = sorted({row["stack"] for row in rows})
    figure, axes = plt.subplots(1, len(stacks), figsize=(5.5 * len(stacks), 4.2), squeeze=False)
    for axis, stack in zip(axes[0], stacks):
        for method in dict.fromkeys(row["method"] for row in rows):
            points = sorted((r["factor"], r["iou_recon"]) for r in rows
                            if r["stack"] == stack and r["method"] == method and r["iou_recon"] is not None)
            if points:
                axis.plot(*zip(*points), "o-", label=method)
        axis.set_title(stack, fontsize=10)
        axis.set_xlabel("Z / XY resolution factor")
        axis.set_ylabel("IoU on reconstructed slices")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def default_inputs() -> List[Path]:
    if SHARED_DATA.is_dir():
        files = list_tiff_files(SHARED_DATA)
        if files:
            return files
    return []


def benchmark_box(crop: Optional[Sequence[int]], quick: bool) -> Optional[Sequence[int]]:
    """The central (D, H, W) box each input is cut to: ``crop`` when given, else
    :data:`QUICK_SHAPE` with ``quick``, else ``None`` (whole stacks)."""
    return crop or (QUICK_SHAPE if quick else None)


def load_inputs(paths: Sequence[Path], quick: bool, sample_shape,
                crop: Optional[Sequence[int]] = None) -> List[tuple]:
    """(name, bool stack, label stack or None) triples; every path is checked before any long work.

    Integer stacks with more than two values are instance label images: their
    foreground is benchmarked, and the ids are restored and scored too. Each
    stack is cut to :func:`benchmark_box`.
    """
    for path in paths:
        if not Path(path).exists():
            raise InputNotFoundError(f"Input '{path}' does not exist. Give TIFF files or folders of TIFF slices.")
    named = [(Path(path).name, *read_mask_or_labels(path)) for path in paths]
    if not paths:
        labels = make_sample_labels(tuple(sample_shape), seed=0)
        named.append((f"sample{tuple(sample_shape)}", labels > 0, labels))
    shape = benchmark_box(crop, quick)
    if shape:
        named = [(name, central_crop(mask, shape), None if labels is None else central_crop(labels, shape))
                 for name, mask, labels in named]
    return named


def parse_overrides(pairs: Sequence[str], settings: Dict[str, Any]) -> Dict[str, Any]:
    """Apply ``NAME=VALUE`` overrides of eval.py constants."""
    from eval import parse_setting

    out = dict(settings)
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in settings or not value:
            raise UserError(f"--set takes NAME=VALUE with NAME one of eval.py's constants, got '{pair}'.")
        out[name] = parse_setting(name, value)
    return out


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", nargs="+", type=Path, help="TIFF files or slice folders (default: ../shared/data)")
    parser.add_argument("--factors", nargs="+", type=int, default=[4, 8, 10],
                        help="keep every N-th slice of each stack")
    parser.add_argument("--output-grid", choices=("input", "isotropic"), default="input",
                        help="input: restore onto the input's slices (the factor is N); isotropic: onto the grid "
                             "whose Z step is the pixel size, from the file's voxel size (UroCell, 15 nm slices and "
                             "16 nm pixels, kept every 7th: factor 6.5625), the truth resampled onto it (masks)")
    parser.add_argument("--methods", nargs="+", choices=METHODS + ("cubic",),
                        help=f"masks: {' '.join(METHODS)} (default: all); --kind intensity: "
                             f"{' '.join(INTENSITY_METHODS)} (default: all)")
    parser.add_argument("--kind", choices=("mask", "intensity"), default="mask",
                        help="mask: segmentations (IoU); intensity: grey-scale stacks (PSNR/SSIM), default inputs "
                             "../shared/data/intensity/*.tif")
    parser.add_argument("--out", type=Path, help="output folder (new; default bench_runs/<date>-<time>)")
    parser.add_argument("--quick", action="store_true",
                        help=f"central crop {QUICK_SHAPE} and a shorter training {QUICK_SETTINGS}")
    parser.add_argument("--crop", type=positive_int, nargs=3, metavar=("D", "H", "W"),
                        help="benchmark the central D x H x W box of each input (whole axes where it is smaller)")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="override eval.py constants for the network, e.g. --set ORIENTATIONS=y")
    parser.add_argument("--label", default="network", help="method name written for the network rows")
    parser.add_argument("--sample-shape", type=int, nargs=3, default=[128, 128, 128],
                        help="built-in sample size when no input is given")
    parser.add_argument("--restore-memory", type=int, nargs=3, metavar=("K", "H", "W"),
                        help="instead of the benchmark: wall time and peak memory of apply.py restoring a K x H x W "
                             "mask at factor 8 with a small saved model (e.g. 125 1024 1024 -> 993 x 1024 x 1024)")
    parser.add_argument("--out-of-core", action="store_true",
                        help="instead of the benchmark: restore a generated OME-Zarr mask block by block on a local "
                             "Dask cluster (--workers, --worker-memory) at --out-of-core-shape and at a quarter of "
                             "it; report each worker's peak memory against its limit, restarts, spilling, voxels/s")
    parser.add_argument("--out-of-core-shape", type=int, nargs=3, metavar=("K", "H", "W"),
                        default=list(OUT_OF_CORE_SHAPE),
                        help="kept slices of the --out-of-core input at factor 8 (61 x 3072 x 3072 restores to "
                             "481 x 3072 x 3072 = 4.5e9 voxels)")
    parser.add_argument("--workers", type=int, default=2, help="--out-of-core: local Dask workers")
    parser.add_argument("--worker-memory", default="1GiB", help="--out-of-core: memory limit of each worker")
    parser.add_argument("--block-size", type=int, default=512, help="--out-of-core: lateral block edge")
    parser.add_argument("--engine-levers", action="store_true",
                        help="instead of the benchmark: forward throughput of the network under each engine lever "
                             "(channels-last, BatchNorm folding, bfloat16) and the training step under each "
                             "training lever, side by side")
    parser.add_argument("--isa", nargs="+", choices=("avx2", "avx512", "avx512-bf16", "amx", "native"),
                        help="run this benchmark once per instruction-set class, each in a child process capped to "
                             "it (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY), and print the rows side by side; a class "
                             "the CPU lacks is reported, not run")
    parser.add_argument("--kind-rule", action="store_true",
                        help="how often --kind auto decides right: every stack under ../shared/data (or --input) "
                             "and the built-in phantoms, one table row each")
    parser.add_argument("--itk-worker", nargs=2, help=argparse.SUPPRESS)
    return parser


@dataclass(frozen=True)
class Case:
    """One stack at one factor: the truth, its kept slices ``sparse`` at the output positions ``kept``
    (every ``factor``-th slice, ``data.downsample_z``) and, for a label image, its ids (else None).

    On the isotropic output grid (``--output-grid isotropic``, :meth:`on_isotropic_grid`) the factor is
    the kept slices' Z/XY ratio, which may not be an integer: ``kept`` are then fractional positions
    (only those that land on an output slice are not scored, ``metrics.reconstructed_indices``) and
    ``truth`` is resampled onto the grid.
    """
    name: str
    factor: float
    truth: np.ndarray
    sparse: np.ndarray
    kept: np.ndarray
    labels: Optional[np.ndarray] = None

    @classmethod
    def of(cls, name: str, truth: np.ndarray, factor: int, labels: Optional[np.ndarray] = None) -> "Case":
        sparse, kept = downsample_z(truth, factor)
        return cls(name, int(factor), truth, sparse, kept, labels)

    @classmethod
    def on_isotropic_grid(cls, name: str, truth: np.ndarray, step: int, voxel_zyx: Sequence[float]) -> "Case":
        """Every ``step``-th slice of a mask sliced at ``voxel_zyx[0]`` with pixels of ``voxel_zyx[2]``,
        restored onto the grid whose Z step is the pixel size (``data.simulate_isotropic_grid``)."""
        sparse, factor, truth_on_grid = simulate_isotropic_grid(truth, step, voxel_zyx[0], voxel_zyx[2])
        return cls(name, factor, truth_on_grid, sparse, kept_positions(len(sparse), factor))


def benchmark_cases(stacks: Sequence[tuple], steps: Sequence[int], grid: str, voxels: Sequence[Optional[tuple]]
                    ) -> Dict[tuple, Case]:
    """Every stack at every step, checked before any long work: ``{(stack index, step): Case}``. On the
    isotropic ``grid`` each stack needs its voxel size (``voxels``, from its file) and, being scored as a
    mask, no label ids."""
    cases = {}
    for index, (name, truth, labels) in enumerate(stacks):
        if grid == "isotropic" and (labels is not None or not voxels[index] or voxels[index][0] is None):
            raise UserError(f"{name}: --output-grid isotropic scores masks of a calibrated stack (a TIFF with its "
                            "Z step and pixel size); give a mask with its voxel size, or leave the grid as input.")
        for step in steps:
            try:
                check_factor(step, truth.shape[0])
            except ValueError as error:
                raise UserError(f"{name}: {error}") from None
            cases[index, step] = (Case.on_isotropic_grid(name, truth, step, voxels[index]) if grid == "isotropic"
                                  else Case.of(name, truth, step, labels))
    return cases


def benchmark_settings(args: argparse.Namespace) -> Tuple[Settings, Dict[str, Any]]:
    """The network's recipe: eval.py's constants, :data:`QUICK_SETTINGS` with ``--quick``, then ``--set``.
    Returns it as :class:`settings.Settings` and as the constants the report records."""
    from eval import default_settings

    constants = parse_overrides(args.set, dict(default_settings(), **(QUICK_SETTINGS if args.quick else {})))
    return Settings.from_dict(constants), constants


def new_output_folder(out: Optional[Path], stamp: str) -> Path:
    """``out``, or ``bench_runs/<stamp>`` (a ``strftime`` pattern of now); an existing folder is refused
    (it is made only once the inputs are checked)."""
    out_dir = out or Path("bench_runs") / datetime.now().strftime(stamp)
    if out_dir.exists():
        raise OutputExistsError(f"Output folder '{out_dir}' already exists; give a new --out.")
    return out_dir


def run_report(settings: Dict[str, Any], device, rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The report of a run, filled in as its ``rows`` come: ``settings`` (JSON-able), versions, device, date."""
    import torch

    return {"settings": settings,
            "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__},
            "device": describe_device(device), "date": datetime.now().isoformat(timespec="seconds"), "rows": rows}


def json_constants(constants: Dict[str, Any]) -> Dict[str, Any]:
    """Setting constants as the report writes them (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in constants.items()}


def fit_recipes(cases: Dict[tuple, Case], settings: Settings, typed: Optional[Sequence[str]]
                ) -> Tuple[Dict[tuple, Settings], List[str]]:
    """With ``typed`` (the network is benchmarked), the recipe fitted to each case, as apply.py and eval.py
    fit it: a stack smaller than the recipe trains on what it holds; a setting given with --set (named in
    ``typed``) is kept as given, or refused. Returns ``{case key: recipe}`` and the notes of what was fitted."""
    from restore import fit_recipe_to_stack

    recipes: Dict[tuple, Settings] = {}
    notes: List[str] = []
    if typed is None:
        return recipes, notes
    for key, case in cases.items():
        try:
            dense = case.labels is not None and is_dense_label_image(case.labels[case.kept])
            recipes[key], fitted = fit_recipe_to_stack(settings, case.sparse.shape, case.factor, typed,
                                                       "dense labels" if dense else "mask")
        except ValueError as error:
            raise UserError(f"{case.name}: {error}") from None
        notes += [f"{case.name}, factor {factor_value(case.factor)}: {note}" for note in fitted]
    return recipes, notes


def mask_rows(case: Case, method: str, label: str, settings: Settings, device
              ) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Restore ``case`` with ``method`` (its rows named ``label``) and score it: the row of the mask (a
    row of n/a when the method is not installed, printed as it comes) and, for a label image, the
    rows of its ids (:data:`LABEL_SDF_METHOD` too after 'sdf')."""
    try:
        if method == "itk_mci" and not is_integer_factor(case.factor):
            raise ImportError("ITK interpolates between whole slices; the kept slices fall between output slices")
        result = restore_with(method, case.sparse, case.kept, case.truth.shape[0], case.factor, settings, device,
                              None if case.labels is None else case.labels[case.kept])
    except ImportError as error:
        print(f"| {case.name} | {factor_value(case.factor)} | {label} | unavailable: {error} |", flush=True)
        return unavailable_row(case.name, case.factor, label), []
    row = score_row(case.name, case.factor, label, result["restored"], case.truth, case.kept, result["train_s"],
                    result["infer_s"], result.get("infer_gflop_per_s"), result.get("train_gflop_per_s"))
    print(markdown_table([row]).splitlines()[-1], flush=True)
    if case.labels is None:
        return row, []
    label_rows = []
    for label_method, row_name in [(method, label)] + ([(LABEL_SDF_METHOD, LABEL_SDF_METHOD)] if method == "sdf"
                                                       else []):
        start = time.perf_counter()
        restored_labels = result.get("labels") if label_method == method else None
        if restored_labels is None:
            restored_labels = restore_label_ids(label_method, result["restored"], case.labels[case.kept], case.kept,
                                                case.truth.shape[0], case.factor)
        label_rows.append(label_row(case.name, case.factor, row_name, restored_labels, case.labels, case.kept,
                                    result.get("labels_s", time.perf_counter() - start)))
        del restored_labels
    return row, label_rows


def save_report(out_dir: Path, report: Dict[str, Any], label_rows: List[Dict[str, Any]]) -> None:
    """The report as JSON and its tables as Markdown: after every row, so that a crash late in a long run
    loses nothing."""
    if label_rows:
        report["label_rows"] = label_rows
    (out_dir / "bench_results.json").write_text(json.dumps(report, indent=2))
    (out_dir / "bench_results.md").write_text(markdown_table(report["rows"]) + "\n" + (
        "\nLabel ids on reconstructed slices\n\n" + markdown_table(label_rows, LABEL_ROW_KEYS) + "\n"
        if label_rows else ""))


def run_benchmark(args: argparse.Namespace) -> Dict[str, Any]:
    """Masks (and the ids of label images): every method on every stack at every factor, one Markdown
    row at a time; the report, tables and IoU-vs-factor plot in a new folder."""
    from model import select_device

    settings, constants = benchmark_settings(args)
    out_dir = new_output_folder(args.out, "%Y%m%d-%H%M%S")
    paths = args.input if args.input else default_inputs()
    methods = list(args.methods or METHODS)
    stacks = load_inputs(paths, args.quick, args.sample_shape, args.crop)
    voxels = [read_voxel_size(path) for path in paths] if paths else [(1.0, 1.0, 1.0)]
    cases = benchmark_cases(stacks, args.factors, args.output_grid, voxels)
    typed = [pair.partition("=")[0] for pair in args.set]
    recipes, recipe_notes = fit_recipes(cases, settings, typed if "network" in methods else None)
    out_dir.mkdir(parents=True)
    device = select_device(settings.inference.device)
    print(f"Device: {describe_device(device)}; stacks: {', '.join(f'{n} {s.shape}' for n, s, _ in stacks)}; "
          f"factors {args.factors}")
    for note in recipe_notes:
        print(f"Recipe fitted to the stack: {note}.")
    rows: List[Dict[str, Any]] = []
    label_rows: List[Dict[str, Any]] = []  # label-image inputs: scores of the restored ids (LABEL_ROW_KEYS)
    report = run_report({"factors": args.factors, "output_grid": args.output_grid, "methods": methods,
                         "quick": args.quick, "crop": args.crop,
                         "inputs": [str(p) for p in paths] or "built-in sample", "network": json_constants(constants),
                         **({"recipe_fitted": recipe_notes} if recipe_notes else {})}, device, rows)
    print(markdown_table([]), flush=True)
    for key, case in cases.items():
        for method in methods:
            row, more = mask_rows(case, method, args.label if method == "network" else method,
                                  recipes.get(key, settings), device)
            rows.append(row)
            label_rows += more
            save_report(out_dir, report, label_rows)
    plot_iou_vs_factor(rows, out_dir / "iou_vs_factor.png")
    print(f"\nResults in {out_dir}\n")
    print(markdown_table(rows))
    if label_rows:
        print("\nLabel ids on reconstructed slices: voxel accuracy (0 included), mean IoU over the true ids, "
              "adapted Rand error (lower is better); labels_s = seconds to make the ids:")
        print(markdown_table(label_rows, LABEL_ROW_KEYS))
    return report


def bf16_is_native(device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware (AVX512-BF16 or AMX; a GPU that supports it), which the
    lever tables say beside their bfloat16 rows; ``PRECISION auto`` chooses it only where it is also faster."""
    import torch

    from model import cpu_computes_bf16

    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_computes_bf16()


def measure_engine_levers(tile: int = 256, batch: int = 8, repeats: int = 5) -> List[Dict[str, Any]]:
    """Forward throughput of the network under each engine lever, side by side in one run.

    The levers are applied one on top of the other on the same batch of
    ``batch`` tiles of ``tile`` x ``tile`` (5 channels): the seed (the previous
    network, float32, NCHW), then channels-last memory format, then BatchNorm
    folded into the convolutions, then bfloat16 autocast (where the hardware has
    it natively; else the row says so); a row drops channels-last again, and the
    last row is the default network (additive skips, no shortcut BatchNorm) with
    every engine lever. Each row gives the median seconds per batch, output
    pixels per second, GFLOP/s (each network's own FLOPs, counted by
    ``torch.utils.flop_counter``), the speed-up over the seed and the largest
    probability difference from the seed (not defined for the default network,
    whose weights are others: ``None``).
    """
    import torch

    from model import PREVIOUS_NETWORK, AttentionResUNet, autocast, fuse_for_inference

    def network(**architecture):
        torch.manual_seed(0)
        model = AttentionResUNet(in_channels=5, **architecture).train()
        with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
            for _ in range(3):
                model(torch.rand(4, 5, 64, 64))
        return model.eval()

    previous, default = network(**PREVIOUS_NETWORK), network()
    images = (torch.rand(batch, 5, tile, tile) > 0.7).float()
    images_cl = images.contiguous(memory_format=torch.channels_last)
    device = next(previous.parameters()).device
    bf16 = bf16_is_native(device)
    emulated = "" if bf16 else " (not native here: emulated)"
    folded = fuse_for_inference(previous).to(memory_format=torch.channels_last)
    # (name, network, input, compute dtype, unfolded network for FLOPs, same weights as the seed)
    variants = [("seed: previous network, float32, NCHW", previous, images, torch.float32, previous, True),
                ("+ channels-last", previous.to(memory_format=torch.channels_last), images_cl, torch.float32,
                 previous, True),
                ("+ BatchNorm folded", folded, images_cl, torch.float32, previous, True),
                ("+ bfloat16 autocast" + emulated, folded, images_cl, torch.bfloat16, previous, True),
                # bfloat16 without channels-last: shows which of the two carries the speed-up
                ("bfloat16, BatchNorm folded, NCHW", fuse_for_inference(previous).to(
                    memory_format=torch.contiguous_format), images, torch.bfloat16, previous, True),
                ("+ additive skips, no shortcut BatchNorm (default network)",
                 fuse_for_inference(default).to(memory_format=torch.channels_last), images_cl, torch.bfloat16,
                 default, False)]
    rows, reference, seed_time = [], None, None
    for name, net, x, dtype, unfolded, same_weights in variants:
        flops = model_flops(unfolded, (batch, 5, tile, tile))
        times = []
        with torch.inference_mode(), autocast(device, dtype):
            out = torch.sigmoid(net(x).float())
            for _ in range(repeats):
                start = time.perf_counter()
                out = torch.sigmoid(net(x).float())
                times.append(time.perf_counter() - start)
        seconds = float(np.median(times))
        reference = out if reference is None else reference
        seed_time = seconds if seed_time is None else seed_time
        difference = float(f"{(out - reference).abs().max().item():.2e}") if same_weights else None
        rows.append({"lever": name, "s_per_batch": round(seconds, 4),
                     "mpixel_per_s": float(f"{batch * tile * tile / seconds / 1e6:.3g}"),  # 3 digits: small tiles too
                     "gflop_per_s": round(flops / seconds / 1e9, 1), "speedup": round(seed_time / seconds, 2),
                     "max_abs_diff": difference})
        print(f"| {name} | {rows[-1]['s_per_batch']} | {rows[-1]['mpixel_per_s']} | {rows[-1]['gflop_per_s']} | "
              f"{rows[-1]['speedup']}x | {'-' if difference is None else difference} |", flush=True)
    return rows


def measure_training_levers(crop: int = 128, batch: int = 8, rounds: int = 5, steps: int = 3) -> List[Dict[str, Any]]:
    """Seconds per training step under each training lever, side by side in one run.

    Each lever is applied on top of the previous one, on the same batch of
    ``batch`` crops of ``crop`` x ``crop`` (5 channels) with BCE loss and Adam:
    the seed (the previous network, float32, NCHW); channels-last; bfloat16
    autocast (where the hardware has it natively; else the row says so); the
    default network (additive skips, no shortcut BatchNorm), which is the
    default step; and Adam's fused kernel, which is not used (its gain is
    within the noise, and the default's per-parameter loop keeps published
    results reproducible). Rows of one network start from the same weights.
    The variants take turns, ``rounds`` times ``steps`` steps each, so that a
    drift of the machine's speed hits all rows alike; a row gives the median.
    """
    import copy

    import torch

    from model import PREVIOUS_NETWORK, AttentionResUNet, autocast

    torch.manual_seed(0)
    networks = {"previous": AttentionResUNet(in_channels=5, **PREVIOUS_NETWORK),
                "default": AttentionResUNet(in_channels=5)}
    flops = {key: model_flops(net, (batch, 5, crop, crop), backward=True) for key, net in networks.items()}
    device = next(networks["default"].parameters()).device
    images = (torch.rand(batch, 5, crop, crop) > 0.7).float()
    targets = (torch.rand(batch, 1, crop, crop) > 0.7).float()
    bf16 = bf16_is_native(device)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    # (name, network, channels-last, compute dtype, fused Adam)
    levers = [("seed: previous network, float32, NCHW", "previous", False, torch.float32, False),
              ("+ channels-last", "previous", True, torch.float32, False),
              ("+ bfloat16 autocast" + ("" if bf16 else " (not native here: emulated)"), "previous", True,
               torch.bfloat16, False),
              ("+ additive skips, no shortcut BatchNorm (default)", "default", True, torch.bfloat16, False),
              ("+ fused Adam (not used)", "default", True, torch.bfloat16, True)]
    variants = []
    for name, key, channels_last, dtype, fused in levers:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        net = copy.deepcopy(networks[key]).to(memory_format=layout).train()
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, fused=fused)
        variants.append((name, key, net, optimizer, images.contiguous(memory_format=layout), dtype))

    def train_steps(net, optimizer, x, dtype, count):
        for _ in range(count):
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                loss = loss_fn(net(x).float(), targets)
            loss.backward()
            optimizer.step()

    times: Dict[str, List[float]] = {name: [] for name, *_ in variants}
    for variant in variants:  # warm-up: oneDNN picks its kernels on the first steps
        train_steps(*variant[2:], count=2)
    for _ in range(rounds):
        for name, _, *rest in variants:
            start = time.perf_counter()
            train_steps(*rest, count=steps)
            times[name].append((time.perf_counter() - start) / steps)
    rows, seed_time = [], None
    for name, key, *_ in variants:
        seconds = float(np.median(times[name]))
        seed_time = seconds if seed_time is None else seed_time
        rows.append({"lever": name, "s_per_step": round(seconds, 4), "samples_per_s": round(batch / seconds, 1),
                     "gflop_per_s": round(flops[key] / seconds / 1e9, 1), "speedup": round(seed_time / seconds, 2)})
        print(f"| {name} | {rows[-1]['s_per_step']} | {rows[-1]['samples_per_s']} | {rows[-1]['gflop_per_s']} | "
              f"{rows[-1]['speedup']}x |", flush=True)
    return rows


def read_grey_inputs(paths: Sequence[Path], factors: Sequence[int], box: Optional[Sequence[int]]
                     ) -> List[Tuple[str, np.ndarray]]:
    """(name, grey values) of each input, cut to the central ``box`` (:func:`benchmark_box`); every path
    and factor is checked before any long work."""
    from data import read_typed_stack

    if not paths:
        raise InputNotFoundError("No grey-scale input: give --input, or put stacks in ../shared/data/intensity/.")
    stacks = []
    for path in paths:
        if not Path(path).exists():
            raise InputNotFoundError(f"Input '{path}' does not exist.")
        _, image, _ = read_typed_stack(path, "intensity")
        stacks.append((Path(path).name, central_crop(image, box) if box else image))
    for name, image in stacks:
        for factor in factors:
            check_factor(factor, image.shape[0])
    return stacks


def intensity_row(case: Case, method: str, label: str, settings: Settings, device
                  ) -> Tuple[Dict[str, Any], np.ndarray, Dict[str, float]]:
    """Restore the grey values of ``case`` with ``method`` (its row named ``label``): the row (PSNR and
    SSIM on the reconstructed slices, costs), the restored stack and its scores."""
    from metrics import score_intensity_reconstruction
    from restore import restore_intensity

    start = time.perf_counter()
    depth = case.truth.shape[0]
    costs: Dict[str, Any] = {"train_s": None}
    if method == "network":
        restored, model, info = restore_intensity(case.sparse, case.factor, settings, original_depth=depth,
                                                  device=device)
        costs = {"train_s": round(info["train_s"], 2), **network_throughput(model, settings, info, "intensity")}
        infer_s = info["infer_s"]
    else:
        values = interpolate_along_axis(case.sparse, case.kept, depth, method=method)
        # Written as the network's values are (GREY_DTYPE), so that rounding does not favour either.
        restored = as_grey_values(values, grey_dtype(case.truth.dtype, settings.inference.grey_dtype))
        infer_s = time.perf_counter() - start
    scores = score_intensity_reconstruction(restored, case.truth, case.kept)
    row = {"stack": case.name, "factor": case.factor, "method": label,
           "psnr_recon": round(scores["psnr_recon"], 3), "ssim_recon": round(scores["ssim_recon"], 4),
           "train_s": costs["train_s"], "infer_s": round(infer_s, 3),
           "voxels_per_s": round(case.truth.size / infer_s) if infer_s > 0 else None,
           "infer_gflop_per_s": costs.get("infer_gflop_per_s"),
           "train_gflop_per_s": costs.get("train_gflop_per_s"), "peak_rss_mb": round(peak_rss_mb(), 1)}
    return row, restored, scores


def run_intensity_benchmark(args: argparse.Namespace) -> Dict[str, Any]:
    """Grey-scale stacks: linear and cubic interpolation along Z and the network, PSNR and SSIM
    on the reconstructed slices of the identical sparse stack, one Markdown row at a time."""
    from eval import intensity_comparison_figure
    from model import select_device

    methods = args.methods or list(INTENSITY_METHODS)
    unknown = [m for m in methods if m not in INTENSITY_METHODS]
    if unknown:
        raise UserError(f"--kind intensity benchmarks {', '.join(INTENSITY_METHODS)}, not {', '.join(unknown)}.")
    settings, constants = benchmark_settings(args)
    out_dir = new_output_folder(args.out, "intensity-%Y%m%d-%H%M%S")
    paths = args.input or sorted((SHARED_DATA / "intensity").glob("*.tif"))
    stacks = read_grey_inputs(paths, args.factors, benchmark_box(args.crop, args.quick))
    out_dir.mkdir(parents=True)
    device = select_device(settings.inference.device)
    rows: List[Dict[str, Any]] = []
    report = {"kind": "intensity", **run_report(json_constants(constants), device, rows)}
    print(f"Device: {describe_device(device)}; stacks: {', '.join(f'{n} {s.shape}' for n, s in stacks)}; factors {args.factors}")
    print(markdown_table([], INTENSITY_ROW_KEYS), flush=True)
    for name, truth in stacks:
        for factor in args.factors:
            case = Case.of(name, truth, factor)
            restored_by_method, scores_by_method = {}, {}
            for method in methods:
                row, restored_by_method[method], scores_by_method[method] = intensity_row(
                    case, method, args.label if method == "network" else method, settings, device)
                rows.append(row)
                print(markdown_table([row], INTENSITY_ROW_KEYS).splitlines()[-1], flush=True)
                (out_dir / "bench_results.json").write_text(json.dumps(report, indent=2))
                (out_dir / "bench_results.md").write_text(markdown_table(rows, INTENSITY_ROW_KEYS) + "\n")
            if set(INTENSITY_METHODS) <= set(restored_by_method):  # the before/after figure needs all three
                scores_by_method["predicted"] = scores_by_method["network"]
                intensity_comparison_figure(truth, restored_by_method["linear"], restored_by_method["cubic"],
                                            restored_by_method["network"], case.kept,
                                            out_dir / f"comparison_{Path(name).stem}_f{factor}.png", scores_by_method)
            del restored_by_method
    print(f"\nResults in {out_dir}")
    return report


def measure_restore_memory(shape_khw: Sequence[int], factor: int, out_dir: Path) -> Dict[str, Any]:
    """Wall time and peak memory of ``apply.py`` restoring a large mask.

    Builds an anisotropic ``(K, H, W)`` mask (the built-in sample, every
    ``factor``-th slice, tiled laterally) with voxel size ``factor x 1 x 1``,
    saves a small untrained model (the memory of a restore does not depend on
    the weights, and training would dominate the time), and runs ``apply.py``
    in a child process, whose peak resident memory is reported next to the
    size of the uint8 output. The restored mask itself is meaningless.
    """
    import torch

    from data import make_sample_stack, save_stack
    from model import AttentionResUNet, save_model

    n_kept, height, width = (int(v) for v in shape_khw)
    if out_dir.exists():
        raise OutputExistsError(f"Output folder '{out_dir}' already exists; give a new --out.")
    out_dir.mkdir(parents=True)
    tile = make_sample_stack((128, 128, 128), seed=1)[::factor]
    reps = [-(-want // have) for want, have in zip((n_kept, height, width), tile.shape)]  # ceil
    save_stack(out_dir / "aniso.tif", np.tile(tile, reps)[:n_kept, :height, :width], (factor, 1.0, 1.0))
    torch.manual_seed(0)
    save_model(out_dir / "small_model.pt", AttentionResUNet(in_channels=5, depth=1, base_filters=4),
               {"factor": factor})
    command = [sys.executable, str(Path(__file__).resolve().parent / "apply.py"), "--input", str(out_dir / "aniso.tif"),
               "--output", str(out_dir / "restored.tif"), "--model", str(out_dir / "small_model.pt"),
               "--orientations", "y", "--inference-batch-size", "4"]
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    depth = (n_kept - 1) * factor + 1
    output_mb = depth * height * width / 2**20
    result = {"input_shape": [n_kept, height, width], "factor": factor,
              "output_shape": [depth, height, width], "wall_s": round(time.perf_counter() - start, 1),
              "peak_rss_mb": round(peak_rss_mb(children_only=True), 1),
              "uint8_output_mb": round(output_mb, 3)}
    result["peak_over_output"] = round(result["peak_rss_mb"] / output_mb, 2)
    (out_dir / "memory.json").write_text(json.dumps(result, indent=2))
    print(f"apply.py restored {tuple(result['input_shape'])} -> {tuple(result['output_shape'])} in "
          f"{result['wall_s']} s; peak memory {result['peak_rss_mb']:.0f} MiB = {result['peak_over_output']}x "
          f"the uint8 output ({output_mb:.0f} MiB)")
    return result


def write_tiled_sample_zarr(path: Path, shape_khw: Sequence[int], factor: int) -> None:
    """An anisotropic OME-Zarr mask ``(K, H, W)``, voxel ``factor x 1 x 1`` um: every ``factor``-th slice
    of the built-in sample, tiled, written chunk by chunk (never whole in memory)."""
    import zarr_io
    from data import make_sample_stack

    tile = make_sample_stack((128, 128, 128), seed=1)[::factor]
    layout = zarr_io.create_output(path, shape_khw, (float(factor), 1.0, 1.0), "um", pyramid=False)
    for region in zarr_io.pyramid_regions(layout.image, 0):  # the chunks of level 0
        indices = [np.arange(r.start, r.stop) % size for r, size in zip(region, tile.shape)]  # tiled
        layout.image.write(region, tile[np.ix_(*indices)].view(np.uint8) * np.uint8(255))


def _worker_report(dask_worker) -> Dict[str, Any]:
    """Run on each Dask worker: its process, peak memory, limit and what it spilled to disk."""
    spilled = getattr(dask_worker.data, "spilled_total", None)
    return {"pid": os.getpid(), "peak_rss_mb": round(peak_rss_mb(), 1),
            "limit_mb": round((dask_worker.memory_manager.memory_limit or 0) / 2**20, 1),
            "spilled_bytes": int(spilled.disk) if spilled is not None else 0}


def measure_out_of_core(shape_khw: Sequence[int], factor: int, out_dir: Path, workers: int = 2,
                        worker_memory: str = "1GiB", block_size: int = 512) -> Dict[str, Any]:
    """Peak memory per worker of the block-wise restore, at ``shape_khw`` and at a quarter of it.

    For each size: write a tiled sample mask as OME-Zarr (chunk by chunk), save
    a small untrained model (memory does not depend on the weights), start a
    local Dask cluster of ``workers`` processes with ``worker_memory`` each,
    and run ``apply.py --scheduler`` (a child process) into an OME-Zarr
    output. Reported per size: each worker's peak resident memory and limit,
    whether a worker was restarted (its process changed) or spilled to disk,
    wall time and restored voxels per second. The restored mask itself is
    meaningless.
    """
    import torch
    from distributed import Client, LocalCluster

    from model import AttentionResUNet, save_model

    if out_dir.exists():
        raise OutputExistsError(f"Output folder '{out_dir}' already exists; give a new --out.")
    n_kept, height, width = (int(v) for v in shape_khw)
    if min(n_kept, height, width) < 3 or workers < 1:
        raise UserError("--out-of-core-shape needs at least 3 x 3 x 3 kept voxels and --workers at least 1.")
    out_dir.mkdir(parents=True)
    torch.manual_seed(0)
    model_path = save_model(out_dir / "small_model.pt", AttentionResUNet(in_channels=5, depth=1, base_filters=4),
                            {"factor": factor})
    runs = []
    for name, shape in (("quarter", (n_kept, max(3, height // 2), max(3, width // 2))),
                        ("full", (n_kept, height, width))):
        source, target = out_dir / f"{name}_input.ome.zarr", out_dir / f"{name}_restored.ome.zarr"
        write_tiled_sample_zarr(source, shape, factor)
        depth = (shape[0] - 1) * factor + 1
        with LocalCluster(n_workers=workers, threads_per_worker=1, memory_limit=worker_memory,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            pids_before = sorted(client.run(os.getpid).values())
            command = [sys.executable, str(Path(__file__).resolve().parent / "apply.py"), "--input", str(source),
                       "--output", str(target), "--model", str(model_path), "--scheduler", cluster.scheduler_address,
                       "--block-size", str(block_size), "--orientations", "y", "--inference-batch-size", "4"]
            print(" ".join(command), flush=True)
            start = time.perf_counter()
            subprocess.run(command, check=True)
            wall_s = time.perf_counter() - start
            reports = sorted(client.run(_worker_report).values(), key=lambda r: r["pid"])
            restarted = sorted(r["pid"] for r in reports) != pids_before
        voxels = depth * shape[1] * shape[2]
        runs.append({"name": name, "input_shape": list(shape), "output_shape": [depth, shape[1], shape[2]],
                     "output_voxels": voxels, "wall_s": round(wall_s, 1), "voxels_per_s": round(voxels / wall_s),
                     "workers": reports, "worker_restarted": restarted,
                     "spilled": any(r["spilled_bytes"] for r in reports),
                     "max_worker_peak_mb": max(r["peak_rss_mb"] for r in reports)})
        run = runs[-1]
        print(f"{name}: {tuple(run['input_shape'])} -> {tuple(run['output_shape'])} ({voxels:.3g} voxels) in "
              f"{run['wall_s']} s = {run['voxels_per_s']:.3g} voxels/s; worker peaks "
              f"{', '.join(str(r['peak_rss_mb']) for r in reports)} MiB of {reports[0]['limit_mb']} MiB; restarted: "
              f"{restarted}; spilled: {run['spilled']}", flush=True)
    result = {"factor": factor, "workers": workers, "worker_memory": worker_memory, "block_size": block_size,
              "runs": runs,
              "peak_full_over_quarter": round(runs[1]["max_worker_peak_mb"] / runs[0]["max_worker_peak_mb"], 3),
              "voxels_full_over_quarter": round(runs[1]["output_voxels"] / runs[0]["output_voxels"], 3)}
    (out_dir / "out_of_core.json").write_text(json.dumps(result, indent=2))
    print(f"Worker peak memory, full over quarter size: {result['peak_full_over_quarter']}x for "
          f"{result['voxels_full_over_quarter']}x the voxels")
    return result


# The kind each shared stack holds (the README of ../shared/data): masks at the top, the rest by folder.
KNOWN_KINDS = {"labels/fib25_medulla_crop_neurons.tif": "labels", "labels/fib25_medulla_crop_em.tif": "intensity"}


def measure_kind_rule(inputs: Optional[Sequence[Path]] = None, seeds: Sequence[int] = (0, 1, 2)) -> List[Dict]:
    """``--kind auto``'s decision (``data.kind_evidence`` on the sample apply.py reads) against the known
    kind of every shared stack and of the built-in phantoms (labels as uint16 and uint8, masks, grey
    values), printed as a table; returns the rows."""
    from data import kind_evidence, make_sample_intensity, make_sample_labels, make_sample_stack, read_value_sample

    root = SHARED_DATA
    paths = list(inputs) if inputs else sorted(root.glob("*.tif")) + sorted(root.glob("*/*.tif"))
    cases = []
    for path in paths:
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        known = KNOWN_KINDS.get(name, "intensity" if name.startswith("intensity/") else "mask")
        cases.append((name, known, lambda p=path: read_value_sample(p)))
    for seed in seeds:
        cases += [(f"phantom labels (uint16), seed {seed}", "labels", lambda s=seed: make_sample_labels(seed=s)),
                  (f"phantom labels (uint8), seed {seed}", "labels",
                   lambda s=seed: make_sample_labels(seed=s).astype(np.uint8)),
                  (f"phantom mask, seed {seed}", "mask", lambda s=seed: make_sample_stack(seed=s)),
                  (f"phantom grey values, seed {seed}", "intensity", lambda s=seed: make_sample_intensity(seed=s))]
    print("| stack | kind | --kind auto decides | evidence |\n|---|---|---|---|")
    rows = []
    for name, known, sample in cases:
        decided, reason = kind_evidence(sample())
        rows.append({"stack": name, "kind": known, "decided": decided, "reason": reason})
        print(f"| {name} | {known} | {decided or 'asks for --kind'} | {reason} |", flush=True)
    right = sum(row["kind"] == row["decided"] for row in rows)
    print(f"\n{right} of {len(rows)} decided right.")
    return rows


def without_flags(argv: Sequence[str], flags: Sequence[str]) -> List[str]:
    """``argv`` without each of ``flags`` and the values that follow it (up to the next ``--flag``)."""
    kept: List[str] = []
    skipping = False
    for token in argv:
        if token.startswith("--"):
            skipping = token.split("=", 1)[0] in flags
        if not skipping:
            kept.append(token)
    return kept


def run_per_isa(argv: Sequence[str], isas: Sequence[str], out_dir: Path) -> List[Dict[str, Any]]:
    """This benchmark (``argv`` without ``--isa``/``--out``) once per ISA class, each in a child process
    capped by ``machine.emulation_environment`` writing to ``out_dir/<isa>``; one table of every row with
    the class asked for and the class the child reported (its ``device``). Returns the rows."""
    import subprocess

    from machine import can_emulate, cpu_model, emulation_environment

    if out_dir.exists():
        raise OutputExistsError(f"Output folder '{out_dir}' already exists; give a new --out.")
    out_dir.mkdir(parents=True)
    child_argv = without_flags(argv, ("--isa", "--out"))
    print(f"CPU: {cpu_model()}; one child process per instruction-set class: {', '.join(isas)}", flush=True)
    rows: List[Dict[str, Any]] = []
    for isa in isas:
        if not can_emulate(isa):
            print(f"{isa}: not run, this CPU lacks it (a cap only lowers the instruction set)", flush=True)
            continue
        child_out = out_dir / isa
        result = subprocess.run([sys.executable, str(Path(__file__).resolve()), *child_argv, "--out", str(child_out)],
                                env=emulation_environment(isa, dict(os.environ)))
        if result.returncode != 0:
            raise UserError(f"The benchmark capped to {isa} failed (exit status {result.returncode}); its output is "
                            "above.")
        report = json.loads((child_out / "bench_results.json").read_text())
        rows += [dict(row, isa=isa, device=report["device"]) for row in report["rows"]]
    print("\n| ISA asked for | device as the run saw it | stack | factor | method | iou_recon | train_s | infer_s |\n"
          "|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['isa']} | {row['device']} | {row['stack']} | {row['factor']} | {row['method']} | "
              f"{row['iou_recon']} | {row['train_s']} | {row['infer_s']} |")
    (out_dir / "bench_isa.json").write_text(json.dumps(rows, indent=1))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.isa:
        from errors import run_cli

        out_dir = args.out or Path("bench_runs") / datetime.now().strftime("isa-%Y%m%d-%H%M%S")
        return run_cli(lambda _: run_per_isa(sys.argv[1:] if argv is None else list(argv), args.isa, out_dir), args)
    if args.itk_worker:
        _itk_worker(*args.itk_worker)
        return 0
    from errors import run_cli

    if args.restore_memory:
        out_dir = args.out or Path("bench_runs") / datetime.now().strftime("memory-%Y%m%d-%H%M%S")
        return run_cli(lambda _: measure_restore_memory(args.restore_memory, 8, out_dir), args)
    if args.out_of_core:
        out_dir = args.out or Path("bench_runs") / datetime.now().strftime("out-of-core-%Y%m%d-%H%M%S")
        return run_cli(lambda _: measure_out_of_core(args.out_of_core_shape, 8, out_dir, args.workers,
                                                     args.worker_memory, args.block_size), args)
    if args.kind_rule:
        return run_cli(lambda _: measure_kind_rule(args.input), args)
    if args.engine_levers:
        import torch

        def both_tables(_):
            print(f"Network forward on 8 tiles of 256 x 256, {torch.get_num_threads()} threads\n"
                  "| lever | s per batch | Mpixel/s | GFLOP/s | speed-up | max prob. diff |\n|---|---|---|---|---|---|")
            inference = measure_engine_levers()
            print("\nTraining step (forward, backward, Adam) on 8 crops of 128 x 128\n"
                  "| lever | s per step | samples/s | GFLOP/s | speed-up |\n|---|---|---|---|---|")
            return {"inference": inference, "training": measure_training_levers()}

        return run_cli(both_tables, args)
    if args.kind == "intensity":
        return run_cli(run_intensity_benchmark, args)
    return run_cli(run_benchmark, args)


if __name__ == "__main__":
    sys.exit(main())
