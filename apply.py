"""``python apply.py``: restore genuinely anisotropic stacks from the command line.

Argument parsing, inputs and outputs, voxel sizes and messages. The work is
done by the restore engine (``restore.py``); this script only wires files to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import glob
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

import blocks
import zarr_io
from data import (InputNotFoundError, MaskValues, OutputExistsError,
                  StackChoice, UserError, as_label_image, decide_kind_and_reason, factor_from_voxel_size, input_exists,
                  normal_unit, other_series, read_calibration, read_stack, read_typed_stack, read_value_sample,
                  save_stack, stack_dtype, stack_shape)
from errors import ToolWarning, refuse_unwritable, run_cli
from tiff_io import is_ome_tiff_path, length_scale
from h5_io import is_hdf5_path, split_hdf5_path
from mrc_io import is_mrc_path
from eval import default_recipe
from model import load_model, save_model, select_device
from morph import interpolate_along_axis, kept_positions
from plan import RestorePlan, record_throughput
from labeling import is_dense_label_image, touching_share
from restore import (check_model_settings, fit_recipe_to_stack, inference_kind, model_config, restore_intensity,
                     restore_stack, same_factor, training_kind)
from settings import (FIELDS, GROUPS, TRAINING_ONLY, Settings, SettingsParser, VoxelSize, add_setting_arguments,
                      typed_values)

# The settings apply.py's command line takes: all but eval.py's simulated voxel size, which is read from
# the file here (the voxel-size flags override it).
RESTORE_SETTING_NAMES = tuple(FIELDS)
# The suffixes of a single output file (a TIFF or an OME-Zarr store); a name within a typo of one of them (x.tf,
# x.tiif, x.zar) is refused rather than made a folder.
OUTPUT_SUFFIXES = (".tif", ".tiff", ".zarr")
# Output names that ask for a format this tool does not write (a name with another suffix is a folder).
OTHER_IMAGE_SUFFIXES = frozenset((".png", ".jpg", ".jpeg", ".bmp", ".gif", ".h5", ".hdf5", ".hdf", ".n5", ".mrc",
                                  ".rec", ".nii", ".gz", ".nrrd", ".mha", ".mhd", ".npy", ".npz", ".raw", ".czi",
                                  ".lif", ".nd2", ".ims", ".klb", ".am", ".vtk"))
USAGE = ("%(prog)s --input STACK [STACK ...] --output OUT [--kind KIND] [--model FILE | --save-model FILE]\n"
         "       [--z-step Z --xy-size XY --unit UNIT] [options]")


def training_only_flags(args: argparse.Namespace) -> List[str]:
    """The flags typed on the command line that only change how a network is trained (nothing a
    trained model's restore reads), as ``--flag-name``."""
    return [FIELDS[name][1].metadata["flag"] for name in TRAINING_ONLY if name in args.typed]


def preview_figure(stack_khw: np.ndarray, restored_dhw: np.ndarray, factor: float, path: Path,
                   grey: bool = False) -> None:
    """XZ section through the most populated Y row (the centre row of a grey-scale
    stack): the acquired slices drawn at their true Z spacing (each repeated
    ``factor`` times) beside the restoration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = stack_khw.shape[1] // 2 if grey else int(np.argmax((stack_khw != 0).sum(axis=(0, 2))))
    # Each acquired slice drawn over the output slices nearest to it: its true Z extent.
    acquired = stack_khw[:, y, :] if grey else stack_khw[:, y, :] != 0
    before = interpolate_along_axis(acquired, kept_positions(len(acquired), factor), restored_dhw.shape[0],
                                    method="nearest")
    after = restored_dhw[:, y, :] if grey else restored_dhw[:, y, :] != 0
    figure, axes = plt.subplots(2, 1, figsize=(10, 2 * 2.2 * max(after.shape[0] / after.shape[1], 0.25) + 1.2))
    for axis, image, title in zip(axes, (before, after), (f"acquired (Z step = {factor:g} px), XZ at y={y}",
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
        if not input_exists(path):
            raise InputNotFoundError(f"Input '{path}' does not exist. Give a multipage TIFF, a folder of TIFF slices, "
                                     "an HDF5 file (or file.h5/dataset) or an OME-Zarr image.")
    return paths


def output_path_for(input_path: Path, output: Path, n_inputs: int, choice: StackChoice = StackChoice()) -> Path:
    """Where the restored version of ``input_path`` goes: ``output`` itself for one input (a .tif or an
    .ome.zarr), else ``<input name>_restored`` in the folder ``output``, in the input's format, with the
    channel and time point chosen (``_c1_t0``) so that one run per channel fills one folder."""
    single = output.suffix.lower() in OUTPUT_SUFFIXES
    if not single and not output.is_dir():
        suffix = output.suffix.lower()
        typo = difflib.get_close_matches(suffix, OUTPUT_SUFFIXES, n=1, cutoff=0.75)
        if suffix in OTHER_IMAGE_SUFFIXES or typo:
            meant = f" ({output.with_suffix(typo[0]).name} was meant?)" if typo else ""
            raise UserError(f"--output '{output}' names a {output.suffix} file, a format this tool does not "
                            f"write{meant}. Name a .tif (ImageJ TIFF), .ome.tif (OME-TIFF) or .ome.zarr output, "
                            "or a folder for several inputs.")
    if n_inputs == 1 and single:
        return output
    if single:
        raise UserError(f"{n_inputs} inputs need an output folder, not '{output}'.")
    chosen = "".join(f"_{letter}{value}" for letter, value in (("c", choice.channel), ("t", choice.timepoint))
                     if value is not None)
    if zarr_io.is_zarr_path(input_path):
        return output / f"{zarr_image_stem(input_path)}{chosen}_restored.ome.zarr"
    if is_hdf5_path(input_path):  # plant.h5/segmentation -> plant_segmentation
        file_path, key = split_hdf5_path(input_path)
        stem = file_path.stem + ("_" + key.replace("/", "_") if key else "")
        return output / f"{stem}{chosen}_restored.tif"
    suffix = ".ome.tif" if is_ome_tiff_path(input_path) else ".tif"
    return output / f"{tiff_stem(input_path)}{chosen}_restored{suffix}"


def output_label_name(path: Path) -> str:
    """The name of the label image an OME-Zarr output of label ids holds (``OUT.ome.zarr/labels/<name>``), and of
    a converted image: the input store's name (``zarr_io.zarr_stem``, as its ``ZarrImage.name``), or the input
    file's stem."""
    return zarr_io.zarr_stem(path) if zarr_io.is_zarr_path(path) else tiff_stem(path)


def zarr_image_stem(path: Path) -> str:
    """An OME-Zarr image's name for a file name: the store's, and for an image inside it the path within
    (``cells.ome.zarr/labels/nuclei`` -> ``cells_labels_nuclei``), as label images share names across stores."""
    parts = Path(str(path).rstrip("/")).parts
    stores = [i for i, part in enumerate(parts) if part.lower().endswith(".zarr")]
    if not stores or stores[-1] == len(parts) - 1:
        return zarr_io.zarr_stem(path)
    return "_".join([zarr_io.zarr_stem(parts[stores[-1]]), *parts[stores[-1] + 1:]])


def tiff_stem(path: Path) -> str:
    """A TIFF's name without ``.tif``/``.tiff`` and ``.ome`` (``cells.ome.tif`` -> ``cells``)."""
    name = path.name
    for suffix in (".tiff", ".tif", ".ome"):
        name = name[: -len(suffix)] if name.lower().endswith(suffix) else name
    return name


def probabilities_path_for(target: Path) -> Path:
    """Where ``--save-probabilities`` writes, next to the output and in its format."""
    if zarr_io.is_zarr_path(target):
        return target.with_name(zarr_io.zarr_stem(target) + "_probabilities.ome.zarr")
    return target.with_name(tiff_stem(target) + "_probabilities" + (".ome.tif" if is_ome_tiff_path(target) else ".tif"))


def preview_path_for(target: Path) -> Path:
    """Where ``--preview`` writes its figure, next to the output."""
    stem = zarr_io.zarr_stem(target) if zarr_io.is_zarr_path(target) else tiff_stem(target)
    return target.with_name(stem + "_preview.png")


def build_apply_parser() -> argparse.ArgumentParser:
    """The command line: what a user types every day first (input, output, kind, model), then the groups
    of the settings model (voxel size, model and training, inference, large volumes, advanced)."""
    defaults = dict(base_settings().as_dict())
    parser = SettingsParser(
        usage=USAGE,
        description="Restore anisotropic masks, label images or grey-scale stacks to isotropic voxels. Without "
                    "--model, a network is trained on each input itself (self-supervised, as in eval.py).",
        epilog="Flags left out take the defaults shown, or a saved model's (--model); old forms such as "
               "--num-epochs 0 (by kind) and --tta-flips true are still accepted.")
    parser.add_argument("--input", nargs="+", required=True, metavar="STACK",
                        help="multipage TIFF(s), slice folder(s), HDF5 dataset(s) (file.h5 or file.h5/key), MRC "
                             "file(s), OME-Zarr image(s) or label image(s), or a glob")
    parser.add_argument("--output", required=True, metavar="OUT",
                        help="output .tif or .ome.zarr for one input, or a folder for several")
    add_setting_arguments(parser, defaults, ["KIND"])
    parser.add_argument("--labels", nargs="?", const="yes", choices=("auto", "yes", "no"), default=None,
                        help="shorthand: --labels (= yes) is --kind labels, --labels no is --kind mask; auto = "
                             "as --kind auto")
    parser.add_argument("--model", metavar="FILE", help="a model saved by eval.py or --save-model; skips training")
    parser.add_argument("--save-model", metavar="FILE",
                        help="where to save the trained model (one input, no --model)")
    parser.add_argument("--save-probabilities", choices=("none", "uint8", "float16"), default="none",
                        help="also write the foreground probability stack next to the output: uint8 (0-255, one "
                             "byte per voxel) or float16 (held as float16, written as 32-bit float for ImageJ) "
                             "(default: none)")
    parser.add_argument("--preview", action="store_true",
                        help="also save <output>_preview.png: an XZ section before and after restoration")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (kind, factor, shapes, voxel sizes, bytes, memory, expected time) from "
                             "the metadata and a sample of values, and stop: nothing is written")
    groups = add_setting_arguments(parser, defaults, ["Z_RESOLUTION", "XY_RESOLUTION", "VOXEL_UNIT"])
    groups["model and training"] = parser.add_argument_group("model and training", GROUPS["model and training"])
    groups["model and training"].add_argument(
        "--allow-factor-mismatch", action="store_true",
        help="use --model on a stack whose Z/XY factor differs from the one it was trained at")
    rest = [name for name in RESTORE_SETTING_NAMES if name not in ("KIND", "Z_RESOLUTION", "XY_RESOLUTION",
                                                                   "VOXEL_UNIT")]
    add_setting_arguments(parser, defaults, rest, groups)
    return parser


def base_settings() -> Settings:
    """The recipe before a saved model's or the flags': ``eval.py``'s constants, without its simulated
    voxel size (here it comes from the file)."""
    return dataclasses.replace(default_recipe(), voxel=VoxelSize())


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line, with ``typed`` (the settings given, by constant name) and ``settings``
    (:func:`base_settings` with them) added."""
    args = build_apply_parser().parse_args(argv)
    args.typed = typed_values(args)
    args.settings = Settings.from_dict(args.typed, base=base_settings())
    return args


def voxel_size_for(path: Path, typed: VoxelSize) -> Tuple[Tuple[float, float, float], str, str]:
    """The input's voxel size ``(z, y, x)``, its unit and a sentence saying where they came from.

    ``typed`` holds the sizes and unit given (``--z-step``, ``--xy-size``, ``--unit``; None = not given).
    Flags win over the file's metadata, axis by axis. The unit written is
    ``unit`` when given, else the file's unit. A size typed without ``--unit``
    is taken in the file's unit when the file has one (the sentence says so);
    sizes typed without any unit known are an error. Sizes read from the file
    are converted to ``--unit`` when it names another length unit (a file in
    um, ``--z-step 1000 --unit nm``). Y and X sizes that differ by more than
    1 % are an error: the factor would hold for one lateral axis only.
    """
    z_step, xy_size, unit = typed.z_step, typed.xy_size, typed.unit
    calibration = zarr_io.read_calibration(path) if zarr_io.is_zarr_path(path) else read_calibration(path)
    (file_z, file_y, file_x), file_unit = calibration if calibration else ((None, None, None), None)
    typed_unit = None if unit is None else (normal_unit(unit) or unit)  # 'µm', 'micron' -> 'um' (ASCII metadata)
    if typed_unit is not None and file_unit is not None and typed_unit != file_unit and (z_step is None or
                                                                                       xy_size is None):
        scale = unit_scale(file_unit, typed_unit, path)  # sizes taken from the file, expressed in --unit
        file_z, file_y, file_x = (None if v is None else v * scale for v in (file_z, file_y, file_x))
    z = z_step if z_step is not None else file_z
    y, x = (xy_size, xy_size) if xy_size is not None else (file_y, file_x)
    if x is None:
        where = ("its dataset's element_size_um" if is_hdf5_path(path) else "the MRC header's voxel size"
                 if is_mrc_path(path) else "ImageJ resolution or OME PhysicalSizeX")
        raise UserError(f"'{path}' carries no lateral pixel size ({where}). Pass --xy-size (and --z-step, --unit), "
                        "or set the voxel size in Fiji (Image > Properties) and save again.")
    if z is None:
        why = ("a folder of 2D slices has none" if path.is_dir() else "no element_size_um attribute"
               if is_hdf5_path(path) else "no voxel size in the MRC header" if is_mrc_path(path)
               else "no ImageJ spacing or OME PhysicalSizeZ")
        raise UserError(f"'{path}' carries no Z step ({why}). Pass --z-step, in the unit of the file's pixel size"
                        + (f" ({file_unit})." if file_unit else " (and --unit)."))
    y = x if y is None else y
    if abs(y - x) > 0.01 * max(x, y):
        raise UserError(f"'{path}' has pixels of {y:g} (Y) by {x:g} (X): they differ by more than 1 %, so one Z/XY "
                        "factor cannot make the voxels isotropic. Resample the stack to square pixels first, or pass "
                        "--xy-size to use one size for both.")
    if typed_unit is None and z_step is not None and xy_size is not None:
        raise UserError("--z-step and --xy-size were given without --unit: pass --unit (e.g. --unit um) so that "
                        "the output's metadata names the unit of those numbers.")
    resolved = typed_unit or file_unit
    if resolved is None:
        raise UserError(f"'{path}' gives its pixel size without a unit; pass --unit (e.g. --unit um).")
    what = "from the file" if z_step is None and xy_size is None else (
        "from the flags" if z_step is not None and xy_size is not None else "from the file and the flags")
    if typed_unit is None and (z_step is not None or xy_size is not None):
        what += f"; {'--z-step' if z_step is not None else '--xy-size'} taken in the file's unit, {resolved}"
    return (float(z), float(y), float(x)), resolved, f"Z {z:g} {resolved}, XY {x:g} {resolved} ({what})"


def unit_scale(from_unit: str, to_unit: str, path: Path) -> float:
    """The factor that expresses lengths in ``from_unit`` in ``to_unit``; a clear error when either is no
    length unit."""
    scale = length_scale(from_unit, to_unit)
    if scale is None:
        raise UserError(f"--unit {to_unit} differs from the unit of '{path}' ({from_unit}) and cannot be converted; "
                        "pass all of --z-step, --xy-size and --unit.")
    return scale


def kind_from_flags(args: argparse.Namespace) -> str:
    """``--kind``, with ``--labels`` as its shorthand (``--labels`` = labels, ``--labels no`` = mask)."""
    from_labels = {"yes": "labels", "no": "mask", "auto": "auto", None: "auto"}[args.labels]
    kind = args.settings.data.kind
    if kind != "auto" and from_labels != "auto" and from_labels != kind:
        raise UserError(f"--kind {kind} and --labels {args.labels} disagree; give one of them.")
    return kind if kind != "auto" else from_labels


def input_kind(path: Path, kind: str, threshold: Optional[float], model_kind: Optional[str], image,
               sample: np.ndarray) -> Tuple[str, str]:
    """The kind of one input and why, from its OME-Zarr metadata (``image``, None for a file) and a
    ``sample`` of its values (:func:`value_sample`).

    Order: ``--kind``; a binarization threshold (a mask); a saved model's
    kind (a grey-scale model restores grey values; a mask model masks, or
    label images when the values are ids); an OME-Zarr label image's
    metadata; the values (``data.kind_evidence``).
    """
    if kind != "auto":
        return kind, "given as --kind"
    if threshold is not None:
        return "mask", "--binarize-threshold given"
    if model_kind == "intensity":
        return "intensity", "the model restores grey values"
    if image is not None and image.is_label:
        return "labels", "an OME-Zarr label image"
    decided, reason = decide_kind_and_reason(sample, "auto", f"'{path}'")
    if model_kind == "labels" and decided == "mask" and sample.size and sample.min() > 0:
        return "labels", f"a label model; {reason}"  # two ids and no 0: what a dense label model restores
    if model_kind is not None:
        if decided == "intensity":
            raise UserError(f"The model restores masks, but '{path}' looks like a grey-scale image ({reason}). Pass "
                            "--kind mask or --kind labels to restore it with this model, or give a grey-scale model.")
        return decided, f"a {'label' if model_kind == 'labels' else 'mask'} model; {reason}"
    return decided, reason


def plan_input(args: argparse.Namespace, path: Path, target: Path, kind: str, settings: Settings,
               saved_config: Dict[str, Any], model_kind: Optional[str]) -> RestorePlan:
    """Decide one input's restore from its metadata and a sample of its values; all checks that can fail
    do so here, before any long work."""
    threshold, choice = settings.data.binarize_threshold, settings.data.stack_choice()
    image = zarr_io.open_image(path, choice) if zarr_io.is_zarr_path(path) else None  # a damaged file is named first
    shape = tuple(image.shape) if image is not None else stack_shape(path, choice)
    dtype = image.dtype if image is not None else stack_dtype(path)
    sample = value_sample(path, image, choice)  # read once: the kind, the label rule and the mask's values
    decided, why = input_kind(path, kind, threshold, model_kind, image, sample)
    check_kind_flags(args, decided, path)
    if decided == "intensity" and np.dtype(dtype) == bool:
        raise UserError(f"'{path}' is a 1-bit (bool) image, a mask, not grey values: leave out --kind intensity (or "
                        "give --kind mask).")
    if decided == "mask" and saved_config.get("restores") == "boundaries":
        raise UserError(f"The model restores the boundaries of dense label images (it was saved from one), but "
                        f"'{path}' is a mask: give a model trained on masks, or leave out --model to train one.")
    voxel, unit, said = voxel_size_for(path, settings.voxel)
    factor = factor_from_voxel_size(voxel[0], voxel[2], minimum=1, rounding=settings.voxel.factor_rounding)[0]
    trained_at = saved_config.get("factor")
    if factor > 1 and not same_factor(trained_at, factor) and not args.allow_factor_mismatch:
        raise UserError(f"The model was trained at factor {trained_at}, but '{path}' needs factor {factor} ({said}). "
                        "Train a model on this stack (leave out --model), or pass --allow-factor-mismatch to use it "
                        "anyway.")
    translation = (0.0, 0.0, 0.0)
    if image is not None:
        scale = unit_scale(image.unit, unit, path) if image.unit and image.unit != unit else 1.0
        translation = tuple(float(t) * scale for t in image.translation_zyx)
    to_zarr = zarr_io.is_zarr_path(target)
    dense, label_rule = (labels_rule_for(path, sample, saved_config, model_kind,
                                         None if to_zarr else np.uint16)  # the ids the output holds
                         if decided == "labels" else (False, None))
    if dense:
        prior = settings.inference.shape_prior
        label_rule += ("; the network sees the boundary mask upsampled and where per-label shape-based interpolation "
                       "puts the boundaries along each plane (--boundary-input interfaces)"
                       if settings.training.boundary_input == "interfaces"
                       else "; the network sees the boundary mask upsampled (--boundary-input linear)")
        label_rule += (f"; the ids pulled towards per-label shape-based interpolation's boundaries where the network "
                       f"is unsure (--shape-prior {prior:g})" if prior > 0 else "; the ids grow on the network's "
                       "boundaries alone (--shape-prior 0)")
    if model_kind is not None:  # the restore checks it again; here it fails before any reading
        check_model_settings(saved_config, inference_kind(decided, dense), settings)
    notes: List[str] = []
    if factor > 1 and model_kind is None:
        settings, notes = fit_recipe_to_stack(settings, shape, factor, list(args.typed),
                                              training_kind(decided, dense))
    mask_values = mask_values_for(path, image, decided, threshold, choice, sample)
    if mask_values is not None and mask_values.background != 0:  # a two-class segmentation: every block cuts alike
        settings = settings.with_values(BINARIZE_THRESHOLD=float(mask_values.background))
    return RestorePlan(path, target, decided, why, factor, said, shape, np.dtype(dtype), voxel, unit, translation,
                       settings, trained=model_kind is None,
                       block_size=settings.large.block_size if to_zarr else None,
                       workers=settings.large.workers, probabilities=None if args.save_probabilities == "none"
                       else args.save_probabilities, notes=notes, label_rule=label_rule,
                       other_images=[] if image is not None else other_series(path),
                       dense_labels=dense, mask_values=mask_values,
                       levels=image.levels if image is not None else 1,
                       label_images=() if image is None else tuple(f"{image.path.rstrip('/')}/labels/{name}"
                                                                    for name in image.label_images),
                       label_name=output_label_name(path) if decided == "labels" and to_zarr else None)


def value_sample(path: Path, image, choice: StackChoice) -> np.ndarray:
    """A sample of an input's values, read once per input: a few evenly spaced slices of a file
    (``data.read_value_sample``), the central window of a store's middle slice."""
    return (zarr_io.sample_for_label_detection(image) if image is not None
            else read_value_sample(path, choice=choice))


def mask_values_for(path: Path, image, kind: str, threshold: Optional[float], choice: StackChoice,
                    sample: np.ndarray) -> Optional[MaskValues]:
    """The two values a restored mask is written in: the input mask's own (``data.MaskValues.of`` its value
    ``sample``, or of :func:`fuller_sample` where that holds one value only: a small object the sampled slices
    miss), 0/255 for a mask binarised by ``--binarize-threshold``; None for other kinds."""
    if kind != "mask":
        return None
    if threshold is not None:
        return MaskValues()
    if sample.dtype != bool and len(np.unique(sample)) < 2:
        sample = fuller_sample(path, image, choice)
    return MaskValues.of(sample)


def fuller_sample(path: Path, image, choice: StackChoice, max_values: int = 2**26) -> np.ndarray:
    """Values of every slice: a file's whole stack (an in-memory restore reads it anyway), or a store's every
    slice at a lateral stride that keeps to about ``max_values`` values."""
    if image is None:
        return read_stack(path, choice)
    depth, height, width = image.shape
    step = max(1, int(np.ceil(np.sqrt(depth * height * width / max_values))))
    return np.concatenate([image.read(slice(k, k + 1), slice(0, height, step), slice(0, width, step)).ravel()
                           for k in range(depth)])


def labels_rule_for(path: Path, sample: np.ndarray, saved_config: Dict[str, Any], model_kind: Optional[str],
                    label_dtype=np.uint16) -> Tuple[bool, str]:
    """Whether a label image is dense (``labeling.is_dense_label_image`` of a ``sample`` of its values) and how its
    ids will be restored, for the plan; ids the output cannot hold (``label_dtype``: uint16 for a TIFF, None
    for OME-Zarr, ``data.as_label_image``) in the sample, and a saved model that restores the other target
    (boundaries of a dense label image, or a foreground), are one error here, before the whole stack is read."""
    as_label_image(sample, path, label_dtype)
    dense = is_dense_label_image(sample)
    density = (f"its ids cover {np.count_nonzero(sample) / sample.size:.0%} of the voxels and "
               f"{touching_share(sample):.0%} of their outline lies against other ids")
    if model_kind is not None and saved_config.get("restores", "foreground") != ("boundaries" if dense else "foreground"):
        trained = saved_config.get("restores", "foreground")
        raise UserError(f"The model restores the {trained} of {'dense' if trained == 'boundaries' else 'sparse'} label "
                        f"images, but '{path}' is {'dense' if dense else 'not dense'}: {density}. Train on this stack "
                        "(leave out --model).")
    if dense:
        return True, f"dense ({density}): the network restores the boundaries between ids, the ids grow between them"
    return False, "the nearest id of the kept slices within each restored object"


def output_files(args: argparse.Namespace, targets: Sequence[Path]) -> List[Tuple[Path, str]]:
    """Every path this run writes, with what it is: the outputs, their probabilities and previews, the model."""
    files = [(t, "output") for t in targets]
    files += [(probabilities_path_for(t), "probabilities") for t in targets] if args.save_probabilities != "none" else []
    files += [(preview_path_for(t), "preview") for t in targets] if args.preview else []
    return files + ([(Path(args.save_model), "model (--save-model)")] if args.save_model else [])


def check_outputs(args: argparse.Namespace, targets: Sequence[Path]) -> None:
    """Refuse outputs that exist (unless --overwrite, or --resume for OME-Zarr), before any work."""
    extra = [path for path, what in output_files(args, targets) if what != "output"]
    resume = args.settings.large.resume
    resumable = {str(t) for t in targets + extra if zarr_io.is_zarr_path(t)} if resume else set()
    if resume_replaces_saved_model(args, targets):
        resumable.add(str(args.save_model))
    clashes = [(str(path), what) for path, what in output_files(args, targets)
               if path.exists() and str(path) not in resumable]
    if clashes and not args.overwrite:
        # Each clash by the flag that names it: a model file is given by --save-model, not --output.
        flags = sorted({"--save-model" if what.startswith("model") else "--output" for _, what in clashes})
        raise OutputExistsError(f"Output exists: {', '.join(path for path, _ in clashes)}. Choose another "
                                f"{' or '.join(flags)} or pass --overwrite"
                                + (" (or --resume for an interrupted OME-Zarr output)." if any(
                                    zarr_io.is_zarr_path(path) for path, _ in clashes) else "."))


def resume_replaces_saved_model(args: argparse.Namespace, targets: Sequence[Path]) -> bool:
    """Whether a ``--resume`` may meet its existing ``--save-model`` file: one that holds the model of an output
    being resumed (a run stopped by ``--max-blocks`` saved it; saving it again changes nothing), or any file
    beside a finished output (its resume restores nothing and saves no model). Any other file there is refused
    like any existing output."""
    if not (args.settings.large.resume and args.save_model and Path(args.save_model).is_file()):
        return False
    resumed = [t for t in targets if zarr_io.is_zarr_path(t) and t.exists()]
    if resumed and all(blocks.finished_output(t) for t in resumed):
        return True
    try:
        saved = load_model(args.save_model, "cpu")[0]
    except UserError:
        return False
    models = (blocks.interrupted_run_model(t) for t in resumed)
    return any(model is not None and blocks.same_weights(model, saved) for model in models)


def model_saved_already(path: Path, model) -> bool:
    """Whether ``path`` holds ``model``'s weights: a resumed run's ``--save-model``, written by the part before
    (with the same settings: a resume refuses others), need not be written again."""
    try:
        return Path(path).is_file() and blocks.same_weights(load_model(path, "cpu")[0], model)
    except UserError:
        return False


def run_settings(args: argparse.Namespace, saved_config: Dict[str, Any], model) -> Settings:
    """The settings of this run: the defaults, a saved model's recipe (the settings a restore reads from
    a model, ``model="read"`` in ``settings.py``), then the flags typed."""
    settings = Settings.from_dict(args.typed, base=base_settings().with_model_record(saved_config))
    if model is not None:
        unused = training_only_flags(args)
        if unused:
            warnings.warn(f"{', '.join(unused)} only change{'s' if len(unused) == 1 else ''} training: "
                          "with --model they have no effect (the model is trained already). Leave out --model "
                          "to train with them.", ToolWarning)
        # the given network's shape, which the restore runs and the plan's expected time is recorded under
        settings = settings.with_values(TRAIN_Z_SIZE=model.architecture["in_channels"],
                                        BASE_FILTERS=model.architecture["base_filters"],
                                        DEPTH=model.architecture["depth"])
    return settings.validate()


def restore_files(args: argparse.Namespace) -> None:
    """Restore every input of the command line. Inputs, outputs, voxel sizes, kinds and settings are all
    checked, and each input's plan printed, before any long work starts; ``--dry-run`` stops there."""
    plans, model = plan_restores(args)
    for plan in plans:
        print("\n".join(plan.lines()), flush=True)
    if args.dry_run:
        try:
            check_outputs(args, [plan.target for plan in plans])
        except OutputExistsError as error:  # the run would stop here: say so now
            print(f"note: {error}")
        print("dry run: nothing was read beyond the metadata and a sample of values; nothing was written.")
        return
    for plan in plans:
        if plan.factor == 1:
            convert_isotropic(args, plan)
        elif zarr_io.is_zarr_path(plan.target):
            restore_into_ome_zarr(args, plan, model)
        else:
            restore_into_tiff(args, plan, model)


def plan_restores(args: argparse.Namespace) -> Tuple[List[RestorePlan], Optional[Any]]:
    """Every input's plan, and the model given (or None): all the checks that can fail, in the order a
    user fixes them (flags, outputs, device, model, then each input's metadata and values)."""
    kind = kind_from_flags(args)
    inputs = expand_inputs(args.input)
    targets = output_targets(args, inputs)
    check_large_volume_flags(args, targets)
    check_kind_flags(args, kind)
    for path, what in output_files(args, targets):
        refuse_unwritable(path, what)
    if not args.dry_run:
        check_outputs(args, targets)
    model, saved_config, model_kind = given_model(args)
    settings = run_settings(args, saved_config, model)
    plans = [plan_input(args, path, target, kind, settings, saved_config, model_kind)
             for path, target in zip(inputs, targets)]
    return plans, model


def output_targets(args: argparse.Namespace, inputs: Sequence[Path]) -> List[Path]:
    """Where each input is written (:func:`output_path_for`); one error for outputs that would collide."""
    if args.save_model and (len(inputs) > 1 or args.model):
        raise UserError("--save-model keeps the model trained on one input; it cannot be combined with --model "
                        "or several inputs.")
    targets = [output_path_for(p, Path(args.output), len(inputs), args.settings.data.stack_choice()) for p in inputs]
    if len(set(targets)) < len(targets):
        raise UserError("Several inputs would be written to the same output name; give inputs with distinct "
                        "names or restore them in separate calls.")
    for written, what in output_files(args, targets):
        for path in inputs:  # any input, not only its own: '*.tif --output ./' meets a_restored.tif of a run before
            refuse_output_over_input(path, written, what)
    return targets


def refuse_output_over_input(input_path: Path, target: Path, what: str = "output") -> None:
    """One error, even with --overwrite, where a file this run writes (``what``: the output, its probabilities
    or preview, the --save-model file) would replace or write into an input (the input file itself, the store
    or HDF5 file that holds it, or the slice folder it is): an OME-Zarr output is cleared before the input is
    read, and no run should put the only copy of the data at risk."""
    source, written = input_path.absolute().resolve(), target.absolute().resolve()
    if written == source:
        where = "is the input"
    elif written in source.parents:
        where = "holds the input"
    elif source in written.parents:
        where = "lies inside the input"
    else:
        return
    raise UserError(f"The {what} '{target}' {where} '{input_path}': writing it would destroy the data being "
                    f"restored. Choose another path outside the input.")


def given_model(args: argparse.Namespace) -> Tuple[Optional[Any], Dict[str, Any], Optional[str]]:
    """``--model`` loaded on the device (refused first when this machine lacks it): the model, the recipe
    saved with it, and its kind ('mask' or 'intensity'); ``(None, {}, None)`` without ``--model``."""
    device = args.settings.inference.device
    select_device(device)  # a device this machine lacks is refused before any reading
    if not args.model:
        return None, {}, None
    model, saved_config = load_model(args.model, device)
    kind = saved_config.get("kind") or ("intensity" if model.architecture.get("output") == "intensity" else "mask")
    return model, saved_config, kind


def read_input(plan: RestorePlan, label_dtype=np.uint16) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The whole input, typed as planned: the stored values (grey values) or the foreground, and ids of
    ``label_dtype`` (uint16 for a TIFF output; None, the smallest that holds them, for OME-Zarr)."""
    if zarr_io.is_zarr_path(plan.path):
        return zarr_io.read_typed_image(zarr_io.open_image(plan.path, plan.choice), plan.kind, plan.binarize_threshold,
                                        label_dtype)[1:]
    return read_typed_stack(plan.path, plan.kind, plan.binarize_threshold, label_dtype, plan.choice)[1:]


def restore_into_tiff(args: argparse.Namespace, plan: RestorePlan, model) -> None:
    """One input restored in memory and written as a TIFF (with its probabilities and preview on request)."""
    settings, factor, target = plan.settings, plan.factor, plan.target
    stack, labels = read_input(plan)
    if plan.kind == "intensity":
        restored, used_model, info = restore_intensity(stack, factor, settings, model=model,
                                                       allow_factor_mismatch=args.allow_factor_mismatch)
        probabilities = None
    else:
        restored, probabilities, used_model, info = restore_stack(
            stack, factor, settings, model=model, labels=labels,
            probability_dtype=np.float16 if args.save_probabilities == "float16" else np.uint8,
            keep_probabilities=args.save_probabilities != "none", dense_labels=plan.dense_labels,
            allow_factor_mismatch=args.allow_factor_mismatch)
    voxel, unit = plan.voxel_out_zyx, plan.unit
    save_stack(target, restored, voxel, unit, overwrite=args.overwrite, encode_mask=plan.written_mask_values.encode,
               grey_values=plan.kind == "intensity")
    if args.save_probabilities != "none":
        save_stack(probabilities_path_for(target), probabilities, voxel, unit, overwrite=args.overwrite)
    if args.preview:
        preview_figure(stack, restored, factor, preview_path_for(target),
                       grey=plan.kind == "intensity")
    if args.save_model:
        restores = "boundaries" if labels is not None and plan.dense_labels else "foreground"
        trained_as = plan.training_kind() if plan.trained else None
        save_model(args.save_model, used_model, dict(model_config(settings, factor, trained_as), kind=plan.kind,
                                                     restores=restores), overwrite=args.overwrite)
    record_throughput(plan, info["train_s"], info["infer_s"])
    print(f"Wrote {target} (voxel {voxel[0]:.4g} x {voxel[1]:.4g} x {voxel[2]:.4g} {unit}); "
          f"training {info['train_s']:.0f} s, restoring {info['infer_s']:.0f} s.")


def convert_isotropic(args: argparse.Namespace, plan: RestorePlan) -> None:
    """A stack of factor 1 (already isotropic, or a Z/XY ratio below 1.5: ``plan.conversion_reason``): written in
    the output's format, values and Z step unchanged."""
    to_zarr = zarr_io.is_zarr_path(plan.target)
    stack, labels = read_input(plan, None if to_zarr else np.uint16)
    if plan.kind == "intensity":
        stack = stack.astype(plan.grey_out_dtype, copy=False)
    if to_zarr:
        name = output_label_name(plan.path)
        zarr_io.write_image(plan.target, stack, plan.voxel_in_zyx, plan.unit, plan.translation_zyx,
                            plan.settings.large.ngff_version,
                            plan.kind, labels, name, overwrite=args.overwrite, mask_values=plan.written_mask_values)
    else:
        save_stack(plan.target, labels if plan.kind == "labels" else stack, plan.voxel_in_zyx, plan.unit,
                   overwrite=args.overwrite, encode_mask=plan.written_mask_values.encode,
                   grey_values=plan.kind == "intensity")
    print(f"Wrote {plan.target}: converted without restoring ({plan.conversion_reason()}).")


def check_kind_flags(args: argparse.Namespace, kind: str, path: Optional[Path] = None) -> None:
    """Reject flags that a stack of ``kind`` cannot use (the command line's kind, or one input's)."""
    if kind == "intensity" and args.save_probabilities != "none":
        what = f"'{path}' is a grey-scale stack" if path else "Grey-scale stacks (--kind intensity) are"
        raise UserError(f"{what} restored as grey values, which have no foreground probabilities: leave out "
                        "--save-probabilities.")


def check_large_volume_flags(args: argparse.Namespace, targets: Sequence[Path]) -> None:
    """Reject flags of the block-wise restore that cannot apply, before any work."""
    to_zarr = [zarr_io.is_zarr_path(t) for t in targets]
    large = args.settings.large
    cluster = large.workers > 0 or large.scheduler or large.resume or large.max_blocks is not None
    if cluster and not all(to_zarr):
        raise UserError("--workers, --scheduler, --resume and --max-blocks restore block by block into an OME-Zarr "
                        "output; give --output NAME.ome.zarr (a TIFF output is restored in memory).")
    if large.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {large.workers}.")
    if large.workers and large.scheduler:
        raise UserError("--workers starts a local cluster and --scheduler uses a running one: give one of them.")
    if large.resume and args.overwrite:
        raise UserError("--resume continues an existing output and --overwrite replaces it: give one of them.")
    if args.preview and any(to_zarr):
        raise UserError("--preview needs the whole restored stack in memory; it is available for TIFF outputs.")
    if any(to_zarr):
        blocks.chunk_edge(large.block_size)
    if large.workers > 0:
        blocks.check_worker_memory_floor(large.worker_memory)
    if large.scheduler:  # reached now, not after the training
        blocks.check_scheduler(large.scheduler)


def restore_into_ome_zarr(args: argparse.Namespace, plan: RestorePlan, model) -> None:
    """One input into an OME-Zarr output, block by block (``blocks.restore_to_ome_zarr``). A Zarr input is
    read window by window; a TIFF input is read whole (it fits in memory) and restored block by block."""
    settings, factor, path, target = plan.settings, plan.factor, plan.path, plan.target
    threshold = plan.binarize_threshold
    if zarr_io.is_zarr_path(path):
        image = zarr_io.open_image(path, plan.choice)
        source = image
        labels = image if plan.kind == "labels" else None
    else:  # OME-Zarr holds ids beyond a TIFF's 65535
        source, labels = read_typed_stack(path, plan.kind, threshold, label_dtype=None, choice=plan.choice)[1:]
    name = output_label_name(path)
    probabilities = None if args.save_probabilities == "none" else args.save_probabilities
    config = dict(model_config(settings, factor, plan.training_kind() if plan.trained else None), kind=plan.kind,
                  **({"restores": "boundaries" if plan.dense_labels else "foreground"} if labels is not None else {}))
    voxel = plan.voxel_out_zyx
    described = blocks.OutputMetadata(voxel, plan.unit, plan.translation_zyx, label_name=name, source_name=str(path),
                                      source_stack=plan.choice.describe(), mask_values=plan.written_mask_values)
    try:
        result = blocks.restore_to_ome_zarr(
            source, target, factor, settings, described, kind="intensity" if plan.kind == "intensity" else "mask",
            model=model, model_config=config, labels_source=labels,
            label_rule="dense" if plan.dense_labels else "sparse", probabilities=probabilities,
            probabilities_output=probabilities_path_for(target) if probabilities else None, overwrite=args.overwrite)
    except KeyboardInterrupt:  # the blocks written are kept: say how to go on
        if target.exists():
            print(f"\n'{target}' keeps the blocks written so far: the same command with --resume (and without "
                  "--overwrite) continues from them.", file=sys.stderr)
        raise
    if args.save_model and result["model"] is not None and not (args.settings.large.resume and model_saved_already(
            args.save_model, result["model"])):
        save_model(args.save_model, result["model"], config, overwrite=args.overwrite)
    if result["state"] == "complete" and not result.get("already_complete"):  # blocks.py said so already
        if not result["skipped"]:
            record_throughput(plan, result["train_s"], result["restore_s"])
        print(f"Wrote {target} (voxel {voxel[0]:.4g} x {voxel[1]:.4g} x {voxel[2]:.4g} {plan.unit}"
              + (f"; the ids in {target}/labels/{name}" if labels is not None else "") + "); "
              f"training {result['train_s']:.0f} s, restoring {result['restore_s']:.0f} s "
              f"({result['restored']} blocks restored, {result['skipped']} already done).")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python apply.py --input STACK --output OUT.tif``: see ``--help``."""
    return run_cli(restore_files, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
