"""Measure the method: simulate anisotropy on an isotropic mask, restore it, score it.

Edit the constants below, or override any of them on the command line
(``python eval.py --help`` lists every flag with its default). With no input
configured the built-in sample phantom is used, so ``python eval.py`` runs on a
fresh machine with no data.

Workflow: load -> keep every ``factor``-th Z slice -> train on lateral crops
of the kept slices -> restore the missing slices with the network -> restore
them with shape-based interpolation (the baseline) -> IoU against the original
-> save stacks, model, figures and ``metrics.json`` -> optional slice viewer.
"""
from __future__ import annotations

# ----------------------------------------------------------------------------
# Configuration (edit here, or pass e.g. --num-epochs 20 on the command line).
# These constants fill the settings model (settings.Settings, where each one's type,
# help text and flag live); as shipped they equal its defaults, which library callers
# get (a test checks). None = the rule named in the comment.
# ----------------------------------------------------------------------------
# The run (eval.py only)
INPUT_IMAGES_DIRECTORY = ""  # isotropic TIFF, slice folder, file.h5/key, .mrc or .ome.zarr; "" = built-in sample
OUTPUT_PREDICTION_OUTDIRECTORY = ""  # predicted stacks; "" = <RUN_DIRECTORY>/predicted
OUTPUT_INTERPOLATED_DIRECTORY = ""  # morphed (baseline) stack; "" = <RUN_DIRECTORY>/interpolated
RUN_DIRECTORY = ""  # model, figures, metrics.json; "" = a new folder runs/eval-<date>-<time>
OVERWRITE = False  # replace existing output files
SAMPLE_SHAPE = (128, 128, 128)  # (D, H, W) of the built-in sample
SHOW = "auto"  # slice viewer after the run: auto, yes, no
# The input and the simulated voxel size
KIND = "auto"  # mask, labels, intensity or auto
BINARIZE_THRESHOLD = None  # None: foreground = value != 0
CHANNEL = None  # a file with several channels (or RGB): the one to use, from 0; None: the file has one
TIMEPOINT = None  # a file with several time points: the one to use, from 0; None: the file has one
XY_RESOLUTION = 2.0  # lateral pixel size
Z_RESOLUTION = 16.0  # simulated Z step; factor = Z_RESOLUTION / XY_RESOLUTION, rounded
VOXEL_UNIT = "um"  # unit of the two sizes
FACTOR_ROUNDING = "isotropic"  # apply.py, a non-integer ratio: isotropic grid, or "nearest" integer (eval rounds)
# Training
TRAIN_XY_SIZE = 128  # crop edge, px
TRAIN_Z_SIZE = 5  # kept slices per crop (channels), odd
TRAIN_NB = None  # None: by kind (720 crops; 2880 for the boundaries of dense label images)
VAL_SPLIT = 0.1
MIN_CONTENT_RATIO = 0.005
RANDOM_STATE = 42
BATCH_SIZE = 8
START_FROM = "phantom"  # masks: fine-tune the phantom-trained model, or "scratch"
NUM_EPOCHS = None  # None: by kind (masks 3 fine-tuning, 4 from random weights; grey values 20)
LEARNING_RATE = None  # None: by kind (masks 3e-3, grey values 6e-3)
DICE_WEIGHT = 0.0
UPSCALE_METHOD = "linear"
BOUNDARY_INPUT = "interfaces"  # dense label images: the boundary network's input (or "linear")
PRECISION = "auto"
TRAIN_LATERAL_AXES = "yx"
CROP_POOL = None  # None: by kind (masks 2: the hardest half of twice the crops; grey values 1)
SLICE_PROFILE_FWHM = 0.0
INTENSITY_LOSS = "mse+ssim"
# Network
BASE_FILTERS = 16
DEPTH = 3
DROPOUT_RATE = 0.1
INPUT_SKIP = True
SKIP_MERGE = "add"
SHORTCUT_NORM = False
# Inference
INFERENCE_TILE_SIZE = 1024  # px
INFERENCE_BATCH_SIZE = 16
INFERENCE_BATCH_PIXELS = 131072
ORIENTATIONS = "yx"
CHANNEL_STRIDE = None  # None: by kind (half the factor for masks and labels, the factor for grey values)
TTA_FLIPS = None  # None: by kind (on for grey values and dense label images, off for masks and other labels)
KEEP_KEPT_SLICES = True
SKIP_EMPTY_TILES = True
COMPILE = False
PROBABILITY_THRESHOLD = 0.5
GREY_DTYPE = "input"  # grey values written in the input's dtype, or "float32"
SHAPE_PRIOR = 0.4  # dense label images: weight of shape-based interfaces where the ids grow
DEVICE = None  # None: CUDA when available

import argparse
import functools
import json
import os
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from errors import ToolWarning, run_cli
from settings import Settings as _Settings

CONFIG_NAMES = [name for name in list(globals()) if name.isupper() and not name.startswith("_")]


# The flags of the run constants above (the recipe's flags come from settings.py).
RUN_FLAGS = {
    "INPUT_IMAGES_DIRECTORY": ("--input", "PATH", "an isotropic stack: folder of 2D TIFF slices, a multipage TIFF, "
                               "an HDF5 dataset (file.h5/key), an MRC file or an OME-Zarr image; its pixel size and "
                               "unit are read from the file", "the built-in sample"),
    "RUN_DIRECTORY": ("--run-directory", "PATH", "folder for the model, figures and metrics.json",
                      "a new folder runs/eval-<date>-<time>"),
    "OUTPUT_PREDICTION_OUTDIRECTORY": ("--output-prediction-outdirectory", "PATH", "folder of the predicted stacks",
                                       "<run directory>/predicted"),
    "OUTPUT_INTERPOLATED_DIRECTORY": ("--output-interpolated-directory", "PATH",
                                      "folder of the interpolated (baseline) stack", "<run directory>/interpolated"),
    "OVERWRITE": ("--overwrite", None, "replace existing output files", None),
    "SAMPLE_SHAPE": ("--sample-shape", "D,H,W", "size of the built-in sample", None),
    "SHOW": ("--show", "{auto,yes,no}", "slice viewer after the run (auto: when a display exists)", None),
}
ALIASES = {"INPUT_IMAGES_DIRECTORY": ("--input-images-directory",)}


def default_settings() -> Dict[str, Any]:
    """The configuration constants of this module, as a dict (the run's and the recipe's)."""
    return {name: globals()[name] for name in CONFIG_NAMES}


def default_recipe() -> _Settings:
    """The recipe the constants of this module state, as :class:`settings.Settings`."""
    from settings import Settings

    return Settings.from_dict(default_settings())


def _parse_value(text: str, default: Any) -> Any:
    """A typed text as a value of the type of ``default`` (a run constant)."""
    from settings import parse_bool, parse_shape

    if isinstance(default, bool):
        return parse_bool(text)
    if isinstance(default, tuple):
        return parse_shape(text)
    return text if default is None else type(default)(text)


def parse_setting(name: str, text: str) -> Any:
    """``NAME=VALUE`` overrides: ``text`` as a value of the constant ``name`` (a recipe setting or a run
    constant); old sentinels (``NUM_EPOCHS=0``) are accepted."""
    from settings import FIELDS, parse_text

    return parse_text(name, text) if name in FIELDS else _parse_value(text, default_settings()[name])


def build_parser(names: Optional[Sequence[str]] = None, add_help: bool = True,
                 suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The command line of ``eval.py``: one flag per configuration constant (or per name in ``names``),
    generated from the settings model (``settings.py``) and grouped as ``apply.py``'s.

    With ``suppress_defaults``, flags not given on the command line are absent
    from the parsed namespace (their default is still shown in ``--help``).
    """
    from settings import FIELDS, SettingsParser, SwitchAction, add_setting_arguments, shown_default

    settings = default_settings()
    parser = SettingsParser(description=__doc__.split("\n\n")[0], add_help=add_help,
                            usage="%(prog)s [--input PATH] [--kind KIND] [--z-step Z --xy-size XY] "
                                  "[--run-directory PATH] [options]")
    for name in (n for n in (names or CONFIG_NAMES) if n in RUN_FLAGS):
        flag, metavar, text, means = RUN_FLAGS[name]
        help_text = f"{text} (default: {shown_default(settings[name], None) if means is None else means})"
        options = [flag, *ALIASES.get(name, ())]
        if isinstance(settings[name], bool):
            parser.add_argument(*options, dest=name, action=SwitchAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(*options, dest=name, metavar=metavar, default=argparse.SUPPRESS, help=help_text,
                                type=lambda text, d=settings[name]: _parse_value(text, d))
    recipe = [n for n in (names or CONFIG_NAMES) if n in FIELDS]
    add_setting_arguments(parser, settings, recipe)
    if not suppress_defaults:
        parser.set_defaults(**{name: settings[name] for name in (names or CONFIG_NAMES)})
    return parser


def validate_settings(settings: Dict[str, Any]) -> None:
    """Reject settings that would fail later, with one clear message each."""
    from data import UserError, resolution_factor
    from settings import Settings

    resolution_factor(settings["Z_RESOLUTION"], settings["XY_RESOLUTION"])
    Settings.from_dict(settings).validate()
    shape = tuple(settings["SAMPLE_SHAPE"])
    if len(shape) != 3 or not all(int(n) == n and n > 0 for n in shape):
        raise UserError(f"SAMPLE_SHAPE (--sample-shape) is three positive sizes D,H,W (e.g. 128,128,128), got "
                        f"{','.join(map(str, shape))}.")
    if str(settings["SHOW"]).lower() not in ("auto", "yes", "no", "true", "false"):
        raise UserError(f"SHOW must be auto, yes or no, got '{settings['SHOW']}'.")


def display_available() -> bool:
    """True when matplotlib can open a window (an interactive backend and a screen)."""
    import matplotlib

    backend = matplotlib.get_backend().lower()
    if backend in ("agg", "pdf", "svg", "ps", "cairo", "template") or "inline" in backend:
        return False
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def view_stacks_interactively(raw_dhw: np.ndarray, morphed_dhw: np.ndarray, predicted_dhw: np.ndarray,
                              titles: Sequence[str] = ("raw", "morphed", "predicted"), block: bool = True):
    """Matplotlib window "Slice Viewer": three stacks side by side, a slider over Z.

    Returns the figure (and keeps a reference to the slider on it) so it can be
    driven programmatically; blocks until closed when ``block`` and a display exists.
    """
    import matplotlib.pyplot as plt
    from matplotlib.widgets import Slider

    stacks = [np.asarray(s) for s in (raw_dhw, morphed_dhw, predicted_dhw)]
    depth = stacks[0].shape[0]
    # Masks on 0..1; grey-scale stacks on the ground truth's range, the same for all three.
    vmin, vmax = (0, 1) if stacks[0].dtype == bool else (float(stacks[0].min()), float(stacks[0].max()))
    figure, axes = plt.subplots(1, 3, figsize=(13, 5), num="Slice Viewer")
    images = []
    for axis, stack, title in zip(axes, stacks, titles):
        images.append(axis.imshow(stack[depth // 2], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest"))
        axis.set_title(title)
        axis.axis("off")
    figure.subplots_adjust(bottom=0.15)
    slider = Slider(figure.add_axes([0.2, 0.04, 0.6, 0.04]), "Z", 0, depth - 1, valinit=depth // 2, valstep=1)

    def update(value: float) -> None:
        for image, stack in zip(images, stacks):
            image.set_data(stack[int(value)])
        figure.canvas.draw_idle()

    slider.on_changed(update)
    figure.slider = slider
    if block and display_available():
        plt.show()
    return figure


def comparison_figure(truth_dhw: np.ndarray, nearest_dhw: np.ndarray, morphed_dhw: np.ndarray,
                      predicted_dhw: np.ndarray, kept_indices: np.ndarray, path: Path, scores: Dict[str, float]) -> None:
    """Orthogonal (Z, X) section and one reconstructed XY slice of each stack, errors coloured.

    Colours: white = correct foreground, red = false positive, cyan = false negative.
    """
    import matplotlib
    import matplotlib.pyplot as plt

    from metrics import reconstructed_indices

    recon = reconstructed_indices(kept_indices, truth_dhw.shape[0])
    y_section = int(np.argmax(truth_dhw.sum(axis=(0, 2))))  # the Y with most foreground
    z_slice = int(recon[np.argmax(truth_dhw[recon].sum(axis=(1, 2)))]) if len(recon) else 0

    def coloured(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
        rgb = np.zeros(pred.shape + (3,), dtype=np.float32)
        rgb[pred & truth] = (1, 1, 1)
        rgb[pred & ~truth] = (1, 0.2, 0.2)
        rgb[~pred & truth] = (0, 0.8, 0.9)
        return rgb

    columns = [("ground truth", truth_dhw), ("kept slices (nearest)", nearest_dhw),
               (f"shape-based IoU {scores['morphed']:.3f}", morphed_dhw),
               (f"network IoU {scores['predicted']:.3f}", predicted_dhw)]
    figure, axes = plt.subplots(2, 4, figsize=(16, 8.5))
    for col, (title, stack) in enumerate(columns):
        axes[0, col].imshow(coloured(stack[:, y_section, :], truth_dhw[:, y_section, :]), interpolation="nearest",
                            aspect="auto")
        axes[0, col].set_title(f"{title}\nXZ section at y={y_section}", fontsize=10)
        axes[1, col].imshow(coloured(stack[z_slice], truth_dhw[z_slice]), interpolation="nearest")
        axes[1, col].set_title(f"XY slice z={z_slice} (reconstructed)", fontsize=10)
        for axis in axes[:, col]:
            axis.set_xticks([])
            axis.set_yticks([])
    for z in kept_indices:
        for col in range(4):
            axes[0, col].axhline(z, color="yellow", lw=0.4, alpha=0.5)
    figure.suptitle("IoU on reconstructed slices; red = false positive, cyan = false negative, "
                    "yellow lines = kept slices", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    matplotlib.pyplot.close("all")


def intensity_comparison_figure(truth_dhw: np.ndarray, linear_dhw: np.ndarray, cubic_dhw: np.ndarray,
                                predicted_dhw: np.ndarray, kept_indices: np.ndarray, path: Path,
                                scores: Dict[str, Dict[str, float]]) -> None:
    """Grey-scale XZ section (centre row) and one reconstructed XY slice of each stack,
    with PSNR / SSIM on the reconstructed slices in the titles."""
    import matplotlib
    import matplotlib.pyplot as plt

    from metrics import reconstructed_indices

    recon = reconstructed_indices(kept_indices, truth_dhw.shape[0])
    y_section = truth_dhw.shape[1] // 2
    z_slice = int(recon[len(recon) // 2]) if len(recon) else 0
    vmin, vmax = np.percentile(truth_dhw[:: max(1, truth_dhw.shape[0] // 16)], (0.5, 99.5))

    def title(name: str) -> str:
        return f"{name} {scores[name]['psnr_recon']:.2f} dB / SSIM {scores[name]['ssim_recon']:.3f}"

    columns = [("ground truth", truth_dhw), (title("linear"), linear_dhw), (title("cubic"), cubic_dhw),
               (title("predicted").replace("predicted", "network"), predicted_dhw)]
    figure, axes = plt.subplots(2, 4, figsize=(16, 8.5))
    for col, (name, stack) in enumerate(columns):
        axes[0, col].imshow(stack[:, y_section, :], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest",
                            aspect="auto")
        axes[0, col].set_title(f"{name}\nXZ section at y={y_section}", fontsize=10)
        axes[1, col].imshow(stack[z_slice], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        axes[1, col].set_title(f"XY slice z={z_slice} (reconstructed)", fontsize=10)
        for axis in axes[:, col]:
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle("Grey-scale restoration; PSNR / SSIM on the reconstructed slices", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    matplotlib.pyplot.close("all")


def output_paths(settings: Dict[str, Any]) -> Dict[str, Path]:
    """Every file this run writes; checked before any long work starts."""
    from data import OutputExistsError
    from errors import refuse_unwritable

    run_dir = Path(settings["RUN_DIRECTORY"] or Path("runs") / datetime.now().strftime("eval-%Y%m%d-%H%M%S"))
    predicted_dir = Path(settings["OUTPUT_PREDICTION_OUTDIRECTORY"] or run_dir / "predicted")
    interpolated_dir = Path(settings["OUTPUT_INTERPOLATED_DIRECTORY"] or run_dir / "interpolated")
    paths = {
        "model": run_dir / "model.pt",
        "metrics": run_dir / "metrics.json",
        "loss_curve": run_dir / "loss_curve.png",
        "training_examples": run_dir / "training_examples.png",
        "comparison": run_dir / "comparison.png",
        "probabilities": predicted_dir / "predicted_probabilities.tif",
        "predicted": predicted_dir / "predicted_stack.tif",
        "morphed": interpolated_dir / "morphed_stack.tif",  # grey-scale: linear interpolation along Z
        "predicted_labels": predicted_dir / "predicted_labels.tif",  # written for label-image inputs
    }
    for path in paths.values():
        refuse_unwritable(path)
    if not settings["OVERWRITE"]:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise OutputExistsError(f"Output files already exist: {', '.join(existing)}. Choose other output "
                                  "directories or pass --overwrite.")
    return paths


def with_input_voxel_size(settings: Dict[str, Any], typed: Sequence[str] = ()) -> Dict[str, Any]:
    """The settings of a run on a user's isotropic stack (``INPUT_IMAGES_DIRECTORY``), read as apply.py reads a
    file: the pixel size and unit from the file unless typed (``--xy-size``, ``--unit``; a size typed without
    ``--unit`` is in the file's unit); the simulated Z step keeps the default factor (``Z_RESOLUTION /
    XY_RESOLUTION`` of the constants) unless ``--z-step`` is typed. Unchanged for the built-in sample."""
    import zarr_io
    from data import InputNotFoundError, UserError, input_exists, length_scale, read_calibration

    path = settings["INPUT_IMAGES_DIRECTORY"]
    if not path:
        return settings
    if not input_exists(path):
        raise InputNotFoundError(f"Input '{path}' does not exist. Give an isotropic stack: a multipage TIFF, a folder "
                                 "of TIFF slices, an HDF5 dataset (file.h5/key), an MRC file or an OME-Zarr image.")
    if zarr_io.is_zarr_path(path):
        image = zarr_io.open_image(path, _Settings.from_dict(settings).data.stack_choice())
        calibration = (image.voxel_size_zyx, image.unit) if image.voxel_size_zyx else None
    else:
        calibration = read_calibration(path)
    file_z, file_x, file_unit = (None, None, None) if calibration is None else (
        calibration[0][0], calibration[0][2], calibration[1])
    unit = settings["VOXEL_UNIT"] if "VOXEL_UNIT" in typed else (file_unit or settings["VOXEL_UNIT"])
    if "XY_RESOLUTION" in typed:
        x = float(settings["XY_RESOLUTION"])
    elif file_x:
        x = float(file_x)
        if file_unit and file_unit != unit:  # --unit typed alone: the file's size converted to it
            scale = length_scale(file_unit, unit)
            if scale is None:
                raise UserError(f"--unit {unit} differs from the unit of '{path}' ({file_unit}) and cannot be "
                                "converted; pass --xy-size too.")
            x, file_z = x * scale, None if file_z is None else file_z * scale
    else:
        print(f"'{path}' carries no pixel size: the default XY_RESOLUTION {settings['XY_RESOLUTION']:g} {unit} is "
              "used (--xy-size gives it).")
        x = float(settings["XY_RESOLUTION"])
    default_factor = Z_RESOLUTION / XY_RESOLUTION  # of the constants above, whatever was typed
    resolved = dict(settings, XY_RESOLUTION=x, VOXEL_UNIT=unit,
                    Z_RESOLUTION=float(settings["Z_RESOLUTION"]) if "Z_RESOLUTION" in typed else default_factor * x)
    print(f"Pixel size of '{path}': {x:g} {unit}; simulated Z step {resolved['Z_RESOLUTION']:g} {unit}.")
    if file_z is not None and file_x and "XY_RESOLUTION" not in typed and abs(file_z - x) > 0.01 * x:
        warnings.warn(f"'{path}' has a Z step of {file_z:g} {unit} and pixels of {x:g} {unit}: eval.py simulates the "
                      "anisotropy of an isotropic stack, and this one is anisotropic already (apply.py restores it).",
                      ToolWarning)
    return resolved


def load_evaluation_stack(settings: Dict[str, Any]) -> Tuple[str, np.ndarray, Optional[np.ndarray], str]:
    """The isotropic ground truth: ``(kind, stack, labels or None, source)``.

    ``kind`` is 'mask', 'labels' or 'intensity' (``KIND``, or decided by
    ``data.decide_kind``); ``stack`` is bool for masks and label images, the
    stored grey values for intensities. Without an input, the built-in sample
    (a label phantom, or its grey-scale rendering for ``KIND = intensity``).
    """
    import zarr_io
    from data import make_sample_intensity, make_sample_labels, read_typed_stack

    if settings["INPUT_IMAGES_DIRECTORY"]:
        source = str(settings["INPUT_IMAGES_DIRECTORY"])
        recipe = _Settings.from_dict(settings)
        if zarr_io.is_zarr_path(source):
            image = zarr_io.open_image(source, recipe.data.stack_choice())
            kind, truth, labels = zarr_io.read_typed_image(image, recipe.data.kind, recipe.data.binarize_threshold,
                                                           None)
        else:
            kind, truth, labels = read_typed_stack(source, recipe.data.kind, recipe.data.binarize_threshold,
                                                   choice=recipe.data.stack_choice())
        return kind, truth, labels, source
    shape, seed = tuple(settings["SAMPLE_SHAPE"]), settings["RANDOM_STATE"]
    source = f"built-in sample {shape}"
    if settings["KIND"] == "intensity":
        return "intensity", make_sample_intensity(shape, seed=seed), None, source + ", grey-scale"
    labels = make_sample_labels(shape, seed=seed)
    return "labels" if settings["KIND"] != "mask" else "mask", labels > 0, labels, source


def _evaluate_masks(recipe, truth, true_labels, sparse, kept_indices, factor, device):
    """Network, shape-based and nearest restorations of a mask, with IoU (and per-label IoU)."""
    from metrics import mean_label_iou, reconstructed_indices, score_reconstruction
    from morph import interpolate_along_axis, morph_stack_interpolated
    from labeling import assign_labels
    from restore import restore_probabilities, threshold_probabilities

    print("Generating training samples, training and applying the model ...")
    probabilities, model, info = restore_probabilities(sparse, factor, recipe, original_depth=truth.shape[0],
                                                       device=device, out_dtype=np.uint8)
    predicted = threshold_probabilities(probabilities, recipe.inference.probability_threshold)
    timings = {"train_s": info["train_s"], "infer_s": info["infer_s"]}
    print("Morphological (shape-based) interpolation ...")
    t0 = time.perf_counter()
    morphed = morph_stack_interpolated(sparse, kept_indices, truth.shape[0])
    timings["morph_s"] = time.perf_counter() - t0
    nearest = interpolate_along_axis(sparse, kept_indices, truth.shape[0], method="nearest")
    scores = {"morphed": score_reconstruction(morphed, truth, kept_indices),
              "predicted": score_reconstruction(predicted, truth, kept_indices),
              "nearest": score_reconstruction(nearest, truth, kept_indices)}
    for name in ("morphed", "predicted"):
        print(f"IoU for {name.capitalize()} Stack: {scores[name]['iou_stack']:.4f} "
              f"(reconstructed slices only: {scores[name]['iou_recon']:.4f})")
    stacks = {"probabilities": probabilities, "predicted": predicted, "morphed": morphed}
    if true_labels is not None:
        recon = reconstructed_indices(kept_indices, truth.shape[0])
        for name, restored in (("morphed", morphed), ("predicted", predicted)):
            restored_labels = assign_labels(restored, true_labels[kept_indices], factor)
            scores[name]["label_iou_recon"] = mean_label_iou(restored_labels, true_labels, recon)
            if name == "predicted":
                stacks["predicted_labels"] = restored_labels
        print(f"Mean per-label IoU on reconstructed slices: morphed {scores['morphed']['label_iou_recon']:.4f}, "
              f"predicted {scores['predicted']['label_iou_recon']:.4f}")
    figure = (comparison_figure, (truth, nearest, morphed, predicted, kept_indices),
              {k: v["iou_recon"] for k, v in scores.items()})
    return stacks, scores, model, info, timings, figure


def _evaluate_intensities(recipe, truth, sparse, kept_indices, factor, device):
    """Network, linear and cubic restorations of a grey-scale stack, with PSNR and SSIM."""
    from data import as_grey_values, grey_dtype
    from metrics import score_intensity_reconstruction
    from morph import interpolate_along_axis
    from restore import restore_intensity

    print("Generating training samples, training and applying the model (grey-scale) ...")
    predicted, model, info = restore_intensity(sparse, factor, recipe, original_depth=truth.shape[0], device=device)
    timings = {"train_s": info["train_s"], "infer_s": info["infer_s"]}
    # The baselines are written as the network's values are (GREY_DTYPE), so that rounding favours neither.
    as_truth = functools.partial(as_grey_values, dtype=grey_dtype(truth.dtype, recipe.inference.grey_dtype))
    linear = as_truth(interpolate_along_axis(sparse, kept_indices, truth.shape[0], method="linear"))
    cubic = as_truth(interpolate_along_axis(sparse, kept_indices, truth.shape[0], method="cubic"))
    scores = {name: score_intensity_reconstruction(stack, truth, kept_indices)
              for name, stack in (("linear", linear), ("cubic", cubic), ("predicted", predicted))}
    over = "the 8-bit range" if truth.dtype in (np.uint8, np.int8) else "the true stack's minimum to maximum"
    print(f"PSNR and SSIM over a data range of {scores['linear']['data_range']:g} grey levels ({over}).")
    for name in ("linear", "cubic", "predicted"):
        print(f"PSNR / SSIM for {name.capitalize()} Stack (reconstructed slices): "
              f"{scores[name]['psnr_recon']:.2f} dB / {scores[name]['ssim_recon']:.4f}")
    stacks = {"predicted": predicted, "morphed": linear}
    figure = (intensity_comparison_figure, (truth, linear, cubic, predicted, kept_indices), scores)
    return stacks, scores, model, info, timings, figure


def run_evaluation(settings: Dict[str, Any], typed: Sequence[str] = ()) -> Dict[str, Any]:
    """The whole workflow; returns the metrics dict that is also saved as JSON.

    ``typed`` names the settings the user gave on the command line: the
    training recipe is fitted to a small stack (``restore.fit_recipe_to_stack``)
    except for those, which are used as given or refused.
    """
    import torch

    from data import downsample_z, resolution_factor, save_stack
    from model import save_model, select_device
    from restore import fit_recipe_to_stack, model_config, training_kind
    from train import display_training_results, plot_loss_history

    from settings import FITTED_TO, Settings

    settings = with_input_voxel_size(settings, typed)
    validate_settings(settings)
    recipe = Settings.from_dict(settings)
    start = time.perf_counter()
    device = select_device(recipe.inference.device)
    print(f"Computation will be performed on device: {device.type}")

    factor = resolution_factor(settings["Z_RESOLUTION"], settings["XY_RESOLUTION"])
    print("Loading the stack ...")
    kind, truth, true_labels, source = load_evaluation_stack(settings)
    sparse, kept_indices = downsample_z(truth, factor)
    recipe, notes = fit_recipe_to_stack(recipe, sparse.shape, factor, typed, training_kind(kind))
    settings = {**settings, **{name: value for name, value in recipe.as_dict().items()
                               if name in settings or name == FITTED_TO}}
    for note in notes:
        print(f"Recipe fitted to the stack: {note}.")
    paths = output_paths(settings)
    print(f"Stack {truth.shape} (D, H, W), {kind}, from {source}; factor {factor}: {len(kept_indices)} slices kept.")
    print(f"Outputs go to {paths['metrics'].parent}")

    if kind == "intensity":
        stacks, scores, model, info, timings, figure = _evaluate_intensities(recipe, truth, sparse, kept_indices,
                                                                             factor, device)
    else:
        stacks, scores, model, info, timings, figure = _evaluate_masks(recipe, truth, true_labels, sparse,
                                                                       kept_indices, factor, device)

    print("Saving ...")
    voxel = (settings["XY_RESOLUTION"],) * 3
    unit, overwrite = settings["VOXEL_UNIT"], settings["OVERWRITE"]
    config = dict(model_config(recipe, factor, training_kind(kind)), kind=kind)
    written = [save_model(paths["model"], model, config, overwrite=overwrite)]
    written += [save_stack(paths[name], stack, voxel, unit, overwrite, grey_values=kind == "intensity")
                for name, stack in stacks.items()]
    plot_loss_history(info["history"], paths["loss_curve"])
    display_training_results(model, info["examples"], path=paths["training_examples"])
    draw, arrays, figure_scores = figure
    draw(*arrays, paths["comparison"], figure_scores)
    written += [paths["loss_curve"], paths["training_examples"], paths["comparison"], paths["metrics"]]
    timings["total_s"] = time.perf_counter() - start
    metrics = {
        "source": source, "kind": kind, "shape_dhw": list(truth.shape), "factor": factor,
        "kept_indices": kept_indices.tolist(), "device": device.type, "scores": scores,
        "loss_history": info["history"], "timings": {k: round(v, 2) for k, v in timings.items()},
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()},
        "versions": {"numpy": np.__version__, "torch": torch.__version__},
        "outputs": [str(p) for p in written],
    }
    paths["metrics"].write_text(json.dumps(metrics, indent=2))
    print(f"Done in {timings['total_s']:.0f} s. Results in {paths['metrics'].parent}")

    show = str(settings["SHOW"]).lower()
    if show in ("yes", "true") or (show == "auto" and display_available()):
        baseline = "linear" if kind == "intensity" else "morphed"
        view_stacks_interactively(truth, stacks["morphed"], stacks["predicted"],
                                  titles=("raw (ground truth)", baseline, "predicted"))
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    typed = vars(build_parser(suppress_defaults=True).parse_args(argv))
    return run_cli(run_evaluation, dict(default_settings(), **typed), list(typed))


if __name__ == "__main__":
    sys.exit(main())
