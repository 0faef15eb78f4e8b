"""Block-wise restore (blocks.py) and OME-Zarr I/O (zarr_io.py): the same result as the in-memory
engine, in this process, on a local cluster and on a real scheduler; retries, resume, metadata, CLI."""
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

import apply
import blocks
import labeling
import restore
import train
import zarr_io
from data import (OutputExistsError, UserError, downsample_z, intensity_range, make_sample_intensity,
                  make_sample_labels, normalize_intensity, save_stack)
from eval import default_settings
from model import AttentionResUNet, save_model

REPO = Path(__file__).resolve().parents[1]
SHAPE = (31, 50, 90)  # (D, H, W) of the isotropic truth; H and W are not multiples of the block size
BLOCK = 32
THRESHOLD = 0.5
UM = blocks.OutputMetadata((1.0, 1.0, 1.0), "um")  # the restored stack's voxel size and unit
CELLS_UM = blocks.OutputMetadata((1.0, 1.0, 1.0), "um", label_name="cells")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return AttentionResUNet(in_channels=3, depth=1, base_filters=4).eval()


def tiny_settings(**overrides):
    settings = default_settings()
    settings.update(TRAIN_Z_SIZE=3, TRAIN_XY_SIZE=16, INFERENCE_TILE_SIZE=32, INFERENCE_BATCH_SIZE=8,
                    PRECISION="fp32", PROBABILITY_THRESHOLD=THRESHOLD, DEVICE="cpu")
    settings.update(overrides)
    return settings


def kept_labels(factor, seed=0, shape=SHAPE):
    return downsample_z(make_sample_labels(shape, seed=seed), factor)[0]


def write_input(path, sparse_ids, voxel=(4.0, 1.0, 1.0), unit="um", translation=(0.0, 0.0, 0.0), version="0.4"):
    """An anisotropic OME-Zarr input: the mask as the image, the ids as labels/cells."""
    layout = zarr_io.create_output(path, sparse_ids.shape, voxel, unit, translation, version,
                                   label_dtype=sparse_ids.dtype, label_name="cells", chunk_xy=32, pyramid=False)
    layout.image.write((slice(None),) * 3, ((sparse_ids > 0) * 255).astype(np.uint8))
    layout.labels.write((slice(None),) * 3, sparse_ids)
    return zarr_io.open_image(path), zarr_io.open_image(Path(path) / "labels" / "cells")


def in_memory_probabilities(model, sparse_mask, factor, settings):
    return restore.apply_model_to_stack_tiled_slice_by_slice(model, sparse_mask, factor, out_dtype=np.float32,
                                                             progress=False, **restore.inference_kwargs(settings))


def assert_masks_agree(mask, probabilities):
    """Identical except voxels whose probability lies within 1e-3 of the threshold."""
    differ = mask != (probabilities >= THRESHOLD)
    assert not np.any(differ & (np.abs(probabilities - THRESHOLD) > 1e-3))


def read_level(path, level=0):
    return np.asarray(zarr.open_array(store=str(path), path=f"s{level}", mode="r")[:])


@pytest.mark.parametrize("block", [16, 32, 64])
def test_tile_work_is_the_pixels_the_engine_runs_block_by_block(tiny_model, block):
    """The plan's block work (blocks.tile_work) against the engine's own counters: every tile restore_block
    runs for each block, summed, over the tiles of one restore of the whole stack."""
    factor, ids = 4, kept_labels(4, seed=1)
    inference = dict(restore.inference_kwargs(tiny_settings()), skip_empty=False)
    shape_dhw = ((ids.shape[0] - 1) * factor + 1,) + ids.shape[1:]

    def pixels_run(block_size):
        plan, stats = blocks.BlockPlan(shape_dhw, block_size), {}
        for index in range(len(plan)):
            (wy0, wy1), (wx0, wx1) = blocks.read_window_for(ids.shape[1:], plan.region(index), factor, inference)
            restore.restore_block(tiny_model, ids[:, wy0:wy1, wx0:wx1] > 0, (wy0, wx0), ids.shape[1:],
                                  plan.region(index), factor, progress=False, stats=stats, **inference)
        return stats["pixels_run"]

    whole = pixels_run(max(ids.shape[1:]))
    assert blocks.tile_work(shape_dhw, max(ids.shape[1:]), inference) == 1.0
    assert blocks.tile_work(shape_dhw, block, inference) == pytest.approx(pixels_run(block) / whole)
    assert blocks.tile_work(shape_dhw, block, inference) > 1.0  # every block edge cuts a tile here


# --------------------------------------------------------------------------- #
# (a) the block-wise result is the in-memory result
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("factor,version", [(2, "0.4"), (3, "0.5"), (4, "0.4"), (10, "0.5")])
def test_blockwise_equals_in_memory(tmp_path, tiny_model, factor, version):
    settings = tiny_settings()
    ids = kept_labels(factor, seed=factor)
    image, _ = write_input(tmp_path / "in.ome.zarr", ids, version=version)
    out, probs = tmp_path / "out.ome.zarr", tmp_path / "probs.ome.zarr"
    summary = blocks.restore_to_ome_zarr(image, out, factor, dict(settings, BLOCK_SIZE=BLOCK, NGFF_VERSION=version), UM,
                                         model=tiny_model, probabilities="float32", probabilities_output=probs,
                                         progress=False)
    plan = blocks.BlockPlan(((ids.shape[0] - 1) * factor + 1,) + ids.shape[1:], BLOCK)
    assert summary["state"] == "complete" and summary["restored"] == len(plan) == 6
    # Blocks really read less than the stack: the kernel's read window of the first block.
    (wy0, wy1), (wx0, wx1) = blocks.read_window_for(ids.shape[1:], plan.region(0), factor,
                                                    restore.inference_kwargs(settings))
    assert (wy1 - wy0) * (wx1 - wx0) < ids.shape[1] * ids.shape[2]

    expected = in_memory_probabilities(tiny_model, ids > 0, factor, settings)
    probabilities, mask = read_level(probs), read_level(out)
    assert probabilities.shape == mask.shape == expected.shape == plan.shape_dhw
    np.testing.assert_allclose(probabilities, expected, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(mask[::factor], np.where(ids > 0, 255, 0))  # kept slices verbatim
    assert set(np.unique(mask)) <= {0, 255}
    assert_masks_agree(mask != 0, expected)


def test_label_ids_and_pyramid_match_whole_stack(tmp_path, tiny_model):
    factor = 3
    ids = kept_labels(factor, seed=5, shape=(31, 70, 90))
    _, labels = write_input(tmp_path / "in.ome.zarr", ids)
    out = tmp_path / "out.ome.zarr"
    summary = blocks.restore_to_ome_zarr(labels, out, factor, tiny_settings(BLOCK_SIZE=BLOCK), CELLS_UM,
                                         model=tiny_model, labels_source=labels, label_halo=4, progress=False)
    mask = read_level(out) != 0
    restored_ids = read_level(out / "labels" / "cells")
    # Whole-slice assignment on the same mask: the halo grew where it had to, and the ids agree everywhere.
    np.testing.assert_array_equal(restored_ids, labeling.assign_labels(mask, ids, factor))
    assert summary["label_blocks_inexact"] == 0 and max(summary["label_halos"]) > 4
    assert restored_ids.dtype == ids.dtype
    # Pyramid: max-pooled mask, strided ids; scratch data of the run removed.
    level1 = read_level(out, 1)
    padded = np.pad(mask, [(0, s % 2) for s in mask.shape]).astype(np.uint8) * 255
    np.testing.assert_array_equal(level1, padded.reshape(level1.shape[0], 2, level1.shape[1], 2, level1.shape[2],
                                                         2).max(axis=(1, 3, 5)))
    np.testing.assert_array_equal(read_level(out / "labels" / "cells", 1), restored_ids[::2, ::2, ::2])
    assert not (out / blocks.PROGRESS_GROUP).exists() and not (out / blocks.MODEL_FILE).exists()
    assert zarr.open_group(str(out)).attrs[zarr_io.RESTORE_ATTRIBUTE]["state"] == "complete"


# --------------------------------------------------------------------------- #
# (b) a local cluster of two worker processes, (c) a real scheduler and two workers
# --------------------------------------------------------------------------- #
def test_local_cluster_of_two_processes(tmp_path, tiny_model):
    factor = 4
    ids = kept_labels(factor, seed=7)
    settings = tiny_settings()
    out = tmp_path / "out.ome.zarr"
    # In-memory (TIFF-like) inputs are staged into the output for the worker processes.
    summary = blocks.restore_to_ome_zarr(ids > 0, out, factor,
                                         dict(settings, BLOCK_SIZE=BLOCK, WORKERS=2, WORKER_MEMORY="1GiB"), CELLS_UM,
                                         model=tiny_model, labels_source=ids, processes=True, progress=False)
    assert summary["state"] == "complete" and summary["restored"] == 6
    mask = read_level(out) != 0
    assert_masks_agree(mask, in_memory_probabilities(tiny_model, ids > 0, factor, settings))
    np.testing.assert_array_equal(read_level(out / "labels" / "cells"), labeling.assign_labels(mask, ids, factor))


def test_local_workers_take_the_users_malloc_setting(monkeypatch):
    """A local cluster's workers start with Dask's malloc setting (memory-safe, the default), and without it
    when the user's Dask configuration says so: heap reuse, 1.6-2.4x faster restores for more memory
    (docs/large-volumes.md#worker-processes-and-glibcs-malloc)."""
    import dask

    key = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
    # Dask's nanny writes its setting into this process' environment; the test leaves it as it found it.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "unset below")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    with dask.config.set({key: None}), blocks.dask_client(workers=1, worker_memory="1GiB") as client:
        assert list(client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_")).values()) == [None]
    default = dask.config.get(key)
    if default is not None:
        with blocks.dask_client(workers=1, worker_memory="1GiB") as client:
            assert list(client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_")).values()) == [str(default)]


@pytest.fixture
def dask_scheduler(tmp_path):
    """A ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1, started as a cluster's operator
    would: the dependencies installed, this checkout neither on their path nor their working folder."""
    scheduler_file = tmp_path / "scheduler.json"
    python_path = os.pathsep.join(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != REPO)
    env = dict(os.environ, PYTHONPATH=python_path, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    common = dict(cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                   "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                                  **common)]
    try:
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        for _ in range(2):
            processes.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                               "--host", "127.0.0.1", "--nthreads", "1", "--memory-limit", "1GiB",
                                               "--no-dashboard", "--no-nanny"], **common))
        from distributed import Client

        def imports_the_project():  # local: pickled by value, as the workers cannot import this file either
            import importlib.util
            return importlib.util.find_spec("blocks") is not None

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=90)
            assert not any(client.run(imports_the_project).values())
            assert not client.run_on_scheduler(imports_the_project)
        yield address
    finally:
        for process in processes[1:]:  # workers without nannies: nothing of theirs outlives them
            process.kill()
        processes[0].terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_scheduler_with_two_worker_subprocesses(tmp_path, tiny_model, dask_scheduler):
    factor = 3
    ids = kept_labels(factor, seed=8)
    image, _ = write_input(tmp_path / "in.ome.zarr", ids)
    settings = tiny_settings()
    out = tmp_path / "out.ome.zarr"
    summary = blocks.restore_to_ome_zarr(image, out, factor, dict(settings, BLOCK_SIZE=BLOCK, SCHEDULER=dask_scheduler),
                                         UM, model=tiny_model, progress=False)
    assert summary["state"] == "complete" and summary["restored"] == 6
    local = tmp_path / "local.ome.zarr"
    blocks.restore_to_ome_zarr(image, local, factor, dict(settings, BLOCK_SIZE=BLOCK), UM, model=tiny_model,
                               progress=False)
    np.testing.assert_array_equal(read_level(out), read_level(local))
    np.testing.assert_array_equal(read_level(out, 1), read_level(local, 1))
    assert_masks_agree(read_level(out) != 0, in_memory_probabilities(tiny_model, ids > 0, factor, settings))


# --------------------------------------------------------------------------- #
# (d) retries, resume, existing outputs
# --------------------------------------------------------------------------- #
class FlakyKernel:
    """restore.restore_block that fails the first attempt at each region in ``fail_regions``."""

    def __init__(self, fail_regions=()):
        self.fail_regions, self.calls, self.kernel = set(fail_regions), 0, restore.restore_block

    def __call__(self, model, window, origin, global_hw, region, *args, **kwargs):
        self.calls += 1
        if region in self.fail_regions:
            self.fail_regions.discard(region)
            raise RuntimeError(f"simulated failure at {region}")
        return self.kernel(model, window, origin, global_hw, region, *args, **kwargs)


def block_regions(factor, n_kept_shape, indices):
    plan = blocks.BlockPlan(((n_kept_shape[0] - 1) * factor + 1,) + tuple(n_kept_shape[1:]), BLOCK)
    return [plan.region(i) for i in indices]


def test_interrupted_run_resumes_to_identical_result(tmp_path, tiny_model, monkeypatch):
    factor = 4
    ids = kept_labels(factor, seed=2)
    image, labels = write_input(tmp_path / "in.ome.zarr", ids)
    settings = tiny_settings(BLOCK_SIZE=BLOCK)
    run = dict(model=tiny_model, labels_source=labels, progress=False)
    clean = tmp_path / "clean.ome.zarr"
    blocks.restore_to_ome_zarr(labels, clean, factor, settings, CELLS_UM, **run)

    out = tmp_path / "out.ome.zarr"
    monkeypatch.setattr(restore, "restore_block", FlakyKernel(block_regions(factor, ids.shape, [3])))
    with pytest.raises(blocks.BlockFailedError, match="failed 1 times") as failed:
        blocks.restore_to_ome_zarr(labels, out, factor, settings, CELLS_UM, retries=0, **run)
    # A user error for the command line (one line), the task's exception chained.
    assert isinstance(failed.value, UserError) and "simulated failure" in str(failed.value.__cause__)
    assert blocks.finished_blocks(str(out), "restore") == {0, 1, 2}
    # A block half-written when the run died: its data is there, its marker is not.
    (y0, y1), (x0, x1) = blocks.BlockPlan(read_level(clean).shape, BLOCK).region(3)
    zarr.open_array(store=str(out), path="s0", mode="r+")[:5, y0:y1, x0:x1] = 77
    with pytest.raises(OutputExistsError):
        blocks.restore_to_ome_zarr(labels, out, factor, settings, CELLS_UM, **run)
    with pytest.raises(UserError, match="block_size"):
        blocks.restore_to_ome_zarr(labels, out, factor, dict(settings, RESUME=True, BLOCK_SIZE=64), CELLS_UM, **run)

    counting = FlakyKernel()
    monkeypatch.setattr(restore, "restore_block", counting)
    # Batching changes the speed, not the result: a resume with other batch settings is the same run.
    rebatched = dict(settings, INFERENCE_BATCH_SIZE=3, INFERENCE_BATCH_PIXELS=0)
    summary = blocks.restore_to_ome_zarr(labels, out, factor, dict(rebatched, RESUME=True), CELLS_UM,
                                         **dict(run, model=None))  # the model kept in the output is used
    assert counting.calls == 3 and summary["skipped"] == 3 and summary["restored"] == 3
    for level in range(2):
        np.testing.assert_array_equal(read_level(out, level), read_level(clean, level))
        np.testing.assert_array_equal(read_level(out / "labels" / "cells", level),
                                      read_level(clean / "labels" / "cells", level))
    again = blocks.restore_to_ome_zarr(labels, out, factor, dict(settings, RESUME=True), CELLS_UM, **run)
    assert again["restored"] == 0 and again["state"] == "complete"


def test_failed_blocks_are_retried_here_and_on_dask(tmp_path, tiny_model, monkeypatch):
    factor = 4
    ids = kept_labels(factor, seed=3)
    settings = tiny_settings()
    flaky = FlakyKernel(block_regions(factor, ids.shape, [1, 4]))
    monkeypatch.setattr(restore, "restore_block", flaky)
    summary = blocks.restore_to_ome_zarr(ids > 0, tmp_path / "here.ome.zarr", factor, dict(settings, BLOCK_SIZE=BLOCK),
                                         UM, model=tiny_model, retries=1, progress=False)
    assert summary["state"] == "complete" and flaky.calls == 6 + 2
    # Dask's retries=: threads share this process' (patched) kernel, so its failures are seen.
    flaky = FlakyKernel(block_regions(factor, ids.shape, [0, 2]))
    monkeypatch.setattr(restore, "restore_block", flaky)
    image, _ = write_input(tmp_path / "in.ome.zarr", ids)
    summary = blocks.restore_to_ome_zarr(image, tmp_path / "dask.ome.zarr", factor,
                                         dict(settings, BLOCK_SIZE=BLOCK, WORKERS=1), UM, model=tiny_model, retries=1,
                                         processes=False, progress=False)
    assert summary["state"] == "complete" and flaky.calls == 6 + 2
    np.testing.assert_array_equal(read_level(tmp_path / "dask.ome.zarr"), read_level(tmp_path / "here.ome.zarr"))


def test_failing_block_is_one_line_and_resume_is_crash_safe(tmp_path, tiny_model, monkeypatch, capsys):
    """A block that keeps failing (a bug) stops the CLI with one line (exit 2) that names the error and
    the resume; its traceback is kept in the output. The resume accepts the input under another
    spelling of its path, refuses other metadata, and records completion before it cleans up."""
    factor = 4
    ids = kept_labels(factor, seed=2)
    image, _ = write_input(tmp_path / "seg.ome.zarr", ids, voxel=(2.0, 0.5, 0.5))
    save_model(tmp_path / "m.pt", tiny_model, {"factor": factor, "inference_tile_size": 32, "train_xy_size": 16})
    monkeypatch.chdir(tmp_path)
    common = ["--model", "m.pt", "--precision", "fp32", "--device", "cpu", "--block-size", str(BLOCK), "--output",
              "iso.ome.zarr"]
    kernel, broken = restore.restore_block, set(block_regions(factor, ids.shape, [2]))

    def buggy_kernel(model, window, origin, global_hw, region, *args, **kwargs):
        if region in broken:
            raise ZeroDivisionError("a bug in the kernel")
        return kernel(model, window, origin, global_hw, region, *args, **kwargs)

    monkeypatch.setattr(restore, "restore_block", buggy_kernel)
    assert apply.main(["--input", "seg.ome.zarr"] + common) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback (most recent call last)" not in err
    assert "ZeroDivisionError: a bug in the kernel" in err and "run the same command again with --resume" in err
    report = tmp_path / "iso.ome.zarr" / blocks.ERROR_FILE
    assert str(report) in err and "buggy_kernel" in report.read_text()
    assert blocks.finished_blocks("iso.ome.zarr", "restore") == {0, 1}

    # The same input must be the same array with the same metadata.
    with pytest.raises(UserError, match=r"input \(.*translation_zyx"):
        blocks.restore_to_ome_zarr(dataclasses.replace(image, translation_zyx=(5.0, 0.0, 0.0)), "iso.ome.zarr", factor,
                                   tiny_settings(RESUME=True, BLOCK_SIZE=BLOCK),
                                   blocks.OutputMetadata((0.5, 0.5, 0.5), "um"), progress=False)
    # Killed right after 'complete' is recorded (the clean-up fails here): complete, readable, resumable.
    monkeypatch.setattr(restore, "restore_block", kernel)
    cleanup = blocks._remove_scaffolding
    monkeypatch.setattr(blocks, "_remove_scaffolding", lambda output: (_ for _ in ()).throw(KeyboardInterrupt))
    assert apply.main(["--input", "./seg.ome.zarr", "--resume"] + common) == 130  # './seg' is 'seg'
    assert "keeps the blocks written so far: the same command with --resume" in capsys.readouterr().err
    out = tmp_path / "iso.ome.zarr"
    assert zarr.open_group(str(out)).attrs[zarr_io.RESTORE_ATTRIBUTE]["state"] == "complete"
    assert (out / blocks.MODEL_FILE).exists() and zarr_io.open_image(out).read().shape[0] == 29
    monkeypatch.setattr(blocks, "_remove_scaffolding", cleanup)
    assert apply.main(["--input", str(tmp_path / "seg.ome.zarr"), "--resume"] + common) == 0
    printed = capsys.readouterr().out
    assert "already complete; nothing to resume" in printed and "Wrote" not in printed
    assert not (out / blocks.MODEL_FILE).exists() and not report.exists() and not (out / blocks.PROGRESS_GROUP).exists()


def test_outputs_are_laid_out_beside_and_renamed_into_place(tmp_path, tiny_model, monkeypatch):
    """A new output (and its probabilities) is made in a hidden folder and renamed into place with its
    record. Killed between the two renames: the output resumes and moves the probabilities itself."""
    ids = kept_labels(4, seed=1, shape=(13, 40, 40))
    out, probs = tmp_path / "out.ome.zarr", tmp_path / "out_probabilities.ome.zarr"
    settings = tiny_settings(BLOCK_SIZE=BLOCK)
    run = dict(model=tiny_model, probabilities="uint8", probabilities_output=probs, progress=False)
    move = blocks._move_into_place

    def killed_after_the_output(staged, target):
        if target == str(probs):
            raise KeyboardInterrupt
        move(staged, target)

    monkeypatch.setattr(blocks, "_move_into_place", killed_after_the_output)
    with pytest.raises(KeyboardInterrupt):
        blocks.restore_to_ome_zarr(ids > 0, out, 4, settings, UM, **run)
    assert not probs.exists() and zarr.open_group(str(out)).attrs[zarr_io.RESTORE_ATTRIBUTE]["state"] == "running"
    monkeypatch.setattr(blocks, "_move_into_place", move)
    summary = blocks.restore_to_ome_zarr(ids > 0, out, 4, dict(settings, RESUME=True), UM, **run)
    assert summary["state"] == "complete" and read_level(probs).shape == read_level(out).shape == (13, 40, 40)
    replaced = blocks.restore_to_ome_zarr(ids > 0, out, 4, settings, UM, overwrite=True, **run)
    assert replaced["state"] == "complete" and replaced["restored"] == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no scratch folder left


def test_existing_outputs_are_never_touched_without_overwrite_or_resume(tmp_path, tiny_model):
    factor = 4
    ids = kept_labels(factor, seed=1, shape=(13, 40, 40))
    settings = tiny_settings()
    out = tmp_path / "out.ome.zarr"
    blocks.restore_to_ome_zarr(ids > 0, out, factor, dict(settings, BLOCK_SIZE=BLOCK), UM, model=tiny_model,
                               progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(OutputExistsError, match="--overwrite"):
        blocks.restore_to_ome_zarr(ids > 0, out, factor, dict(settings, BLOCK_SIZE=BLOCK), UM, model=tiny_model,
                                   progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    blocks.restore_to_ome_zarr(ids > 0, out, factor, dict(settings, BLOCK_SIZE=BLOCK), UM, model=tiny_model,
                               progress=False, overwrite=True)
    assert read_level(out).shape == (13, 40, 40)
    assert all(p.stat().st_mtime_ns != before[p] for p in [out / ".zattrs"])
    # --overwrite deletes Zarr stores only, and --resume needs a run's own record.
    folder = tmp_path / "notes.ome.zarr"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not a Zarr store"):
        blocks.restore_to_ome_zarr(ids > 0, folder, factor, settings, UM, model=tiny_model, overwrite=True,
                                   progress=False)
    assert (folder / "notes.txt").read_text() == "mine"
    foreign = tmp_path / "foreign.ome.zarr"
    write_input(foreign, ids)
    with pytest.raises(UserError, match="not written by apply.py"):
        blocks.restore_to_ome_zarr(ids > 0, foreign, factor, dict(settings, RESUME=True), UM, model=tiny_model,
                                   progress=False)


# --------------------------------------------------------------------------- #
# (e) metadata read back by ome_zarr.reader (what napari uses)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_reader_reads_voxel_size_unit_and_translation(tmp_path, tiny_model, version):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    factor = 4
    ids = kept_labels(factor, seed=4, shape=(13, 40, 70))
    _, labels = write_input(tmp_path / "in.ome.zarr", ids, voxel=(2.0, 0.5, 0.5), translation=(3.0, 1.5, -2.0),
                            version=version)
    assert (labels.voxel_size_zyx, labels.unit, labels.translation_zyx) == ((2.0, 0.5, 0.5), "um", (3.0, 1.5, -2.0))
    assert labels.is_label and labels.ngff_version == version
    out = tmp_path / "out.ome.zarr"
    blocks.restore_to_ome_zarr(labels, out, factor, tiny_settings(NGFF_VERSION=version, BLOCK_SIZE=BLOCK),
                               blocks.OutputMetadata((0.5, 0.5, 0.5), "um", labels.translation_zyx, label_name="cells"),
                               model=tiny_model, labels_source=labels, progress=False)
    nodes = list(Reader(parse_url(str(out)))())
    image = next(n for n in nodes if n.load(Multiscales) and not n.load(Label))
    label = next(n for n in nodes if n.load(Label))
    for node, shift in ((image, 0.25), (label, 0.0)):  # max-pooled levels sit at their block's centre
        transforms = node.metadata["coordinateTransformations"]
        assert transforms[0] == [{"type": "scale", "scale": [0.5, 0.5, 0.5]},
                                 {"type": "translation", "translation": [3.0, 1.5, -2.0]}]
        assert transforms[1][0]["scale"] == [1.0, 1.0, 1.0]
        assert transforms[1][1]["translation"] == [3.0 + shift, 1.5 + shift, -2.0 + shift]
        assert [axis["unit"] for axis in node.metadata["axes"]] == ["micrometer"] * 3
        assert node.data[0].shape == (13, 40, 70)
    assert label.metadata["name"] == "cells"
    assert np.array_equal(np.asarray(label.data[0][::factor]), ids)
    version_seen = zarr.open_group(str(out)).attrs.asdict()
    assert (version_seen["ome"]["version"] if version == "0.5" else version_seen["multiscales"][0]["version"]) \
        == version
    assert zarr.open_group(str(out)).info._zarr_format == (2 if version == "0.4" else 3)


def test_reading_units_plain_arrays_and_bad_stores(tmp_path):
    group = zarr.open_group(str(tmp_path / "mixed.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(1, 5, 8, 9), chunks=(1, 5, 8, 9), dtype="uint8")
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "c", "type": "channel"}, {"name": "z", "type": "space", "unit": "micrometer"},
        {"name": "y", "type": "space", "unit": "nanometer"}, {"name": "x", "type": "space", "unit": "nanometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 0.2, 50, 50]},
                                                                 {"type": "translation",
                                                                  "translation": [0, 1, 100, 0]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 2, 2]}]}]
    image = zarr_io.open_image(tmp_path / "mixed.ome.zarr")
    assert image.shape == (5, 8, 9) and image.leading_index == (0,) and image.unit == "nm"
    np.testing.assert_allclose(image.voxel_size_zyx, (200.0, 100.0, 100.0))  # z converted to nm, global scale
    np.testing.assert_allclose(image.translation_zyx, (1000.0, 200.0, 0.0))
    assert image.read().shape == (5, 8, 9)
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(4, 6, 6), chunks=(4, 6, 6), dtype="uint16")
    plain = zarr_io.open_image(tmp_path / "plain.zarr")
    assert plain.voxel_size_zyx is None and zarr_io.read_calibration(tmp_path / "plain.zarr") is None
    zarr.open_group(str(tmp_path / "two_channels.zarr"), mode="w").create_array("a", shape=(2, 3, 4, 4), dtype="u1")
    with pytest.raises(UserError, match="expected a 3D stack"):
        zarr_io.open_image(tmp_path / "two_channels.zarr" / "a")
    with pytest.raises(UserError, match="labels group"):
        zarr_io.open_image(write_input(tmp_path / "l.ome.zarr", np.ones((3, 4, 4), np.uint16))[0].path + "/labels")


# --------------------------------------------------------------------------- #
# (f) apply.py end to end
# --------------------------------------------------------------------------- #
def test_cli_zarr_to_zarr_with_resume_and_zarr_to_tif(tmp_path, tiny_model, capsys):
    factor = 4
    ids = kept_labels(factor, seed=6)
    write_input(tmp_path / "seg.ome.zarr", ids, voxel=(2.0, 0.5, 0.5), translation=(1.0, 0.0, 0.0))
    model_path = save_model(tmp_path / "m.pt", tiny_model, {"factor": factor, "inference_tile_size": 32,
                                                            "train_xy_size": 16})
    common = ["--model", str(model_path), "--precision", "fp32", "--device", "cpu"]
    source = str(tmp_path / "seg.ome.zarr" / "labels" / "cells")
    iso = tmp_path / "seg_iso.ome.zarr"
    zarr_args = ["--input", source, "--output", str(iso), "--block-size", str(BLOCK)] + common
    assert apply.main(zarr_args + ["--max-blocks", "2"]) == 0
    assert "2 of 6 blocks restored" in capsys.readouterr().out
    assert apply.main(zarr_args) == 2 and "--resume" in capsys.readouterr().err
    assert apply.main(zarr_args + ["--resume", "--ngff-version", "0.4"]) == 0
    resumed = capsys.readouterr().out
    assert f"the ids in {iso}/labels/cells); training" in resumed and "4 blocks restored, 2 already done" in resumed
    assert apply.main(["--input", source, "--output", str(tmp_path / "seg_iso.tif")] + common) == 0
    in_memory = tifffile.imread(tmp_path / "seg_iso.tif")
    blockwise = zarr_io.open_image(iso / "labels" / "cells")
    assert blockwise.voxel_size_zyx == (0.5, 0.5, 0.5) and blockwise.translation_zyx == (1.0, 0.0, 0.0)
    ids_blockwise = blockwise.read()
    assert ids_blockwise.shape == in_memory.shape == ((ids.shape[0] - 1) * factor + 1,) + ids.shape[1:]
    np.testing.assert_array_equal(ids_blockwise, in_memory)  # block by block = whole stack in memory
    np.testing.assert_array_equal(ids_blockwise[::factor], ids)

    # TIFF in, Zarr out (the TIFF carries the voxel size); flags that need an OME-Zarr output are refused.
    save_stack(tmp_path / "aniso.tif", ids > 0, (2.0, 0.5, 0.5), "um")
    assert apply.main(["--input", str(tmp_path / "aniso.tif"), "--output", str(tmp_path / "from_tif.ome.zarr"),
                       "--workers", "0", "--ngff-version", "0.5"] + common) == 0
    assert np.array_equal(read_level(tmp_path / "from_tif.ome.zarr") != 0, ids_blockwise != 0)
    assert apply.main(["--input", str(tmp_path / "aniso.tif"), "--output", str(tmp_path / "x.tif"), "--workers",
                       "2"] + common) == 2
    assert "OME-Zarr output" in capsys.readouterr().err and not (tmp_path / "x.tif").exists()
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(4, 32, 32), chunks=(4, 32, 32), dtype="uint8")
    assert apply.main(["--input", str(tmp_path / "plain.zarr"), "--output", str(tmp_path / "p.ome.zarr")]
                      + common) == 2
    assert "--xy-size" in capsys.readouterr().err and not (tmp_path / "p.ome.zarr").exists()
    assert apply.main(["--input", source, "--output", str(tmp_path / "b.ome.zarr"), "--block-size", "300"]
                      + common) == 2
    assert "multiple of the output chunk" in capsys.readouterr().err


def test_training_on_a_large_store_reads_bounded_windows(tmp_path, monkeypatch):
    ids = kept_labels(4, seed=9, shape=(41, 200, 260))
    image, _ = write_input(tmp_path / "in.ome.zarr", ids)
    settings = tiny_settings(TRAIN_NB=200, MIN_CONTENT_RATIO=0.0)  # every window drawn is kept
    whole, panel_width, _ = blocks.training_stack(image, settings)
    np.testing.assert_array_equal(whole, ids > 0)  # a small store: all of it, one panel
    assert panel_width == ids.shape[2]
    reads = []
    original_read = zarr_io.ZarrImage.read

    def spy(self, z=slice(None), y=slice(None), x=slice(None)):
        reads.append((y, x))
        return original_read(self, z, y, x)

    monkeypatch.setattr(zarr_io.ZarrImage, "read", spy)
    budget = ids.shape[0] * 128 * 128 * 3  # three windows of 8 x TRAIN_XY_SIZE = 128 pixels, all K slices
    stack, panel_width, _ = blocks.training_stack(image, settings, max_bytes=budget)
    assert stack.shape == (ids.shape[0], 128, 3 * 128) and stack.nbytes <= budget and panel_width == 128
    assert len(reads) == 3  # only the windows were read, each once
    for j, (y, x) in enumerate(reads):
        assert (y.stop - y.start, x.stop - x.start) == (128, 128)
        np.testing.assert_array_equal(stack[:, :, j * 128:(j + 1) * 128], ids[:, y, x] > 0)


def test_block_wise_training_draws_each_crop_within_one_window(tmp_path, monkeypatch, capsys):
    # A store larger than the training budget trains on windows laid side by side: apply.py passes
    # their width down, so that no training crop straddles two (their meeting column is in no image).
    ids = kept_labels(4, seed=9, shape=(41, 200, 260))
    write_input(tmp_path / "in.ome.zarr", ids)
    monkeypatch.setattr(blocks, "TRAINING_BYTES", ids.shape[0] * 128 * 128 * 2)  # two windows of 128 px
    seen = {}

    class Stop(Exception):
        pass

    def spy(stack, crop_size_zyx, n_samples, *args, **kwargs):
        seen.update(shape=stack.shape, panel_width=args[-2] if args else kwargs.get("panel_width"))  # then label_ids
        raise Stop

    monkeypatch.setattr(train, "create_cropped_image_dataset", spy)
    with pytest.raises(Stop):
        apply.main(["--input", str(tmp_path / "in.ome.zarr"), "--output", str(tmp_path / "o.ome.zarr"),
                    "--train-xy-size", "16", "--train-z-size", "3", "--train-nb", "200", "--device", "cpu",
                    "--block-size", str(BLOCK)])
    assert seen == {"shape": (ids.shape[0], 128, 2 * 128), "panel_width": 128}
    assert "2 windows of 128 x 128 pixels" in capsys.readouterr().out


def test_cli_trains_on_a_zarr_input_and_resume_reuses_its_model(tmp_path, capsys):
    ids = kept_labels(4, seed=6)
    write_input(tmp_path / "seg.ome.zarr", ids, voxel=(2.0, 0.5, 0.5))
    recipe = ["--train-xy-size", "16", "--train-z-size", "3", "--train-nb", "32", "--num-epochs", "1",
              "--base-filters", "4", "--depth", "1", "--inference-tile-size", "32", "--precision", "fp32",
              "--device", "cpu", "--block-size", str(BLOCK), "--input", str(tmp_path / "seg.ome.zarr")]
    out = tmp_path / "iso.ome.zarr"
    assert apply.main(recipe + ["--output", str(out), "--max-blocks", "2", "--save-model",
                                str(tmp_path / "m.pt")]) == 0
    assert "Training on kept slices (8, 50, 90)" in capsys.readouterr().out
    assert apply.main(recipe + ["--output", str(out), "--resume"]) == 0
    resumed = capsys.readouterr().out
    assert "Training" not in resumed and "4 blocks restored, 2 already done" in resumed
    with pytest.warns(UserWarning, match="--train-nb, --num-epochs, --base-filters, --depth only change training"):
        assert apply.main(recipe + ["--output", str(tmp_path / "again.ome.zarr"), "--model",
                                    str(tmp_path / "m.pt")]) == 0
    np.testing.assert_array_equal(read_level(out), read_level(tmp_path / "again.ome.zarr"))


# --------------------------------------------------------------------------- #
# (g) grey-scale stacks: the same block-wise path, grey values out
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def tiny_intensity_model():
    torch.manual_seed(1)
    return AttentionResUNet(in_channels=3, depth=1, base_filters=4, output="intensity").eval()


def kept_grey_values(factor, dtype=np.uint8, seed=0, shape=SHAPE):
    """Kept slices of the grey-scale phantom: uint8 as made, uint16 scaled, float32 with negative values."""
    sparse = downsample_z(make_sample_intensity(shape, seed=seed), factor)[0]
    if np.dtype(dtype) == np.uint16:
        return sparse.astype(np.uint16) * 200
    return sparse if np.dtype(dtype) == np.uint8 else (sparse / np.float32(255) * 3.7 - 0.5).astype(dtype)


def write_grey_input(path, sparse, voxel=(4.0, 1.0, 1.0), unit="um"):
    """An anisotropic grey-scale OME-Zarr input (one level, no labels)."""
    layout = zarr_io.create_output(path, sparse.shape, voxel, unit, image_format=zarr_io.ImageFormat(sparse.dtype, "mean"),
                                   chunk_xy=32, pyramid=False)
    layout.image.write((slice(None),) * 3, sparse)
    return zarr_io.open_image(path)


def mean_pooled(values):
    """Reference pyramid step of grey values: 2 x 2 x 2 means, the image's last voxel repeated at odd ends."""
    padded = np.pad(values.astype(np.float64), [(0, s % 2) for s in values.shape], mode="edge")
    d, h, w = padded.shape
    return padded.reshape(d // 2, 2, h // 2, 2, w // 2, 2).mean(axis=(1, 3, 5))


# float32 grey values are compared with one tile per network call: oneDNN's convolutions round the last bit
# differently for some batch sizes, and blocks batch their tiles differently from the whole stack (integer grey
# values round such differences away, so uint8 runs with the usual batches).
@pytest.mark.parametrize("dtype,batch_size,shape,block_sizes", [(np.uint8, 8, SHAPE, (32, 48)),
                                                                 (np.float32, 1, (13, 30, 40), (16, 24))])
def test_blockwise_grey_values_equal_in_memory(tmp_path, tiny_intensity_model, dtype, batch_size, shape,
                                               block_sizes):
    factor = 4
    sparse = kept_grey_values(factor, dtype, seed=3, shape=shape)
    settings = tiny_settings(INFERENCE_BATCH_SIZE=batch_size)
    expected, _, info = restore.restore_intensity(sparse, factor, settings, model=tiny_intensity_model,
                                                  progress=False)
    assert blocks.volume_intensity_range(sparse) == info["value_range"]
    for block_size in block_sizes:
        out = tmp_path / f"grey_{block_size}.ome.zarr"
        summary = blocks.restore_to_ome_zarr(sparse, out, factor, dict(settings, BLOCK_SIZE=block_size), UM,
                                             kind="intensity", model=tiny_intensity_model, progress=False)
        assert summary["state"] == "complete" and summary["value_range"] == info["value_range"]
        restored = read_level(out)
        assert restored.dtype == expected.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(restored, expected)  # the same bytes, whatever the block size
        np.testing.assert_array_equal(restored[::factor], sparse)
        record = zarr.open_group(str(out)).attrs[zarr_io.RESTORE_ATTRIBUTE]
        assert record["plan"]["kind"] == "intensity" and record["plan"]["value_range"] == list(info["value_range"])
        # Pyramid: averaged grey values (integers rounded), in the input's dtype.
        level1 = read_level(out, 1)
        assert level1.dtype == np.dtype(dtype)
        if np.issubdtype(dtype, np.integer):
            np.testing.assert_array_equal(level1, np.rint(mean_pooled(restored)).astype(dtype))
        else:
            np.testing.assert_allclose(level1, mean_pooled(restored), rtol=1e-6)


def test_blockwise_grey_values_on_dask_workers(tmp_path, tiny_intensity_model):
    factor = 3
    sparse = kept_grey_values(factor, np.uint8, seed=4)
    settings = tiny_settings()
    expected = restore.restore_intensity(sparse, factor, settings, model=tiny_intensity_model, progress=False)[0]
    out = tmp_path / "dask.ome.zarr"
    # Two worker threads (the in-memory input is staged into the output for them, as for worker processes).
    summary = blocks.restore_to_ome_zarr(sparse, out, factor, dict(settings, BLOCK_SIZE=BLOCK, WORKERS=2), UM,
                                         kind="intensity", model=tiny_intensity_model, processes=False, progress=False)
    assert summary["state"] == "complete" and summary["restored"] == 6
    np.testing.assert_array_equal(read_level(out), expected)
    assert not (out / blocks.PROGRESS_GROUP).exists()


def test_grey_value_run_resumes_to_identical_bytes(tmp_path, tiny_intensity_model):
    factor = 4
    sparse = kept_grey_values(factor, np.uint16, seed=5)
    image = write_grey_input(tmp_path / "em.ome.zarr", sparse)
    settings = tiny_settings(BLOCK_SIZE=BLOCK)
    run = dict(kind="intensity", model=tiny_intensity_model, progress=False)
    clean = tmp_path / "clean.ome.zarr"
    blocks.restore_to_ome_zarr(image, clean, factor, settings, UM, **run)
    out = tmp_path / "out.ome.zarr"
    partial = blocks.restore_to_ome_zarr(image, out, factor, dict(settings, MAX_BLOCKS=2), UM, **run)
    assert partial["state"] == "partial" and blocks.finished_blocks(str(out), "restore") == {0, 1}

    # The volume's range is part of the run: changed grey values are refused, not mixed into one output.
    brighter = np.minimum(sparse.astype(np.uint32) * 2, 65535).astype(np.uint16)
    zarr.open_array(store=str(image.path), path=image.component, mode="r+")[:] = brighter
    with pytest.raises(UserError, match="value_range"):
        blocks.restore_to_ome_zarr(image, out, factor, dict(settings, RESUME=True), UM, **run)
    zarr.open_array(store=str(image.path), path=image.component, mode="r+")[:] = sparse

    resumed = blocks.restore_to_ome_zarr(image, out, factor, dict(settings, RESUME=True), UM,
                                         **dict(run, model=None))  # the model kept in the output
    assert resumed["state"] == "complete" and (resumed["skipped"], resumed["restored"]) == (2, 4)
    levels = len(zarr_io.layout_from_record(
        zarr.open_group(str(out)).attrs[zarr_io.RESTORE_ATTRIBUTE]["layout"], out).image.levels)
    assert levels > 1
    for level in range(levels):
        resumed_values, clean_values = read_level(out, level), read_level(clean, level)
        assert resumed_values.dtype == np.uint16 and resumed_values.tobytes() == clean_values.tobytes()


def test_grey_value_range_and_training_windows_of_a_store(tmp_path, monkeypatch):
    sparse = kept_grey_values(4, np.uint16, seed=6, shape=(41, 200, 260))
    image = write_grey_input(tmp_path / "em.ome.zarr", sparse)
    value_range = blocks.volume_intensity_range(image)
    assert value_range == intensity_range(sparse)  # a small store: all of it, as in memory
    reads = []
    original_read = zarr_io.ZarrImage.read

    def spy(self, z=slice(None), y=slice(None), x=slice(None)):
        reads.append(original_read(self, z, y, x).size)
        return original_read(self, z, y, x)

    monkeypatch.setattr(zarr_io.ZarrImage, "read", spy)
    sampled = blocks.volume_intensity_range(image, max_values=50_000)
    assert sum(reads) <= 50_000 + len(reads) * sparse.shape[2]  # about max_values, one slice at a time
    assert len(reads) > 1 and np.allclose(sampled, value_range, rtol=0.1)

    # Training windows hold normalised grey values (float32), every window drawn is kept.
    settings = tiny_settings(TRAIN_NB=200, MIN_CONTENT_RATIO=1.0)  # no mask window would pass this
    np.testing.assert_array_equal(blocks.training_stack(sparse, settings, value_range=value_range)[0],
                                  normalize_intensity(sparse, value_range))
    budget = sparse.shape[0] * 128 * 128 * 4 * 2  # two windows of 128 x 128 float32 values
    stack, panel_width, _ = blocks.training_stack(image, settings, max_bytes=budget, value_range=value_range)
    assert panel_width == 128 and stack.dtype == np.float32 and stack.shape == (sparse.shape[0], 128, 2 * 128) and stack.nbytes <= budget


def test_cli_grey_scale_tif_into_ome_zarr(tmp_path, capsys):
    factor = 4
    sparse = kept_grey_values(factor, np.uint16, seed=7)
    source = tmp_path / "em.tif"
    save_stack(source, sparse, (2.0, 0.5, 0.5), "um")
    recipe = ["--train-xy-size", "16", "--train-z-size", "3", "--train-nb", "32", "--num-epochs", "1",
              "--base-filters", "4", "--depth", "1", "--inference-tile-size", "32", "--precision", "fp32",
              "--device", "cpu", "--input", str(source)]
    out = tmp_path / "em_iso.ome.zarr"
    # Probabilities of grey values: one clear error, before any work.
    assert apply.main(recipe + ["--output", str(out), "--kind", "intensity", "--save-probabilities", "uint8"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("error:") == 1 and "--save-probabilities" in captured.err
    assert "Training" not in captured.out and not out.exists()

    assert apply.main(recipe + ["--output", str(out), "--kind", "intensity", "--block-size", str(BLOCK),
                                "--save-model", str(tmp_path / "m.pt")]) == 0
    assert "kind: intensity (" in capsys.readouterr().out
    written = zarr_io.open_image(out)
    assert written.dtype == "uint16" and written.shape == ((len(sparse) - 1) * factor + 1,) + sparse.shape[1:]
    assert written.voxel_size_zyx == (0.5, 0.5, 0.5) and written.unit == "um"
    restored = written.read()
    np.testing.assert_array_equal(restored[::factor], sparse)
    # The same model in memory, into a TIFF: the same grey values (up to the rounding of a last float bit).
    tif = tmp_path / "em_iso.tif"
    with pytest.warns(UserWarning, match="only change training"):
        assert apply.main(recipe + ["--output", str(tif), "--kind", "intensity", "--model",
                                    str(tmp_path / "m.pt")]) == 0
    in_memory = tifffile.imread(tif)
    assert in_memory.dtype == np.uint16 and np.abs(in_memory.astype(int) - restored).max() <= 1
    assert np.mean(in_memory != restored) < 1e-3

    # A Zarr input follows the TIFF rule for 'auto', and a grey-scale model's kind comes first: float and
    # integer grey values are both restored as grey values.
    floats = write_grey_input(tmp_path / "float.ome.zarr", kept_grey_values(factor, np.float32, seed=7),
                              voxel=(2.0, 0.5, 0.5))
    common = ["--model", str(tmp_path / "m.pt"), "--precision", "fp32", "--device", "cpu", "--block-size", str(BLOCK)]
    assert apply.main(["--input", floats.path, "--output", str(tmp_path / "f.ome.zarr")] + common) == 0
    assert "kind: intensity (" in capsys.readouterr().out and zarr_io.open_image(tmp_path / "f.ome.zarr").dtype == "float32"
    integers = write_grey_input(tmp_path / "int.ome.zarr", sparse, voxel=(2.0, 0.5, 0.5))
    assert apply.main(["--input", integers.path, "--output", str(tmp_path / "i.ome.zarr")] + common) == 0
    assert "kind: intensity (the model restores grey values)" in capsys.readouterr().out
    assert zarr_io.open_image(tmp_path / "i.ome.zarr").dtype == "uint16"


def test_worker_memory_warning_follows_the_fitted_tiles_and_the_volume():
    """Default settings: a modest volume fits a 1 GiB worker without a warning (its planes are cut
    into tiles of 161 x 512, not 1024 x 1024); a deep, wide one warns; grey values need more than masks."""
    inference = restore.inference_kwargs(default_settings())
    modest, deep = blocks.BlockPlan((161, 512, 512), 512), blocks.BlockPlan((961, 3072, 3072), 512)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blocks._check_worker_memory(modest, 21, 8, inference, "uint8", "1GiB", True, "cpu")
    with pytest.warns(UserWarning, match="may need about"):
        blocks._check_worker_memory(deep, 121, 8, inference, "uint8", "1GiB", True, "cpu")
    mask = blocks.estimate_block_memory(modest, 21, 8, inference, "uint8")
    grey = blocks.estimate_block_memory(modest, 21, 8, inference, "float32", "uint8")
    assert grey > mask
    # the tiles follow the planes: tiles of 161 x 512 pixels, not of 1024 x 1024, as many at once as the engine runs
    # (on a CPU at most INFERENCE_BATCH_PIXELS pixels, at least 2 tiles: restore.tiles_per_batch)
    small_tiles = dict(inference, batch_size=1)
    assert mask - blocks.estimate_block_memory(modest, 21, 8, small_tiles, "uint8") == 1 * 161 * 512 * blocks.ACTIVATION_BYTES
    on_gpu = blocks.estimate_block_memory(modest, 21, 8, inference, "uint8", device_type="cuda")
    assert on_gpu - blocks.estimate_block_memory(modest, 21, 8, small_tiles, "uint8", device_type="cuda") == (
        15 * 161 * 512 * blocks.ACTIVATION_BYTES)  # a GPU runs the whole batch of 16


def test_worker_memory_warning_counts_the_dense_label_pass():
    """The ids of a dense label image grow on a block's window one gap at a time: at factor 16 a shallow stack's
    restore fits a 1 GiB worker but its id pass (17 planes of the window) does not, and the warning says so."""
    inference = restore.inference_kwargs(default_settings())
    shallow = blocks.BlockPlan((65, 2048, 2048), 512)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blocks._check_worker_memory(shallow, 5, 16, inference, "uint8", "1GiB", True, "cpu")
    with pytest.warns(UserWarning, match="may need about"):
        blocks._check_worker_memory(shallow, 5, 16, inference, "uint8", "1GiB", True, "cpu", dense_label_dtype="uint32")
    restore_pass = blocks.estimate_block_memory(shallow, 5, 16, inference, "uint8")
    id_pass = blocks.estimate_dense_label_memory(shallow, 5, 16, "uint32")
    assert blocks.estimate_worker_memory(shallow, 5, 16, inference, "uint8", None, "uint32") == id_pass > restore_pass
    # A middle block's window is the block and two halos on every side: one gap of 17 planes of it.
    assert id_pass > labeling.grow_labels_memory(16, (512 + 4 * blocks.LABEL_HALO) ** 2) + blocks.PROCESS_BYTES


def test_resume_names_what_changed_in_the_recorded_inference():
    """A run interrupted before test-time flips were on by kind is refused with the setting that changed."""
    recorded = {"kind": "intensity", "factor": 4, "inference": {"flips": [[]], "orientations": ["y", "x"]}}
    current = {**recorded, "inference": {"flips": [[], [-1], [-2], [-2, -1]], "orientations": ["y", "x"]}}
    assert blocks._plan_differences(recorded, current) == ["inference (flips [[]] -> [[], [-1], [-2], [-2, -1]])"]
    assert blocks._plan_differences(recorded, {**recorded, "factor": 3}) == ["factor"]
    assert blocks._plan_differences({"kind": "intensity"}, recorded) == []  # keys an earlier version did not record


def test_resume_compares_the_channel_planes_spacing_in_voxels():
    """A run recorded before the spacing was by kind has no stride_fraction (its planes were the factor apart):
    a mask run is refused with the spacing that changed, and resumes with that spacing typed; a grey-value run,
    whose spacing did not change, resumes."""
    old_mask = {"kind": "mask", "factor": 8, "inference": {"channel_stride": None, "orientations": ["y", "x"]}}
    by_kind = {**old_mask, "inference": {"channel_stride": None, "stride_fraction": 0.5, "orientations": ["y", "x"]}}
    typed = {**old_mask, "inference": {"channel_stride": 8, "stride_fraction": 1.0, "orientations": ["y", "x"]}}
    assert blocks._plan_differences(old_mask, by_kind) == ["inference (channel_stride 8 -> 4)"]
    assert blocks._plan_differences(old_mask, typed) == []
    old_grey = {**old_mask, "kind": "intensity"}
    grey_now = {**old_grey, "inference": {"channel_stride": None, "stride_fraction": 1.0, "orientations": ["y", "x"]}}
    assert blocks._plan_differences(old_grey, grey_now) == []
    # Recorded by this version: the rule and a typed stride of the same spacing are one run; another is not.
    assert blocks._plan_differences(by_kind, {**by_kind, "inference": {**typed["inference"], "channel_stride": 4}}) == []
    assert blocks._plan_differences(by_kind, typed) == ["inference (channel_stride 4 -> 8)"]


def test_the_plan_counts_what_the_training_reads_of_a_store(tmp_path, capsys, monkeypatch):
    """Of an OME-Zarr input the process that trains holds at most blocks.TRAINING_BYTES of kept slices: the plan's
    figure for it moves with that cap byte for byte while the store is larger, and not past it."""
    from test_first_contact import plan_of, run_apply

    mask = np.zeros((16, 256, 256), np.uint8)
    mask[:, 50:100, 50:100] = 1
    write_input(tmp_path / "in.ome.zarr", mask, voxel=(2.0, 0.5, 0.5))  # factor 4; 2 MiB as the engine holds it

    def process_mib(cap):
        monkeypatch.setattr(blocks, "TRAINING_BYTES", cap)
        status, printed, err = run_apply(capsys, "--input", tmp_path / "in.ome.zarr", "--output",
                                         tmp_path / "o.ome.zarr", "--dry-run", "--workers", "2")
        assert status == 0, err
        return float(re.match(r"about ([\d.]+) MiB", plan_of(printed)["memory of this process"]).group(1))

    assert process_mib(2**20) - process_mib(2**19) == pytest.approx(0.5, abs=0.1)
    assert process_mib(2**23) == process_mib(2**22)  # past the store's size the cap no longer counts
