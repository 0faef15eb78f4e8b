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
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from data import InputNotFoundError, OutputExistsError, UserError, check_factor, downsample_z, list_tiff_files, make_sample_labels, read_mask_or_labels
from metrics import calculate_dice, calculate_iou, mean_label_iou, mean_surface_distance, reconstructed_indices
from morph import interpolate_along_axis, morph_stack_interpolated
from restore import assign_labels, restore_probabilities, threshold_probabilities

METHODS = ("nearest", "linear", "sdf", "itk_mci", "network")
ROW_KEYS = ("stack", "factor", "method", "iou_recon", "dice_recon", "iou_stack", "assd_vox", "train_s", "infer_s",
            "voxels_per_s", "peak_rss_mb")
SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"
QUICK_SHAPE = (96, 128, 128)  # central crop (D, H, W) for --quick
QUICK_SETTINGS = {"TRAIN_NB": 480, "NUM_EPOCHS": 3}


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


def restore_with(method: str, sparse: np.ndarray, kept: np.ndarray, depth: int, factor: int,
                 settings: Dict[str, Any], device) -> Dict[str, Any]:
    """Run one method; returns the restored bool stack and its costs."""
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
        probabilities, _, info = restore_probabilities(sparse, factor, settings, original_depth=depth, device=device)
        restored = threshold_probabilities(probabilities, settings["PROBABILITY_THRESHOLD"])
        return {"restored": restored, "train_s": info["train_s"], "infer_s": info["infer_s"]}
    else:
        raise UserError(f"Unknown method '{method}'; choose from {METHODS}.")
    return {"restored": restored, "train_s": train_s, "infer_s": time.perf_counter() - start}


def score_row(stack_name: str, factor: int, method: str, restored: np.ndarray, truth: np.ndarray,
              kept: np.ndarray, train_s: Optional[float], infer_s: float) -> Dict[str, Any]:
    """One result row, every score computed from the arrays."""
    recon = reconstructed_indices(kept, truth.shape[0])
    return {
        "stack": stack_name, "factor": int(factor), "method": method,
        "iou_recon": round(calculate_iou(restored[recon], truth[recon]), 5),
        "dice_recon": round(calculate_dice(restored[recon], truth[recon]), 5),
        "iou_stack": round(calculate_iou(restored, truth), 5),
        "assd_vox": round(mean_surface_distance(restored, truth, recon), 4),
        "train_s": None if train_s is None else round(train_s, 2),
        "infer_s": round(infer_s, 3),
        "voxels_per_s": round(truth.size / infer_s) if infer_s > 0 else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def unavailable_row(stack_name: str, factor: int, method: str) -> Dict[str, Any]:
    row = dict.fromkeys(ROW_KEYS)
    row.update(stack=stack_name, factor=int(factor), method=method)
    return row


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    header = "| " + " | ".join(ROW_KEYS) + " |\n|" + "---|" * len(ROW_KEYS) + "\n"
    lines = ["| " + " | ".join("n/a" if row[k] is None else str(row[k]) for k in ROW_KEYS) + " |" for row in rows]
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


def load_inputs(paths: Sequence[Path], quick: bool, sample_shape) -> List[tuple]:
    """(name, bool stack, label stack or None) triples; every path is checked before any long work.

    Integer stacks with more than two values are instance label images: their
    foreground is benchmarked, and the ids are restored and scored too.
    """
    for path in paths:
        if not Path(path).exists():
            raise InputNotFoundError(f"Input '{path}' does not exist. Give TIFF files or folders of TIFF slices.")
    named = [(Path(path).name, *read_mask_or_labels(path)) for path in paths]
    if not paths:
        labels = make_sample_labels(tuple(sample_shape), seed=0)
        named.append((f"sample{tuple(sample_shape)}", labels > 0, labels))
    if quick:
        named = [(name, central_crop(mask, QUICK_SHAPE), None if labels is None else central_crop(labels, QUICK_SHAPE))
                 for name, mask, labels in named]
    return named


def parse_overrides(pairs: Sequence[str], settings: Dict[str, Any]) -> Dict[str, Any]:
    """Apply ``NAME=VALUE`` overrides of eval.py constants."""
    from eval import _parse_value

    out = dict(settings)
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in settings or not value:
            raise UserError(f"--set takes NAME=VALUE with NAME one of eval.py's constants, got '{pair}'.")
        out[name] = _parse_value(value, settings[name])
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", nargs="+", type=Path, help="TIFF files or slice folders (default: ../shared/data)")
    parser.add_argument("--factors", nargs="+", type=int, default=[4, 8, 10])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, help="output folder (new; default bench_runs/<date>-<time>)")
    parser.add_argument("--quick", action="store_true",
                        help=f"central crop {QUICK_SHAPE} and a shorter training {QUICK_SETTINGS}")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="override eval.py constants for the network, e.g. --set ORIENTATIONS=y")
    parser.add_argument("--label", default="network", help="method name written for the network rows")
    parser.add_argument("--sample-shape", type=int, nargs=3, default=[128, 128, 128],
                        help="built-in sample size when no input is given")
    parser.add_argument("--restore-memory", type=int, nargs=3, metavar=("K", "H", "W"),
                        help="instead of the benchmark: wall time and peak memory of apply.py restoring a K x H x W "
                             "mask at factor 8 with a small saved model (e.g. 125 1024 1024 -> 993 x 1024 x 1024)")
    parser.add_argument("--itk-worker", nargs=2, help=argparse.SUPPRESS)
    return parser


def run_benchmark(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    from eval import default_settings
    from model import select_device
    from train import check_crop_size

    settings = default_settings()
    if args.quick:
        settings.update(QUICK_SETTINGS)
    settings = parse_overrides(args.set, settings)
    out_dir = args.out or Path("bench_runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if out_dir.exists():
        raise OutputExistsError(f"Output folder '{out_dir}' already exists; give a new --out.")
    paths = args.input if args.input else default_inputs()
    stacks = load_inputs(paths, args.quick, args.sample_shape)
    for name, stack, _ in stacks:
        for factor in args.factors:
            try:
                check_factor(factor, stack.shape[0])
                if "network" in args.methods:
                    n_kept = len(range(0, stack.shape[0], factor))
                    check_crop_size((n_kept,) + stack.shape[1:], (settings["TRAIN_Z_SIZE"], settings["TRAIN_XY_SIZE"],
                                                                   settings["TRAIN_XY_SIZE"]), factor)
            except ValueError as error:
                raise UserError(f"{name}: {error}") from None
    out_dir.mkdir(parents=True)
    device = select_device(settings["DEVICE"] or None)
    print(f"Device: {device.type}; stacks: {', '.join(f'{n} {s.shape}' for n, s, _ in stacks)}; "
          f"factors {args.factors}")
    rows: List[Dict[str, Any]] = []
    label_rows: List[Dict[str, Any]] = []  # per-label IoU, for label-image inputs
    report = {
        "settings": {"factors": args.factors, "methods": args.methods, "quick": args.quick,
                     "inputs": [str(p) for p in paths] or "built-in sample",
                     "network": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__},
        "device": f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "date": datetime.now().isoformat(timespec="seconds"),
        "rows": rows,
    }

    def save_report() -> None:  # after every row, so a crash late in a long run loses nothing
        if label_rows:
            report["label_rows"] = label_rows
        (out_dir / "bench_results.json").write_text(json.dumps(report, indent=2))
        (out_dir / "bench_results.md").write_text(markdown_table(rows) + "\n")

    print(markdown_table([]), flush=True)
    for name, truth, labels in stacks:
        for factor in args.factors:
            sparse, kept = downsample_z(truth, factor)
            for method in args.methods:
                label = args.label if method == "network" else method
                try:
                    result = restore_with(method, sparse, kept, truth.shape[0], factor, settings, device)
                except ImportError as error:
                    print(f"| {name} | {factor} | {label} | unavailable: {error} |", flush=True)
                    rows.append(unavailable_row(name, factor, label))
                    save_report()
                    continue
                row = score_row(name, factor, label, result["restored"], truth, kept, result["train_s"],
                                result["infer_s"])
                rows.append(row)
                print(markdown_table([row]).splitlines()[-1], flush=True)
                if labels is not None:
                    restored_labels = assign_labels(result["restored"], labels[kept], factor)
                    recon = reconstructed_indices(kept, truth.shape[0])
                    label_rows.append({"stack": name, "factor": int(factor), "method": label,
                                       "label_iou_recon": round(mean_label_iou(restored_labels, labels, recon), 5)})
                save_report()
    plot_iou_vs_factor(rows, out_dir / "iou_vs_factor.png")
    print(f"\nResults in {out_dir}\n")
    print(markdown_table(rows))
    if label_rows:
        print("\nMean per-label IoU on reconstructed slices (ids restored by nearest kept-slice label):")
        for row in label_rows:
            print(f"| {row['stack']} | {row['factor']} | {row['method']} | {row['label_iou_recon']} |")
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.itk_worker:
        _itk_worker(*args.itk_worker)
        return 0
    from eval import run_cli

    if args.restore_memory:
        out_dir = args.out or Path("bench_runs") / datetime.now().strftime("memory-%Y%m%d-%H%M%S")
        return run_cli(lambda _: measure_restore_memory(args.restore_memory, 8, out_dir), args)
    return run_cli(run_benchmark, args)


if __name__ == "__main__":
    sys.exit(main())
