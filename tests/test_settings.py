"""The settings model (settings.py): the command lines are generated from it, the library defaults to it,
a saved model records it and a restore reads it back, and the old forms are still accepted."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import apply
import eval as eval_module
import restore
import settings as settings_module
from data import UserError
from model import AttentionResUNet, load_model, save_model
from settings import FIELDS, GROUPS, TRAINING_ONLY, Inference, Settings, Training

REPO = Path(__file__).resolve().parents[1]
APPLY = ["--input", "a.tif", "--output", "o.tif"]


def help_text(script: str) -> str:
    result = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


# --------------------------------------------------------------------------- #
# One place per setting
# --------------------------------------------------------------------------- #
def test_every_setting_is_described_once():
    for constant, (section, item) in FIELDS.items():
        meta = item.metadata
        assert meta["help"] and meta["group"] in (*GROUPS, "main"), constant
        assert (item.default is None) == (meta["none"] is not None) or item.name in ("scheduler",), constant
        assert meta["model"] in (None, "read", "recorded"), constant
    # eval.py's constants are filled from the model: the same defaults, except eval.py's simulated voxel size.
    from_constants = eval_module.default_recipe()
    assert dataclasses.replace(from_constants, voxel=Settings().voxel) == Settings()
    assert (from_constants.voxel.z_step, from_constants.voxel.xy_size) == (16.0, 2.0)
    # restore and train hold no table of their own any more.
    for stale in ("SETTINGS", "MODEL_RECIPE", "TRAINING_SETTINGS_READ_AT_INFERENCE"):
        assert not hasattr(restore, stale)


def test_library_defaults_are_the_command_line_recipe():
    """restore.train_on_stack / restore_stack / fit_on_sparse_stack default to Settings(); both command lines
    give the same Settings when no flag is typed."""
    import inspect

    import blocks
    import train

    assert apply.parse_args(APPLY).settings == dataclasses.replace(eval_module.default_recipe(),
                                                                   voxel=Settings().voxel)
    typed = vars(eval_module.build_parser(suppress_defaults=True).parse_args([]))
    assert typed == {} and Settings.from_dict(eval_module.default_settings()) == eval_module.default_recipe()
    for function in (restore.train_on_stack, restore.restore_stack, restore.restore_probabilities,
                     restore.restore_intensity, train.fit_on_sparse_stack):
        parameters = inspect.signature(function).parameters
        name = "recipe" if "recipe" in parameters else "settings"
        assert parameters[name].default is None, function  # None = Settings()
    assert blocks.BLOCK_SIZE == Settings().large.block_size
    # Masks fine-tune the phantom-trained starting model by default: 3 epochs (4 from random weights).
    assert train.training_recipe() == (Settings().training.for_kind("mask", fine_tuning=True), Settings().network)
    assert train.training_recipe()[0].num_epochs == 3
    assert train.training_recipe(start_from="scratch")[0].num_epochs == 4


def test_dict_view_round_trips_and_reads_old_sentinels():
    recipe = Settings()
    assert Settings.from_dict(recipe.as_dict()) == recipe
    assert recipe["TRAIN_NB"] == recipe.training.train_nb and recipe.get("NOT_A_SETTING", 1) == 1
    old = Settings.from_dict({"NUM_EPOCHS": 0, "LEARNING_RATE": 0.0, "CROP_POOL": 0.0, "CHANNEL_STRIDE": 0,
                              "BINARIZE_THRESHOLD": -1.0, "DEVICE": "", "SAMPLE_SHAPE": (8, 8, 8)})
    assert old == recipe  # eval.py's run constants (SAMPLE_SHAPE) are no recipe settings: ignored
    assert Settings.from_dict({"NUM_EPOCHS": 3, "BINARIZE_THRESHOLD": 0.0}).training.num_epochs == 3
    assert Settings.from_dict({"BINARIZE_THRESHOLD": 0.0}).data.binarize_threshold == 0.0
    assert Training().for_kind("intensity").num_epochs == 20 and Training(num_epochs=2).for_kind().num_epochs == 2


def test_validation_names_the_setting():
    with pytest.raises(UserError, match="TRAIN_Z_SIZE must be odd"):
        Settings().with_values(TRAIN_Z_SIZE=4).validate()
    with pytest.raises(UserError, match="SKIP_MERGE must be one of add, concat, got 'sum'"):
        Settings().with_values(SKIP_MERGE="sum").validate()
    with pytest.raises(UserError, match="CROP_POOL must be at least 1"):
        Settings().with_values(CROP_POOL=0.5).validate()
    with pytest.raises(UserError, match="NGFF_VERSION must be one of 0.4, 0.5, got '0.6'"):
        Settings().with_values(NGFF_VERSION="0.6").validate()
    assert Settings().validate() == Settings()


def test_every_range_checked_names_a_setting_the_defaults_satisfy():
    from settings import FIELDS

    for constant, value, low, high in Settings()._ranges():
        assert constant in FIELDS and low <= value and (high is None or value <= high), constant


@pytest.mark.parametrize("constant, value, message", [
    ("INFERENCE_BATCH_SIZE", 0, "INFERENCE_BATCH_SIZE must be at least 1, got 0"),
    ("BATCH_SIZE", 0, "BATCH_SIZE must be at least 1, got 0"),
    ("INFERENCE_TILE_SIZE", 0, "INFERENCE_TILE_SIZE must be at least 1, got 0"),
    ("PROBABILITY_THRESHOLD", 7, "PROBABILITY_THRESHOLD must be at least 0 and at most 1, got 7"),
    ("DROPOUT_RATE", 1.0, "DROPOUT_RATE must be at least 0 and at most 0.99, got 1.0"),
    ("DEPTH", 0, "DEPTH must be at least 1, got 0"),
])
def test_sizes_and_fractions_out_of_range_are_refused_before_any_work(constant, value, message, capsys, tmp_path):
    with pytest.raises(UserError, match=message):
        Settings().with_values(**{constant: value}).validate()
    import eval as evaluation  # the command line refuses it before reading or training anything
    flag = "--" + constant.lower().replace("_", "-")
    assert evaluation.main([flag, str(value), "--run-directory", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# The command lines, generated
# --------------------------------------------------------------------------- #
def test_apply_help_reads_top_to_bottom():
    text = help_text("apply.py")
    usage = text.split("\n\n")[0]
    assert usage.startswith("usage: apply.py --input STACK [STACK ...] --output OUT [--kind KIND] "
                            "[--model FILE | --save-model FILE]")
    headings = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert headings[-5:] == ["voxel size", "model and training", "inference", "large volumes", "advanced"]
    assert text.index("--input STACK") < text.index("--z-step") < text.index("--num-epochs") \
        < text.index("--tta-flips") < text.index("--block-size") < text.index("--train-xy-size")
    assert "VALUE" not in text and "--tta-flips, --no-tta-flips" in text
    words = " ".join(text.split())  # help texts are wrapped
    assert "--num-epochs N" in text and "passes over the training crops (default: by kind)" in words
    assert "(default: by kind: half the factor (rounded) for masks and labels, the factor for grey values)" in words
    assert "(default: value != 0)" in words
    for constant, (_, item) in FIELDS.items():  # every setting, with its help text
        assert item.metadata["flag"] in text, constant
    import re

    for measured in (r"IoU", r"\bdB\b", r"\d\.?\d*x (faster|slower)", r"\+0\.\d", r"GiB peak"):  # numbers: docs/
        assert not re.search(measured, words), measured


def test_eval_help_uses_the_same_names_and_groups():
    text = help_text("eval.py")
    headings = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert headings[-4:] == ["voxel size", "model and training", "inference", "advanced"]
    assert "--z-step FLOAT, --z-resolution FLOAT" in text and "--input PATH, --input-images-directory PATH" in text
    assert "(default: 16.0)" in text and "VALUE" not in text
    for constant, (section, item) in FIELDS.items():
        if section != "large":
            assert item.metadata["flag"] in text, constant


def test_old_flag_forms_are_still_accepted():
    parse = apply.parse_args
    old = parse(APPLY + ["--num-epochs", "0", "--crop-pool", "0", "--channel-stride", "0", "--binarize-threshold",
                         "-1", "--tta-flips", "true", "--keep-kept-slices=false", "--z-resolution", "4",
                         "--xy-resolution", "0.5", "--voxel-unit", "nm"])
    new = parse(APPLY + ["--tta-flips", "--no-keep-kept-slices", "--z-step", "4", "--xy-size", "0.5",
                         "--unit", "nm"])
    assert old.settings == new.settings
    assert new.settings.inference.tta_flips and not new.settings.inference.keep_kept_slices
    assert new.settings.voxel == settings_module.VoxelSize(4.0, 0.5, "nm")
    assert set(old.typed) >= {"NUM_EPOCHS", "TTA_FLIPS", "Z_RESOLUTION"}  # typed, though equal to the default
    assert parse(APPLY + ["--compile", "yes"]).settings.inference.compile is True
    # eval.py: apply.py's names work there too, and its own older ones.
    typed = vars(eval_module.build_parser(suppress_defaults=True).parse_args(
        ["--z-step", "8", "--xy-size", "2", "--input-images-directory", "x", "--overwrite", "true"]))
    assert typed == {"Z_RESOLUTION": 8.0, "XY_RESOLUTION": 2.0, "INPUT_IMAGES_DIRECTORY": "x", "OVERWRITE": True}
    with pytest.raises(SystemExit):
        parse(APPLY + ["--num-epochs", "many"])


def test_bench_overrides_take_old_sentinels():
    import bench

    overrides = bench.parse_overrides(["NUM_EPOCHS=0", "TTA_FLIPS=true", "SAMPLE_SHAPE=8,8,8"],
                                      eval_module.default_settings())
    assert overrides["NUM_EPOCHS"] is None and overrides["TTA_FLIPS"] is True and overrides["SAMPLE_SHAPE"] == (8, 8, 8)


# --------------------------------------------------------------------------- #
# The saved model records its recipe; a restore reads back what it needs
# --------------------------------------------------------------------------- #
def test_model_records_the_recipe_and_a_restore_reads_it_back(tmp_path):
    trained_with = Settings().with_values(TRAIN_Z_SIZE=3, TRAIN_XY_SIZE=32, ORIENTATIONS="y", TTA_FLIPS=True,
                                          CHANNEL_STRIDE=2, NUM_EPOCHS=3, PROBABILITY_THRESHOLD=0.4, PRECISION="fp32")
    path = save_model(tmp_path / "m.pt", AttentionResUNet(in_channels=3, depth=1, base_filters=4),
                      dict(restore.model_config(trained_with, 4), kind="mask"))
    model, config = load_model(path)
    # Recorded: the whole recipe, by lower-case constant name.
    assert config["num_epochs"] == 3 and config["precision"] == "fp32" and config["factor"] == 4
    assert {name.lower() for name, (_, item) in FIELDS.items() if item.metadata["model"]} <= set(config)
    # Read back by a restore: the settings marked model="read", unless typed.
    args = apply.parse_args(APPLY + ["--model", str(path), "--inference-tile-size", "64"])
    restored_with = apply.run_settings(args, config, model)
    read = [name for name, (_, item) in FIELDS.items() if item.metadata["model"] == "read"]
    assert set(read) == {"TRAIN_XY_SIZE", "TRAIN_Z_SIZE", "UPSCALE_METHOD", "INFERENCE_TILE_SIZE", "ORIENTATIONS",
                         "CHANNEL_STRIDE", "TTA_FLIPS", "KEEP_KEPT_SLICES", "PROBABILITY_THRESHOLD", "BOUNDARY_INPUT"}
    for name in read:
        expected = 64 if name == "INFERENCE_TILE_SIZE" else trained_with[name]
        assert restored_with[name] == expected, name
    # Only recorded: the training-only settings, and the arithmetic (a restore picks its own).
    assert restored_with.training.num_epochs is None and restored_with.training.precision == "auto"
    kwargs = restore.inference_kwargs(restored_with, model)
    assert kwargs["orientations"] == ("y",) and kwargs["channel_stride"] == 2 and len(kwargs["flips"]) == 4


def test_test_time_flips_are_on_by_kind_for_grey_values_and_a_typed_switch_wins():
    mask_model = AttentionResUNet(in_channels=3, depth=1, base_filters=4)
    grey_model = AttentionResUNet(in_channels=3, depth=1, base_filters=4, output="intensity")
    by_kind, off, on = Settings(), Settings().with_values(TTA_FLIPS=False), Settings().with_values(TTA_FLIPS=True)
    assert by_kind.inference.tta_flips is None
    four, none = restore.TEST_TIME_FLIPS, ((),)
    # The model's kind decides where there is a model; else the kind the caller names.
    assert restore.inference_kwargs(by_kind, grey_model)["flips"] == four
    assert restore.inference_kwargs(by_kind, mask_model, kind="intensity")["flips"] == none
    assert [restore.inference_kwargs(by_kind, kind=kind)["flips"]
            for kind in ("intensity", "dense labels", "mask", "labels")] == [four, four, none, none]
    assert restore.inference_kwargs(by_kind, mask_model, kind="dense labels")["flips"] == four
    assert restore.inference_kwargs(off, grey_model)["flips"] == none
    assert restore.inference_kwargs(on, mask_model)["flips"] == four
    # On the command line: nothing typed is "by kind"; the switch and its old spelling set it.
    assert "TTA_FLIPS" not in vars(apply.parse_args(APPLY))
    assert vars(apply.parse_args(APPLY + ["--no-tta-flips"]))["TTA_FLIPS"] is False
    assert vars(apply.parse_args(APPLY + ["--tta-flips", "true"]))["TTA_FLIPS"] is True
    assert "by kind: on for grey values and dense label images" in " ".join(help_text("apply.py").split())


def test_channel_planes_are_half_the_factor_apart_for_masks_and_labels_and_the_factor_for_grey_values():
    mask_model = AttentionResUNet(in_channels=3, depth=1, base_filters=4)
    grey_model = AttentionResUNet(in_channels=3, depth=1, base_filters=4, output="intensity")
    by_kind, typed = Settings(), Settings().with_values(CHANNEL_STRIDE=5)

    def stride(settings, factor, model=None, kind="mask"):
        return restore.Kernel(**restore.inference_kwargs(settings, model, kind)).stride_for(factor)

    # Half the factor, rounded to the nearest (halves to even), at least one voxel; any ratio (6.5625: UroCell
    # kept every 7th slice).
    assert [stride(by_kind, f) for f in (8, 4, 3, 5, 7, 6.5625, 1.57, 1)] == [4, 2, 2, 2, 4, 3, 1, 1]
    # Grey values keep the spacing of earlier versions at every factor, 2.5 included (round(2.5) = 2).
    assert [stride(by_kind, f, kind="intensity") for f in (8, 2.5, 3.5, 6.5625)] == [8, 2, 4, 7]
    assert [stride(by_kind, 8, kind=kind) for kind in ("mask", "labels", "dense labels", "intensity")] == [4, 4, 4, 8]
    # The model's output decides where there is a model, as for the flips.
    assert stride(by_kind, 8, grey_model) == 8 and stride(by_kind, 8, mask_model, kind="intensity") == 4
    # A typed stride is voxels, whatever the kind and factor; a negative one is refused, naming the fix.
    assert stride(typed, 8) == stride(typed, 3, grey_model) == 5
    with pytest.raises(UserError, match="CHANNEL_STRIDE must be 0 .by kind. or a number of voxels, got -2"):
        Settings().with_values(CHANNEL_STRIDE=-2).validate()
    # A sparse label image restores its foreground as a mask: what the plan prints for 'labels' is what runs.
    assert settings_module.STRIDE_BY_KIND["labels"] == settings_module.STRIDE_BY_KIND["mask"]
    assert settings_module.TTA_BY_KIND["labels"] == settings_module.TTA_BY_KIND["mask"]
    # The library's reference keeps the training geometry: a Kernel built by hand spaces its planes a factor apart.
    assert restore.Kernel(train_depth=3, tile_size=32).stride_for(8) == restore.channel_stride(8) == 8


def test_models_saved_by_earlier_versions_still_load(tmp_path):
    """Their config holds the ten settings of the old MODEL_RECIPE, with CHANNEL_STRIDE 0 for 'the factor'."""
    old_config = {"train_xy_size": 32, "train_z_size": 3, "upscale_method": "linear", "inference_tile_size": 128,
                  "orientations": "yx", "channel_stride": 0, "tta_flips": False, "keep_kept_slices": True,
                  "probability_threshold": 0.5, "random_state": 42, "factor": 4, "kind": "mask"}
    network = AttentionResUNet(in_channels=3, depth=1, base_filters=4)
    torch.save({"format": "axial-sr-model/1", "architecture": network.architecture, "config": old_config,
                "state_dict": network.state_dict()}, tmp_path / "old.pt")
    model, config = load_model(tmp_path / "old.pt")
    restored_with = apply.run_settings(apply.parse_args(APPLY), config, model)
    assert restored_with.inference.channel_stride is None and restored_with.inference.tile_size == 128
    assert restored_with.training.train_z_size == 3


def test_training_only_flags_come_from_the_model():
    assert set(TRAINING_ONLY) >= {"TRAIN_NB", "NUM_EPOCHS", "BASE_FILTERS", "SKIP_MERGE"}
    assert not set(TRAINING_ONLY) & {"TRAIN_XY_SIZE", "TRAIN_Z_SIZE", "UPSCALE_METHOD", "PRECISION"}
    args = apply.parse_args(APPLY + ["--num-epochs", "2", "--precision", "fp32", "--depth", "2"])
    assert apply.training_only_flags(args) == ["--num-epochs", "--depth"]


def test_restore_runs_from_settings_objects():
    """The engine takes Settings (or the old dict view) and gives the same probabilities."""
    torch.manual_seed(0)
    model = AttentionResUNet(in_channels=3, depth=1, base_filters=4).eval()
    sparse = np.zeros((4, 24, 24), bool)
    sparse[:, 6:18, 8:16] = True
    recipe = Settings(inference=Inference(tile_size=32, device="cpu")).with_values(TRAIN_Z_SIZE=3, PRECISION="fp32")
    typed, _, _ = restore.restore_probabilities(sparse, 4, recipe, model, progress=False)
    as_dict, _, _ = restore.restore_probabilities(sparse, 4, recipe.as_dict(), model, progress=False)
    np.testing.assert_array_equal(typed, as_dict)


def test_eval_constants_as_shipped_are_the_library_defaults():
    """The constants at the top of eval.py state the recipe a user edits; as shipped they equal the settings
    model's defaults, which library callers get (eval.py's simulated voxel size is its own)."""
    import dataclasses

    import eval as eval_script
    from settings import Settings

    from_constants, library = eval_script.default_recipe(), Settings()
    for group in dataclasses.fields(Settings):
        if group.name != "voxel":
            assert getattr(from_constants, group.name) == getattr(library, group.name), group.name
