"""First contact: what a user meets on the first run of apply.py / eval.py.

The recipe fitted to any stack size (restore.fit_recipe_to_stack), the kind rule
(data.kind_evidence), the plan printed before any work (--dry-run), units and
geometry (translation, nm/um, Y != X, factor 1, --model at another factor),
one-line errors, the grey-value training figure, bfloat16 under an emulated AVX2
CPU and eval.py on a small sample. Tiny stacks and cheap training throughout.
"""
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import apply
import data
import model as model_module
import restore
import train
import zarr_io
from data import (INTENSITY_FLATNESS, LABEL_FLATNESS, UserError, decide_kind, flatness, kind_evidence,
                  make_sample_intensity, make_sample_labels, make_sample_stack, read_calibration, save_stack)
from eval import default_settings
from model import AttentionResUNet, save_model
from plan import human_bytes
from settings import Settings

REPO = Path(__file__).resolve().parents[1]
# Cheap training; deliberately no --train-xy-size / --train-z-size: the recipe is fitted to the stack.
CHEAP = ["--num-epochs", "1", "--train-nb", "32", "--base-filters", "4", "--batch-size", "4"]
VOXEL = (1.0, 0.25, 0.25)  # um: factor 4


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test: measured throughputs go to a tmp folder, never to the user's cache; the tests' runs of a few
    seconds are recorded (a user's are not, plan.MIN_TIMED_S: test_short_phases_leave_no_rate)."""
    import plan

    cache = tmp_path / "cache"
    monkeypatch.setenv("AXIAL_SR_CACHE", str(cache))
    monkeypatch.setattr(plan, "MIN_TIMED_S", 0.0)
    return cache


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def kept_mask(n_kept=17, size=64, factor=4, seed=1):
    """Kept slices (every ``factor``-th) of the binary phantom, 0/255 uint8."""
    truth = make_sample_stack(((n_kept - 1) * factor + 1, size, size), seed=seed)
    return truth[::factor].astype(np.uint8) * 255


def kept_labels(n_kept=17, height=64, width=64, factor=4, seed=2):
    """Kept slices of the label phantom, as a uint8 label image."""
    ids = make_sample_labels(((n_kept - 1) * factor + 1, height, width), seed=seed)[::factor]
    assert ids.max() < 256
    return ids.astype(np.uint8)


def write_tif(path, stack, voxel=VOXEL, unit="um"):
    save_stack(path, stack, voxel, unit)
    return Path(path)


def run_apply(capsys, *args):
    """``apply.main`` in-process: (exit status, stdout, stderr)."""
    status = apply.main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def plan_of(out):
    """The plan's ``name: value`` lines as a dict (first occurrence of each name)."""
    plan = {}
    for line in out.splitlines():
        name, sep, value = line.partition(": ")
        if sep and name not in plan:
            plan[name] = value
    return plan


def numbers(text):
    return [float(v) for v in re.findall(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text)]


def assert_one_error_line(err, *fragments):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def files_under(folder):
    """Every path under ``folder`` with its modification time (to prove nothing was written)."""
    return {str(p): p.stat().st_mtime_ns for p in Path(folder).rglob("*")}


# --------------------------------------------------------------------------- #
# 1. Any stack size: the recipe is fitted to the stack
# --------------------------------------------------------------------------- #
def test_default_phantom_recipe_is_unchanged():
    """eval.py's default run (128^3 phantom, factor 16/2 = 8: 16 kept slices) keeps its recipe."""
    settings = default_settings()
    assert settings["Z_RESOLUTION"] / settings["XY_RESOLUTION"] == 8 and settings["SAMPLE_SHAPE"] == (128,) * 3
    fitted, notes = restore.fit_recipe_to_stack(settings, (16, 128, 128), 8)
    assert notes == []
    assert {k: v for k, v in fitted.items() if k != restore.FITTED_TO} == settings
    assert fitted[restore.FITTED_TO] == [16, 128, 128, 8]  # marked, so that training does not fit it again
    assert (fitted["TRAIN_XY_SIZE"], fitted["TRAIN_Z_SIZE"], fitted["TRAIN_NB"]) == (128, 5, None)  # by kind
    assert restore.training_kwargs(fitted, "mask")["train_nb"] == 720


@pytest.mark.parametrize("shape, factor, expected", [
    # (kept slices, H, W), factor -> (TRAIN_XY_SIZE, TRAIN_Z_SIZE, TRAIN_NB) with DEPTH 3 (multiples of 8)
    ((17, 64, 64), 4, (64, 5, 416)),     # 13 z positions x 1 x 1 x 2 orientations x 4 phases = 104 distinct
    ((13, 120, 122), 4, (120, 5, 288)),  # 9 x 1 x 1 x 2 x 4 = 72 distinct
    ((3, 50, 70), 4, (48, 3, 96)),       # 1 x 1 x 3 x 2 x 4 = 24 distinct
    ((2, 16, 16), 4, (16, 1, 64)),       # the smallest stack: 2 kept slices -> 1 channel
    ((4, 40, 200), 8, (40, 3, 720)),     # 2 x 1 x 21 x 2 x 8 = 672 distinct: 720 crops are fine
])
def test_recipe_fitted_to_small_stacks(shape, factor, expected):
    settings = default_settings()
    before = dict(settings)
    fitted, notes = restore.fit_recipe_to_stack(settings, shape, factor)
    assert settings == before  # the caller's dict is not changed
    # TRAIN_NB stays "by kind" (None); the training caps the kind's number (train.training_recipe).
    crops = restore.training_kwargs(fitted, "mask")["train_nb"]
    assert (fitted["TRAIN_XY_SIZE"], fitted["TRAIN_Z_SIZE"], crops) == expected and fitted["TRAIN_NB"] is None
    # Only the two crop sizes may change.
    assert {k for k in settings if fitted[k] != settings[k]} <= {"TRAIN_XY_SIZE", "TRAIN_Z_SIZE"}
    # The rules, stated independently.
    n_kept, height, width = shape
    assert fitted["TRAIN_XY_SIZE"] == min(128, min(height, width) // 8 * 8)
    assert fitted["TRAIN_Z_SIZE"] % 2 == 1 and fitted["TRAIN_Z_SIZE"] <= n_kept
    assert fitted["TRAIN_Z_SIZE"] == min(5, n_kept if n_kept % 2 else n_kept - 1)
    crop = (fitted["TRAIN_Z_SIZE"], fitted["TRAIN_XY_SIZE"], fitted["TRAIN_XY_SIZE"])
    distinct = train.distinct_crops(shape, crop, factor, "yx", 8)
    assert crops == min(720, train.DRAWS_PER_DISTINCT_CROP * distinct)
    # The boundaries of a dense label image train on 4 x the crops, capped the same way.
    assert restore.training_kwargs(fitted, "dense labels")["train_nb"] == min(2880, 4 * distinct)
    train.check_crop_size(shape, crop, factor)  # the fitted crop can be cut
    # One note per setting changed, naming old and new values.
    new_values = {"TRAIN_XY_SIZE": fitted["TRAIN_XY_SIZE"], "TRAIN_Z_SIZE": fitted["TRAIN_Z_SIZE"], "TRAIN_NB": crops}
    old_values = {"TRAIN_XY_SIZE": 128, "TRAIN_Z_SIZE": 5, "TRAIN_NB": 720}
    for name in new_values:
        changed = [n for n in notes if n.startswith(name + " ")]
        if new_values[name] != old_values[name]:
            assert len(changed) == 1 and f"{old_values[name]} -> {new_values[name]}" in changed[0], notes
        else:
            assert changed == [], notes


def test_dense_label_crops_by_kind_and_typed():
    """TRAIN_NB "by kind": 720 crops for masks and grey values, 2880 for the boundaries of a dense label
    image (restore.training_kind), at most 4 draws per distinct crop of a small stack; a number typed or
    set in eval.py is used for every kind (capped only when not typed)."""
    settings = default_settings()
    big, _ = restore.fit_recipe_to_stack(settings, (17, 256, 256), 4, kind="dense labels")
    assert [restore.training_kwargs(big, kind)["train_nb"] for kind in ("mask", "dense labels", "intensity")] == \
        [720, 2880, 720]
    assert restore.training_kind("labels", dense_labels=True) == "dense labels"
    assert restore.training_kind("labels") == restore.training_kind("mask") == "mask"
    # 72 distinct crops: both kinds capped at 288, and the note says so for the kind fitted for.
    small, notes = restore.fit_recipe_to_stack(settings, (13, 120, 122), 4, kind="dense labels")
    assert restore.training_kwargs(small, "dense labels")["train_nb"] == 288 and "TRAIN_NB 2880 -> 288" in notes[-1]
    # 1008 distinct crops: a mask keeps 720, a dense label image gets 4032 -> capped at 2880, not changed.
    middle, notes = restore.fit_recipe_to_stack(settings, (13, 100, 200), 4, kind="mask")
    assert (restore.training_kwargs(middle, "mask")["train_nb"], restore.training_kwargs(middle, "dense labels")[
        "train_nb"]) == (720, 2880) and not any(n.startswith("TRAIN_NB") for n in notes)
    # A number set in eval.py (not typed) is capped for every kind; a typed one is kept for every kind.
    fixed, _ = restore.fit_recipe_to_stack(dict(settings, TRAIN_NB=600), (13, 120, 122), 4)
    assert restore.training_kwargs(fixed, "dense labels")["train_nb"] == 288
    typed, _ = restore.fit_recipe_to_stack(dict(settings, TRAIN_NB=600), (13, 120, 122), 4, typed=["TRAIN_NB"])
    assert restore.training_kwargs(typed, "dense labels")["train_nb"] == 600
    # A typed 0 is "by kind": capped, and the plan says why.
    by_kind, notes = restore.fit_recipe_to_stack(dict(settings, TRAIN_NB=0), (13, 120, 122), 4, typed=["TRAIN_NB"])
    assert restore.training_kwargs(by_kind, "mask")["train_nb"] == 288 and "TRAIN_NB 720 -> 288" in notes[-1]
    with pytest.raises(ValueError, match="No training recipe for kind 'auto'"):
        restore.training_kwargs(settings, "auto")
    with pytest.raises(UserError, match="TRAIN_NB must be 0 \\(by kind\\) or a positive number of crops"):
        Settings.from_dict(dict(settings, TRAIN_NB=-5)).validate()


def test_recipe_fitting_follows_the_network_depth():
    """Crop edges are multiples of 2 ** DEPTH."""
    settings = default_settings()
    assert restore.fit_recipe_to_stack(settings, (5, 54, 54), 4)[0]["TRAIN_XY_SIZE"] == 48
    assert restore.fit_recipe_to_stack(dict(settings, DEPTH=2), (5, 54, 54), 4)[0]["TRAIN_XY_SIZE"] == 52
    assert train.network_multiple(3) == 8 and train.largest_crop_edge(54, 60, 2) == 52


def test_typed_settings_are_never_changed():
    settings = default_settings()
    # TRAIN_NB typed: kept, although the stack offers fewer distinct crops.
    fitted, notes = restore.fit_recipe_to_stack(dict(settings, TRAIN_NB=720), (17, 64, 64), 4, typed=["TRAIN_NB"])
    assert fitted["TRAIN_NB"] == 720 and not any(n.startswith("TRAIN_NB") for n in notes)
    assert fitted["TRAIN_XY_SIZE"] == 64  # the others are still fitted
    # TRAIN_XY_SIZE typed and fitting: kept; TRAIN_NB is then counted with that crop.
    fitted, notes = restore.fit_recipe_to_stack(dict(settings, TRAIN_XY_SIZE=32), (17, 64, 64), 4,
                                                typed=["TRAIN_XY_SIZE"])
    assert fitted["TRAIN_XY_SIZE"] == 32
    assert restore.training_kwargs(fitted, "mask")["train_nb"] == min(720, 4 * train.distinct_crops(
        (17, 64, 64), (5, 32, 32), 4, "yx", 8))
    # Typed values that do not fit: a UserError naming the setting, never a silent change.
    with pytest.raises(UserError, match=r"TRAIN_XY_SIZE=128x128 is larger than the stack's slices \(64x64\)"):
        restore.fit_recipe_to_stack(settings, (17, 64, 64), 4, typed=["TRAIN_XY_SIZE"])
    with pytest.raises(UserError, match=r"TRAIN_Z_SIZE=5 is larger than the 3 slices kept at factor 4"):
        restore.fit_recipe_to_stack(settings, (3, 64, 64), 4, typed=["TRAIN_Z_SIZE"])


def test_smallest_crop_edge():
    assert train.smallest_crop_edge(4, 3) == 16  # 2 x 2 bottleneck at depth 3
    assert train.smallest_crop_edge(8, 3) == 16
    assert train.smallest_crop_edge(16, 3) == 32  # two kept rows at factor 16
    assert train.smallest_crop_edge(20, 3) == 40
    assert train.smallest_crop_edge(5, 2) == 12  # 10 rounded up to a multiple of 4


@pytest.mark.parametrize("shape, factor, minimum", [
    ((1, 64, 64), 4, 16), ((5, 15, 64), 4, 16), ((5, 64, 15), 4, 16), ((2, 31, 64), 16, 32)])
def test_stack_below_the_smallest_is_one_error_naming_the_minimum(shape, factor, minimum):
    with pytest.raises(UserError) as raised:
        restore.fit_recipe_to_stack(default_settings(), shape, factor)
    message = str(raised.value)
    assert f"{shape[0]} kept slices of {shape[1]} x {shape[2]} pixels is too small to train on at factor {factor}" \
        in message
    assert f"at least 2 slices of {minimum} x {minimum} pixels" in message and "--model" in message
    # The minimum itself trains.
    restore.fit_recipe_to_stack(default_settings(), (2, minimum, minimum), factor)


def test_apply_restores_a_small_mask_without_crop_flags(tmp_path, capsys, private_cache):
    sparse = kept_mask()
    source = write_tif(tmp_path / "mask.tif", sparse)
    out = tmp_path / "restored.tif"
    status, printed, err = run_apply(capsys, "--input", source, "--output", out, *CHEAP)
    assert status == 0, err
    plan = plan_of(printed)
    # CHEAP's narrow network cannot start from the default network's starting model.
    assert plan["training"] == ("32 crops of 5 x 64 x 64 (3.0 MiB in memory), 1 epochs, from random weights (the starting model has "
                                "base_filters 16, not 4)")
    assert "recipe fitted to the stack: TRAIN_XY_SIZE 128 -> 64: the slices are 64 x 64 pixels" in printed
    restored = tifffile.imread(out)
    assert restored.shape == (65, 64, 64) and restored.dtype == np.uint8
    assert set(np.unique(restored)) <= {0, 255}
    np.testing.assert_array_equal(restored[::4], sparse)  # kept slices verbatim at 0, 4, 8, ...
    assert read_calibration(out) == ((0.25, 0.25, 0.25), "um")
    assert (private_cache / "throughput.json").is_file()  # measured into the tmp cache


def test_apply_restores_a_small_uint8_label_image(tmp_path, capsys):
    ids = kept_labels(13, 120, 122)
    source = write_tif(tmp_path / "cells.tif", ids)
    out = tmp_path / "cells_restored.tif"
    status, printed, err = run_apply(capsys, "--input", source, "--output", out, "--kind", "labels", *CHEAP)
    assert status == 0, err
    assert plan_of(printed)["kind"] == "labels (given as --kind)"
    assert "recipe fitted to the stack: TRAIN_XY_SIZE 128 -> 120" in printed
    restored = tifffile.imread(out)
    assert restored.shape == (49, 120, 122)
    assert set(np.unique(restored)) <= set(np.unique(ids))  # no id the input does not hold
    assert len(np.unique(restored)) > 2
    np.testing.assert_array_equal(restored[::4], ids)
    assert read_calibration(out) == ((0.25, 0.25, 0.25), "um")


def test_apply_refuses_a_stack_too_small_to_train_on(tmp_path, capsys):
    source = write_tif(tmp_path / "tiny.tif", kept_mask(n_kept=3, size=12))
    out = tmp_path / "o.tif"
    status, printed, err = run_apply(capsys, "--input", source, "--output", out, *CHEAP)
    assert status == 2
    assert_one_error_line(err, "too small to train on at factor 4", "at least 2 slices of 16 x 16 pixels")
    assert not out.exists() and "Epoch" not in printed


def test_typed_train_nb_reaches_the_training(tmp_path, capsys, monkeypatch):
    """apply.py keeps a typed --train-nb (the plan says so); the training must then draw that many crops."""
    source = write_tif(tmp_path / "mask.tif", kept_mask())
    seen = {}

    class Stop(Exception):
        pass

    def spy(sparse, factor, recipe=None, **kwargs):
        seen["recipe"] = recipe
        raise Stop  # no training needed: what it was asked to do is the point

    monkeypatch.setattr(train, "fit_on_sparse_stack", spy)
    with pytest.raises(Stop):
        apply.main(["--input", str(source), "--output", str(tmp_path / "o.tif"), "--train-nb", "600",
                    "--num-epochs", "1", "--base-filters", "4"])
    assert plan_of(capsys.readouterr().out)["training"].startswith("600 crops of 5 x 64 x 64 (56.2 MiB in memory), 1 epochs, from ")
    assert seen["recipe"].training.train_nb == 600  # is 416 (= 4 x 104 distinct crops): the typed value was changed


# --------------------------------------------------------------------------- #
# 2. The kind rule
# --------------------------------------------------------------------------- #
def ambiguous_ids():
    """Integer ids in pairs along X, constant along Y: 95/126 = 0.754 of neighbour pairs equal."""
    row = np.repeat(np.arange(1, 33), 2)  # 1 1 2 2 ... 32 32
    return np.tile(row, (2, 64, 1)).astype(np.uint8)


def test_flatness():
    assert flatness(np.full((2, 16, 16), 7, np.uint16)) == 1.0  # one constant block
    touching = np.kron(np.arange(1, 5).reshape(2, 2), np.ones((8, 8), np.uint8))
    padded = np.zeros((20, 20), np.uint8)
    padded[1:9, 1:9], padded[11:19, 11:19] = 3, 9  # constant blocks apart: no pair of two objects
    assert flatness(padded) == 1.0
    assert flatness(np.zeros((8, 8), np.uint8)) == 1.0  # no pair of object pixels at all
    # 4 touching blocks of 8 x 8: per direction 16 lines of 15 pairs, 16 of them across a border.
    equal = 2 * (16 * 15 - 16)
    assert flatness(touching) == pytest.approx(equal / (2 * 16 * 15))
    assert flatness(np.indices((8, 8)).sum(axis=0) % 2 + 1) == 0.0  # checkerboard of 1 and 2
    assert flatness(ambiguous_ids()) == pytest.approx(95 / 126)


def test_kind_evidence_and_decide_kind():
    rng = np.random.default_rng(0)
    mask255 = kept_mask(n_kept=3, size=32)
    assert kind_evidence(mask255)[0] == "mask" and kind_evidence(mask255)[1] == "0/255 values"
    assert kind_evidence((mask255 > 0).astype(np.uint8)) == ("mask", "0/1 values")
    assert kind_evidence(mask255 > 0)[0] == "mask"
    labels = make_sample_labels((9, 64, 64), seed=0).astype(np.uint8)
    assert len(np.unique(labels)) > 2
    kind, reason = kind_evidence(labels)
    assert kind == "labels" and "piecewise constant" in reason
    grey = make_sample_intensity((9, 64, 64), seed=0)
    kind, reason = kind_evidence(grey)
    assert kind == "intensity" and "noise or texture" in reason
    floats = rng.random((3, 16, 16)).astype(np.float32) * 10
    assert kind_evidence(floats) == ("intensity", "non-integer values")
    for stack, kind in ((mask255, "mask"), (labels, "labels"), (grey, "intensity"), (floats, "intensity")):
        assert decide_kind(stack) == kind
    # In between the two thresholds: no guess, one error asking for --kind.
    ambiguous = ambiguous_ids()
    assert INTENSITY_FLATNESS < flatness(ambiguous) < LABEL_FLATNESS
    assert kind_evidence(ambiguous)[0] is None
    with pytest.raises(UserError, match=r"--kind labels or --kind intensity") as raised:
        decide_kind(ambiguous, "auto", "'amb.tif'")
    assert "'amb.tif'" in str(raised.value) and "75%" in str(raised.value)
    # A kind given is used as given.
    assert decide_kind(ambiguous, "labels") == "labels" and decide_kind(grey, "mask") == "mask"
    with pytest.raises(UserError, match="--kind must be one of"):
        decide_kind(grey, "grey")


def test_photon_counts_of_a_dim_image_are_not_taken_for_a_label_image():
    """Poisson counts at a mean of 0.05 photons per pixel (0, and now and then 1, 2 or 3, alone): their few
    neighbour pairs are mostly 1 beside 1, piecewise constant by flatness, but they form no objects. The rule
    asks for --kind; the objects of a label image, even small ones, are regions."""
    from kinds import LABEL_REGION_SHARE, region_share

    counts = np.random.default_rng(3).poisson(0.05, (8, 96, 96)).astype(np.uint16)
    assert flatness(counts) >= LABEL_FLATNESS and region_share(counts) < LABEL_REGION_SHARE
    kind, reason = kind_evidence(counts)
    assert kind is None and "isolated" in reason
    with pytest.raises(UserError, match=r"--kind labels or --kind intensity"):
        decide_kind(counts)
    small_objects = np.zeros((8, 96, 96), np.uint16)  # 2 x 2 nuclei-sized spots, each its own id
    for index, (y, x) in enumerate(np.random.default_rng(4).integers(0, 94, (40, 2))):
        small_objects[index % 8, y:y + 2, x:x + 2] = index + 1
    assert region_share(small_objects) == 1.0 and kind_evidence(small_objects)[0] == "labels"


# --------------------------------------------------------------------------- #
# 3. --dry-run
# --------------------------------------------------------------------------- #
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    source = write_tif(tmp_path / "cells.tif", kept_labels())
    out = tmp_path / "out.tif"
    before = files_under(tmp_path)
    status, printed, err = run_apply(capsys, "--input", source, "--output", out, "--dry-run")
    assert status == 0, err
    assert err == ""
    assert files_under(tmp_path) == before and not out.exists()  # not even the cache folder
    plan = plan_of(printed)
    assert re.fullmatch(r"labels \(piecewise constant: .+\)", plan["kind"]), plan["kind"]
    assert plan["factor"] == "4 from Z 1 um, XY 0.25 um (from the file)"
    assert plan["input shape"] == "17 x 64 x 64 (Z, Y, X), uint8"
    assert plan["input voxel size"] == "1 x 0.25 x 0.25 um"
    assert plan["output shape"] == "65 x 64 x 64 (Z, Y, X)"
    assert plan["output voxel size"] == "0.25 x 0.25 x 0.25 um"
    assert plan["translation"] == "0 x 0 x 0 um"
    assert re.fullmatch(r"\d+(\.\d)? (B|KiB|MiB|GiB) \(uncompressed\)", plan["output bytes"])
    assert re.fullmatch(r"about \d+\.\d (MiB|GiB) \(estimate\)", plan["memory"])
    assert plan["training"] == ("416 crops of 5 x 64 x 64 (39.0 MiB in memory), 3 epochs, from the phantom-trained starting model "
                                "(phantom-mask.pt), fine-tuned")
    assert plan["test-time flips"] == ("off (by kind; --tta-flips averages four flipped passes, about 4x the "
                                       "restore time)")
    assert plan["expected time"].startswith("not known yet")
    assert printed.strip().splitlines()[-1].startswith("dry run:")
    assert "Epoch" not in printed


def test_dry_run_ignores_an_existing_output(tmp_path, capsys):
    source = write_tif(tmp_path / "mask.tif", kept_mask())
    out = tmp_path / "out.tif"
    out.write_bytes(b"keep me")
    status, printed, err = run_apply(capsys, "--input", source, "--output", out, "--dry-run")
    assert status == 0, err
    assert out.read_bytes() == b"keep me"
    assert f"note: Output exists: {out}. Choose another --output or pass --overwrite." in printed  # as the run says


@pytest.mark.parametrize("make, kind, reason", [
    (lambda: kept_mask(), "mask", "(0/255 values)"),
    (lambda: kept_labels(), "labels", "(piecewise constant:"),
    (lambda: make_sample_intensity((17, 64, 64), seed=1), "intensity", "(noise or texture:"),
])
def test_dry_run_tells_the_kind_without_kind_flag(tmp_path, capsys, make, kind, reason):
    stack = make()
    assert stack.dtype == np.uint8
    source = write_tif(tmp_path / "in.tif", stack)
    status, printed, err = run_apply(capsys, "--input", source, "--output", tmp_path / "o.tif", "--dry-run")
    assert status == 0, err
    assert plan_of(printed)["kind"].startswith(f"{kind} {reason}")
    # Test-time flips by kind (settings.TTA_BY_KIND): on for grey values (and dense label images), off for masks and
    # sparse label images (this labels sample).
    assert plan_of(printed)["test-time flips"].startswith("on (by kind" if kind == "intensity" else "off (by kind")


def test_dry_run_of_an_ambiguous_stack_asks_for_kind(tmp_path, capsys):
    source = write_tif(tmp_path / "amb.tif", np.repeat(ambiguous_ids(), 2, axis=0))
    status, printed, err = run_apply(capsys, "--input", source, "--output", tmp_path / "o.tif", "--dry-run")
    assert status == 2
    assert_one_error_line(err, "--kind labels or --kind intensity", "amb.tif")


@pytest.mark.parametrize("cache_text", ["[]", "not json", '{"key": 3}'])
def test_a_damaged_throughput_cache_is_an_empty_one(tmp_path, capsys, private_cache, cache_text):
    private_cache.mkdir(parents=True)
    (private_cache / "throughput.json").write_text(cache_text)
    source = write_tif(tmp_path / "mask.tif", kept_mask())
    status, printed, err = run_apply(capsys, "--input", source, "--output", tmp_path / "never.tif", "--dry-run")
    assert status == 0, err
    assert plan_of(printed)["expected time"].startswith("not known yet")


def test_the_expected_time_uses_the_median_of_the_last_runs(private_cache):
    """One run slowed 25 times (another job on the machine) moves the recorded rate only to the median; a
    single number, as earlier versions kept it, counts as one run; the last THROUGHPUT_RUNS runs are kept."""
    from types import SimpleNamespace

    from plan import THROUGHPUT_RUNS, record_throughput, recorded_throughput

    plan = SimpleNamespace(factor=4, kind="mask", settings={"DEVICE": "cpu"}, output_voxels=1000, trained=True,
                           network_work=lambda: 2, training_crop_pixels=lambda: 100_000,
                           network_shape=lambda: (16, 3))
    private_cache.mkdir(parents=True)
    for train_s in (10.0, 10.0, 250.0, 10.0):
        record_throughput(plan, train_s, restore_s=1.0)
    assert recorded_throughput("mask", "cpu") == {"train_pixels_per_s": 10_000.0, "restore_voxel_passes_per_s": 2000.0}
    for _ in range(THROUGHPUT_RUNS):
        record_throughput(plan, 20.0, restore_s=1.0)
    table = json.loads((private_cache / "throughput.json").read_text())
    (runs,) = table.values()
    assert runs["train_pixels_per_s"] == [5000.0] * THROUGHPUT_RUNS
    (key,) = table
    (private_cache / "throughput.json").write_text(json.dumps({key: {"train_pixels_per_s": 7.0,
                                                                     "restore_voxel_passes_per_s": "fast"}}))
    assert recorded_throughput("mask", "cpu") == {"train_pixels_per_s": 7.0}


def test_a_narrower_network_or_another_arithmetic_keeps_its_rates_apart(private_cache, monkeypatch):
    """A network of 4 filters trains about ten times faster than the default 16: its rates are kept under its own
    key, so that a quick test run with --base-filters 4 does not make a default plan's expected time too short."""
    from types import SimpleNamespace

    from plan import record_throughput, recorded_throughput

    narrow = SimpleNamespace(factor=4, kind="mask", settings={"DEVICE": "cpu"}, output_voxels=1000, trained=True,
                             network_work=lambda: 2, training_crop_pixels=lambda: 100_000,
                             network_shape=lambda: (4, 3))
    record_throughput(narrow, 20.0, restore_s=20.0)
    assert recorded_throughput("mask", "cpu") is None
    assert recorded_throughput("mask", "cpu", (4, 3)) == {"train_pixels_per_s": 5000.0,
                                                          "restore_voxel_passes_per_s": 100.0}
    # bfloat16 runs 1.4-2.5x faster or slower than float32 by CPU: each arithmetic keeps its own rates.
    in_bf16 = SimpleNamespace(**dict(vars(narrow), settings={"DEVICE": "cpu", "PRECISION": "bf16"},
                                     network_shape=lambda: (16, 3)))
    record_throughput(in_bf16, 10.0, restore_s=20.0)
    assert recorded_throughput("mask", "cpu", (16, 3), "fp32") is None
    assert recorded_throughput("mask", "cpu", (16, 3), "bf16") == {"train_pixels_per_s": 10_000.0,
                                                                   "restore_voxel_passes_per_s": 100.0}
    # 'auto' reads the rates of the arithmetic it resolves to on this CPU.
    monkeypatch.setattr(model_module, "cpu_prefers_bf16", lambda: True)
    assert recorded_throughput("mask", "cpu", (16, 3), "auto") == recorded_throughput("mask", "cpu", (16, 3), "bf16")
    monkeypatch.setattr(model_module, "cpu_prefers_bf16", lambda: False)
    assert recorded_throughput("mask", "cpu", (16, 3), "auto") is None


def test_the_memory_estimate_counts_the_training(tmp_path, capsys):
    """A run that trains holds its samples (crops x (planes + 1) x crop pixels, float32) beside the stack: ten
    times the crops raise the plan's memory by what their samples take."""
    source = write_tif(tmp_path / "mask.tif", kept_mask())

    def memory_mib(*flags):
        status, printed, err = run_apply(capsys, "--input", source, "--output", tmp_path / "o.tif", "--dry-run", *flags)
        assert status == 0, err
        return float(re.match(r"about ([\d.]+) MiB", plan_of(printed)["memory"]).group(1))

    samples_mib = (320 - 32) * (5 + 1) * 64 * 64 * 4 / 2**20  # crops fitted to the 64 px slices, 5 planes
    assert memory_mib("--train-nb", "320") - memory_mib("--train-nb", "32") == pytest.approx(samples_mib, abs=0.2)


def test_a_block_wise_plan_counts_the_process_that_trains(tmp_path, capsys):
    """Block by block on workers, the plan gives a worker's memory and, apart, this process's: it holds the input
    file and trains, so more crops raise its figure and not the worker's. With the blocks in this process, one
    figure covers both."""
    source = write_tif(tmp_path / "mask.tif", kept_mask())

    def memory_mib(*flags):
        status, printed, err = run_apply(capsys, "--input", source, "--output", tmp_path / "o.ome.zarr", "--dry-run",
                                         "--block-size", "32", *flags)
        assert status == 0, err
        plan = plan_of(printed)
        return {name: float(re.match(r"about ([\d.]+) MiB", plan[name]).group(1)) for name in plan
                if name.startswith("memory")}

    samples_mib = (320 - 32) * (5 + 1) * 64 * 64 * 4 / 2**20
    few, many = memory_mib("--workers", "2", "--train-nb", "32"), memory_mib("--workers", "2", "--train-nb", "320")
    assert set(few) == {"memory per worker", "memory of this process"}
    assert few["memory per worker"] == many["memory per worker"]
    assert many["memory of this process"] - few["memory of this process"] == pytest.approx(samples_mib, abs=0.2)
    in_process = memory_mib("--train-nb", "320")
    assert set(in_process) == {"memory"} and in_process["memory"] == many["memory of this process"]


def test_short_phases_leave_no_rate(private_cache, monkeypatch):
    """A training or restore of a few seconds is mostly fixed costs: its rate would predict a full run several
    times too long, so it is not kept."""
    from types import SimpleNamespace

    import plan as plan_module
    from plan import record_throughput, recorded_throughput

    monkeypatch.setattr(plan_module, "MIN_TIMED_S", 10.0)
    plan = SimpleNamespace(factor=4, kind="mask", settings={"DEVICE": "cpu"}, output_voxels=1000, trained=True,
                           network_work=lambda: 2, training_crop_pixels=lambda: 100_000,
                           network_shape=lambda: (16, 3))
    record_throughput(plan, 9.0, restore_s=2.0)
    assert recorded_throughput("mask", "cpu") is None and not (private_cache / "throughput.json").exists()
    record_throughput(plan, 20.0, restore_s=2.0)
    assert recorded_throughput("mask", "cpu") == {"train_pixels_per_s": 5000.0}
    record_throughput(plan, 5.0, restore_s=10.0)
    assert recorded_throughput("mask", "cpu") == {"train_pixels_per_s": 5000.0, "restore_voxel_passes_per_s": 200.0}


def test_dry_run_after_a_run_gives_the_expected_time(tmp_path, capsys, private_cache):
    source = write_tif(tmp_path / "mask.tif", kept_mask())
    dry = ["--input", source, "--output", tmp_path / "never.tif", "--dry-run"]
    status, printed, _ = run_apply(capsys, *dry)
    assert status == 0 and plan_of(printed)["expected time"].startswith("not known yet")
    status, _, err = run_apply(capsys, "--input", source, "--output", tmp_path / "o.tif", *CHEAP)
    assert status == 0, err
    table = json.loads((private_cache / "throughput.json").read_text())
    (runs,) = table.values()  # one run of each rate kept, so far
    rates = {name: values[0] for name, values in runs.items()}
    assert rates["train_pixels_per_s"] > 0 and rates["restore_voxel_passes_per_s"] > 0
    status, printed, _ = run_apply(capsys, *dry)  # the run's narrow network says nothing of the default one's time
    assert status == 0 and plan_of(printed)["expected time"].startswith("not known yet")
    dry.extend(["--base-filters", "4"])
    status, printed, _ = run_apply(capsys, *dry)
    assert status == 0
    match = re.fullmatch(r"about (\d+) s on .+ \(from earlier runs here\)", plan_of(printed)["expected time"])
    assert match, plan_of(printed)["expected time"]
    # The estimate is the plan's work at the measured rates (416 crops of 64 x 64, 4 epochs from random weights, as
    # the starting model has 16 filters; 65 x 64 x 64 voxels, two orientations and no flips for a mask).
    assert plan_of(printed)["training"].startswith("416 crops of 5 x 64 x 64")
    expected = 416 * 64 * 64 * 4 / rates["train_pixels_per_s"] + 65 * 64 * 64 * 2 / rates["restore_voxel_passes_per_s"]
    # A restore rate is per network pass: with test-time flips the same plan expects four times the restore.
    status, printed, _ = run_apply(capsys, *dry, "--tta-flips")
    flipped = re.fullmatch(r"about (\d+) s on .+", plan_of(printed)["expected time"])
    assert status == 0 and int(flipped.group(1)) == round(expected + 3 * 65 * 64 * 64 * 2
                                                          / rates["restore_voxel_passes_per_s"])
    assert int(match.group(1)) == round(expected)
    assert not (tmp_path / "never.tif").exists()
    # Block by block, 32-px blocks of this 64-px stack each compute the planes' one tile: twice the restore's work.
    status, printed, _ = run_apply(capsys, "--input", source, "--output", tmp_path / "never.ome.zarr", "--block-size",
                                   "32", "--dry-run", "--base-filters", "4")
    blockwise = re.fullmatch(r"about (\d+) s on .+", plan_of(printed)["expected time"])
    assert status == 0 and int(blockwise.group(1)) == round(expected + 65 * 64 * 64 * 2
                                                            / rates["restore_voxel_passes_per_s"])
    assert plan_of(printed)["block work"].startswith("2.0x the network work of the same restore in memory")
    status, printed, _ = run_apply(capsys, *dry)
    assert "block work" not in plan_of(printed)


def test_plan_output_bytes_of_a_uint8_label_image(tmp_path, capsys):
    ids = kept_labels()
    source = write_tif(tmp_path / "cells.tif", ids)
    out = tmp_path / "o.tif"
    status, printed, err = run_apply(capsys, "--input", source, "--output", out, "--kind", "labels", *CHEAP)
    assert status == 0, err
    written = tifffile.imread(out)
    assert written.dtype == np.uint16
    assert plan_of(printed)["output bytes"] == f"{human_bytes(written.nbytes)} (uncompressed)"


# --------------------------------------------------------------------------- #
# 4. Units and geometry
# --------------------------------------------------------------------------- #
def zarr_input(path, stack, voxel=VOXEL, unit="micrometer", translation=(10.0, 20.0, 30.0)):
    layout = zarr_io.create_output(path, stack.shape, voxel, unit, translation_zyx=translation, pyramid=False)
    layout.image.write((slice(None),) * 3, stack)
    return Path(path)


def test_zarr_translation_is_given_in_the_unit_asked_for(tmp_path, capsys):
    source = zarr_input(tmp_path / "in.ome.zarr", kept_mask())
    image = zarr_io.open_image(source)
    assert image.unit == "um" and image.translation_zyx == (10.0, 20.0, 30.0)
    status, printed, err = run_apply(capsys, "--input", source, "--output", tmp_path / "o.ome.zarr", "--dry-run")
    assert status == 0, err
    assert plan_of(printed)["translation"] == "10 x 20 x 30 um"
    status, printed, err = run_apply(capsys, "--input", source, "--output", tmp_path / "o.ome.zarr", "--dry-run",
                                     "--unit", "nm")
    assert status == 0, err
    plan = plan_of(printed)
    assert plan["translation"].endswith(" nm") and numbers(plan["translation"]) == [10000.0, 20000.0, 30000.0]
    assert plan["input voxel size"] == "1000 x 250 x 250 nm"
    assert plan["output voxel size"] == "250 x 250 x 250 nm"
    assert plan["factor"] == "4 from Z 1000 nm, XY 250 nm (from the file)"
    assert not (tmp_path / "o.ome.zarr").exists()


def test_zarr_input_restored_in_nm(tmp_path, capsys):
    sparse = kept_mask()
    source = zarr_input(tmp_path / "in.ome.zarr", sparse)
    out = tmp_path / "o.tif"
    status, printed, err = run_apply(capsys, "--input", source, "--output", out, "--unit", "nm", *CHEAP)
    assert status == 0, err
    assert numbers(plan_of(printed)["translation"]) == [10000.0, 20000.0, 30000.0]
    assert read_calibration(out) == ((250.0, 250.0, 250.0), "nm")
    restored = tifffile.imread(out)
    assert restored.shape == (65, 64, 64)
    np.testing.assert_array_equal(restored[::4], sparse)


def test_zarr_input_restored_into_ome_zarr_keeps_its_origin_in_nm(tmp_path, capsys):
    sparse = kept_mask()
    source = zarr_input(tmp_path / "in.ome.zarr", sparse)
    out = tmp_path / "o.ome.zarr"
    status, printed, err = run_apply(capsys, "--input", source, "--output", out, "--unit", "nm", *CHEAP)
    assert status == 0, err
    image = zarr_io.open_image(out)
    assert image.unit == "nm"
    assert image.voxel_size_zyx == pytest.approx((250.0, 250.0, 250.0))
    assert image.translation_zyx == pytest.approx((10000.0, 20000.0, 30000.0))
    restored = image.read(slice(None), slice(None), slice(None))
    assert restored.shape == (65, 64, 64)
    np.testing.assert_array_equal(restored[::4], sparse)


def test_z_step_in_another_unit_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(UserError, match=r"160 times the XY pixel size .*more than 64.*different units"):
        data.factor_from_voxel_size(40, 0.25)
    assert data.MAX_FACTOR == 64 and data.factor_from_voxel_size(16, 0.25)[0] == 64
    source = write_tif(tmp_path / "mask.tif", kept_mask())  # XY 0.25 um
    out = tmp_path / "o.tif"
    status, printed, err = run_apply(capsys, "--input", source, "--output", out, "--z-step", "40", *CHEAP)
    assert status == 2
    assert_one_error_line(err, "160 times", "more than 64", "different units (nm and um)")
    assert printed == "" and not out.exists()  # no plan printed, nothing trained or written


def test_pixels_that_are_not_square_are_refused(tmp_path, capsys):
    stack = kept_mask()
    source = write_tif(tmp_path / "rect.tif", stack, (1.0, 0.25, 0.3))
    assert read_calibration(source) == ((1.0, 0.25, 0.3), "um")
    status, printed, err = run_apply(capsys, "--input", source, "--output", tmp_path / "o.tif", "--dry-run")
    assert status == 2
    assert_one_error_line(err, "0.25 (Y) by 0.3 (X)", "more than 1 %", "--xy-size")
    # --xy-size gives one size for both; a difference within 1 % is accepted.
    status, printed, err = run_apply(capsys, "--input", source, "--output", tmp_path / "o.tif", "--dry-run",
                                     "--xy-size", "0.25")
    assert status == 0, err
    assert plan_of(printed)["factor"].startswith("4 ")
    close = write_tif(tmp_path / "close.tif", stack, (1.0, 0.25, 0.2502))
    status, printed, err = run_apply(capsys, "--input", close, "--output", tmp_path / "o.tif", "--dry-run")
    assert status == 0, err


def test_model_trained_at_another_factor(tmp_path, capsys):
    torch.manual_seed(0)
    network = AttentionResUNet(in_channels=3, base_filters=4, depth=2)
    model_path = save_model(tmp_path / "f8.pt", network, {"factor": 8, "kind": "mask", "train_z_size": 3,
                                                          "train_xy_size": 32, "inference_tile_size": 64})
    sparse = kept_mask()
    source = write_tif(tmp_path / "mask.tif", sparse)  # factor 4
    out = tmp_path / "o.tif"
    status, printed, err = run_apply(capsys, "--input", source, "--output", out, "--model", model_path)
    assert status == 2
    assert_one_error_line(err, "trained at factor 8", "needs factor 4", "--allow-factor-mismatch")
    assert not out.exists() and printed == ""
    status, printed, err = run_apply(capsys, "--input", source, "--output", out, "--model", model_path,
                                     "--allow-factor-mismatch")
    assert status == 0, err
    assert plan_of(printed)["training"] == "none (--model)"
    restored = tifffile.imread(out)
    assert restored.shape == (65, 64, 64)
    np.testing.assert_array_equal(restored[::4], sparse)


def test_isotropic_stacks_are_converted_not_restored(tmp_path, capsys):
    iso = (0.25, 0.25, 0.25)
    # Labels: TIFF -> OME-Zarr (ids in labels/<name>) -> TIFF.
    ids = make_sample_labels((12, 40, 40), seed=3).astype(np.uint8)
    source = write_tif(tmp_path / "cells.tif", ids, iso)
    store = tmp_path / "cells.ome.zarr"
    status, printed, err = run_apply(capsys, "--input", source, "--output", store)
    assert status == 0, err
    plan = plan_of(printed)
    assert plan["factor"].startswith("1 ") and "converted, not restored" in plan["factor"]
    assert plan["training"] == "none (nothing to restore)" and "Epoch" not in printed
    assert plan["expected time"] == "seconds: a conversion, no network runs"
    assert plan["output"].endswith(f"; the ids in {store}/labels/cells, the image their foreground")
    label_image = zarr_io.open_image(store / "labels" / "cells")
    assert label_image.is_label
    np.testing.assert_array_equal(label_image.read(slice(None), slice(None), slice(None)), ids)
    assert zarr_io.read_calibration(store / "labels" / "cells") == (iso, "um")
    root = zarr_io.open_image(store)
    np.testing.assert_array_equal(root.read(slice(None), slice(None), slice(None)), np.where(ids > 0, 255, 0))
    back = tmp_path / "cells_back.tif"
    status, printed, err = run_apply(capsys, "--input", store / "labels" / "cells", "--output", back)
    assert status == 0, err
    np.testing.assert_array_equal(tifffile.imread(back), ids)
    assert read_calibration(back) == (iso, "um")
    # Grey values: TIFF -> OME-Zarr -> TIFF, values and dtype unchanged.
    grey = make_sample_intensity((12, 40, 40), seed=3)
    source = write_tif(tmp_path / "grey.tif", grey, iso)
    status, _, err = run_apply(capsys, "--input", source, "--output", tmp_path / "grey.ome.zarr")
    assert status == 0, err
    status, _, err = run_apply(capsys, "--input", tmp_path / "grey.ome.zarr", "--output", tmp_path / "grey_back.tif")
    assert status == 0, err
    back = tifffile.imread(tmp_path / "grey_back.tif")
    assert back.dtype == grey.dtype
    np.testing.assert_array_equal(back, grey)


# --------------------------------------------------------------------------- #
# 5. One-line errors
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("device, fragment", [
    ("cuda", "no CUDA GPU"), ("banana", "is not a device")])
def test_device_errors_are_one_line(tmp_path, capsys, device, fragment):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    source = write_tif(tmp_path / "mask.tif", kept_mask())
    out = tmp_path / "o.tif"
    status, printed, err = run_apply(capsys, "--input", source, "--output", out, "--device", device, *CHEAP)
    assert status == 2
    assert_one_error_line(err, f"Device '{device}' (--device", fragment)
    assert not out.exists() and "Epoch" not in printed


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_tiff_says_permission(tmp_path, capsys):
    source = write_tif(tmp_path / "mask.tif", kept_mask())
    source.chmod(0)
    try:
        status, _, err = run_apply(capsys, "--input", source, "--output", tmp_path / "o.tif", "--dry-run")
    finally:
        source.chmod(0o644)
    assert status == 2
    line = assert_one_error_line(err, "permission denied")
    assert "damaged" not in line


def test_permission_error_while_reading_says_permission(tmp_path, capsys, monkeypatch):
    """The same, simulated (root may read any file): the OS refuses to open the TIFF."""
    source = write_tif(tmp_path / "mask.tif", kept_mask())

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(source))

    monkeypatch.setattr(tifffile, "TiffFile", refuse)
    status, _, err = run_apply(capsys, "--input", source, "--output", tmp_path / "o.tif", "--dry-run")
    assert status == 2
    line = assert_one_error_line(err, "cannot be read: permission denied", "mask.tif")
    assert "damaged" not in line


def test_writing_to_turns_disk_full_into_a_user_error(tmp_path):
    target = tmp_path / "out.tif"
    with pytest.raises(UserError) as raised:
        with data.writing_to(target):
            target.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not target.exists()  # the partial file is removed
    message = str(raised.value)
    assert str(target) in message and "No space left on device" in message and "Free some space" in message
    # Errors that are no refusal of the OS to write stay what they are.
    with pytest.raises(OSError) as raised:
        with data.writing_to(target):
            raise OSError(errno.EIO, "Input/output error")
    assert not isinstance(raised.value, UserError) and raised.value.errno == errno.EIO


def test_save_stack_on_a_full_disk(tmp_path, monkeypatch):
    def half_written(path, *args, **kwargs):
        Path(path).write_bytes(b"II*\x00partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", half_written)
    target = tmp_path / "out.tif"
    with pytest.raises(UserError, match="No space left on device"):
        save_stack(target, kept_mask(n_kept=3, size=16))
    assert not target.exists()


def test_save_stack_as_slices_on_a_full_disk_leaves_no_partial_slice(tmp_path, monkeypatch):
    real = tifffile.imwrite

    def full_at_third(path, *args, **kwargs):
        if Path(path).name == "slice_0002.tif":
            Path(path).write_bytes(b"II*\x00partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", full_at_third)
    folder = tmp_path / "slices"
    with pytest.raises(UserError, match="No space left on device"):
        save_stack(folder, kept_mask(n_kept=5, size=16), as_slices=True)
    assert not (folder / "slice_0002.tif").exists()


# --------------------------------------------------------------------------- #
# 6. The training figure of a grey-value model
# --------------------------------------------------------------------------- #
def captured_figure(monkeypatch):
    figures = []
    finish = train._finish_figure

    def capture(figure, path, show):
        figures.append(figure)
        finish(figure, path, show)

    monkeypatch.setattr(train, "_finish_figure", capture)
    return figures


def test_training_figure_of_an_intensity_model_has_no_sigmoid(tmp_path, monkeypatch):
    torch.manual_seed(0)
    network = AttentionResUNet(in_channels=3, base_filters=4, depth=2, output="intensity").eval()
    rng = np.random.default_rng(0)
    inputs = (rng.random((2, 3, 16, 16)) * 3).astype(np.float32)  # input skip: outputs reach beyond 1
    labels = (rng.random((2, 1, 16, 16)) * 3).astype(np.float32)
    figures = captured_figure(monkeypatch)
    png = tmp_path / "examples.png"
    train.display_training_results(network, {"train": (inputs, labels)}, n_examples=2, path=png)
    assert png.is_file() and png.stat().st_size > 0
    (figure,) = figures
    axes = np.asarray(figure.axes).reshape(-1, 3)
    assert axes.shape == (2, 3)
    with torch.no_grad():
        expected = network(torch.from_numpy(inputs)).numpy()
    for row in range(2):
        shown = np.asarray(axes[row][2].images[0].get_array())
        np.testing.assert_allclose(shown, expected[row, 0], rtol=1e-6, atol=1e-6)
        # Grey values on one window per row: the label's.
        assert axes[row][2].images[0].get_clim() == pytest.approx((labels[row, 0].min(), labels[row, 0].max()))
        np.testing.assert_array_equal(np.asarray(axes[row][1].images[0].get_array()), labels[row, 0])
    assert expected.max() > 1.0 or expected.min() < 0.0  # outside [0, 1]: a sigmoid would have hidden it


def test_training_figure_of_a_mask_model_shows_probabilities(monkeypatch):
    torch.manual_seed(0)
    network = AttentionResUNet(in_channels=3, base_filters=4, depth=2).eval()
    rng = np.random.default_rng(1)
    inputs = rng.random((1, 3, 16, 16)).astype(np.float32)
    labels = (rng.random((1, 1, 16, 16)) > 0.5).astype(np.float32)
    figures = captured_figure(monkeypatch)
    train.display_training_results(network, {"validation": (inputs, labels)}, n_examples=1)
    axes = np.asarray(figures[0].axes).reshape(-1, 3)
    with torch.no_grad():
        expected = torch.sigmoid(network(torch.from_numpy(inputs))).numpy()
    np.testing.assert_allclose(np.asarray(axes[0][2].images[0].get_array()), expected[0, 0], atol=1e-6)
    assert axes[0][2].images[0].get_clim() == (0.0, 1.0)


# --------------------------------------------------------------------------- #
# 7. bfloat16 under an emulated AVX2 CPU
# --------------------------------------------------------------------------- #
def test_emulated_avx2_cpu_computes_in_float32(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert model_module.cpu_computes_bf16() is False  # this machine, as it is
    assert model_module.resolve_precision("auto", cpu) == torch.float32
    # A CPU with native bfloat16 (patched in, so that the cap is what is tested).
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert model_module.cpu_computes_bf16() is False  # capped to AVX2: float32, as on a real AVX2 CPU
    assert model_module.resolve_precision("auto", cpu) == torch.float32
    assert model_module.resolve_precision("bf16", cpu) == torch.bfloat16  # asked for: given
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_amx")
    assert model_module.cpu_computes_bf16() is True
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert model_module.cpu_computes_bf16() is True
    # Intel's AVX512-BF16 without AMX computes bfloat16, but float32 is faster there: auto chooses float32.
    monkeypatch.setattr(model_module, "cpu_is_amd", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert model_module.resolve_precision("auto", cpu) == torch.float32
    assert model_module.precision_reason("auto", cpu) == "auto: bfloat16 is not faster on an Intel CPU without AMX"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert model_module.resolve_precision("auto", cpu) == torch.bfloat16  # AMX: bfloat16
    assert model_module.precision_reason("auto", cpu).startswith("auto: AMX")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # AMX capped off, as on an AVX-512-BF16 part
    assert model_module.cpu_computes_bf16() is True and model_module.resolve_precision("auto", cpu) == torch.float32
    # AMD's AVX512-BF16 (Zen 4 and later) runs bfloat16 dot products at twice float32's rate: auto chooses bfloat16.
    monkeypatch.setattr(model_module, "cpu_is_amd", lambda: True)
    assert model_module.resolve_precision("auto", cpu) == torch.bfloat16
    assert model_module.precision_reason("auto", cpu).startswith("auto: AVX512-BF16 on an AMD CPU")
    assert model_module.precision_reason("fp32", cpu) == "--precision fp32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")  # capped below bfloat16 on the same AMD CPU: float32
    assert model_module.resolve_precision("auto", cpu) == torch.float32
    assert model_module.precision_reason("auto", cpu) == ("auto: this CPU's bfloat16 is capped off "
                                                          "(ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY)")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert model_module.resolve_precision("fp32", cpu) == torch.float32
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")  # oneDNN's older name for the cap
    assert model_module.cpu_computes_bf16() is False
    monkeypatch.undo()  # the vendor, as /proc/cpuinfo names it
    monkeypatch.setattr(model_module, "cpuinfo_field", lambda name: "AuthenticAMD" if name == "vendor_id" else None)
    assert model_module.cpu_is_amd() is True
    monkeypatch.setattr(model_module, "cpuinfo_field", lambda name: "GenuineIntel" if name == "vendor_id" else None)
    assert model_module.cpu_is_amd() is False
    import platform  # no /proc/cpuinfo (Windows, macOS): the platform's processor string

    monkeypatch.setattr(model_module, "cpuinfo_field", lambda name: None)
    monkeypatch.setattr(platform, "processor", lambda: "AMD64 Family 25 Model 17 Stepping 1, AuthenticAMD")
    assert model_module.cpu_is_amd() is True
    monkeypatch.setattr(platform, "processor", lambda: "i386")
    assert model_module.cpu_is_amd() is False


@pytest.mark.parametrize("cpu_class, kind, expected", [
    ("amd-bf16", "mask", "bfloat16 (auto: AVX512-BF16 on an AMD CPU, where bfloat16 is the faster arithmetic; "
                         "--precision fp32 for float32)"),
    ("amd-bf16", "intensity", "bfloat16 (auto: AVX512-BF16 on an AMD CPU, where bfloat16 is the faster arithmetic; "
                              "--precision fp32 for float32; on an AMD Zen 4 grey values scored 0.15 dB PSNR higher "
                              "in float32)"),
    ("intel-bf16", "mask", "float32 (auto: bfloat16 is not faster on an Intel CPU without AMX)"),
    ("amx", "intensity", "bfloat16 (auto: AMX, where bfloat16 is the faster arithmetic; --precision fp32 for float32)"),
    ("avx2", "mask", "float32 (auto: this CPU has no bfloat16 arithmetic)"),
])
def test_the_plan_names_the_arithmetic_and_why(tmp_path, capsys, monkeypatch, cpu_class, kind, expected):
    """The plan's arithmetic line on every CPU class (patched in, whatever this machine is)."""
    monkeypatch.setattr(model_module, "cpu_computes_bf16", lambda: cpu_class != "avx2")
    monkeypatch.setattr(model_module, "cpu_has_amx", lambda: cpu_class == "amx")
    monkeypatch.setattr(model_module, "cpu_is_amd", lambda: cpu_class == "amd-bf16")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu_class != "avx2", raising=False)
    grey = np.random.default_rng(0).integers(0, 200, (17, 64, 64)).astype(np.uint8)
    source = write_tif(tmp_path / "stack.tif", grey if kind == "intensity" else kept_mask())
    status, printed, err = run_apply(capsys, "--input", source, "--output", tmp_path / "o.tif", "--kind", kind,
                                     "--dry-run", "--device", "cpu")
    assert status == 0, err
    assert plan_of(printed)["arithmetic"] == expected
    status, printed, _ = run_apply(capsys, "--input", source, "--output", tmp_path / "o.tif", "--kind", kind,
                                   "--dry-run", "--device", "cpu", "--precision", "fp32")
    assert plan_of(printed)["arithmetic"] == "float32 (--precision fp32)"


def amx_cpu(monkeypatch, capability="AVX512"):
    """Pretend to be an AMX Xeon (bfloat16 natively), whatever this machine is."""
    import machine

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    return machine


def test_machine_class_names_the_instruction_set(monkeypatch):
    machine = amx_cpu(monkeypatch)
    assert machine.isa_class() == "amx"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert machine.isa_class() == "avx512-bf16"
    machine = amx_cpu(monkeypatch, "AVX2")  # ATEN_CPU_CAPABILITY=avx2
    assert machine.isa_class() == "avx2"
    assert model_module.cpu_computes_bf16() is False
    assert re.fullmatch(r".+ \(avx2, \d+ threads\)", machine.machine_key("cpu"))


def test_machine_class_under_an_onednn_avx2_cap(monkeypatch):
    machine = amx_cpu(monkeypatch)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert model_module.cpu_computes_bf16() is False  # precision: float32, as on an AVX2 CPU (passes)
    assert machine.isa_class() == "avx2"  # the throughput key: the emulated class


# --------------------------------------------------------------------------- #
# 8. eval.py on a small sample
# --------------------------------------------------------------------------- #
def run_eval(*args):
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "eval.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_eval_on_a_small_sample_fits_the_recipe(tmp_path):
    run = tmp_path / "run"
    result = run_eval("--sample-shape", "9,48,48", "--show", "no", "--run-directory", str(run), "--num-epochs", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Recipe fitted to the stack: TRAIN_XY_SIZE 128 -> 48" in result.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["shape_dhw"] == [9, 48, 48] and metrics["factor"] == 8 and metrics["kept_indices"] == [0, 8]
    settings = metrics["settings"]
    assert settings["TRAIN_XY_SIZE"] == 48 and settings["TRAIN_Z_SIZE"] == 1
    assert settings["TRAIN_NB"] is None  # by kind, capped at training: 1 z position x 1 x 1 x 2 orientations x 8
    assert restore.training_kwargs(settings, "mask")["train_nb"] == 4 * 32  # phases, 4 draws each
    assert settings["NUM_EPOCHS"] == 1
    assert (run / "model.pt").is_file()


def test_eval_refuses_a_typed_crop_larger_than_the_sample(tmp_path):
    run = tmp_path / "run"
    result = run_eval("--sample-shape", "9,48,48", "--show", "no", "--run-directory", str(run), "--num-epochs", "1",
                      "--train-xy-size", "64")
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "TRAIN_XY_SIZE=64x64 is larger than the stack's slices (48x48)")
    assert "Epoch" not in result.stdout and "Generating training samples" not in result.stdout
    assert not (run / "metrics.json").exists() and not (run / "model.pt").exists()
