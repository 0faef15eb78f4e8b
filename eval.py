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
# Configuration (edit here, or pass e.g. --num-epochs 20 on the command line)
# ----------------------------------------------------------------------------
INPUT_IMAGES_DIRECTORY = ""  # folder of 2D TIFF slices or one multipage TIFF; "" = built-in sample
KIND = "auto"  # "mask", "labels", "intensity" (grey-scale) or "auto" (decided only where it cannot be wrong)
OUTPUT_PREDICTION_OUTDIRECTORY = ""  # predicted stacks; "" = <RUN_DIRECTORY>/predicted
OUTPUT_INTERPOLATED_DIRECTORY = ""  # morphed (baseline) stack; "" = <RUN_DIRECTORY>/interpolated
RUN_DIRECTORY = ""  # model, figures, metrics.json; "" = a new folder runs/eval-<date>-<time>
OVERWRITE = False  # replace existing output files (never done silently)
SAMPLE_SHAPE = (128, 128, 128)  # (D, H, W) of the built-in sample
XY_RESOLUTION = 2.0  # lateral pixel size
Z_RESOLUTION = 16.0  # simulated Z step; factor = Z_RESOLUTION / XY_RESOLUTION rounded to the nearest integer
VOXEL_UNIT = "um"  # unit of the resolutions, written into the TIFF metadata
BINARIZE_THRESHOLD = -1.0  # foreground = value > threshold; < 0 means value != 0
TRAIN_XY_SIZE = 128  # lateral crop edge for training, in pixels
TRAIN_Z_SIZE = 5  # neighbouring kept slices fed as channels (odd)
TRAIN_NB = 720  # number of training crops (train + validation); with a GPU try 3000 (docs/gpu.md)
VAL_SPLIT = 0.1  # fraction of crops kept for validation
MIN_CONTENT_RATIO = 0.005  # reject crops whose label has less foreground than this
RANDOM_STATE = 42  # seeds python, numpy and torch
BATCH_SIZE = 8  # training batch size
START_FROM = "phantom"  # masks and label images: fine-tune the network trained on built-in phantoms ("phantom") or start from random weights ("scratch")
NUM_EPOCHS = 0  # passes over the training crops; 0 = by kind: 3 fine-tuning (4 from random weights) for masks and label images, 20 for grey values
LEARNING_RATE = 0.0  # peak learning rate (one-cycle schedule, Adam); 0 = by kind: 3e-3 for masks, 6e-3 for grey values
DICE_WEIGHT = 0.0  # weight of a soft-Dice term added to the BCE loss
BASE_FILTERS = 16  # width of the first U-Net level; with a GPU try 32 (with TRAIN_NB 3000: +0.009 IoU)
DEPTH = 3  # U-Net down-sampling steps
DROPOUT_RATE = 0.1  # bottleneck dropout
INPUT_SKIP = True  # residual prediction: the network corrects the upscaled input
SKIP_MERGE = "add"  # decoders add the gated encoder features ("add") or concatenate them ("concat": previous network)
SHORTCUT_NORM = False  # BatchNorm after the 1x1 shortcut projection of a residual block (True in the previous network)
UPSCALE_METHOD = "linear"  # interpolation that degrades training crops and upscales Z
TRAIN_LATERAL_AXES = "yx"  # degrade training crops along Y and X at random ("yx") or along Y only ("y")
CROP_POOL = 0.0  # draw TRAIN_NB x CROP_POOL candidate crops, train on the TRAIN_NB that interpolation gets most wrong (1 = random crops); 0 = by kind: 2 for masks and label images, 1 for grey values
SLICE_PROFILE_FWHM = 0.0  # grey-scale: Gaussian slice profile of the training degradation, FWHM in Z steps (0 = none)
INTENSITY_LOSS = "mse"  # grey-scale: regression loss, "mse" (+0.4 dB over "l1" at factor 4 on EM, a tie at 8) or "l1"
INFERENCE_TILE_SIZE = 1024  # largest tile edge at inference (larger planes are tiled, tiles shrunk to fit)
INFERENCE_BATCH_SIZE = 16  # tiles per forward pass at inference (on a CPU, see INFERENCE_BATCH_PIXELS)
INFERENCE_BATCH_PIXELS = 131072  # CPU: at most this many pixels per forward pass, >= 2 tiles; 0 = no cap
ORIENTATIONS = "yx"  # predict planes along Y ("y"), along X ("x") or both, averaged ("yx")
CHANNEL_STRIDE = 0  # spacing of the channel planes at inference; 0 = factor (as in training)
TTA_FLIPS = False  # average predictions over flips along Z and along the lateral axis
KEEP_KEPT_SLICES = True  # copy the known slices verbatim into the prediction
SKIP_EMPTY_TILES = True  # tiles that are zero in every channel reuse the model's output on zeros (exact)
COMPILE = False  # torch.compile the inference network: 1.4-1.8x faster restore after ~45 s of compiling per tile shape; pays on several 10^8 voxels
PRECISION = "auto"  # network arithmetic: "auto" (bfloat16 where the CPU/GPU has it natively), "fp32", "bf16"
PROBABILITY_THRESHOLD = 0.5  # probability above which a voxel is foreground
DEVICE = ""  # "cpu", "cuda" or "" = CUDA when available
SHOW = "auto"  # slice viewer after the run: "auto" (when a display exists), "yes", "no"

import argparse
import functools
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

CONFIG_NAMES = [name for name in list(globals()) if name.isupper() and not name.startswith("_")]


def default_settings() -> Dict[str, Any]:
    """The configuration constants of this module, as a dict."""
    return {name: globals()[name] for name in CONFIG_NAMES}


def _parse_value(text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true/false, got '{text}'")
    if isinstance(default, tuple):
        return tuple(int(part) for part in text.replace("x", ",").split(","))
    return type(default)(text)


def _constant_comments() -> Dict[str, str]:
    """The comment after each constant in this file, used as its --help text."""
    comments = {}
    for line in Path(__file__).read_text().splitlines():
        name, _, rest = line.partition(" = ")
        if name in CONFIG_NAMES and "#" in rest:
            comments[name] = rest.split("#", 1)[1].strip()
    return comments


def build_parser(names: Optional[Sequence[str]] = None, add_help: bool = True,
                 suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """A parser with one ``--kebab-case`` flag per configuration constant (or per name in ``names``).

    With ``suppress_defaults``, flags not given on the command line are absent
    from the parsed namespace (their default is still shown in ``--help``).
    """
    settings = default_settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comments = _constant_comments()
    for name in names or CONFIG_NAMES:
        default = settings[name]
        help_text = comments.get(name, "") + (f" (default: {default})" if suppress_defaults else "")
        parser.add_argument("--" + name.lower().replace("_", "-"), dest=name, metavar="VALUE",
                            default=argparse.SUPPRESS if suppress_defaults else default,
                            type=lambda text, d=default: _parse_value(text, d), help=help_text)
    return parser


def validate_settings(settings: Dict[str, Any]) -> None:
    """Reject settings that would fail later, with one clear message each."""
    from data import KINDS, UserError, resolution_factor
    from model import PRECISIONS, SKIP_MERGES, START_FROM_CHOICES
    from train import check_crop_pool, check_lateral_axes

    resolution_factor(settings["Z_RESOLUTION"], settings["XY_RESOLUTION"])
    if settings["TRAIN_Z_SIZE"] % 2 == 0 or settings["TRAIN_Z_SIZE"] < 1:
        raise UserError(f"TRAIN_Z_SIZE must be odd (the centre slice is the label), got {settings['TRAIN_Z_SIZE']}.")
    if not set(settings["ORIENTATIONS"]) <= {"y", "x"} or not settings["ORIENTATIONS"]:
        raise UserError(f"ORIENTATIONS must be 'y', 'x' or 'yx', got '{settings['ORIENTATIONS']}'.")
    check_lateral_axes(settings["TRAIN_LATERAL_AXES"])
    if settings["START_FROM"] not in START_FROM_CHOICES:
        raise UserError(f"START_FROM must be one of {', '.join(START_FROM_CHOICES)}, got '{settings['START_FROM']}'.")
    if settings["UPSCALE_METHOD"] not in ("linear", "nearest"):
        # 'sdf' would blend distance maps across the channel planes of a 2D crop,
        # so training and inference would not see the same interpolation.
        raise UserError(f"UPSCALE_METHOD must be 'linear' or 'nearest', got '{settings['UPSCALE_METHOD']}'.")
    if settings["NUM_EPOCHS"] < 0:
        raise UserError(f"NUM_EPOCHS must be 0 (by kind) or a positive number of epochs, got {settings['NUM_EPOCHS']}.")
    if settings["LEARNING_RATE"] < 0:
        raise UserError(f"LEARNING_RATE must be 0 (by kind) or positive, got {settings['LEARNING_RATE']}.")
    if settings["CROP_POOL"] != 0:
        check_crop_pool(settings["CROP_POOL"])
    if not 0 < settings["VAL_SPLIT"] < 1:
        raise UserError(f"VAL_SPLIT must be between 0 and 1, got {settings['VAL_SPLIT']}.")
    if str(settings["SHOW"]).lower() not in ("auto", "yes", "no", "true", "false"):
        raise UserError(f"SHOW must be auto, yes or no, got '{settings['SHOW']}'.")
    if settings["KIND"] not in KINDS:
        raise UserError(f"KIND must be one of {', '.join(KINDS)}, got '{settings['KIND']}'.")
    if settings["INTENSITY_LOSS"] not in ("l1", "mse"):
        raise UserError(f"INTENSITY_LOSS must be 'l1' or 'mse', got '{settings['INTENSITY_LOSS']}'.")
    if settings["INFERENCE_BATCH_PIXELS"] < 0:
        raise UserError(f"INFERENCE_BATCH_PIXELS must be 0 (no cap) or a number of pixels, got "
                        f"{settings['INFERENCE_BATCH_PIXELS']}.")
    if settings["SKIP_MERGE"] not in SKIP_MERGES:
        raise UserError(f"SKIP_MERGE must be one of {', '.join(SKIP_MERGES)}, got '{settings['SKIP_MERGE']}'.")
    if settings["PRECISION"] not in PRECISIONS:
        raise UserError(f"PRECISION must be one of {', '.join(PRECISIONS)}, got '{settings['PRECISION']}'.")


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
    if not settings["OVERWRITE"]:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise OutputExistsError(f"Output files already exist: {', '.join(existing)}. Choose other output "
                                  "directories or pass --overwrite true.")
    return paths


def load_evaluation_stack(settings: Dict[str, Any]):
    """The isotropic ground truth: ``(kind, stack, labels or None, source)``.

    ``kind`` is 'mask', 'labels' or 'intensity' (``KIND``, or decided by
    ``data.decide_kind``); ``stack`` is bool for masks and label images, the
    stored grey values for intensities. Without an input, the built-in sample
    (a label phantom, or its grey-scale rendering for ``KIND = intensity``).
    """
    from data import make_sample_intensity, make_sample_labels, read_typed_stack

    if settings["INPUT_IMAGES_DIRECTORY"]:
        source = str(settings["INPUT_IMAGES_DIRECTORY"])
        threshold = settings["BINARIZE_THRESHOLD"] if settings["BINARIZE_THRESHOLD"] >= 0 else None
        kind, truth, labels = read_typed_stack(source, settings["KIND"], threshold)
        return kind, truth, labels, source
    shape, seed = tuple(settings["SAMPLE_SHAPE"]), settings["RANDOM_STATE"]
    source = f"built-in sample {shape}"
    if settings["KIND"] == "intensity":
        return "intensity", make_sample_intensity(shape, seed=seed), None, source + ", grey-scale"
    labels = make_sample_labels(shape, seed=seed)
    return "labels" if settings["KIND"] != "mask" else "mask", labels > 0, labels, source


def _evaluate_masks(settings, truth, true_labels, sparse, kept_indices, factor, device):
    """Network, shape-based and nearest restorations of a mask, with IoU (and per-label IoU)."""
    from metrics import mean_label_iou, reconstructed_indices, score_reconstruction
    from morph import interpolate_along_axis, morph_stack_interpolated
    from restore import assign_labels, restore_probabilities, threshold_probabilities

    print("Generating training samples, training and applying the model ...")
    probabilities, model, info = restore_probabilities(sparse, factor, settings, original_depth=truth.shape[0],
                                                       device=device, out_dtype=np.uint8)
    predicted = threshold_probabilities(probabilities, settings["PROBABILITY_THRESHOLD"])
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


def _evaluate_intensities(settings, truth, sparse, kept_indices, factor, device):
    """Network, linear and cubic restorations of a grey-scale stack, with PSNR and SSIM."""
    from data import as_grey_values
    from metrics import score_intensity_reconstruction
    from morph import interpolate_along_axis
    from restore import restore_intensity

    print("Generating training samples, training and applying the model (grey-scale) ...")
    predicted, model, info = restore_intensity(sparse, factor, settings, original_depth=truth.shape[0], device=device)
    timings = {"train_s": info["train_s"], "infer_s": info["infer_s"]}
    as_truth = functools.partial(as_grey_values, dtype=truth.dtype)
    linear = as_truth(interpolate_along_axis(sparse, kept_indices, truth.shape[0], method="linear"))
    cubic = as_truth(interpolate_along_axis(sparse, kept_indices, truth.shape[0], method="cubic"))
    scores = {name: score_intensity_reconstruction(stack, truth, kept_indices)
              for name, stack in (("linear", linear), ("cubic", cubic), ("predicted", predicted))}
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
    from restore import fit_recipe_to_stack, model_config
    from train import display_training_results, plot_loss_history

    validate_settings(settings)
    start = time.perf_counter()
    device = select_device(settings["DEVICE"] or None)
    print(f"Computation will be performed on device: {device.type}")

    factor = resolution_factor(settings["Z_RESOLUTION"], settings["XY_RESOLUTION"])
    print("Loading the stack ...")
    kind, truth, true_labels, source = load_evaluation_stack(settings)
    sparse, kept_indices = downsample_z(truth, factor)
    settings, notes = fit_recipe_to_stack(settings, sparse.shape, factor, typed)
    for note in notes:
        print(f"Recipe fitted to the stack: {note}.")
    paths = output_paths(settings)
    print(f"Stack {truth.shape} (D, H, W), {kind}, from {source}; factor {factor}: {len(kept_indices)} slices kept.")
    print(f"Outputs go to {paths['metrics'].parent}")

    if kind == "intensity":
        stacks, scores, model, info, timings, figure = _evaluate_intensities(settings, truth, sparse, kept_indices,
                                                                             factor, device)
    else:
        stacks, scores, model, info, timings, figure = _evaluate_masks(settings, truth, true_labels, sparse,
                                                                       kept_indices, factor, device)

    print("Saving ...")
    voxel = (settings["XY_RESOLUTION"],) * 3
    unit, overwrite = settings["VOXEL_UNIT"], settings["OVERWRITE"]
    config = dict(model_config(settings, factor), kind=kind)
    written = [save_model(paths["model"], model, config, overwrite=overwrite)]
    written += [save_stack(paths[name], stack, voxel, unit, overwrite) for name, stack in stacks.items()]
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


def run_cli(job, *args) -> int:
    """Run a command-line job: a user error (``data.UserError``: bad path, damaged
    file, existing output, bad setting) prints one ``error: ...`` line and gives
    exit status 2. Any other exception is a bug and keeps its traceback."""
    from data import UserError

    try:
        job(*args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    typed = list(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    return run_cli(run_evaluation, vars(build_parser().parse_args(argv)), typed)


if __name__ == "__main__":
    sys.exit(main())
