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

import blocks
import zarr_io
from data import (KINDS, LENGTH_UNITS_IN_UM, InputNotFoundError, OutputExistsError, UserError, normal_unit,
                  factor_from_voxel_size, read_calibration, read_typed_stack, save_stack, stack_shape)
from eval import build_parser, default_settings, run_cli, validate_settings
from model import load_model, save_model
from restore import SETTINGS, TRAINING_SETTINGS_READ_AT_INFERENCE, model_config, restore_intensity, restore_stack
from train import check_crop_size

# eval.py constants that apply.py's command line also accepts (training and inference recipe).
# (--kind and --device have flags of their own, with choices.)
RESTORE_SETTING_NAMES = tuple(name for name in SETTINGS if name not in ("DEVICE", "KIND"))


def training_only_flags(args: argparse.Namespace) -> List[str]:
    """The flags typed on the command line that only change how a network is trained (nothing a
    trained model's restore reads), as ``--flag-name``."""
    return ["--" + name.lower().replace("_", "-") for name in RESTORE_SETTING_NAMES
            if SETTINGS[name][0] == "train" and name not in TRAINING_SETTINGS_READ_AT_INFERENCE
            and hasattr(args, name)]


def preview_figure(stack_khw: np.ndarray, restored_dhw: np.ndarray, factor: int, path: Path,
                   grey: bool = False) -> None:
    """XZ section through the most populated Y row (the centre row of a grey-scale
    stack): the acquired slices drawn at their true Z spacing (each repeated
    ``factor`` times) beside the restoration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = stack_khw.shape[1] // 2 if grey else int(np.argmax((stack_khw != 0).sum(axis=(0, 2))))
    before = np.repeat(stack_khw[:, y, :] if grey else stack_khw[:, y, :] != 0, factor, axis=0)
    before = before[: restored_dhw.shape[0]]
    after = restored_dhw[:, y, :] if grey else restored_dhw[:, y, :] != 0
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
            raise InputNotFoundError(f"Input '{path}' does not exist. Give a multipage TIFF, a folder of TIFF slices "
                                     "or an OME-Zarr image.")
    return paths


def output_path_for(input_path: Path, output: Path, n_inputs: int) -> Path:
    """Where the restored version of ``input_path`` goes: ``output`` itself for one input (a .tif or an
    .ome.zarr), else ``<input name>_restored`` in the folder ``output``, in the input's format."""
    single = output.suffix.lower() in (".tif", ".tiff", ".zarr")
    if n_inputs == 1 and single:
        return output
    if single:
        raise UserError(f"{n_inputs} inputs need an output folder, not '{output}'.")
    if zarr_io.is_zarr_path(input_path):
        return output / f"{zarr_io.zarr_stem(input_path)}_restored.ome.zarr"
    return output / f"{input_path.stem}_restored.tif"


def probabilities_path_for(target: Path) -> Path:
    """Where ``--save-probabilities`` writes, next to the output and in its format."""
    if zarr_io.is_zarr_path(target):
        return target.with_name(zarr_io.zarr_stem(target) + "_probabilities.ome.zarr")
    return target.with_name(target.stem + "_probabilities.tif")


def build_apply_parser() -> argparse.ArgumentParser:
    # Shared settings default to "not given", so that a saved model's recipe is only
    # overridden by flags the user actually typed.
    shared = build_parser(names=RESTORE_SETTING_NAMES, add_help=False, suppress_defaults=True)
    parser = argparse.ArgumentParser(
        parents=[shared], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Restore anisotropic masks, label images or grey-scale stacks to isotropic voxels. Without "
                    "--model, a network is trained on each input itself (self-supervised, as in eval.py).")
    parser.add_argument("--input", nargs="+", required=True,
                        help="multipage TIFF(s), slice folder(s), OME-Zarr image(s) or label image(s), or a glob")
    parser.add_argument("--output", required=True,
                        help="output .tif or .ome.zarr for one input, or a folder for several")
    parser.add_argument("--model", help="a model saved by eval.py or --save-model; skips training")
    parser.add_argument("--save-model", help="where to save the trained model (one input, no --model)")
    parser.add_argument("--z-step", type=float,
                        help="Z step between slices (default: from the file's metadata; needed for slice folders)")
    parser.add_argument("--xy-size", type=float, help="lateral pixel size (default: from the file's metadata)")
    parser.add_argument("--unit", default=None,
                        help="unit of --z-step/--xy-size, written to the output; needed when both are given")
    parser.add_argument("--kind", choices=KINDS, default="auto",
                        help="mask (segmentation), labels (instance ids), intensity (grey-scale image, restored in "
                             "its own dtype and range) or auto: decided only where it cannot be wrong (a two-valued "
                             "stack is a mask, a float stack grey-scale), else an error asks for --kind")
    parser.add_argument("--labels", nargs="?", const="yes", choices=("auto", "yes", "no"), default=None,
                        help="shorthand: --labels (= yes) is --kind labels, --labels no is --kind mask; auto = when "
                             "an integer stack has more "
                             "than two values")
    parser.add_argument("--save-probabilities", choices=("none", "uint8", "float16"), default="none",
                        help="also write the foreground probability stack next to the output: uint8 (0-255, one "
                             "byte per voxel) or float16 (held as float16, written as 32-bit float for ImageJ)")
    parser.add_argument("--preview", action="store_true",
                        help="also save <output>_preview.png: an XZ section before and after restoration")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--device", default="", help="cpu or cuda; default CUDA when available")
    large = parser.add_argument_group(
        "large volumes", "An output named *.ome.zarr is restored block by block with bounded memory (inputs may be "
                         "OME-Zarr images, label images or plain Zarr arrays, or TIFFs)")
    large.add_argument("--block-size", type=int, default=blocks.BLOCK_SIZE,
                       help="lateral edge of a block (all of Z); memory per worker grows with its square")
    large.add_argument("--workers", type=int, default=0,
                       help="worker processes of a local Dask cluster; 0 = restore block after block in this process")
    large.add_argument("--worker-memory", default="1GiB", help="memory limit of each local Dask worker")
    large.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://host:8786); its workers "
                                           "need this repository on PYTHONPATH and the output's folder")
    large.add_argument("--resume", action="store_true",
                       help="continue an interrupted OME-Zarr output: finished blocks are kept, the rest restored")
    large.add_argument("--max-blocks", type=int, help="restore at most this many blocks now (continue with --resume)")
    large.add_argument("--ngff-version", choices=zarr_io.NGFF_VERSIONS, default=zarr_io.DEFAULT_NGFF_VERSION,
                       help="OME-Zarr version written: 0.4 (Zarr v2, read by Fiji and most tools) or 0.5 (Zarr v3)")
    return parser


def voxel_size_for(path: Path, z_step: Optional[float], xy_size: Optional[float],
                   unit: Optional[str]) -> Tuple[Tuple[float, float, float], str, str]:
    """The input's voxel size ``(z, y, x)``, its unit and a sentence saying where they came from.

    Flags win over the file's metadata, axis by axis. The unit written is
    ``unit`` when given, else the file's unit, and the file's unit only names
    numbers that came (at least in part) from the file: sizes typed as flags
    alone need ``--unit``. Sizes read from the file are converted to ``--unit``
    when it names another length unit (a file in um, ``--z-step 1000 --unit nm``).
    """
    calibration = zarr_io.read_calibration(path) if zarr_io.is_zarr_path(path) else read_calibration(path)
    (file_z, file_y, file_x), file_unit = calibration if calibration else ((None, None, None), None)
    unit = None if unit is None else (normal_unit(unit) or unit)  # 'µm', 'micron' -> 'um' (ASCII metadata)
    if unit is not None and file_unit is not None and unit != file_unit and (z_step is None or xy_size is None):
        # Sizes taken from the file are in the file's unit: express them in --unit.
        if unit not in LENGTH_UNITS_IN_UM or file_unit not in LENGTH_UNITS_IN_UM:
            raise UserError(f"--unit {unit} differs from the unit of '{path}' ({file_unit}) and cannot be converted; "
                            "pass all of --z-step, --xy-size and --unit.")
        scale = LENGTH_UNITS_IN_UM[file_unit] / LENGTH_UNITS_IN_UM[unit]
        file_z, file_y, file_x = (None if v is None else v * scale for v in (file_z, file_y, file_x))
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


def kind_from_flags(args: argparse.Namespace) -> str:
    """``--kind``, with ``--labels`` as its shorthand (``--labels`` = labels, ``--labels no`` = mask)."""
    from_labels = {"yes": "labels", "no": "mask", "auto": "auto", None: "auto"}[args.labels]
    if args.kind != "auto" and from_labels != "auto" and from_labels != args.kind:
        raise UserError(f"--kind {args.kind} and --labels {args.labels} disagree; give one of them.")
    return args.kind if args.kind != "auto" else from_labels


def restore_files(args: argparse.Namespace) -> None:
    """Restore every input of the command line. Inputs, outputs, voxel sizes and
    settings are all checked before any long work starts."""
    kind = kind_from_flags(args)
    inputs = expand_inputs(args.input)
    output = Path(args.output)
    if args.save_model and (len(inputs) > 1 or args.model):
        raise UserError("--save-model keeps the model trained on one input; it cannot be combined with --model "
                        "or several inputs.")
    targets = [output_path_for(p, output, len(inputs)) for p in inputs]
    if len(set(targets)) < len(targets):
        raise UserError("Several inputs would be written to the same output name; give inputs with distinct "
                        "names or restore them in separate calls.")
    check_large_volume_flags(args, targets)
    check_kind_flags(args, kind)
    extra = [probabilities_path_for(t) for t in targets] if args.save_probabilities != "none" else []
    extra += [t.with_name(t.stem + "_preview.png") for t in targets] if args.preview else []
    extra += [Path(args.save_model)] if args.save_model else []
    resumable = {str(t) for t in targets + extra if zarr_io.is_zarr_path(t)} if args.resume else set()
    clashes = [str(t) for t in targets + extra if t.exists() and str(t) not in resumable]
    if clashes and not args.overwrite:
        raise OutputExistsError(f"Output exists: {', '.join(clashes)}. Choose another --output or pass --overwrite"
                                + (" (or --resume for an interrupted OME-Zarr output)." if any(
                                    zarr_io.is_zarr_path(c) for c in clashes) else "."))

    settings = default_settings()
    model, saved_config = load_model(args.model, args.device or None) if args.model else (None, {})
    # A saved model brings its own recipe (channels, interpolation, ...); flags typed by the user win.
    settings.update({key.upper(): value for key, value in saved_config.items() if key.upper() in settings})
    settings.update({name: getattr(args, name) for name in RESTORE_SETTING_NAMES if hasattr(args, name)})
    settings["DEVICE"] = args.device
    if model is not None:
        unused = training_only_flags(args)
        if unused:
            warnings.warn(f"{', '.join(unused)} only change{'s' if len(unused) == 1 else ''} training: "
                          "with --model they have no effect (the model is trained already). Leave out --model "
                          "to train with them.")
        settings["TRAIN_Z_SIZE"] = model.architecture["in_channels"]
    validate_settings(settings)

    threshold = settings["BINARIZE_THRESHOLD"] if settings["BINARIZE_THRESHOLD"] >= 0 else None
    plans = []
    for path in inputs:
        # first: a damaged file is named as damaged, not as uncalibrated
        image = zarr_io.open_image(path) if zarr_io.is_zarr_path(path) else None
        shape = image.shape if image is not None else stack_shape(path)
        # A Zarr input's kind is told from a sample, before any work; a TIFF's ('auto') once it is read.
        input_kind = kind if image is None else zarr_io.image_kind(image, kind, threshold)
        check_kind_flags(args, input_kind, path)
        (z_step, y_size, xy_size), unit, said = voxel_size_for(path, args.z_step, args.xy_size, args.unit)
        factor, out_z = factor_from_voxel_size(z_step, xy_size)
        if model is None:
            check_crop_size(shape, (settings["TRAIN_Z_SIZE"], settings["TRAIN_XY_SIZE"], settings["TRAIN_XY_SIZE"]),
                            factor)
        elif saved_config.get("factor") not in (None, factor):
            warnings.warn(f"The model was trained at factor {saved_config['factor']}; '{path}' needs {factor}.")
        plans.append((path, input_kind, factor, (out_z, y_size, xy_size), unit, said))

    for (path, input_kind, factor, voxel, unit, said), target in zip(plans, targets):
        if zarr_io.is_zarr_path(target):
            restore_into_ome_zarr(args, input_kind, path, target, factor, voxel, unit, said, settings, model,
                                  threshold)
            continue
        if zarr_io.is_zarr_path(path):  # a TIFF output holds the whole stack in memory: so may the input
            stack_kind, mask, labels = zarr_io.read_typed_image(zarr_io.open_image(path), input_kind, threshold)
        else:
            stack_kind, mask, labels = read_typed_stack(path, input_kind, threshold)
            check_kind_flags(args, stack_kind, path)
        print(f"{path.name}: {mask.shape} (Z, Y, X), {stack_kind}; factor {factor} from {said} -> "
              f"{(mask.shape[0] - 1) * factor + 1} slices")
        if stack_kind == "intensity":
            restored, used_model, info = restore_intensity(mask, factor, settings, model=model)
            probabilities = None
        else:
            restored, probabilities, used_model, info = restore_stack(
                mask, factor, settings, model=model, labels=labels,
                probability_dtype=np.float16 if args.save_probabilities == "float16" else np.uint8,
                keep_probabilities=args.save_probabilities != "none")
        save_stack(target, restored, voxel, unit, overwrite=args.overwrite)
        if args.save_probabilities != "none":
            save_stack(probabilities_path_for(target), probabilities, voxel, unit, overwrite=args.overwrite)
        if args.preview:
            preview_figure(mask, restored, factor, target.with_name(target.stem + "_preview.png"),
                           grey=stack_kind == "intensity")
        if args.save_model:
            save_model(args.save_model, used_model, dict(model_config(settings, factor), kind=stack_kind),
                       overwrite=args.overwrite)
        print(f"Wrote {target} (voxel {voxel[0]:.4g} x {voxel[1]:.4g} x {voxel[2]:.4g} {unit}); "
              f"training {info['train_s']:.0f} s, restoring {info['infer_s']:.0f} s.")


def check_kind_flags(args: argparse.Namespace, kind: str, path: Optional[Path] = None) -> None:
    """Reject flags that a stack of ``kind`` cannot use (the command line's kind, or one input's)."""
    if kind == "intensity" and args.save_probabilities != "none":
        what = f"'{path}' is a grey-scale stack" if path else "Grey-scale stacks (--kind intensity) are"
        raise UserError(f"{what} restored as grey values, which have no foreground probabilities: leave out "
                        "--save-probabilities.")


def check_large_volume_flags(args: argparse.Namespace, targets: Sequence[Path]) -> None:
    """Reject flags of the block-wise restore that cannot apply, before any work."""
    to_zarr = [zarr_io.is_zarr_path(t) for t in targets]
    cluster = args.workers > 0 or args.scheduler or args.resume or args.max_blocks is not None
    if cluster and not all(to_zarr):
        raise UserError("--workers, --scheduler, --resume and --max-blocks restore block by block into an OME-Zarr "
                        "output; give --output NAME.ome.zarr (a TIFF output is restored in memory).")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}.")
    if args.workers and args.scheduler:
        raise UserError("--workers starts a local cluster and --scheduler uses a running one: give one of them.")
    if args.resume and args.overwrite:
        raise UserError("--resume continues an existing output and --overwrite replaces it: give one of them.")
    if args.preview and any(to_zarr):
        raise UserError("--preview needs the whole restored stack in memory; it is available for TIFF outputs.")
    if any(to_zarr):
        blocks.chunk_edge(args.block_size)


def restore_into_ome_zarr(args: argparse.Namespace, kind: str, path: Path, target: Path, factor: int,
                          voxel: Tuple[float, float, float], unit: str, said: str, settings: dict, model,
                          threshold: Optional[float]) -> None:
    """One input into an OME-Zarr output, block by block (``blocks.restore_to_ome_zarr``). A Zarr input is
    read window by window; a TIFF input is read whole (it fits in memory) and restored block by block.
    ``kind`` may be 'auto' (decided here by the rule of ``data.read_typed_stack``)."""
    if zarr_io.is_zarr_path(path):
        image = zarr_io.open_image(path)
        stack_kind = zarr_io.image_kind(image, kind, threshold)
        source, translation, name = image, image.translation_zyx, image.name
        labels = image if stack_kind == "labels" else None
    else:
        stack_kind, source, labels = read_typed_stack(path, kind, threshold)
        translation, name = (0.0, 0.0, 0.0), path.stem
    check_kind_flags(args, stack_kind, path)
    depth = (source.shape[0] - 1) * factor + 1
    print(f"{path.name}: {tuple(source.shape)} (Z, Y, X), {stack_kind}; factor {factor} from {said} -> {depth} "
          f"slices, into {target} (NGFF {args.ngff_version}, blocks of {args.block_size} x {args.block_size} "
          "pixels)")
    probabilities = None if args.save_probabilities == "none" else args.save_probabilities
    config = dict(model_config(settings, factor), kind=stack_kind)
    result = blocks.restore_to_ome_zarr(
        source, target, factor, settings, voxel, unit, kind="intensity" if stack_kind == "intensity" else "mask",
        model=model, model_config=config, labels_source=labels, label_name=name, translation_zyx=translation,
        source_name=str(path), binarize_threshold=threshold, block_size=args.block_size,
        ngff_version=args.ngff_version, probabilities=probabilities,
        probabilities_output=probabilities_path_for(target) if probabilities else None, workers=args.workers,
        worker_memory=args.worker_memory, scheduler=args.scheduler, resume=args.resume, overwrite=args.overwrite,
        max_blocks=args.max_blocks)
    if args.save_model and result["model"] is not None:
        save_model(args.save_model, result["model"], config, overwrite=args.overwrite)
    if result["state"] == "complete":
        print(f"Wrote {target} (voxel {voxel[0]:.4g} x {voxel[1]:.4g} x {voxel[2]:.4g} {unit}); "
              f"training {result['train_s']:.0f} s, restoring {result['restore_s']:.0f} s "
              f"({result['restored']} blocks restored, {result['skipped']} already done).")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python apply.py --input STACK --output OUT.tif``: see ``--help``."""
    return run_cli(restore_files, build_apply_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
