"""An isotropic output at any Z/XY ratio: the factor rule, the Z grid of a non-integer factor, the
degradation that trains for it, the restore (in memory, block-wise, apply.py) and the label rules on it."""
import warnings

import numpy as np
import pytest
import tifffile

import apply
import blocks
import data
import labeling
import restore
import zarr_io
from data import UserError, make_sample_labels
from eval import default_settings
from morph import interpolate_along_axis, kept_positions, label_boundaries, restored_depth, sample_rows, slices_on_grid
from train import downscale_upscale_height, row_phases

UROCELL_RATIO = 105 / 16  # every 7th slice of a 15 nm FIB-SEM stack with 16 nm pixels: 6.5625


# --------------------------------------------------------------------------- #
# The factor rule
# --------------------------------------------------------------------------- #
def test_a_non_integer_ratio_gives_an_isotropic_grid():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rounding, so nothing to warn about
        assert data.factor_from_voxel_size(105, 16) == (UROCELL_RATIO, 16)
        assert data.factor_from_voxel_size(0.5, 0.16) == (pytest.approx(3.125), 0.16)
        assert data.factor_from_voxel_size(0.235, 0.15, minimum=1) == (pytest.approx(0.235 / 0.15), 0.15)


def test_a_ratio_within_half_a_percent_of_an_integer_is_that_integer():
    factor, z_step = data.factor_from_voxel_size(16.05, 2.0)  # 8.025: 0.3 % off 8
    assert factor == 8 and isinstance(factor, int) and z_step == pytest.approx(16.05 / 8)
    assert data.factor_from_voxel_size(16.2, 2.0)[0] == pytest.approx(8.1)  # 1.2 % off: the ratio itself


def test_nearest_rounding_keeps_the_previous_rule_and_says_so():
    with pytest.warns(UserWarning, match="not an integer"):
        assert data.factor_from_voxel_size(105, 16, rounding="nearest") == (7, 15.0)
    with pytest.raises(UserError, match="FACTOR_ROUNDING must be one of isotropic, nearest"):
        data.factor_from_voxel_size(105, 16, rounding="floor")


def test_below_one_and_a_half_a_ratio_is_still_rounded():
    with pytest.warns(UserWarning, match="Z/XY ratio 1.300 rounds to 1: no slices are added"):
        assert data.factor_from_voxel_size(1.3, 1.0, minimum=1)[0] == 1


# --------------------------------------------------------------------------- #
# The Z grid
# --------------------------------------------------------------------------- #
def test_kept_positions_and_the_slices_on_the_grid():
    assert kept_positions(4, 3).tolist() == [0, 3, 6, 9] and kept_positions(4, 3).dtype == np.int64
    np.testing.assert_allclose(kept_positions(3, 2.5), [0.0, 2.5, 5.0])
    assert restored_depth(4, 3) == 10 and restored_depth(3, 2.5) == 6 and restored_depth(33, UROCELL_RATIO) == 211
    kept, on_grid = slices_on_grid(33, UROCELL_RATIO, 211)
    assert kept.tolist() == [0, 16, 32] and on_grid.tolist() == [0, 105, 210]
    kept, on_grid = slices_on_grid(3, 2.5, 6, offset=-0.5)  # a slab starting half a step after kept slice 0
    assert kept.tolist() == [1] and on_grid.tolist() == [2]


def test_sample_rows_blends_the_two_rows_around_a_position():
    image = np.arange(20, dtype=np.float32).reshape(5, 4) ** 2
    sampled = sample_rows(image, np.array([0.0, 1.25, 3.5, 4.0]), axis=0)
    np.testing.assert_allclose(sampled[1], 0.75 * image[1] + 0.25 * image[2])
    np.testing.assert_allclose(sampled[2], 0.5 * image[3] + 0.5 * image[4])
    np.testing.assert_array_equal(sampled[[0, 3]], image[[0, 4]])
    mask = np.zeros((3, 2), bool)
    mask[1] = True
    assert sample_rows(mask, np.array([0.4, 0.6, 1.5]), axis=0, binary=True).tolist() == [[False] * 2, [True] * 2,
                                                                                          [True] * 2]
    with pytest.raises(ValueError, match="within"):
        sample_rows(image, np.array([4.5]), axis=0)


def test_upscale_height_blends_towards_the_true_positions():
    sparse = np.random.default_rng(0).random((4, 3, 5)).astype(np.float32)
    upscaled = restore.upscale_height(sparse, 2.5)
    assert upscaled.shape == (8, 3, 5)
    for y in range(3):
        for x in range(5):
            np.testing.assert_allclose(upscaled[:, y, x], np.interp(np.arange(8), [0, 2.5, 5, 7.5], sparse[:, y, x]),
                                       rtol=1e-6)
    import torch

    twin = restore.upscale_along_z(torch.from_numpy(sparse), 2.5, 8).numpy()
    np.testing.assert_array_equal(twin, upscaled)


# --------------------------------------------------------------------------- #
# The training degradation
# --------------------------------------------------------------------------- #
def test_integer_degradation_is_unchanged():
    image = np.random.default_rng(1).random((2, 40, 16)) > 0.5
    for factor, phase in ((4, 0), (4, 3), (7, 2)):
        rows = np.arange(phase, 40, factor)
        expected = interpolate_along_axis(image[:, rows], rows, 40, axis=1)
        np.testing.assert_array_equal(downscale_upscale_height(image, factor, phase), expected)
    assert row_phases(4) == 4 and row_phases(UROCELL_RATIO) == 7


def test_fractional_degradation_cuts_rows_between_pixels_and_fills_from_there():
    truth = np.zeros((1, 60, 8), bool)
    truth[0, 17:41] = True
    factor, phase = 6.5, 2
    degraded = downscale_upscale_height(truth, factor, phase)
    positions = phase + np.arange(9) * factor  # 2, 8.5, ..., 54
    rows = sample_rows(truth, positions, axis=1, binary=True)  # a kept row of a mask is binary
    for x in range(8):
        np.testing.assert_allclose(degraded[0, :, x], np.interp(np.arange(60), positions, rows[0, :, x]), atol=1e-6)
    # Grey values are cut by blending too, not thresholded.
    grey = np.linspace(0, 1, 60, dtype=np.float32)[None, :, None] * np.ones((1, 1, 8), np.float32)
    np.testing.assert_allclose(downscale_upscale_height(grey, factor, phase)[0, 2:55], grey[0, 2:55], atol=1e-6)


# --------------------------------------------------------------------------- #
# Restoring on the isotropic grid
# --------------------------------------------------------------------------- #
def tiny_settings(**overrides):
    settings = default_settings()
    settings.update(TRAIN_Z_SIZE=3, TRAIN_XY_SIZE=32, TRAIN_NB=24, NUM_EPOCHS=1, BASE_FILTERS=4, BATCH_SIZE=8,
                    INFERENCE_TILE_SIZE=32, INFERENCE_BATCH_SIZE=8, PRECISION="fp32", DEVICE="cpu",
                    MIN_CONTENT_RATIO=0.0, START_FROM="scratch")
    settings.update(overrides)
    return settings


@pytest.fixture(scope="module")
def fractional_run():
    """Label ids of a phantom kept at positions k * 2.5 (one slice in two on the grid), restored in memory."""
    truth = make_sample_labels((36, 40, 48), seed=3)
    factor = 2.5
    kept_ids = truth[np.round(kept_positions(14, factor)).astype(int)]  # ids cannot be blended: the nearest slice
    restored, probabilities, model, info = restore.restore_stack(kept_ids > 0, factor, tiny_settings(),
                                                                 labels=kept_ids)
    return factor, kept_ids, restored, probabilities, model


def test_in_memory_restore_on_the_isotropic_grid(fractional_run):
    factor, kept_ids, restored, probabilities, _ = fractional_run
    assert restored.shape == (restored_depth(14, factor), 40, 48) == probabilities.shape
    kept, on_grid = slices_on_grid(14, factor, restored.shape[0])
    assert on_grid.tolist() == [0, 5, 10, 15, 20, 25, 30]
    np.testing.assert_array_equal(restored[on_grid], kept_ids[kept])  # the kept slices on the grid, verbatim
    # Each restored slice takes ids only from the two kept slices around it.
    lower = np.floor(np.arange(restored.shape[0]) / factor).astype(int)
    for z in range(restored.shape[0]):
        around = set(np.unique(kept_ids[lower[z]])) | set(np.unique(kept_ids[min(lower[z] + 1, 13)]))
        assert set(np.unique(restored[z])) <= around | {0}


def test_block_wise_labels_equal_the_in_memory_ones(tmp_path, fractional_run):
    factor, kept_ids, restored, _, model = fractional_run
    out = tmp_path / "out.ome.zarr"
    summary = blocks.restore_to_ome_zarr(kept_ids > 0, out, factor, tiny_settings(BLOCK_SIZE=32),
                                         blocks.OutputMetadata((1.0, 1.0, 1.0), "um", label_name="cells"),
                                         model=model, labels_source=kept_ids, progress=False)
    import zarr

    mask = np.asarray(zarr.open_array(store=str(out), path="s0", mode="r")[:]) != 0
    ids = np.asarray(zarr.open_array(store=str(out / "labels" / "cells"), path="s0", mode="r")[:])
    assert summary["state"] == "complete" and ids.shape == restored.shape
    np.testing.assert_array_equal(mask, restored != 0)
    np.testing.assert_array_equal(ids, restored)
    assert zarr.open_group(str(out)).attrs[zarr_io.RESTORE_ATTRIBUTE]["plan"]["factor"] == factor


def test_label_slabs_split_on_the_grid_agree_with_whole_columns():
    """The label pass's slabs (a few kept intervals each) give the ids of one pass over all of Z."""
    rng = np.random.default_rng(4)
    kept_ids = make_sample_labels((24, 30, 30), seed=8)[::2][:11]
    factor = 2.5
    depth = restored_depth(len(kept_ids), factor)
    foreground = interpolate_along_axis(kept_ids > 0, kept_positions(len(kept_ids), factor), depth) >= 0.5
    foreground |= rng.random(foreground.shape) > 0.97
    whole = labeling.assign_labels(foreground, kept_ids, factor, progress=False)
    pieces = np.zeros_like(whole)
    for ka, kb in ((0, 3), (3, 6), (6, 10)):
        z, offset = blocks._slab_slices(ka, kb, factor)
        pieces[z] = labeling.assign_labels(foreground[z], kept_ids[ka:kb + 1], factor, progress=False, offset=offset)
    np.testing.assert_array_equal(pieces, whole)


def test_grow_labels_on_a_fractional_grid_follows_a_perfect_boundary():
    """Dense labels: two ids whose interface moves one column per output slice, kept every 2.5 slices
    (the kept slices between output slices cut from the truth); a perfect boundary gives the truth back."""
    depth, factor = 16, 2.5
    columns = np.arange(24)
    truth = np.stack([np.where(columns < 8 + z, 1, 2) for z in range(depth)]).astype(np.uint16)[:, None, :]
    truth = np.repeat(truth, 6, axis=1)
    truth[np.arange(depth)[:, None, None], :, 8 + np.arange(depth)[:, None, None]] = 0  # a 0 sheet between them
    n_kept = 7
    positions = kept_positions(n_kept, factor)
    # The interface at position p is at column 8 + p: a kept slice between output slices has it there (rounded).
    kept_ids = np.stack([np.where(columns < 8 + round(p), 1, 2) for p in positions]).astype(np.uint16)[:, None, :]
    kept_ids = np.repeat(kept_ids, 6, axis=1)
    for k, p in enumerate(positions):
        kept_ids[k, :, 8 + round(p)] = 0
    boundaries = label_boundaries(truth).astype(np.float32)
    grown = labeling.grow_labels(boundaries, kept_ids, factor, progress=False)
    np.testing.assert_array_equal(grown, truth)


# --------------------------------------------------------------------------- #
# apply.py
# --------------------------------------------------------------------------- #
def anisotropic_tiff(path, z_step, xy_size):
    kept = (make_sample_labels((36, 40, 48), seed=5)[::3] > 0).astype(np.uint8) * 255
    tifffile.imwrite(path, kept, imagej=True, resolution=(1 / xy_size, 1 / xy_size),
                     metadata={"spacing": z_step, "unit": "um", "axes": "ZYX"})
    return kept


def test_apply_restores_onto_the_isotropic_grid_and_says_so(tmp_path, capsys):
    source = tmp_path / "stack.tif"
    kept = anisotropic_tiff(source, 0.4, 0.16)  # ratio 2.5
    target = tmp_path / "restored.tif"
    assert apply.main(["--input", str(source), "--output", str(target), "--train-nb", "24", "--num-epochs", "1",
                       "--train-xy-size", "32", "--train-z-size", "3", "--start-from", "scratch"]) == 0
    printed = capsys.readouterr().out
    assert "factor: 2.5 from" in printed and "output grid is isotropic" in printed
    assert "output voxel size: 0.16 x 0.16 x 0.16 um" in printed
    restored = tifffile.imread(target)
    assert restored.shape == (restored_depth(len(kept), 2.5), 40, 48)
    np.testing.assert_array_equal(restored[::5] != 0, kept[::2] != 0)  # kept slices 0, 2, 4, ... on the grid
    with tifffile.TiffFile(target) as tif:
        assert tif.imagej_metadata["spacing"] == pytest.approx(0.16)


def test_apply_can_round_the_factor_instead(tmp_path, capsys):
    source = tmp_path / "stack.tif"
    kept = anisotropic_tiff(source, 0.4, 0.16)
    assert apply.main(["--input", str(source), "--output", str(tmp_path / "r.tif"), "--factor-rounding", "nearest",
                       "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "factor: 3 from" in printed  # 2.5 rounds half up
    assert ("the Z/XY ratio 2.5 rounded (--factor-rounding nearest), so every kept slice is kept verbatim and the "
            "output Z step is 0.833 times the pixel size") in printed
    assert f"output shape: {(len(kept) - 1) * 3 + 1} x 40 x 48" in printed
    assert "output voxel size: 0.133333 x 0.16 x 0.16 um" in printed


def test_a_ratio_below_one_and_a_half_is_converted_and_not_called_isotropic(tmp_path, capsys):
    """A 0.21 um Z step under 0.15 um pixels (ratio 1.4) is rounded to factor 1: the plan and the last line say
    why the output keeps the input's Z step, not that the stack is isotropic, and name no label rule."""
    source = tmp_path / "cells.tif"
    cells = make_sample_labels((8, 40, 48), seed=3).astype(np.uint16)
    tifffile.imwrite(source, cells, imagej=True, resolution=(1 / 0.15, 1 / 0.15),
                     metadata={"spacing": 0.21, "unit": "um", "axes": "ZYX"})
    target = tmp_path / "cells_out.tif"
    with pytest.warns(UserWarning, match="rounds to 1"):
        assert apply.main(["--input", str(source), "--output", str(target), "--kind", "labels"]) == 0
    printed = capsys.readouterr().out
    factor_line = next(line for line in printed.splitlines() if line.startswith("factor: "))
    assert "the Z/XY ratio 1.4 is below 1.5" in factor_line and "isotropic" not in factor_line
    assert "label ids:" not in printed and "converted without restoring (the Z/XY ratio 1.4" in printed
    np.testing.assert_array_equal(tifffile.imread(target), cells)
    with tifffile.TiffFile(target) as tif:
        assert tif.imagej_metadata["spacing"] == pytest.approx(0.21)
    # A Z step finer than the pixels (ratio 0.7) also rounds to 1: nothing is missing, and the plan says that.
    tifffile.imwrite(source, cells, imagej=True, resolution=(1 / 0.15, 1 / 0.15),
                     metadata={"spacing": 0.105, "unit": "um", "axes": "ZYX"})
    with pytest.warns(UserWarning, match="rounds to 1"):
        assert apply.main(["--input", str(source), "--output", str(tmp_path / "never.tif"), "--dry-run"]) == 0
    factor_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("factor: "))
    assert "the Z step is finer than the pixel size (Z/XY ratio 0.7): nothing is missing along Z" in factor_line


# --------------------------------------------------------------------------- #
# bench.py on the isotropic grid
# --------------------------------------------------------------------------- #
def bench_rows(tmp_path, name, voxel, grid):
    import json

    import bench
    from data import make_sample_stack, save_stack

    truth = make_sample_stack((40, 48, 48), seed=2)
    source = tmp_path / f"{name}.tif"
    if not source.exists():
        save_stack(source, truth, voxel, "nm")
    out = tmp_path / f"bench-{name}-{grid}"
    assert bench.main(["--input", str(source), "--factors", "3", "--methods", "nearest", "sdf", "itk_mci",
                       "--output-grid", grid, "--out", str(out)]) == 0
    return truth, json.loads((out / "bench_results.json").read_text())["rows"]


def test_bench_scores_a_non_integer_ratio_against_the_truth_on_that_grid(tmp_path):
    from metrics import calculate_iou

    truth, rows = bench_rows(tmp_path, "urocell_like", (15.0, 16.0, 16.0), "isotropic")
    factor = 3 * 15 / 16
    assert [(r["factor"], r["method"]) for r in rows] == [(2.8125, "nearest"), (2.8125, "sdf"), (2.8125, "itk_mci")]
    assert rows[2]["iou_recon"] is None  # ITK needs whole-slice positions: a row of n/a
    # An independent score: every 3rd slice kept, the truth sampled at the output positions j * 16 / 15.
    n_kept = len(range(0, 40, 3))
    depth = restored_depth(n_kept, factor)
    truth_on_grid = sample_rows(truth, np.arange(depth) * 16 / 15, axis=0, binary=True)
    nearest = interpolate_along_axis(truth[::3], kept_positions(n_kept, factor), depth, method="nearest")
    recon = np.array([z for z in range(depth) if z % 45])  # kept slice 16k lands on output slice 45k
    assert rows[0]["iou_recon"] == pytest.approx(calculate_iou(nearest[recon], truth_on_grid[recon]), abs=1e-5)
    assert 0.5 < rows[0]["iou_recon"] < rows[1]["iou_recon"]  # shape-based beats the nearest slice here too


def test_bench_isotropic_grid_of_an_isotropic_stack_is_the_input_grid(tmp_path):
    _, on_input = bench_rows(tmp_path, "iso", (16.0, 16.0, 16.0), "input")
    _, on_isotropic = bench_rows(tmp_path, "iso", (16.0, 16.0, 16.0), "isotropic")
    scores = ("factor", "method", "iou_recon", "dice_recon", "iou_stack", "assd_vox")
    assert [[r[k] for k in scores] for r in on_isotropic[:2]] == [[r[k] for k in scores] for r in on_input[:2]]


def test_grey_values_restore_on_the_isotropic_grid_in_memory_and_block_wise(tmp_path):
    """Grey values at factor 2.5: the kept slices on the grid verbatim, the others between their neighbours'
    range, and the block-wise output equal to the in-memory one within one grey level."""
    import zarr

    from data import make_sample_intensity

    truth = make_sample_intensity((36, 40, 48), seed=4)
    kept = truth[np.round(kept_positions(15, 2.5)).astype(int)]  # 0, 2.5 -> 2, 5, ...: a grey stack kept at 2.5
    settings = tiny_settings(NUM_EPOCHS=1, BLOCK_SIZE=32)
    restored, model, _ = restore.restore_intensity(kept, 2.5, settings)
    assert restored.shape == (restored_depth(15, 2.5), 40, 48) and restored.dtype == kept.dtype
    kept_index, on_grid = slices_on_grid(15, 2.5, restored.shape[0])
    np.testing.assert_array_equal(restored[on_grid], kept[kept_index])
    out = tmp_path / "grey.ome.zarr"
    blocks.restore_to_ome_zarr(kept, out, 2.5, settings, blocks.OutputMetadata((0.16, 0.16, 0.16), "um"),
                               kind="intensity", model=model, progress=False)
    blockwise = np.asarray(zarr.open_array(store=str(out), path="s0", mode="r")[:])
    assert blockwise.shape == restored.shape
    assert np.abs(blockwise.astype(np.int64) - restored.astype(np.int64)).max() <= 1
