"""Trustworthy on real files: calibration as Fiji writes it, damaged input, label ids,
the everyday command end to end, inference geometry against an independent reference,
and a memory bound. Tiny stacks and tiny models throughout."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage
from torch import nn

import apply
import data
import eval as eval_module
import labeling
import restore
from data import DamagedFileError, UserError, make_sample_stack, read_calibration, read_stack
from model import save_model
from morph import interpolate_along_axis
from train import fit_on_sparse_stack

REPO = Path(__file__).resolve().parents[1]
TINY = ["--train-xy-size", "32", "--train-z-size", "3", "--train-nb", "64", "--num-epochs", "1", "--base-filters", "4",
        "--depth", "2", "--inference-tile-size", "48"]


def sparse_mask(n_kept=9, size=48, factor=4, seed=3):
    """Kept slices (every ``factor``-th) of the built-in phantom, as 0/255 uint8."""
    return make_sample_stack(((n_kept - 1) * factor + 1, size, size), seed=seed)[::factor].astype(np.uint8) * 255


def write_fiji(path, stack, pixels_per_unit=4.0, unit="um", **metadata):
    """A stack as ImageJ/Fiji writes it: resolution tags, unit, and ``spacing`` only when given."""
    tifffile.imwrite(path, stack, imagej=True, resolution=(pixels_per_unit, pixels_per_unit),
                     metadata={"unit": unit, "axes": "ZYX", **metadata})
    return path


def imagej_calibration(path):
    """(spacing, unit, x pixel size) as an ImageJ reader sees the file."""
    with tifffile.TiffFile(path) as tif:
        meta = tif.imagej_metadata
        num, den = tif.pages[0].tags["XResolution"].value
        return meta.get("spacing", 1.0), meta.get("unit"), den / num


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    """A tiny network trained briefly, saved without a recipe (for runs where training is not the point)."""
    torch.set_num_threads(1)
    sparse = sparse_mask(n_kept=9, size=48, factor=4) > 0
    model, _, _ = fit_on_sparse_stack(sparse, 4, train_xy_size=32, train_z_size=3, train_nb=64, num_epochs=1,
                                      base_filters=4, depth=2, random_state=0, progress=False)
    return save_model(tmp_path_factory.mktemp("model") / "tiny.pt", model, {})


# --------------------------------------------------------------------------- #
# Calibration and units
# --------------------------------------------------------------------------- #
def test_fiji_stack_without_spacing_has_z_step_1_and_restores_at_factor_4(tmp_path, capsys):
    stack = sparse_mask()
    source = write_fiji(tmp_path / "fiji.tif", stack)  # no spacing key: ImageJ omits it when it is 1
    with tifffile.TiffFile(source) as tif:
        assert "spacing" not in tif.imagej_metadata
    assert read_calibration(source) == ((1.0, 0.25, 0.25), "um")

    out = tmp_path / "out.tif"
    assert apply.main(["--input", str(source), "--output", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "factor: 4 from Z 1 um, XY 0.25 um (from the file)" in printed
    restored = tifffile.imread(out)
    assert restored.shape == ((len(stack) - 1) * 4 + 1, 48, 48)
    np.testing.assert_array_equal(restored[::4], stack)
    spacing, unit, x_size = imagej_calibration(out)
    assert (spacing, unit) == (pytest.approx(0.25), "um") and x_size == pytest.approx(0.25)
    assert read_calibration(out) == ((0.25, 0.25, 0.25), "um")


@pytest.mark.parametrize("spelling", ["micron", "\\u00B5m", "um"])
def test_micron_spellings_read_as_um(tmp_path, spelling):
    source = write_fiji(tmp_path / "s.tif", sparse_mask(3, 16), unit=spelling, spacing=2.0)
    assert read_calibration(source) == ((2.0, 0.25, 0.25), "um")


def test_unit_flag_with_micro_sign_is_written_as_um(tmp_path, tiny_model_path):
    source = write_fiji(tmp_path / "s.tif", sparse_mask(3, 48), unit="micron")
    out = tmp_path / "o.tif"
    # µm typed on the command line (TIFF metadata is ASCII: written as 'um', not a crash after the work).
    assert apply.main(["--input", str(source), "--output", str(out), "--model", str(tiny_model_path),
                       "--z-step", "1", "--xy-size", "0.25", "--unit", "\u00b5m"]) == 0
    assert imagej_calibration(out) == (pytest.approx(0.25), "um", pytest.approx(0.25))


def test_training_flags_with_a_model_are_named_as_having_no_effect(tmp_path, tiny_model_path):
    source = write_fiji(tmp_path / "s.tif", sparse_mask(3, 48))
    args = ["--input", str(source), "--model", str(tiny_model_path), "--z-step", "1", "--xy-size", "0.25",
            "--unit", "um"]
    with pytest.warns(UserWarning, match=r"--num-epochs, --skip-merge only change training: with --model they "
                                         r"have no effect"):
        assert apply.main(args + ["--output", str(tmp_path / "a.tif"), "--num-epochs", "3", "--skip-merge",
                                  "concat"]) == 0
    # Settings that the restore reads (precision, interpolation) are no training-only flags.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert apply.main(args + ["--output", str(tmp_path / "b.tif"), "--precision", "fp32"]) == 0


def test_training_settings_read_at_inference_are_exactly_those_the_restore_reads():
    """The warning above relies on this list: a training setting outside it must not change a restore."""
    from settings import FIELDS, TRAINING_ONLY

    base = eval_module.default_recipe()
    changed = {"TRAIN_XY_SIZE": 2048, "TRAIN_Z_SIZE": 7, "UPSCALE_METHOD": "nearest", "PRECISION": "fp32"}
    for name, (section, item) in FIELDS.items():
        if section not in ("training", "network"):
            continue
        value = base[name]
        if name not in changed:  # another valid value of the setting's type
            choices = item.metadata["choices"]
            changed[name] = (not value if isinstance(value, bool) else 3 if value is None
                             else next(c for c in choices if c != value) if choices else value + 1)
        other = base.with_values(**{name: changed[name]})
        reads = any(restore.inference_kwargs(other, kind=kind) != restore.inference_kwargs(base, kind=kind)
                    for kind in ("mask", "dense labels"))  # BOUNDARY_INPUT is read for dense label images only
        assert reads == (name not in TRAINING_ONLY), name


def test_centimetre_resolution_unit_without_imagej_unit_gives_um(tmp_path):
    source = tmp_path / "cm.tif"
    tifffile.imwrite(source, sparse_mask(3, 16), photometric="minisblack", resolution=(40000.0, 40000.0),
                     resolutionunit="CENTIMETER")
    assert read_calibration(source) == ((None, pytest.approx(0.25), pytest.approx(0.25)), "um")
    # With ImageJ metadata but no ImageJ unit, spacing is in the ResolutionUnit too (1e-4 cm = 1 um).
    tifffile.imwrite(source, sparse_mask(3, 16), imagej=True, resolution=(40000.0, 40000.0),
                     resolutionunit="CENTIMETER", metadata={"axes": "ZYX", "spacing": 1e-4})
    (z, y, x), unit = read_calibration(source)
    assert unit == "um" and (z, y, x) == (pytest.approx(1.0), pytest.approx(0.25), pytest.approx(0.25))


def test_folder_of_slices_needs_z_step_and_keeps_its_unit(tmp_path, capsys, tiny_model_path):
    stack = sparse_mask(11, 48)
    folder = tmp_path / "slices"
    folder.mkdir()
    for z, page in enumerate(stack, start=2):  # img_2 ... img_12: first in natural order, not img_10
        pixel = 50.0 if z == 2 else 100.0  # only the first slice's resolution tags count
        tifffile.imwrite(folder / f"img_{z}.tif", page, imagej=True, resolution=(1 / pixel, 1 / pixel),
                         metadata={"unit": "nm"})
    assert read_calibration(folder) == ((None, pytest.approx(50.0), pytest.approx(50.0)), "nm")

    out = tmp_path / "out.tif"
    common = ["--input", str(folder), "--output", str(out), "--model", str(tiny_model_path)]
    assert apply.main(common) == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and "--z-step" in error and "(nm)" in error
    assert not out.exists()

    assert apply.main(common + ["--z-step", "200"]) == 0
    assert "factor: 4 from Z 200 nm, XY 50 nm" in capsys.readouterr().out
    restored = tifffile.imread(out)
    assert restored.shape == (41, 48, 48)
    np.testing.assert_array_equal(restored[::4], stack)
    assert imagej_calibration(out) == (pytest.approx(50.0), "nm", pytest.approx(50.0))


def test_size_flags_need_unit_and_unit_flag_wins_over_file_unit(tmp_path, capsys, tiny_model_path):
    source = write_fiji(tmp_path / "um.tif", sparse_mask(3, 48), spacing=1.0)  # 1 x 0.25 x 0.25 um
    out = tmp_path / "o.tif"
    common = ["--input", str(source), "--output", str(out), "--model", str(tiny_model_path)]
    assert apply.main(common + ["--z-step", "1000", "--xy-size", "250"]) == 2
    error = capsys.readouterr().err
    assert "--unit" in error and "Traceback" not in error
    assert not out.exists()

    assert apply.main(common + ["--z-step", "1000", "--xy-size", "250", "--unit", "nm"]) == 0
    assert "factor: 4 from Z 1000 nm, XY 250 nm (from the flags)" in capsys.readouterr().out
    assert imagej_calibration(out) == (pytest.approx(250.0), "nm", pytest.approx(250.0))

    # One size from the flags, one from the file: the file's 0.25 um is expressed in --unit, not mixed with it.
    out.unlink()
    assert apply.main(common + ["--z-step", "1000", "--unit", "nm"]) == 0
    assert "factor: 4 from Z 1000 nm, XY 250 nm (from the file and the flags)" in capsys.readouterr().out
    assert tifffile.imread(out).shape[0] == 9
    assert imagej_calibration(out) == (pytest.approx(250.0), "nm", pytest.approx(250.0))


def test_ome_sizes_in_um_and_nm_give_factor_4(tmp_path, capsys, tiny_model_path):
    stack = sparse_mask(3, 48)
    source = tmp_path / "mixed.ome.tif"
    tifffile.imwrite(source, stack, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeZ": 1.0, "PhysicalSizeZUnit": "µm", "PhysicalSizeY": 250.0,
        "PhysicalSizeYUnit": "nm", "PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm"})
    (z, y, x), unit = read_calibration(source)
    assert unit == "nm" and (z, y, x) == (pytest.approx(1000.0), pytest.approx(250.0), pytest.approx(250.0))
    out = tmp_path / "o.tif"
    assert apply.main(["--input", str(source), "--output", str(out), "--model", str(tiny_model_path)]) == 0
    assert "factor: 4 from Z 1000 nm, XY 250 nm (from the file)" in capsys.readouterr().out
    assert tifffile.imread(out).shape == (9, 48, 48)
    assert imagej_calibration(out) == (pytest.approx(250.0), "nm", pytest.approx(250.0))


@pytest.mark.parametrize("ratio, factor", [(2.5, 3), (3.5, 4)])
def test_one_factor_rule_in_eval_and_apply(tmp_path, monkeypatch, capsys, tiny_model_path, ratio, factor):
    """eval.py simulates a whole factor (it keeps every factor-th slice); apply.py rounds the same way with
    FACTOR_ROUNDING nearest (its default restores onto an isotropic grid instead: tests/test_any_ratio.py)."""
    with pytest.warns(UserWarning, match="not an integer"):
        assert data.factor_from_voxel_size(ratio, 1.0, rounding="nearest") == (factor, pytest.approx(ratio / factor))
    with pytest.warns(UserWarning):
        assert data.resolution_factor(ratio * 2, 2.0) == factor

    # eval.py: the factor its run simulates (stopped at the first use, before any training).
    used = {}

    class Stop(Exception):
        pass

    def spy(stack, f):
        used["factor"] = f
        raise Stop

    monkeypatch.setattr(data, "downsample_z", spy)
    settings = dict(eval_module.default_settings(), SAMPLE_SHAPE=(16, 16, 16), Z_RESOLUTION=ratio * 2,
                    XY_RESOLUTION=2.0, RUN_DIRECTORY=str(tmp_path / "run"), SHOW="no", DEVICE="cpu")
    with pytest.warns(UserWarning), pytest.raises(Stop):
        eval_module.run_evaluation(settings)
    assert used["factor"] == factor

    # apply.py: the same rule on a file whose Z step is ``ratio`` pixels.
    stack = sparse_mask(3, 48)
    source = write_fiji(tmp_path / "s.tif", stack, pixels_per_unit=1.0, spacing=ratio)
    out = tmp_path / "o.tif"
    with pytest.warns(UserWarning, match="not an integer"):
        assert apply.main(["--input", str(source), "--output", str(out), "--model", str(tiny_model_path),
                           "--factor-rounding", "nearest"]) == 0
    assert f"factor: {factor} from Z {ratio:g} um" in capsys.readouterr().out
    restored = tifffile.imread(out)
    assert restored.shape[0] == (len(stack) - 1) * factor + 1
    np.testing.assert_array_equal(restored[::factor], stack)
    assert imagej_calibration(out)[0] == pytest.approx(ratio / factor)


# --------------------------------------------------------------------------- #
# Damaged and odd input
# --------------------------------------------------------------------------- #
def _cut_in_half(path):
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return path


def _zlib_cut(tmp_path):
    path = tmp_path / "zlib_cut.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 2, (8, 64, 64), dtype=np.uint8) * 255,
                     compression="zlib")
    return _cut_in_half(path)


def _raw_cut(tmp_path):
    path = tmp_path / "raw_cut.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 2, (8, 64, 64), dtype=np.uint8) * 255)
    return _cut_in_half(path)


def _calibrated_cut(tmp_path):
    path = write_fiji(tmp_path / "fiji_cut.tif", sparse_mask(8, 64), spacing=1.0)
    return _cut_in_half(path)


def _random_bytes(tmp_path):
    path = tmp_path / "random.tif"
    path.write_bytes(b"II*\x00" + np.random.default_rng(1).bytes(20000))
    return path


def _bad_ome_xml(tmp_path):
    path = tmp_path / "bad_ome.tif"
    tifffile.imwrite(path, np.zeros((3, 16, 16), np.uint8), photometric="minisblack", metadata=None, description=(
        '<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
        '<Image><Pixels PhysicalSizeX="1" PhysicalSizeX="2"></Image></OME>'))
    return path


@pytest.mark.parametrize("make", [_zlib_cut, _raw_cut, _calibrated_cut, _random_bytes])
def test_damaged_file_is_one_clear_error(tmp_path, capsys, make):
    path = make(tmp_path)
    with pytest.raises(DamagedFileError, match=path.name):
        read_stack(path)
    out = tmp_path / "o.tif"
    # With and without size flags: the file is named as damaged, not as uncalibrated.
    for flags in ([], ["--z-step", "1", "--xy-size", "0.25", "--unit", "um"]):
        assert apply.main(["--input", str(path), "--output", str(out), *flags]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"error: '{path}' is damaged or not a valid TIFF"), lines[0]
        assert not out.exists()


def test_malformed_ome_xml_is_a_damaged_file(tmp_path):
    path = _bad_ome_xml(tmp_path)
    with pytest.raises(DamagedFileError, match="bad_ome.tif"):
        read_calibration(path)


def test_run_cli_keeps_tracebacks_of_programming_errors(capsys):
    def job(error):
        raise error

    with pytest.raises(KeyError):
        eval_module.run_cli(job, KeyError("settings"))
    with pytest.raises(TypeError):
        eval_module.run_cli(job, TypeError("bad call"))
    with pytest.raises(FileNotFoundError):  # a plain OSError is not a user error either
        eval_module.run_cli(job, FileNotFoundError("x"))
    assert capsys.readouterr().err == ""
    for error in (UserError("bad setting"), DamagedFileError("'x.tif' is damaged")):
        assert eval_module.run_cli(job, error) == 2
        assert capsys.readouterr().err == f"error: {error}\n"
    assert eval_module.run_cli(lambda: None) == 0


def test_labels_bare_flag_means_yes(tmp_path, tiny_model_path):
    parse = apply.parse_args
    assert parse(["--input", "a.tif", "--output", "o.tif", "--labels"]).labels == "yes"
    assert parse(["--input", "a.tif", "--labels", "--output", "o.tif"]).labels == "yes"
    assert parse(["--input", "a.tif", "--output", "o.tif", "--labels", "no"]).labels == "no"
    assert parse(["--input", "a.tif", "--output", "o.tif"]).labels is None  # not given: --kind decides
    assert apply.kind_from_flags(parse(["--input", "a.tif", "--output", "o.tif", "--labels"])) == "labels"
    assert apply.kind_from_flags(parse(["--input", "a.tif", "--output", "o.tif", "--labels", "no"])) == "mask"
    with pytest.raises(UserError, match="disagree"):
        apply.kind_from_flags(parse(["--input", "a.tif", "--output", "o.tif", "--labels", "--kind", "intensity"]))

    # Two values only (0 and 300): 'auto' takes it for a mask, the bare flag keeps the id.
    labels = np.where(sparse_mask(3, 48) > 0, 300, 0).astype(np.uint16)
    source = write_fiji(tmp_path / "one_id.tif", labels, spacing=1.0)
    common = ["--input", str(source), "--model", str(tiny_model_path)]
    assert apply.main(common + ["--output", str(tmp_path / "auto.tif")]) == 0
    assert apply.main(common + ["--output", str(tmp_path / "ids.tif"), "--labels"]) == 0
    as_mask, with_ids = tifffile.imread(tmp_path / "auto.tif"), tifffile.imread(tmp_path / "ids.tif")
    assert as_mask.dtype == np.uint16 and set(np.unique(as_mask)) == {0, 300}  # a mask keeps its own two values
    assert with_ids.dtype == np.uint16 and set(np.unique(with_ids)) == {0, 300}
    np.testing.assert_array_equal(with_ids[::4], labels)
    np.testing.assert_array_equal(with_ids > 0, as_mask > 0)  # the ids change no voxel's foreground


# --------------------------------------------------------------------------- #
# Label ids: an independent brute-force reference
# --------------------------------------------------------------------------- #
def reference_id_choices(foreground, sparse_labels, factor, restrict=True):
    """For every restored foreground voxel, the set of ids at minimal 3D distance among the labelled
    voxels of its two bracketing kept slices; with ``restrict``, only ids that the voxel's own 2D
    component (4-connected) overlaps in those kept slices (all ids when it overlaps none).

    Returns {(z, y, x): set of ids}. Brute force over every pair of voxels.
    """
    n_kept = len(sparse_labels)
    choices = {}
    for z in range(foreground.shape[0]):
        if z % factor == 0 and z // factor < n_kept:
            continue  # a kept slice
        low = min(z // factor, n_kept - 1)
        sides = sorted({low, min(low + 1, n_kept - 1)})
        points = [(y, x, sparse_labels[k][y, x], (z - k * factor) ** 2)
                  for k in sides for y, x in zip(*np.nonzero(sparse_labels[k]))]
        points = np.array(points, dtype=np.int64).reshape(-1, 4)
        components, n = ndimage.label(foreground[z])
        for c in range(1, n + 1):
            member = components == c
            touched = set(np.unique(np.concatenate([sparse_labels[k][member] for k in sides]))) - {0}
            usable = points if not (restrict and touched) else points[np.isin(points[:, 2], list(touched))]
            voxels = np.argwhere(member)
            d2 = ((voxels[:, None, 0] - usable[None, :, 0]) ** 2 + (voxels[:, None, 1] - usable[None, :, 1]) ** 2
                  + usable[None, :, 3])
            best = d2.min(axis=1)
            for (y, x), row, m in zip(voxels, d2, best):
                choices[(z, int(y), int(x))] = set(usable[row == m, 2].tolist())
    return choices


def check_against_reference(restored, foreground, sparse_labels, factor):
    np.testing.assert_array_equal(restored[::factor][: len(sparse_labels)], sparse_labels)  # kept verbatim
    choices = reference_id_choices(foreground, sparse_labels, factor)
    assert choices, "the case restores nothing"
    wrong = [(v, int(restored[v]), ids) for v, ids in choices.items() if int(restored[v]) not in ids]
    assert not wrong, wrong[:5]
    recon = np.ones(restored.shape[0], bool)
    recon[::factor] = False
    assert np.all((restored[recon] > 0) == foreground[recon])  # every restored voxel has an id, background none


def test_assign_labels_boundary_moving_between_kept_slices():
    factor, height, width = 4, 10, 48
    sparse = np.zeros((3, height, width), np.uint16)
    for k, boundary in enumerate((20, 30, 24)):  # A | B, the boundary moves right then back
        sparse[k, :, :boundary], sparse[k, :, boundary:] = 7, 900
    depth = 2 * factor + 1 + 2  # two slices after the last kept one
    foreground = np.ones((depth, height, width), bool)
    restored = labeling.assign_labels(foreground, sparse, factor)
    assert restored.dtype == np.uint16
    assert set(np.unique(restored)) == {7, 900}
    check_against_reference(restored, foreground, sparse, factor)
    # The boundary moves monotonically from 20 to 30 and back to 24, row by row.
    first_b = [int(np.argmax(restored[z, 0] == 900)) for z in range(depth)]
    assert first_b[:5] == sorted(first_b[:5]) and first_b[0] == 20 and first_b[4] == 30
    assert first_b[4:9] == sorted(first_b[4:9], reverse=True) and first_b[8] == 24
    assert np.all(restored[:, :, :20] == 7) and np.all(restored[:, :, 30:] == 900)


def test_assign_labels_restricts_ids_to_the_objects_a_component_touches():
    """A (id 300) touches B (id 60000) in the kept slices; in the restored slices A's region moves
    away from B and grows under it, where B's kept voxels are nearer than A's: plain nearest-voxel
    assignment gives part of A's component B's id, the restricted assignment does not."""
    factor, height, width = 4, 16, 40
    sparse = np.zeros((2, height, width), np.uint16)
    sparse[:, :, :10] = 300  # A: x < 10, every row
    sparse[:, :8, 10:] = 60000  # B: x >= 10, rows < 8 (touching A)
    foreground = np.zeros((factor + 1, height, width), bool)
    foreground[1:factor, :, :8] = True  # A's restored region, apart from B's ...
    foreground[1:factor, 12:, :22] = True  # ... and growing under B's rows
    foreground[1:factor, :8, 10:] = True  # B's restored region
    foreground[[0, factor]] = sparse > 0
    restored = labeling.assign_labels(foreground, sparse, factor)

    a_component = np.zeros_like(foreground)
    a_component[1:factor, :, :8] = a_component[1:factor, 12:, :22] = True
    pure = reference_id_choices(foreground, sparse, factor, restrict=False)
    stolen = [v for v, ids in pure.items() if a_component[v] and ids == {60000}]
    assert len(stolen) > 10  # the case is one where pure nearest-label assignment fails
    assert np.all(restored[a_component] == 300)
    assert np.all(restored[1:factor, :8, 10:] == 60000)
    check_against_reference(restored, foreground, sparse, factor)


def test_assign_labels_is_exact_for_connectomics_uint64_ids():
    """The case above with FlyWire-sized uint64 ids two apart (about 2**59): ids that float64 cannot tell
    apart must come out exactly as the same ids renumbered small do."""
    factor, height, width = 4, 16, 40
    small = np.zeros((2, height, width), np.uint16)
    small[:, :, :10], small[:, :8, 10:] = 1, 2
    foreground = np.zeros((factor + 1, height, width), bool)
    foreground[1:factor, :, :8] = foreground[1:factor, 12:, :22] = foreground[1:factor, :8, 10:] = True
    foreground[[0, factor]] = small > 0
    base = np.uint64(720575940379279360)
    large = np.where(small > 0, small.astype(np.uint64) + base, np.uint64(0))
    expected = labeling.assign_labels(foreground, small, factor, progress=False)
    restored = labeling.assign_labels(foreground, large, factor, progress=False)
    assert restored.dtype == np.uint64
    np.testing.assert_array_equal(restored, np.where(expected > 0, expected.astype(np.uint64) + base, np.uint64(0)))


def test_assign_labels_random_cases_match_reference():
    rng = np.random.default_rng(0)
    for case in range(6):
        factor, n_kept, height, width = 3, 3, 14, 18
        blobs = ndimage.binary_opening(rng.random((n_kept, height, width)) > 0.4, np.ones((1, 2, 2)))
        sparse = np.where(blobs, rng.integers(1, 5, (n_kept, height, width)) * 1000, 0).astype(np.uint16)
        sparse[:, : height // 2] = np.where(sparse[:, : height // 2] > 0, 70, 0)  # large touching regions
        depth = (n_kept - 1) * factor + 1 + case % 2
        foreground = ndimage.binary_opening(rng.random((depth, height, width)) > 0.35, np.ones((1, 2, 2)))
        restored = labeling.assign_labels(foreground, sparse, factor)
        check_against_reference(restored, foreground, sparse, factor)


def test_label_ids_above_255_survive_apply_round_trip(tmp_path, capsys, tiny_model_path):
    n_kept, factor = 5, 4
    z, y, x = np.mgrid[: (n_kept - 1) * factor + 1, :48, :48]
    labels = np.zeros(z.shape, np.uint16)
    labels[(y - 24) ** 2 + (x - 16 - z // 2) ** 2 < 100] = 300  # wanders in X
    labels[(y - 24) ** 2 + (x - 34) ** 2 < 64] = 60000  # touches it
    sparse = labels[::factor]
    assert set(np.unique(sparse)) == {0, 300, 60000}
    source = write_fiji(tmp_path / "labels.tif", sparse, spacing=1.0)
    out = tmp_path / "restored.tif"
    common = ["--input", str(source), "--model", str(tiny_model_path)]
    assert apply.main(common + ["--output", str(out)]) == 0  # three integer values in flat regions: labels
    assert "kind: labels (a mask model; piecewise constant" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="binarized"):
        assert apply.main(common + ["--output", str(tmp_path / "mask.tif"), "--labels", "no"]) == 0
    restored = tifffile.imread(out)
    assert restored.dtype == np.uint16 and restored.shape == labels.shape
    np.testing.assert_array_equal(restored[::factor], sparse)
    recon = np.ones(len(restored), bool)
    recon[::factor] = False
    assert set(np.unique(restored[recon])) == {0, 300, 60000}  # both ids restored, no other id, no 8-bit wrap
    np.testing.assert_array_equal(restored > 0, tifffile.imread(tmp_path / "mask.tif") > 0)


# --------------------------------------------------------------------------- #
# The everyday command end to end
# --------------------------------------------------------------------------- #
def test_everyday_command_trains_on_input_and_saved_model_reproduces_it(tmp_path, capsys):
    factor = 4
    truth = make_sample_stack((33, 48, 48), seed=3)
    sparse = truth[::factor].astype(np.uint8) * 255
    source = write_fiji(tmp_path / "mask.tif", sparse, spacing=1.0)
    first, second, model_path = tmp_path / "first.tif", tmp_path / "second.tif", tmp_path / "m.pt"
    assert apply.main(["--input", str(source), "--output", str(first), "--save-model", str(model_path), *TINY]) == 0
    assert "Epoch [1/1]" in capsys.readouterr().out  # it trained on the input
    assert apply.main(["--input", str(source), "--output", str(second), "--model", str(model_path)]) == 0
    assert "Epoch" not in capsys.readouterr().out  # it did not
    restored, again = tifffile.imread(first), tifffile.imread(second)
    assert restored.shape == truth.shape and restored.dtype == np.uint8
    np.testing.assert_array_equal(restored, again)
    np.testing.assert_array_equal(restored[::factor], sparse)
    # The missing slices are filled, not copied from a kept neighbour, and mostly right (this tiny model,
    # one epoch on 64 crops, measured 0.78 against the truth; copying the nearest kept slice gives 0.79).
    recon = np.ones(len(truth), bool)
    recon[::factor] = False
    nearest_copy = interpolate_along_axis(sparse > 0, np.arange(0, len(truth), factor), len(truth), method="nearest")
    differs = (restored[recon] > 0) != nearest_copy[recon]
    assert differs.sum() > 0.03 * (restored[recon] > 0).sum()  # measured 7 %
    iou = np.sum((restored[recon] > 0) & truth[recon]) / np.sum((restored[recon] > 0) | truth[recon])
    assert iou > 0.7, iou
    assert imagej_calibration(second) == (pytest.approx(0.25), "um", pytest.approx(0.25))


# --------------------------------------------------------------------------- #
# Inference geometry against an independent reference
# --------------------------------------------------------------------------- #
class PickChannel(nn.Module):
    """Logits that make the probability (almost exactly) the value of one input channel."""

    def __init__(self, channel: int):
        super().__init__()
        self.channel = channel
        self.unused = nn.Parameter(torch.zeros(1))  # the engine asks the model for its device

    def forward(self, x):
        return 40.0 * (x[:, self.channel:self.channel + 1] - 0.5)


def upscale_by_hand(sparse, factor, depth):
    """Linear interpolation along Z written out: slice z blends kept slices z // f and z // f + 1."""
    out = np.empty((depth,) + sparse.shape[1:])
    for z in range(depth):
        k, w = divmod(z, factor)
        if k >= len(sparse) - 1:
            out[z] = sparse[-1]
        else:
            out[z] = (1 - w / factor) * sparse[k] + (w / factor) * sparse[k + 1]
    return out


@pytest.mark.parametrize("orientation", ["y", "x"])
@pytest.mark.parametrize("stride", [None, 2, "half"])
def test_inference_channel_planes_match_hand_built_reference(orientation, stride):
    """Channel planes ``factor`` apart (the library's reference), a typed stride, and half the factor (the
    command line's rule for masks and labels: 3 * 0.5 = 1.5 rounds to 2)."""
    factor, channels = 3, 5
    spacing = {"stride_fraction": 0.5} if stride == "half" else {"channel_stride": stride}
    stride = 2 if stride == "half" else stride
    sparse = np.random.default_rng(4).random((6, 23, 37)) > 0.7
    depth = (len(sparse) - 1) * factor + 1 + 2  # with two slices after the last kept one
    upscaled = upscale_by_hand(sparse.astype(np.float64), factor, depth)
    axis = 1 if orientation == "y" else 2
    step = factor if stride is None else stride
    reach = (channels // 2) * step
    padded = np.pad(upscaled, [(0, 0)] + [(reach, reach) if a == axis else (0, 0) for a in (1, 2)], mode="reflect")
    assert reach < sparse.shape[axis]  # mirrored once, as numpy's reflect: -1 -> 1
    for channel in range(channels):
        offset = (channel - channels // 2) * step
        index = np.arange(sparse.shape[axis]) + offset + reach
        expected_values = np.take(padded, index, axis=axis)  # plane p holds plane reflect(p + offset)
        expected = 1 / (1 + np.exp(-40 * (expected_values - 0.5)))
        got = restore.apply_model_to_stack_tiled_slice_by_slice(
            PickChannel(channel), sparse, factor, train_depth=channels, tile_size=16, batch_size=4,
            original_depth=depth, **spacing, orientations=orientation, keep_kept_slices=False,
            precision="fp32", out_dtype=np.float32, device=torch.device("cpu"), progress=False)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"channel {channel}")
        np.testing.assert_array_equal(got > 0.5, expected_values > 0.5)
    # A non-trivial case: the channels really differ and the borders really mirror.
    assert not np.array_equal(np.take(padded, np.arange(3), axis=axis), np.take(padded, np.arange(3) + reach,
                                                                                 axis=axis))


# --------------------------------------------------------------------------- #
# Memory
# --------------------------------------------------------------------------- #
MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import bench
    # A fresh process: the children peak (RUSAGE_CHILDREN) counts no child of an earlier test.
    small = bench.measure_restore_memory((3, 128, 128), 8, Path(sys.argv[2]) / "small")
    large = bench.measure_restore_memory((9, 1024, 1024), 8, Path(sys.argv[2]) / "large")
    print("RESULT " + json.dumps([small, large]))
""")


def test_restore_memory_grows_with_the_output_only(tmp_path):
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(REPO), str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    small, large = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert large["output_shape"] == [65, 1024, 1024] and small["output_shape"] == [17, 128, 128]
    with tifffile.TiffFile(tmp_path / "large" / "restored.tif") as tif:
        assert tif.series[0].shape == (65, 1024, 1024) and tif.series[0].dtype == np.uint8
    grown = large["peak_rss_mb"] - small["peak_rss_mb"]
    output_grown = large["uint8_output_mb"] - small["uint8_output_mb"]
    print(f"peak memory grew {grown:.0f} MiB for {output_grown:.0f} MiB more output ({grown / output_grown:.2f}x)")
    # Measured (2 CPU cores, torch 2.13 CPU): 343 -> 488 MiB for a 65 MiB larger output, 2.25x: the uint8
    # output, the input read as uint8 and as bool (9 + 9 MiB) and one chunk of network inputs (CHUNK_VALUES).
    # A float32 copy of the output would add 4x, a second uint8 copy 1x.
    assert output_grown < grown < 2.5 * output_grown, (small, large)
