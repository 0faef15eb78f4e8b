"""``python apply.py``: restore genuinely anisotropic stacks from the command line.

Argument parsing, inputs and outputs, voxel sizes and messages. The work is
done by the restore engine (``restore.py``); this script only wires files to it.
"""
from __future__ import annotations

import argparse
import glob
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from data import (InputNotFoundError, OutputExistsError, UserError, factor_from_voxel_size, read_calibration,
                  read_mask_or_labels, save_stack, stack_shape)
from eval import build_parser, default_settings, run_cli, validate_settings
from model import load_model, save_model
from restore import SETTINGS, model_config, restore_stack
from train import check_crop_size

# eval.py constants that apply.py's command line also accepts (training and inference recipe).
RESTORE_SETTING_NAMES = tuple(name for name in SETTINGS if name != "DEVICE")


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
            raise InputNotFoundError(f"No input matches '{pattern}'.")
        paths.extend(Path(m) for m in matches)
    for path in paths:
        if not path.exists():
            raise InputNotFoundError(f"Input '{path}' does not exist. Give a multipage TIFF or a folder of TIFF slices.")
    return paths


def output_path_for(input_path: Path, output: Path, n_inputs: int) -> Path:
    """Where the restored version of ``input_path`` goes."""
    if n_inputs == 1 and output.suffix.lower() in (".tif", ".tiff"):
        return output
    if output.suffix.lower() in (".tif", ".tiff"):
        raise UserError(f"{n_inputs} inputs need an output folder, not the file '{output}'.")
    return output / f"{input_path.stem}_restored.tif"


def build_apply_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--z-step", type=float,
                        help="Z step between slices (default: from the file's metadata; needed for slice folders)")
    parser.add_argument("--xy-size", type=float, help="lateral pixel size (default: from the file's metadata)")
    parser.add_argument("--unit", default=None,
                        help="unit of --z-step/--xy-size, written to the output; needed when both are given")
    parser.add_argument("--labels", nargs="?", const="yes", choices=("auto", "yes", "no"), default="auto",
                        help="restore instance ids (--labels alone = yes); auto = when an integer stack has more "
                             "than two values")
    parser.add_argument("--save-probabilities", choices=("none", "uint8", "float16"), default="none",
                        help="also write the foreground probability stack next to the output: uint8 (0-255, one "
                             "byte per voxel) or float16 (held as float16, written as 32-bit float for ImageJ)")
    parser.add_argument("--preview", action="store_true",
                        help="also save <output>_preview.png: an XZ section before and after restoration")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--device", default="", help="cpu or cuda; default CUDA when available")
    return parser


def voxel_size_for(path: Path, z_step: Optional[float], xy_size: Optional[float],
                   unit: Optional[str]) -> Tuple[Tuple[float, float, float], str, str]:
    """The input's voxel size ``(z, y, x)``, its unit and a sentence saying where they came from.

    Flags win over the file's metadata, axis by axis. The unit written is
    ``unit`` when given, else the file's unit, and the file's unit only names
    numbers that came (at least in part) from the file: sizes typed as flags
    alone need ``--unit``.
    """
    calibration = read_calibration(path)
    (file_z, file_y, file_x), file_unit = calibration if calibration else ((None, None, None), None)
    z = z_step if z_step is not None else file_z
    y, x = (xy_size, xy_size) if xy_size is not None else (file_y, file_x)
    if x is None:
        raise UserError(f"'{path}' carries no lateral pixel size (ImageJ resolution or OME PhysicalSizeX). Pass "
                        "--xy-size (and --z-step, --unit), or set the voxel size in Fiji (Image > Properties) and "
                        "save again.")
    if z is None:
        why = "a folder of 2D slices has none" if path.is_dir() else "no ImageJ spacing or OME PhysicalSizeZ"
        raise UserError(f"'{path}' carries no Z step ({why}). Pass --z-step, in the unit of the file's pixel size"
                        + (f" ({file_unit})." if file_unit else " (and --unit)."))
    from_file = z_step is None or xy_size is None
    if unit is None and not from_file:
        raise UserError("--z-step and --xy-size were given without --unit: pass --unit (e.g. --unit um) so that "
                        "the output's metadata names the unit of those numbers.")
    unit = unit or file_unit
    if unit is None:
        raise UserError(f"'{path}' gives its pixel size without a unit; pass --unit (e.g. --unit um).")
    what = "from the file" if z_step is None and xy_size is None else ("from the flags" if not from_file
                                                                       else "from the file and the flags")
    return (float(z), float(y), float(x)), unit, f"Z {z:g} {unit}, XY {x:g} {unit} ({what})"


def restore_files(args: argparse.Namespace) -> None:
    """Restore every input of the command line. Inputs, outputs, voxel sizes and
    settings are all checked before any long work starts."""
    inputs = expand_inputs(args.input)
    output = Path(args.output)
    if args.save_model and (len(inputs) > 1 or args.model):
        raise UserError("--save-model keeps the model trained on one input; it cannot be combined with --model "
                        "or several inputs.")
    targets = [output_path_for(p, output, len(inputs)) for p in inputs]
    if len(set(targets)) < len(targets):
        raise UserError("Several inputs would be written to the same output name; give inputs with distinct "
                        "names or restore them in separate calls.")
    extra = [t.with_name(t.stem + "_probabilities.tif") for t in targets] if args.save_probabilities != "none" else []
    extra += [t.with_name(t.stem + "_preview.png") for t in targets] if args.preview else []
    extra += [Path(args.save_model)] if args.save_model else []
    clashes = [str(t) for t in targets + extra if t.exists()]
    if clashes and not args.overwrite:
        raise OutputExistsError(f"Output exists: {', '.join(clashes)}. Choose another --output or pass --overwrite.")

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
        (z_step, y_size, xy_size), unit, said = voxel_size_for(path, args.z_step, args.xy_size, args.unit)
        factor, out_z = factor_from_voxel_size(z_step, xy_size)
        shape = stack_shape(path)
        if model is None:
            check_crop_size(shape, (settings["TRAIN_Z_SIZE"], settings["TRAIN_XY_SIZE"], settings["TRAIN_XY_SIZE"]),
                            factor)
        elif saved_config.get("factor") not in (None, factor):
            warnings.warn(f"The model was trained at factor {saved_config['factor']}; '{path}' needs {factor}.")
        plans.append((path, factor, (out_z, y_size, xy_size), unit, said))

    threshold = settings["BINARIZE_THRESHOLD"] if settings["BINARIZE_THRESHOLD"] >= 0 else None
    for (path, factor, voxel, unit, said), target in zip(plans, targets):
        mask, labels = read_mask_or_labels(path, threshold, args.labels)
        print(f"{path.name}: {mask.shape} (Z, Y, X); factor {factor} from {said} -> "
              f"{(mask.shape[0] - 1) * factor + 1} slices")
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
    return run_cli(restore_files, build_apply_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
