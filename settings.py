"""The settings model: every knob of the recipe, stated once.

Each setting is a field of one of the dataclasses below, grouped by concern
(the input, voxel size, training, network, inference, large volumes). A field
carries its type, default, help text, the command-line group it is listed in,
the ``eval.py`` constant that names it, and what a saved model does with it:

* ``model="read"``: saved with a model, and a restore with that model uses the
  saved value unless the flag is typed (the geometry the model was trained on);
* ``model="recorded"``: saved with a model as the recipe it was trained with,
  not read back;
* ``inference=True`` (training fields): a restore reads it too, so it is no
  training-only flag.

The command lines of ``eval.py`` and ``apply.py`` are generated from these
fields (:func:`add_setting_arguments`), library functions default to
:class:`Settings` ``()``, and ``eval.py``'s constants fill it (as shipped they
equal its defaults; a test checks).

"By kind" and similar defaults are ``None`` here; the numeric sentinels of
earlier versions (``NUM_EPOCHS 0``, ``BINARIZE_THRESHOLD -1``, ...) are still
accepted wherever a value is read (:meth:`Settings.from_dict`, the flags).

This module sits below the scripts: it imports only ``data`` (the file readers' choices), ``errors``,
``kinds``, ``model`` and ``zarr_io``.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from data import FACTOR_ROUNDINGS, StackChoice
from errors import UserError
from kinds import KINDS
from model import PRECISIONS, SKIP_MERGES, START_FROM_CHOICES
from zarr_io import DEFAULT_NGFF_VERSION, NGFF_VERSIONS

GROUPS = {
    "voxel size": "Default: read from the file's metadata (ImageJ or OME). Sizes typed without --unit are taken "
                  "in the file's unit.",
    "model and training": "Without --model, a network is trained on each input itself (self-supervised).",
    "inference": "How the trained network is applied. A saved model brings the settings it was trained with; "
                 "flags typed here win.",
    "large volumes": "An output named *.ome.zarr is restored block by block with bounded memory (inputs may be "
                     "OME-Zarr images, label images or plain Zarr arrays, or TIFFs).",
    "advanced": "The rest of the recipe: crops, network, interpolation.",
}
LATERAL_AXES = ("yx", "y")  # training crops degraded along Y or X at random, or along Y only
ORIENTATION_AXES = ("y", "x")
UPSCALE_METHODS = ("linear", "nearest")
GREY_DTYPES = ("input", "float32")  # grey values written in the input's dtype, or as float32
BOUNDARY_INPUTS = ("interfaces", "linear")  # the network's input for a dense label image's boundaries
INTENSITY_LOSSES = ("mse", "l1", "ssim", "mse+ssim")
BOOLEAN_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                 "off": False}


def parse_bool(text: Union[str, bool]) -> bool:
    """``true/false``, ``yes/no``, ``on/off`` or ``1/0`` as a bool."""
    if isinstance(text, bool):
        return text
    try:
        return BOOLEAN_WORDS[str(text).strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true/false, got '{text}'") from None


def parse_shape(text: Union[str, Sequence[int]]) -> Tuple[int, ...]:
    """``128,128,128`` or ``128x128x128`` (or a sequence) as a tuple of ints."""
    if isinstance(text, str):
        return tuple(int(part) for part in text.replace("x", ",").split(","))
    return tuple(int(part) for part in text)


def setting(default: Any, help: str, *, constant: str, group: str, type: Optional[Callable] = None,
            metavar: Optional[str] = None, choices: Optional[Sequence[Any]] = None, none: Optional[str] = None,
            legacy_none: Optional[Callable[[Any], bool]] = None, model: Optional[str] = None, inference: bool = False,
            flag: Optional[str] = None, aliases: Sequence[str] = (), model_absent: Any = None) -> Any:
    """A dataclass field that is a setting.

    Parameters
    ----------
    default : the default value (``None`` with ``none`` set: "by kind" and the like)
    help : one sentence for ``--help`` (no measurements: those live in ``docs/``)
    constant : the ``eval.py`` constant and key of the dict view (``TRAIN_XY_SIZE``)
    group : one of :data:`GROUPS`, or ``"main"`` (listed with --input and --output)
    type : parser of a typed value (default: the type of ``default``)
    metavar : what the value is (N, PX, FLOAT, NAME); default from ``type``
    choices : allowed values
    none : what ``None`` means, as printed for the default ("by kind")
    legacy_none : values that earlier versions used for ``None`` (e.g. ``lambda v: v == 0``)
    model : ``"read"`` (saved with a model and read back by a restore), ``"recorded"`` or None
    inference : a training setting that a restore reads too
    flag, aliases : the command-line flag (default from ``constant``) and older names for it
    model_absent : with ``model="read"``, the value a saved model whose record lacks the setting was trained
        with (a model saved before the setting existed); None: the current value applies
    """
    if type is None:
        type = {bool: parse_bool, tuple: parse_shape}.get(default.__class__, default.__class__)
    if metavar is None:
        metavar = {int: "N", float: "FLOAT", str: "NAME", parse_shape: "D,H,W"}.get(type)
    return field(default=default, metadata=dict(
        help=help, constant=constant, group=group, type=type, metavar=metavar, choices=choices, none=none,
        legacy_none=legacy_none, model=model, inference=inference, model_absent=model_absent,
        flag=flag or "--" + constant.lower().replace("_", "-"), aliases=tuple(aliases)))


def _zero(value: Any) -> bool:
    return value == 0


def _empty(value: Any) -> bool:
    return value == ""


# --------------------------------------------------------------------------- #
# The settings, one dataclass per concern
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Data:
    """What the input holds and how its values are read."""
    kind: str = setting("auto", "mask (segmentation), labels (instance ids), intensity (grey-scale image, restored "
                        "in its own dtype and range) or auto: decided only where it cannot be wrong (a saved "
                        "model's kind, else the values); the plan says what was decided",
                        constant="KIND", group="main", choices=KINDS, metavar=None)
    binarize_threshold: Optional[float] = setting(
        None, "foreground = value > threshold (read the input as a mask)", constant="BINARIZE_THRESHOLD",
        group="advanced", type=float, none="value != 0", legacy_none=lambda value: value < 0)
    channel: Optional[int] = setting(
        None, "the channel to restore of a file that holds several (counted from 0; also picks a colour of an RGB "
        "file)", constant="CHANNEL", group="main", type=int, none="the file's only one")
    timepoint: Optional[int] = setting(
        None, "the time point to restore of a file that holds several (counted from 0)", constant="TIMEPOINT",
        group="main", type=int, none="the file's only one")

    def stack_choice(self) -> StackChoice:
        """The channel and time point to read, as the readers take them (``tiff_io.choose_stack``)."""
        return StackChoice(self.channel, self.timepoint)


@dataclass(frozen=True)
class VoxelSize:
    """The input's voxel size. ``eval.py`` simulates one (its constants); ``apply.py`` reads the file's."""
    z_step: Optional[float] = setting(None, "Z step between slices", constant="Z_RESOLUTION", group="voxel size",
                                      type=float, none="from the file", flag="--z-step",
                                      aliases=("--z-resolution",))
    xy_size: Optional[float] = setting(None, "lateral pixel size", constant="XY_RESOLUTION", group="voxel size",
                                       type=float, none="from the file", flag="--xy-size",
                                       aliases=("--xy-resolution",))
    unit: Optional[str] = setting(None, "unit of --z-step and --xy-size, written to the output (um, nm, ...)",
                                  constant="VOXEL_UNIT", group="voxel size", type=str, metavar="UNIT",
                                  none="the file's", flag="--unit", aliases=("--voxel-unit",))
    factor_rounding: str = setting("isotropic", "a Z/XY ratio that is not an integer: 'isotropic' restores onto a "
                                   "grid whose Z step is the XY pixel size (kept slices between its slices are "
                                   "restored around); 'nearest' rounds the ratio, kept slices stay verbatim on the "
                                   "grid and the output Z step is Z step / factor", constant="FACTOR_ROUNDING",
                                   group="voxel size", choices=FACTOR_ROUNDINGS, metavar=None)


@dataclass(frozen=True)
class Training:
    """The self-supervised training recipe (crops of the kept slices, degraded along one lateral axis)."""
    train_xy_size: int = setting(128, "lateral crop edge for training", constant="TRAIN_XY_SIZE", group="advanced",
                                 metavar="PX", model="read", inference=True)
    train_z_size: int = setting(5, "neighbouring kept slices fed as channels (odd)", constant="TRAIN_Z_SIZE",
                                group="advanced", model="read", inference=True)
    train_nb: Optional[int] = setting(None, "number of training crops (training + validation)",
                                      constant="TRAIN_NB", group="model and training", type=int, none="by kind",
                                      legacy_none=_zero, model="recorded")
    val_split: float = setting(0.1, "fraction of crops kept for validation", constant="VAL_SPLIT", group="advanced",
                               model="recorded")
    min_content_ratio: float = setting(0.005, "masks: reject crops whose centre slice has less foreground",
                                       constant="MIN_CONTENT_RATIO", group="advanced", model="recorded")
    random_state: int = setting(42, "seed of python, numpy and torch", constant="RANDOM_STATE",
                                group="model and training", model="recorded")
    batch_size: int = setting(8, "training batch size", constant="BATCH_SIZE", group="model and training",
                              model="recorded")
    num_epochs: Optional[int] = setting(None, "passes over the training crops", constant="NUM_EPOCHS",
                                        group="model and training", type=int, none="by kind", legacy_none=_zero,
                                        model="recorded")
    learning_rate: Optional[float] = setting(None, "peak learning rate (one-cycle schedule, Adam)",
                                             constant="LEARNING_RATE", group="model and training", type=float,
                                             none="by kind", legacy_none=_zero, model="recorded")
    dice_weight: float = setting(0.0, "masks: weight of a soft-Dice term added to the BCE loss",
                                 constant="DICE_WEIGHT", group="advanced", model="recorded")
    upscale_method: str = setting("linear", "interpolation that degrades training crops and upscales Z",
                                  constant="UPSCALE_METHOD", group="advanced", choices=UPSCALE_METHODS,
                                  model="read", inference=True)
    boundary_input: str = setting("interfaces", "dense label images: what the boundary network sees between kept "
                                  "slices: the boundary mask upsampled (linear), or half that and half the "
                                  "boundaries of per-label shape-based interpolation along each plane (interfaces)",
                                  constant="BOUNDARY_INPUT", group="advanced", choices=BOUNDARY_INPUTS,
                                  model="read", inference=True, model_absent="linear")
    precision: str = setting("auto", "network arithmetic: auto (bfloat16 where it is faster: AMX CPUs, AMD CPUs with "
                             "AVX512-BF16, recent GPUs), "
                             "fp32 or bf16", constant="PRECISION", group="advanced", choices=PRECISIONS,
                             model="recorded", inference=True)
    lateral_axes: str = setting("yx", "degrade training crops along Y and X at random (yx) or along Y only (y)",
                                constant="TRAIN_LATERAL_AXES", group="advanced", choices=LATERAL_AXES,
                                model="recorded")
    crop_pool: Optional[float] = setting(None, "draw TRAIN_NB x CROP_POOL candidate crops, train on the TRAIN_NB "
                                         "that interpolation gets most wrong (1 = random crops)",
                                         constant="CROP_POOL", group="advanced", type=float, none="by kind",
                                         legacy_none=_zero, model="recorded")
    profile_fwhm: float = setting(0.0, "grey-scale: Gaussian slice profile of the training degradation, FWHM in Z "
                                  "steps (0 = none)", constant="SLICE_PROFILE_FWHM", group="advanced",
                                  model="recorded")
    intensity_loss: str = setting("mse+ssim", "grey-scale: regression loss (mse+ssim: MSE + 0.05 x (1 - SSIM); "
                                  "ssim: 0.84 x (1 - SSIM) + 0.16 x L1)", constant="INTENSITY_LOSS",
                                  group="advanced", choices=INTENSITY_LOSSES, model="recorded")
    start_from: str = setting("phantom", "masks and label images: fine-tune the network trained on built-in "
                              "phantoms (phantom) or start from random weights (scratch)", constant="START_FROM",
                              group="model and training", choices=START_FROM_CHOICES, model="recorded")

    def for_kind(self, kind: str = "mask", fine_tuning: bool = False) -> "Training":
        """This recipe with its "by kind" values (``None``) set to those of ``kind``
        ('mask', 'labels', 'dense labels' or 'intensity'; :data:`RECIPE_BY_KIND`, 'labels' trains as
        'mask'), with :data:`FINE_TUNING_EPOCHS` when the training fine-tunes the starting model
        (``train.starting_point`` says whether)."""
        if kind not in RECIPE_BY_KIND and kind not in TRAINS_AS:
            raise ValueError(f"No training recipe for kind '{kind}': one of {', '.join(RECIPE_BY_KIND)}, or "
                             f"{', '.join(TRAINS_AS)}.")
        by_kind = dict(RECIPE_BY_KIND[TRAINS_AS.get(kind, kind)])
        if fine_tuning:
            by_kind["num_epochs"] = FINE_TUNING_EPOCHS
        return dataclasses.replace(self, **{name: value for name, value in by_kind.items()
                                            if getattr(self, name) is None})


# The "by kind" recipe: grey values are regressed, which gains from a longer, faster-stepping training
# without hard crops; masks train shorter on hard crops (docs/ablations.md, "Training budget"). Training
# cost does not grow with the volume (TRAIN_NB crops per epoch).
# The boundaries of a dense label image (morph.label_boundaries) are sheets 1-2 pixels thick by
# construction, and where they run decides every id: they train as a mask on four times the crops
# (docs/dense-labels.md, "Four times the training crops"). A small stack still draws each distinct crop at
# most train.DRAWS_PER_DISTINCT_CROP times (train.training_recipe).
RECIPE_BY_KIND = {"mask": {"num_epochs": 4, "learning_rate": 3e-3, "crop_pool": 2.0, "train_nb": 720},
                  "dense labels": {"num_epochs": 4, "learning_rate": 3e-3, "crop_pool": 2.0, "train_nb": 2880},
                  "intensity": {"num_epochs": 20, "learning_rate": 6e-3, "crop_pool": 1.0, "train_nb": 720}}
# Kinds that train with another kind's recipe: a sparse label image trains on the mask of its objects.
TRAINS_AS = {"labels": "mask"}
# Masks fine-tuning the phantom-trained starting model (START_FROM phantom, model.starting_weights) reach
# the quality of 4 epochs from random weights in 3 (docs/speed-by-machine.md).
FINE_TUNING_EPOCHS = 3


@dataclass(frozen=True)
class Network:
    """The U-Net (the saved model keeps its architecture; these only shape a new one)."""
    base_filters: int = setting(16, "width of the first U-Net level", constant="BASE_FILTERS", group="advanced",
                                model="recorded")
    depth: int = setting(3, "U-Net down-sampling steps", constant="DEPTH", group="advanced", model="recorded")
    dropout_rate: float = setting(0.1, "bottleneck dropout", constant="DROPOUT_RATE", group="advanced",
                                  model="recorded")
    input_skip: bool = setting(True, "residual prediction: the network corrects the upscaled input",
                               constant="INPUT_SKIP", group="advanced", model="recorded")
    skip_merge: str = setting("add", "decoders add the gated encoder features (add) or concatenate them (concat)",
                              constant="SKIP_MERGE", group="advanced", choices=SKIP_MERGES, model="recorded")
    shortcut_norm: bool = setting(False, "BatchNorm after the 1x1 shortcut projection of a residual block",
                                  constant="SHORTCUT_NORM", group="advanced", model="recorded")


@dataclass(frozen=True)
class Inference:
    """How a trained network restores a stack."""
    tile_size: int = setting(1024, "largest tile edge (larger planes are tiled, tiles shrunk to fit)",
                             constant="INFERENCE_TILE_SIZE", group="inference", metavar="PX", model="read")
    batch_size: int = setting(16, "tiles per forward pass (on a CPU, see --inference-batch-pixels)",
                              constant="INFERENCE_BATCH_SIZE", group="inference")
    batch_pixels: int = setting(2 ** 17, "CPU: at most this many pixels per forward pass, at least 2 tiles; 0 = no "
                                "cap", constant="INFERENCE_BATCH_PIXELS", group="inference", metavar="PX")
    orientations: str = setting("yx", "predict planes along Y (y), along X (x) or both, averaged (yx)",
                                constant="ORIENTATIONS", group="inference", choices=("yx", "y", "x", "xy"),
                                model="read")
    channel_stride: Optional[int] = setting(None, "spacing of the channel planes, in voxels", constant="CHANNEL_STRIDE",
                                            group="advanced", type=int,
                                            none="by kind: half the factor (rounded) for masks and labels, the "
                                            "factor for grey values", legacy_none=_zero, model="read")
    tta_flips: Optional[bool] = setting(None, "average predictions over flips along Z and along the lateral axis",
                                        constant="TTA_FLIPS", group="inference", type=parse_bool,
                                        none="by kind: on for grey values and dense label images, off for masks "
                                             "and other label images", model="read")
    keep_kept_slices: bool = setting(True, "copy the acquired slices verbatim into the output",
                                     constant="KEEP_KEPT_SLICES", group="inference", model="read")
    skip_empty_tiles: bool = setting(True, "tiles that are zero in every channel reuse the model's output on zeros "
                                     "(exact)", constant="SKIP_EMPTY_TILES", group="inference")
    compile: bool = setting(False, "torch.compile the network: a faster restore after a compilation per tile shape; "
                            "pays on large volumes", constant="COMPILE", group="inference")
    probability_threshold: float = setting(0.5, "masks: probability above which a voxel is foreground",
                                           constant="PROBABILITY_THRESHOLD", group="inference", model="read")
    grey_dtype: str = setting("input", "grey values: written in the input's dtype (integers rounded and clipped) "
                              "or as float32 (no rounding: for measuring dim images)", constant="GREY_DTYPE",
                              group="inference", choices=GREY_DTYPES, metavar=None)
    # 0.4: better accuracy and per-label IoU than the network's boundaries alone on FIB-25 neurons (with and
    # without 0 boundaries) and a tissue phantom at factors 3-8, and the adapted Rand error lower but in one case
    # (+0.00003); 0.5 starts losing per-label IoU (docs/dense-labels.md, "Shape-based interfaces beside the
    # network's boundaries").
    shape_prior: float = setting(0.4, "dense label images: weight of per-label shape-based interpolation's "
                                 "boundaries beside the network's in the elevation the ids grow on (0: the "
                                 "network's alone)", constant="SHAPE_PRIOR", group="advanced")
    device: Optional[str] = setting(None, "cpu, cuda or cuda:N", constant="DEVICE", group="model and training",
                                    type=str, metavar="DEVICE", none="CUDA when available", legacy_none=_empty)

    def flips_for(self, kind: str = "mask") -> bool:
        """Whether a restore of ``kind`` (a key of :data:`TTA_BY_KIND`) averages over test-time flips:
        ``tta_flips`` as set, or by kind (``None``)."""
        return TTA_BY_KIND[kind] if self.tta_flips is None else self.tta_flips

    def stride_fraction_for(self, kind: str = "mask") -> float:
        """The channel planes' spacing, as a fraction of the factor, for a restore of ``kind`` (a key of
        :data:`STRIDE_BY_KIND`) when ``channel_stride`` is not set (``None``); 1 where it is set, since
        ``channel_stride`` then gives the spacing in voxels."""
        return STRIDE_BY_KIND[kind] if self.channel_stride is None else 1.0


# Test-time flips by kind: four network passes per plane. Grey values pay for them (0.07 dB and 0.003 SSIM
# on FIB-25 EM at factor 8 for 50 s of restore after 530 s of training, docs/grey-scale.md), and so do dense
# label images, whose ids follow the restored boundary sheets (a lower adapted Rand error at factors 4 and 8,
# docs/dense-labels.md); masks and sparse label images gain 0.001 IoU for four times their restore
# (docs/benchmarks.md).
TTA_BY_KIND = {"mask": False, "labels": False, "dense labels": True, "intensity": True}

# Spacing of the channel planes at inference, as a fraction of the factor (CHANNEL_STRIDE None). The network
# trained on kept slices ``factor`` voxels apart, but at inference the planes beside the restored one are there
# at every voxel: at half the factor the network follows sheets that move across the plane more closely
# (UroCell vesicles at factor 8: IoU 0.7737 against 0.7643, Golgi +0.0004, mitochondria +0.002, and at factor 4
# within 0.0005; dense labels' scores within 0.0003 or better), while grey values are as good at the factor
# (25.797 against 25.791 dB on FIB-25 EM) and worse below it (docs/benchmarks.md, "Channel planes at half the
# factor").
STRIDE_BY_KIND = {"mask": 0.5, "labels": 0.5, "dense labels": 0.5, "intensity": 1.0}
# A sparse label image restores its foreground as a mask: the 'labels' entries above, which the plan prints, must
# equal 'mask' (tests/test_settings.py checks it).


@dataclass(frozen=True)
class LargeVolumes:
    """The block-wise restore into OME-Zarr (``blocks.restore_to_ome_zarr``)."""
    block_size: int = setting(512, "lateral edge of a block (all of Z): 256 or less, or a multiple of 256; memory "
                              "per worker grows with its square", constant="BLOCK_SIZE", group="large volumes",
                              metavar="PX")
    workers: int = setting(0, "worker processes of a local Dask cluster; 0 = block after block in this process",
                           constant="WORKERS", group="large volumes")
    worker_memory: str = setting("1GiB", "memory limit of each local Dask worker", constant="WORKER_MEMORY",
                                 group="large volumes", metavar="BYTES")
    scheduler: Optional[str] = setting(None, "address of a running Dask scheduler (tcp://host:8786); its workers "
                                       "need the dependencies (requirements.txt) and access to the input's and "
                                       "output's folders", constant="SCHEDULER", group="large volumes", type=str,
                                       metavar="ADDRESS", none="none")
    resume: bool = setting(False, "continue an interrupted OME-Zarr output: finished blocks are kept, the rest "
                           "restored", constant="RESUME", group="large volumes")
    max_blocks: Optional[int] = setting(None, "restore at most this many blocks now (continue with --resume)",
                                        constant="MAX_BLOCKS", group="large volumes", type=int, none="all")
    ngff_version: str = setting(DEFAULT_NGFF_VERSION, "OME-Zarr version written: 0.4 (Zarr v2, read by Fiji and "
                                "most tools) or 0.5 (Zarr v3)", constant="NGFF_VERSION", group="large volumes",
                                choices=NGFF_VERSIONS, metavar=None)


SECTIONS = (("data", Data), ("voxel", VoxelSize), ("training", Training), ("network", Network),
            ("inference", Inference), ("large", LargeVolumes))
FITTED_TO = "RECIPE_FITTED_TO"  # dict-view key of Settings.fitted_to


def setting_fields() -> Iterator[Tuple[str, dataclasses.Field]]:
    """Every setting as ``(section name, field)``, in the order of :data:`SECTIONS`."""
    for section, cls in SECTIONS:
        for item in dataclasses.fields(cls):
            yield section, item


FIELDS: Dict[str, Tuple[str, dataclasses.Field]] = {item.metadata["constant"]: (section, item)
                                                    for section, item in setting_fields()}
# The constants that only change how a network is trained: a restore with a saved model reads none of them.
TRAINING_ONLY = tuple(name for name, (section, item) in FIELDS.items()
                      if section in ("training", "network") and not item.metadata["inference"])


def normalize(constant: str, value: Any) -> Any:
    """``value`` of the setting ``constant`` as the model holds it: an old numeric sentinel becomes
    ``None``, a typed text is parsed, a list (from JSON) becomes a tuple."""
    item = FIELDS[constant][1]
    meta = item.metadata
    if value is None:
        return None
    if isinstance(value, str) and meta["type"] is not str:
        value = meta["type"](value)
    if isinstance(value, list):
        value = tuple(value)
    if meta["legacy_none"] is not None and meta["none"] is not None and meta["legacy_none"](value):
        return None
    return value


def parse_text(constant: str, text: str) -> Any:
    """A typed text (``NAME=VALUE`` overrides, the command line) as the value of ``constant``; an old
    sentinel (``0`` = by kind, ...) is accepted."""
    return normalize(constant, FIELDS[constant][1].metadata["type"](text))


@dataclass(frozen=True)
class Settings:
    """Every setting of a run, grouped by concern.

    ``Settings()`` is the recipe of the command lines (``eval.py``'s
    constants fill it the same way). Read a setting as ``settings.training.num_epochs``;
    ``settings["NUM_EPOCHS"]`` and :meth:`as_dict` give the view by constant
    name that earlier versions passed around.
    """
    data: Data = field(default_factory=Data)
    voxel: VoxelSize = field(default_factory=VoxelSize)
    training: Training = field(default_factory=Training)
    network: Network = field(default_factory=Network)
    inference: Inference = field(default_factory=Inference)
    large: LargeVolumes = field(default_factory=LargeVolumes)
    # (K, H, W, factor) the training recipe was fitted to (restore.fit_recipe_to_stack), so that it is
    # fitted again only for another stack.
    fitted_to: Optional[Tuple[int, int, int, float]] = None

    # ----- the view by constant name ----------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: Optional["Settings"] = None) -> "Settings":
        """Settings from a mapping of constant names (others, e.g. ``eval.py``'s run constants, are
        ignored) on top of ``base`` (default ``Settings()``). Old sentinels are accepted."""
        if isinstance(values, Settings):
            return values
        base = base or cls()
        changes: Dict[str, Dict[str, Any]] = {}
        for constant, value in values.items():
            if constant not in FIELDS and isinstance(constant, str) and constant.upper() in FIELDS:
                raise UserError(f"Settings are named by their constant: {constant.upper()}, not '{constant}' (a saved "
                                "model's record is read with Settings().with_model_record(config)).")
            if constant in FIELDS:
                section, item = FIELDS[constant]
                changes.setdefault(section, {})[item.name] = normalize(constant, value)
        sections = {section: dataclasses.replace(getattr(base, section), **fields_)
                    for section, fields_ in changes.items()}
        fitted = values.get(FITTED_TO, base.fitted_to)
        return dataclasses.replace(base, **sections, fitted_to=None if fitted is None else tuple(fitted))

    def as_dict(self) -> Dict[str, Any]:
        """``{constant: value}`` of every setting (plus ``RECIPE_FITTED_TO`` once fitted)."""
        values = {constant: getattr(getattr(self, section), item.name)
                  for constant, (section, item) in FIELDS.items()}
        if self.fitted_to is not None:
            values[FITTED_TO] = list(self.fitted_to)
        return values

    def __getitem__(self, constant: str) -> Any:
        if constant == FITTED_TO:
            return None if self.fitted_to is None else list(self.fitted_to)
        section, item = FIELDS[constant]
        return getattr(getattr(self, section), item.name)

    def get(self, constant: str, default: Any = None) -> Any:
        return self[constant] if constant in FIELDS or constant == FITTED_TO else default

    def with_values(self, **constants: Any) -> "Settings":
        """A copy with the settings named by constant changed (``with_values(NUM_EPOCHS=3)``); a name that is
        no setting is one error, with the nearest names."""
        unknown = [name for name in constants if name not in FIELDS and name.upper() not in FIELDS]
        if unknown:
            near = difflib.get_close_matches(unknown[0].upper(), list(FIELDS), n=3)
            raise UserError(f"'{unknown[0]}' is no setting{f'; did you mean {near[0]}' if near else ''}"
                            f"{'' if len(near) < 2 else ' (or ' + ', '.join(near[1:]) + ')'}? The settings are "
                            "listed by `python apply.py --help` (their constants in eval.py).")
        return Settings.from_dict(constants, base=self)

    # ----- what a saved model keeps -----------------------------------------
    def model_record(self) -> Dict[str, Any]:
        """The recipe a model was trained with, saved in its file: ``{constant.lower(): value}`` of
        every setting marked ``model="read"`` or ``"recorded"``."""
        return {constant.lower(): self[constant] for constant, (_, item) in FIELDS.items() if item.metadata["model"]}

    def with_model_record(self, record: Mapping[str, Any]) -> "Settings":
        """These settings with the values a saved model's ``record`` holds for the settings a restore
        reads from a model (``model="read"``); records of earlier versions hold fewer of them."""
        read = {constant: record[key] for constant, (_, item) in FIELDS.items() if item.metadata["model"] == "read"
                for key in (constant.lower(), constant) if key in record}
        if record:  # a model saved before a setting existed was trained as that setting's model_absent says
            read.update({constant: item.metadata["model_absent"] for constant, (_, item) in FIELDS.items()
                         if item.metadata["model_absent"] is not None and constant not in read})
        return Settings.from_dict(read, base=self)

    # ----- checks -------------------------------------------------------------
    def validate(self) -> "Settings":
        """Reject settings that would fail later, with one message each naming the setting; returns self."""
        training, inference = self.training, self.inference
        if training.train_z_size % 2 == 0 or training.train_z_size < 1:
            raise UserError(f"TRAIN_Z_SIZE must be odd (the centre slice is the label), got {training.train_z_size}.")
        if not inference.orientations or not set(inference.orientations) <= set(ORIENTATION_AXES):
            raise UserError(f"ORIENTATIONS must be 'y', 'x' or 'yx', got '{inference.orientations}'.")
        check_choice("TRAIN_LATERAL_AXES", training.lateral_axes)
        check_choice("BOUNDARY_INPUT", training.boundary_input)
        if training.upscale_method not in UPSCALE_METHODS:
            # 'sdf' would blend distance maps across the channel planes of a 2D crop,
            # so training and inference would not see the same interpolation.
            raise UserError(f"UPSCALE_METHOD must be 'linear' or 'nearest', got '{training.upscale_method}'.")
        if training.num_epochs is not None and training.num_epochs < 0:
            raise UserError(f"NUM_EPOCHS must be 0 (by kind) or a positive number of epochs, got "
                            f"{training.num_epochs}.")
        if training.train_nb is not None and training.train_nb < 0:
            raise UserError(f"TRAIN_NB must be 0 (by kind) or a positive number of crops, got {training.train_nb}.")
        if training.learning_rate is not None and training.learning_rate < 0:
            raise UserError(f"LEARNING_RATE must be 0 (by kind) or positive, got {training.learning_rate}.")
        if training.crop_pool is not None:
            check_crop_pool(training.crop_pool)
        if not 0 <= inference.shape_prior < 1:
            raise UserError(f"SHAPE_PRIOR must be at least 0 and below 1 (the network's boundaries keep some weight), "
                            f"got {inference.shape_prior}.")
        if not 0 < training.val_split < 1:
            raise UserError(f"VAL_SPLIT must be between 0 and 1, got {training.val_split}.")
        if self.data.kind not in KINDS:
            raise UserError(f"KIND must be one of {', '.join(KINDS)}, got '{self.data.kind}'.")
        for constant, value in (("CHANNEL", self.data.channel), ("TIMEPOINT", self.data.timepoint)):
            if value is not None and value < 0:
                raise UserError(f"{constant} counts from 0 (the first); got {value}.")
        if training.intensity_loss not in INTENSITY_LOSSES:
            raise UserError(f"INTENSITY_LOSS must be one of {', '.join(INTENSITY_LOSSES)}, got "
                            f"'{training.intensity_loss}'.")
        if inference.channel_stride is not None and inference.channel_stride < 0:
            raise UserError(f"CHANNEL_STRIDE must be 0 (by kind) or a number of voxels, got "
                            f"{inference.channel_stride}.")
        if inference.batch_pixels < 0:
            raise UserError(f"INFERENCE_BATCH_PIXELS must be 0 (no cap) or a number of pixels, got "
                            f"{inference.batch_pixels}.")
        for constant, value, low, high in self._ranges():
            if not value >= low or (high is not None and not value <= high):  # NaN fails both
                raise UserError(f"{constant} must be at least {low}{'' if high is None else f' and at most {high}'}, "
                                f"got {value}.")
        check_choice("SKIP_MERGE", self.network.skip_merge)
        check_choice("GREY_DTYPE", inference.grey_dtype)
        check_choice("START_FROM", training.start_from)
        check_choice("NGFF_VERSION", self.large.ngff_version)
        check_choice("PRECISION", training.precision)
        return self

    def _ranges(self) -> Tuple[Tuple[str, float, float, Optional[float]], ...]:
        """``(constant, value, lowest, highest or None)`` of the numeric settings with a fixed range (both
        bounds allowed): a batch or tile size of 0 would otherwise fail only after the training."""
        training, network, inference = self.training, self.network, self.inference
        return (("TRAIN_XY_SIZE", training.train_xy_size, 1, None),
                ("BATCH_SIZE", training.batch_size, 1, None),
                ("MIN_CONTENT_RATIO", training.min_content_ratio, 0, 1),
                ("DICE_WEIGHT", training.dice_weight, 0, None),
                ("SLICE_PROFILE_FWHM", training.profile_fwhm, 0, None),
                ("BASE_FILTERS", network.base_filters, 1, None),
                ("DEPTH", network.depth, 1, None),
                ("DROPOUT_RATE", network.dropout_rate, 0, 0.99),
                ("INFERENCE_TILE_SIZE", inference.tile_size, 1, None),
                ("INFERENCE_BATCH_SIZE", inference.batch_size, 1, None),
                ("PROBABILITY_THRESHOLD", inference.probability_threshold, 0, 1),
                ("BLOCK_SIZE", self.large.block_size, 1, None),
                ("WORKERS", self.large.workers, 0, None))


def check_choice(constant: str, value: Any) -> None:
    """One ``UserError`` for a value outside the setting's choices."""
    choices = FIELDS[constant][1].metadata["choices"]
    if value not in choices:
        raise UserError(f"{constant} must be one of {', '.join(map(str, choices))}, got '{value}'.")


def check_crop_pool(crop_pool: float) -> None:
    """Raise a clear error for a ``CROP_POOL`` below 1."""
    if not crop_pool >= 1:
        raise UserError(f"CROP_POOL must be at least 1 (1 = every crop drawn is used; 0 in eval.py: by kind), "
                        f"got {crop_pool}.")


# What library functions take as their recipe: Settings, the dict view of earlier versions, or None (defaults).
SettingsLike = Union[Settings, Mapping[str, Any], None]


def as_settings(settings: SettingsLike) -> Settings:
    """``settings`` as :class:`Settings`: None gives the defaults, a dict of constant names is read
    with :meth:`Settings.from_dict` (the form earlier versions passed around)."""
    if settings is None:
        return Settings()
    return settings if isinstance(settings, Settings) else Settings.from_dict(settings)


# --------------------------------------------------------------------------- #
# The command line, generated from the fields
# --------------------------------------------------------------------------- #
def shown_default(value: Any, none: Optional[str]) -> str:
    """A default as ``--help`` prints it: what ``None`` means, switches as on/off."""
    if value is None:
        return none or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


class SwitchAction(argparse.BooleanOptionalAction):
    """``--flag`` / ``--no-flag``; the form ``--flag true|false`` of earlier versions is rewritten to
    these before parsing (:meth:`SettingsParser.parse_known_args`)."""


class SettingsParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that also takes ``--switch true/false`` (and ``--switch=false``) for its
    switches, as earlier versions did. Flags are never abbreviated: ``--factor 4`` would otherwise be read
    as ``--factor-rounding 4``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if "--factor" in message and "--factor-rounding" not in message:
            message += " (there is no --factor: the factor is the Z step over the XY pixel size, --z-step / --xy-size)"
        super().error(message)

    def parse_known_args(self, args=None, namespace=None):
        import sys

        args = list(sys.argv[1:] if args is None else args)
        switches = {option for action in self._actions if isinstance(action, SwitchAction)
                    for option in action.option_strings if not option.startswith("--no-")}
        rewritten: List[str] = []
        index = 0
        while index < len(args):
            token = args[index]
            name, equals, value = token.partition("=")
            if name in switches and equals:
                rewritten.append(name if parse_bool(value) else "--no-" + name[2:])
            elif (token in switches and index + 1 < len(args)
                  and args[index + 1].strip().lower() in BOOLEAN_WORDS):
                rewritten.append(token if parse_bool(args[index + 1]) else "--no-" + token[2:])
                index += 1
            else:
                rewritten.append(token)
            index += 1
        return super().parse_known_args(rewritten, namespace)


def _typed(constant: str) -> Callable[[str], Any]:
    item = FIELDS[constant][1]

    def parse(text: str) -> Any:
        try:
            return parse_text(constant, text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"invalid {item.metadata['metavar'] or 'value'}: '{text}'") from None
    parse.__name__ = item.metadata["metavar"] or constant.lower()
    return parse


def add_setting_argument(parser: argparse._ActionsContainer, constant: str, default: Any,
                         help: Optional[str] = None, flag: Optional[str] = None,
                         aliases: Optional[Sequence[str]] = None) -> argparse.Action:
    """One setting's flag on ``parser`` (or a group of it). The parsed value lands under ``dest =
    constant`` only when typed (``argparse.SUPPRESS``), so the caller knows what the user gave;
    ``default`` is what ``--help`` prints."""
    meta = FIELDS[constant][1].metadata
    options = [flag or meta["flag"], *(meta["aliases"] if aliases is None else aliases)]
    text = f"{help or meta['help']} (default: {shown_default(default, meta['none'])})"
    if meta["type"] is parse_bool:
        options = [option for option in options if option.startswith("--")]
        return parser.add_argument(*options, dest=constant, action=SwitchAction, default=argparse.SUPPRESS,
                                   help=text)
    # Choices are shown, not enforced by argparse: Settings.validate names the setting and its choices.
    metavar = "{" + ",".join(map(str, meta["choices"])) + "}" if meta["choices"] else meta["metavar"]
    return parser.add_argument(*options, dest=constant, metavar=metavar, type=_typed(constant),
                               default=argparse.SUPPRESS, help=text)


def add_setting_arguments(parser: argparse.ArgumentParser, defaults: Mapping[str, Any],
                          constants: Sequence[str], groups: Optional[Dict[str, argparse._ArgumentGroup]] = None
                          ) -> Dict[str, argparse._ArgumentGroup]:
    """The flags of ``constants``, each in its group (created in the order of :data:`GROUPS`;
    ``"main"`` settings go on ``parser`` itself). ``defaults[constant]`` is printed as the default."""
    groups = dict(groups or {})
    for name, description in GROUPS.items():
        if name not in groups and any(FIELDS[c][1].metadata["group"] == name for c in constants):
            groups[name] = parser.add_argument_group(name, description)
    for constant in constants:
        group = FIELDS[constant][1].metadata["group"]
        add_setting_argument(parser if group == "main" else groups[group], constant, defaults[constant])
    return groups


def typed_values(namespace: argparse.Namespace) -> Dict[str, Any]:
    """The settings typed on a command line parsed with these flags: ``{constant: value}``."""
    return {name: value for name, value in vars(namespace).items() if name in FIELDS}
