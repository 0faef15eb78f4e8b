"""bench.py on a tiny generated stack: rows, JSON schema, scores computed from the arrays."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bench
from data import downsample_z, make_sample_intensity, make_sample_stack, save_stack
from metrics import calculate_iou, reconstructed_indices, score_intensity_reconstruction
from morph import interpolate_along_axis

REPO = Path(__file__).resolve().parents[1]


def test_bench_quick_rows_and_scores(tmp_path):
    truth = make_sample_stack((40, 48, 48), seed=2)
    source = tmp_path / "tiny.tif"
    save_stack(source, truth, (1.0, 1.0, 1.0))
    out = tmp_path / "bench"
    cmd = [sys.executable, "bench.py", "--quick", "--input", str(source), "--factors", "4", "8",
           "--methods", "nearest", "network", "--out", str(out),
           "--set", "TRAIN_XY_SIZE=32", "TRAIN_Z_SIZE=3", "TRAIN_NB=64", "NUM_EPOCHS=1", "BASE_FILTERS=4", "DEPTH=2"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "bench_results.json").read_text())
    assert set(report) == {"settings", "versions", "device", "date", "rows"}
    # The report names the hardware the times were taken on.
    import torch
    if torch.cuda.is_available():
        assert report["device"].startswith("cuda (") and torch.cuda.get_device_name() in report["device"]
    else:
        from machine import cpu_model, isa_class

        assert report["device"].startswith(f"cpu ({cpu_model()}; ISA class {isa_class()}, ")
        assert re.search(r"; \d+ threads; torch ", report["device"])
    rows = report["rows"]
    assert [(r["factor"], r["method"]) for r in rows] == [(4, "nearest"), (4, "network"), (8, "nearest"), (8, "network")]
    for row in rows:
        assert tuple(row) == bench.ROW_KEYS
        assert row["stack"] == "tiny.tif"
        assert 0.0 <= row["iou_recon"] <= 1.0
    for factor in (4, 8):
        sparse, kept = downsample_z(truth, factor)
        nearest = interpolate_along_axis(sparse, kept, truth.shape[0], method="nearest")
        recon = reconstructed_indices(kept, truth.shape[0])
        row = next(r for r in rows if r["factor"] == factor and r["method"] == "nearest")
        assert row["iou_recon"] == pytest.approx(calculate_iou(nearest[recon], truth[recon]), abs=1e-5)
        assert row["iou_stack"] == pytest.approx(calculate_iou(nearest, truth), abs=1e-5)
        assert row["train_s"] is None
    network = [r for r in rows if r["method"] == "network"]
    assert all(r["train_s"] > 0 and r["voxels_per_s"] > 0 for r in network)
    assert (out / "iou_vs_factor.png").stat().st_size > 1000
    assert "| tiny.tif | 4 | nearest |" in result.stdout
    # Never overwrites an existing output folder.
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_bench_intensity_rows_scores_and_before_after_figure(tmp_path):
    truth = make_sample_intensity((24, 48, 48), seed=1)  # uint8 grey values
    source = tmp_path / "grey.tif"
    save_stack(source, truth, (1.0, 1.0, 1.0))
    out = tmp_path / "bench"
    cmd = [sys.executable, "bench.py", "--kind", "intensity", "--input", str(source), "--factors", "4", "--out",
           str(out), "--set", "TRAIN_XY_SIZE=32", "TRAIN_Z_SIZE=3", "TRAIN_NB=32", "NUM_EPOCHS=1", "BASE_FILTERS=4",
           "DEPTH=2", "INFERENCE_TILE_SIZE=48"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads((out / "bench_results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["linear", "cubic", "network"]
    sparse, kept = downsample_z(truth, 4)
    linear = np.clip(np.rint(interpolate_along_axis(sparse, kept, truth.shape[0], method="linear")), 0, 255)
    expected = score_intensity_reconstruction(linear.astype(np.uint8), truth, kept)
    assert rows[0]["psnr_recon"] == pytest.approx(expected["psnr_recon"], abs=1e-3)
    assert rows[0]["ssim_recon"] == pytest.approx(expected["ssim_recon"], abs=1e-4)
    assert rows[2]["train_s"] > 0 and rows[0]["train_s"] is None
    assert (out / "comparison_grey_f4.png").stat().st_size > 10_000  # the XZ before/after section


def test_bench_rejects_missing_input(tmp_path):
    assert bench.main(["--input", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_crop_benchmarks_the_central_box_of_each_input(tmp_path):
    truth = make_sample_stack((20, 30, 40), seed=2)
    source = tmp_path / "tiny.tif"
    save_stack(source, truth, (1.0, 1.0, 1.0))
    (name, mask, labels), = bench.load_inputs([source], quick=False, sample_shape=None, crop=(16, 10, 100))
    # Centred along Z and Y; X is smaller than asked, so it stays whole.
    np.testing.assert_array_equal(mask, truth[2:18, 10:20, :] != 0)
    assert name == "tiny.tif" and labels is None
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--crop", "16", "0", "8"])


def test_itk_mci_matches_sdf_closely_when_installed():
    pytest.importorskip("itk")
    truth = make_sample_stack((33, 48, 48), seed=4)
    sparse, kept = downsample_z(truth, 4)
    restored = bench.run_itk_mci(sparse, kept, truth.shape[0])
    assert restored.shape == truth.shape
    np.testing.assert_array_equal(restored[kept], sparse)
    recon = reconstructed_indices(kept, truth.shape[0])
    nearest = interpolate_along_axis(sparse, kept, truth.shape[0], method="nearest")
    # A real interpolator: at least as good as copying the nearest slice, minus a small margin.
    assert calculate_iou(restored[recon], truth[recon]) > calculate_iou(nearest[recon], truth[recon]) - 0.05


def test_restore_memory_case_reports_peak_and_writes_isotropic_stack(tmp_path):
    import tifffile

    out = tmp_path / "memory"
    result = bench.measure_restore_memory((5, 96, 160), 8, out)
    assert result["output_shape"] == [33, 96, 160]
    assert result["uint8_output_mb"] == pytest.approx(33 * 96 * 160 / 2**20, abs=1e-3)
    assert result["peak_rss_mb"] > 50  # a child running torch, measured, not assumed
    assert result["peak_over_output"] == pytest.approx(result["peak_rss_mb"] / result["uint8_output_mb"], rel=0.01)
    assert json.loads((out / "memory.json").read_text()) == result
    restored = tifffile.imread(out / "restored.tif")
    source = tifffile.imread(out / "aniso.tif")
    assert restored.shape == (33, 96, 160)
    np.testing.assert_array_equal(restored[::8], source)  # kept slices verbatim
    with pytest.raises(FileExistsError):
        bench.measure_restore_memory((5, 96, 160), 8, out)


def test_out_of_core_case_reports_worker_memory_at_two_sizes(tmp_path):
    import zarr_io

    out = tmp_path / "out_of_core"
    result = bench.measure_out_of_core((3, 64, 96), 8, out, workers=2, worker_memory="1GiB", block_size=32)
    quarter, full = result["runs"]
    assert (quarter["name"], full["name"]) == ("quarter", "full")
    assert full["output_shape"] == [17, 64, 96] and quarter["output_shape"] == [17, 32, 48]
    assert result["voxels_full_over_quarter"] == 4.0
    for run in result["runs"]:
        assert len(run["workers"]) == 2
        for worker in run["workers"]:  # measured in each worker process, below the limit it was given
            assert 50 < worker["peak_rss_mb"] < worker["limit_mb"] == 1024.0
        assert not run["worker_restarted"] and not run["spilled"] and run["voxels_per_s"] > 0
    assert json.loads((out / "out_of_core.json").read_text()) == result
    restored = zarr_io.open_image(out / "full_restored.ome.zarr")
    source = zarr_io.open_image(out / "full_input.ome.zarr")
    assert source.voxel_size_zyx == (8.0, 1.0, 1.0) and restored.voxel_size_zyx == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(restored.read()[::8], source.read())  # kept slices verbatim
    with pytest.raises(FileExistsError):
        bench.measure_out_of_core((3, 64, 96), 8, out)


def test_training_levers_rows_side_by_side():
    rows = bench.measure_training_levers(crop=16, batch=2, rounds=1, steps=1)
    assert [row["lever"].split(" (")[0] for row in rows] == [
        "seed: previous network, float32, NCHW", "+ channels-last", "+ bfloat16 autocast",
        "+ additive skips, no shortcut BatchNorm", "+ fused Adam"]
    assert rows[0]["speedup"] == 1.0
    for row in rows:
        assert row["s_per_step"] > 0 and row["gflop_per_s"] > 0
        assert row["samples_per_s"] == pytest.approx(2 / row["s_per_step"], rel=0.02)


def test_engine_levers_rows_side_by_side():
    rows = bench.measure_engine_levers(tile=32, batch=2, repeats=1)
    assert [row["lever"].split(" (")[0] for row in rows] == [
        "seed: previous network, float32, NCHW", "+ channels-last", "+ BatchNorm folded", "+ bfloat16 autocast",
        "bfloat16, BatchNorm folded, NCHW", "+ additive skips, no shortcut BatchNorm"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["max_abs_diff"] == 0
    assert rows[1]["max_abs_diff"] < 1e-5 and rows[2]["max_abs_diff"] < 1e-5  # layout and folding: exact
    assert all(row["max_abs_diff"] < 0.05 for row in rows[3:5])  # bfloat16: close to the seed
    assert rows[-1]["max_abs_diff"] is None  # another network: no difference to report
    for row in rows:
        assert row["s_per_batch"] > 0 and row["gflop_per_s"] > 0
        assert row["mpixel_per_s"] == pytest.approx(2 * 32 * 32 / row["s_per_batch"] / 1e6, rel=0.15)


def test_isa_runs_one_capped_child_per_class_side_by_side(tmp_path):
    """--isa: one child process per class, capped to it; the rows name the class the child really ran as,
    and a class the CPU lacks is reported, not run (its cap would make torch die of an illegal instruction)."""
    import machine

    stack = tmp_path / "mask.tif"
    save_stack(stack, make_sample_stack((33, 48, 48), seed=2), (1.0, 1.0, 1.0), "um")
    out = tmp_path / "isa"
    classes = ["avx2", "native", "amx"]
    cmd = [sys.executable, "bench.py", "--isa", *classes, "--input", str(stack), "--factors", "8", "--methods",
           "nearest", "--out", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads((out / "bench_isa.json").read_text())
    ran = [c for c in classes if machine.can_emulate(c)]
    assert [row["isa"] for row in rows] == ran and all(row["method"] == "nearest" for row in rows)
    assert len({row["iou_recon"] for row in rows}) == 1  # the same arithmetic-free method, the same score
    for row in rows:
        if row["isa"] == "avx2":
            assert "ISA class avx2, torch capability AVX2" in row["device"]
    for missing in set(classes) - set(ran):
        assert f"{missing}: not run, this CPU lacks it" in result.stdout
    assert bench.without_flags(["--isa", "avx2", "native", "--out", "x", "--quick"], ("--isa", "--out")) == ["--quick"]
