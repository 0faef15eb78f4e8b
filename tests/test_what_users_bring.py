"""Files as other programs write them, and outputs as users name them: a 72 dpi TIFF, ImageJ's zunit,
LZW compression, macOS's hidden files in a slice folder, RGB or odd-sized slices, NaN in grey values, an
empty mask, 0/1 masks written back in their own values, an output over its own input, an output format
the tool does not write, OME-TIFF outputs and label images of several OME-Zarr stores in one batch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

import apply
import zarr_io
from data import (MaskValues, UserError, as_typed_stack, make_sample_labels, make_sample_stack, read_calibration,
                  read_stack, stack_shape)

VOXEL = (1.0, 0.25, 0.25)  # um: factor 4
CHEAP = ["--num-epochs", "1", "--train-nb", "32", "--base-filters", "4", "--batch-size", "4"]


def fiji_tiff(path, stack, voxel=VOXEL, **metadata):
    tifffile.imwrite(path, stack, imagej=True, resolution=(1 / voxel[2], 1 / voxel[1]),
                     metadata={"spacing": voxel[0], "unit": "um", **metadata})
    return Path(path)


def mask_stack(shape=(9, 32, 32), seed=2):
    return make_sample_stack(shape=(4 * (shape[0] - 1) + 1,) + shape[1:], seed=seed)[::4]


# --------------------------------------------------------------------------- #
# Reading what other programs write
# --------------------------------------------------------------------------- #
def test_72_dpi_is_no_calibration_as_imagej_reads_it(tmp_path):
    stack = np.zeros((3, 16, 16), np.uint8)
    tifffile.imwrite(tmp_path / "matlab.tif", stack, resolution=(72, 72), resolutionunit="INCH",
                     photometric="minisblack")
    assert read_calibration(tmp_path / "matlab.tif") is None  # not 352.8 um pixels: the user is asked for sizes
    tifffile.imwrite(tmp_path / "scan.tif", stack, resolution=(2540, 2540), resolutionunit="INCH",
                     photometric="minisblack")
    (z, y, x), unit = read_calibration(tmp_path / "scan.tif")
    assert unit == "um" and x == pytest.approx(10.0) and y == pytest.approx(10.0)


def test_imagej_zunit_converts_the_z_step(tmp_path):
    path = fiji_tiff(tmp_path / "z_in_um.tif", np.zeros((3, 16, 16), np.uint8), voxel=(1.0, 250.0, 250.0))
    tifffile.imwrite(path, np.zeros((3, 16, 16), np.uint8), imagej=True, resolution=(1 / 250, 1 / 250),
                     metadata={"spacing": 1.0, "unit": "nm", "zunit": "micron"})
    assert read_calibration(path) == ((1000.0, 250.0, 250.0), "nm")


def test_lzw_compressed_tiff_reads_as_its_values(tmp_path):
    stack = (np.arange(4 * 32 * 32) % 251).astype(np.uint8).reshape(4, 32, 32)
    tifffile.imwrite(tmp_path / "lzw.tif", stack, compression="lzw", photometric="minisblack")
    np.testing.assert_array_equal(read_stack(tmp_path / "lzw.tif"), stack)


def test_hidden_files_in_a_slice_folder_are_not_slices(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    stack = (np.arange(3 * 8 * 8) % 7).astype(np.uint8).reshape(3, 8, 8)
    for index, slice_hw in enumerate(stack):
        tifffile.imwrite(folder / f"img_{index}.tif", slice_hw)
    (folder / "._img_0.tif").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # what macOS leaves on a shared disk
    (folder / ".DS_Store").write_bytes(b"\x00")
    np.testing.assert_array_equal(read_stack(folder), stack)
    assert stack_shape(folder) == (3, 8, 8)


@pytest.mark.parametrize("odd, message", [
    (np.zeros((8, 8, 3), np.uint8), r"must be one 2D slice; 'img_1.tif' has shape \(8, 8, 3\)"),
    (np.zeros((8, 9), np.uint8), r"have different sizes \(img_0.tif: \(8, 8\), img_1.tif: \(8, 9\)"),
])
def test_odd_slices_are_one_error_from_the_metadata_reads(tmp_path, odd, message):
    folder = tmp_path / "slices"
    folder.mkdir()
    for index, slice_hw in enumerate([np.zeros((8, 8), np.uint8), odd, np.zeros((8, 8), np.uint8)]):
        tifffile.imwrite(folder / f"img_{index}.tif", slice_hw, photometric="rgb" if slice_hw.ndim == 3 else None)
    for read in (stack_shape, read_stack):  # the dry run's shape as well as the run's read
        with pytest.raises(UserError, match=message):
            read(folder)


def test_nan_in_grey_values_is_one_error_before_training(tmp_path, capsys):
    grey = np.random.default_rng(0).random((9, 32, 32)).astype(np.float32)
    grey[2, 10:20, 10:20] = np.nan
    with pytest.raises(UserError, match=r"holds 100 NaN or infinite values \(1\.09% of those read\).*nan_to_num"):
        as_typed_stack(grey, "intensity", None, "grey.tif")
    path = fiji_tiff(tmp_path / "grey.tif", grey)
    assert apply.main(["--input", str(path), "--output", str(tmp_path / "out.tif"), "--kind", "intensity"]
                      + CHEAP) == 2
    assert "holds 100 NaN or infinite values" in capsys.readouterr().err
    assert not (tmp_path / "out.tif").exists()


def test_an_empty_mask_is_one_error_before_training(tmp_path, capsys):
    path = fiji_tiff(tmp_path / "empty.tif", np.zeros((9, 32, 32), np.uint8))
    assert apply.main(["--input", str(path), "--output", str(tmp_path / "out.tif"), "--kind", "mask"] + CHEAP) == 2
    assert "hold no foreground (every voxel is 0)" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# Masks come back in their own values
# --------------------------------------------------------------------------- #
def test_mask_values_of_a_sample():
    assert MaskValues.of(np.array([0, 1], np.uint8)) == MaskValues(1, "uint8")
    assert MaskValues.of(np.array([0, 255], np.uint8)) == MaskValues()
    assert MaskValues.of(np.array([0, 1], np.int32)) == MaskValues(1, "uint16")
    assert MaskValues.of(np.array([0, 1.0], np.float64)) == MaskValues(1.0, "float32")
    assert MaskValues.of(np.array([0, 70000], np.uint32)) == MaskValues()  # no output type holds it: 0/255
    assert MaskValues.of(np.array([True, False])) == MaskValues(1, "uint8")  # a 1-bit TIFF, MATLAB's logical
    assert MaskValues.of(np.array([1, 2], np.uint8)) == MaskValues(2, "uint8", 1)  # a two-class segmentation
    assert MaskValues(2, "uint8", 1).encode(np.array([True, False])).tolist() == [2, 1]
    encoded = MaskValues(5, "uint16").encode(np.array([[True, False]]))
    assert encoded.dtype == np.uint16 and encoded.tolist() == [[5, 0]]


@pytest.mark.parametrize("dtype, foreground, written", [(np.uint8, 1, np.uint8), (np.float32, 1.0, np.float32),
                                                        (np.uint16, 7, np.uint16), (np.uint8, 255, np.uint8)])
def test_a_mask_is_written_in_its_own_values_and_its_kept_slices_verbatim(tmp_path, capsys, tiny_model_args,
                                                                           dtype, foreground, written):
    kept = (mask_stack() * foreground).astype(dtype)
    path = fiji_tiff(tmp_path / "mask.tif", kept)
    assert apply.main(["--input", str(path), "--output", str(tmp_path / "out.tif")] + tiny_model_args) == 0
    assert f"written as 0/{foreground:g} {np.dtype(written).name}" in capsys.readouterr().out
    restored = tifffile.imread(tmp_path / "out.tif")
    assert restored.dtype == written and set(np.unique(restored)) <= {0, foreground}
    np.testing.assert_array_equal(restored[::4], kept)


def test_a_0_1_mask_into_ome_zarr_keeps_its_values(tmp_path, tiny_model_args):
    kept = mask_stack().astype(np.uint8)
    path = fiji_tiff(tmp_path / "mask.tif", kept)
    out = tmp_path / "out.ome.zarr"
    assert apply.main(["--input", str(path), "--output", str(out), "--block-size", "32"] + tiny_model_args) == 0
    restored = zarr_io.open_image(out).read()
    assert restored.dtype == np.uint8 and set(np.unique(restored)) == {0, 1}
    np.testing.assert_array_equal(restored[::4], kept)
    assert apply.main(["--input", str(path), "--output", str(tmp_path / "out.tif")] + tiny_model_args) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out.tif"), restored)  # block-wise = in memory


# --------------------------------------------------------------------------- #
# Outputs as users name them
# --------------------------------------------------------------------------- #
def test_an_output_over_its_own_input_is_refused_even_with_overwrite(tmp_path, capsys, tiny_model_args):
    kept = mask_stack().astype(np.uint8) * 255
    store = tmp_path / "cells.ome.zarr"
    zarr_io.write_image(store, kept, VOXEL, "um")
    before = zarr_io.open_image(store).read()
    tiff = fiji_tiff(tmp_path / "cells.tif", kept)
    slices = tmp_path / "slices"
    slices.mkdir()
    for index, slice_hw in enumerate(kept):
        tifffile.imwrite(slices / f"s_{index}.tif", slice_hw)
    for source, target, where in [(store, store, "is the input"), (tiff, tiff, "is the input"),
                                  (store / "s0", store, "holds the input"),
                                  (slices, slices / "restored.tif", "lies inside the input")]:
        args = ["--input", str(source), "--output", str(target), "--overwrite", "--z-step", "1"] + tiny_model_args
        assert apply.main(args) == 2
        assert f"{where} '{source}': writing it would destroy the data" in capsys.readouterr().err
    np.testing.assert_array_equal(zarr_io.open_image(store).read(), before)
    np.testing.assert_array_equal(tifffile.imread(tiff), kept)


@pytest.mark.parametrize("name", ["restored.png", "restored.h5", "restored.mrc", "restored.nii.gz"])
def test_an_output_format_not_written_is_one_error(tmp_path, capsys, tiny_model_args, name):
    path = fiji_tiff(tmp_path / "mask.tif", mask_stack().astype(np.uint8) * 255)
    assert apply.main(["--input", str(path), "--output", str(tmp_path / name), "--dry-run"] + tiny_model_args) == 2
    assert "a format this tool does not write. Name a .tif" in capsys.readouterr().err
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("name, meant", [("restored.tf", "restored.tif"), ("restored.zar", "restored.zarr"),
                                         ("restored.tifff", "restored.tiff")])
def test_a_typo_in_the_output_suffix_is_one_error_not_a_folder(tmp_path, capsys, tiny_model_args, name, meant):
    path = fiji_tiff(tmp_path / "mask.tif", mask_stack().astype(np.uint8) * 255)
    assert apply.main(["--input", str(path), "--output", str(tmp_path / name), "--dry-run"] + tiny_model_args) == 2
    assert f"({meant} was meant?)" in capsys.readouterr().err
    (tmp_path / "run.2024").mkdir()  # a folder whose name has a dot stays a folder for the outputs
    assert apply.main(["--input", str(path), "--output", str(tmp_path / "run.2024"), "--dry-run"]
                      + tiny_model_args) == 0


def test_an_ome_tiff_output_holds_ome_metadata(tmp_path, tiny_model_args):
    kept = mask_stack().astype(np.uint8) * 255
    path = fiji_tiff(tmp_path / "mask.tif", kept)
    out = tmp_path / "restored.ome.tif"
    assert apply.main(["--input", str(path), "--output", str(out), "--save-probabilities", "uint8"]
                      + tiny_model_args) == 0
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome and tif.series[0].axes == "ZYX"
    assert read_calibration(out) == ((0.25, 0.25, 0.25), "um")
    np.testing.assert_array_equal(read_stack(out)[::4], kept)
    assert (tmp_path / "restored_probabilities.ome.tif").exists()


def test_label_images_of_several_stores_get_names_of_their_own(tmp_path, capsys, tiny_model_args):
    for name in ("a", "b"):
        zarr_io.write_image(tmp_path / f"{name}.ome.zarr", make_sample_labels((9, 32, 32), seed=4) > 0, VOXEL, "um",
                            kind="labels", labels_dhw=make_sample_labels((9, 32, 32), seed=4).astype(np.uint16),
                            label_name="cells")
    pattern = str(tmp_path / "*.ome.zarr" / "labels" / "cells")
    assert apply.main(["--input", pattern, "--output", str(tmp_path / "out"), "--dry-run"] + tiny_model_args) == 0
    out = capsys.readouterr().out
    for name in ("a", "b"):
        assert f"output: {tmp_path / 'out' / f'{name}_labels_cells_restored.ome.zarr'}" in out


def test_a_two_class_segmentation_is_a_mask_written_in_its_values(tmp_path, capsys, tiny_model_args):
    """ilastik's Simple Segmentation: 1 and 2, no 0. The larger value is the foreground; block by block the
    same cut is made (a block may hold only 1s), and the output holds 1 and 2 again."""
    kept = np.where(mask_stack(), 2, 1).astype(np.uint8)
    path = fiji_tiff(tmp_path / "simple_segmentation.tif", kept)
    assert apply.main(["--input", str(path), "--output", str(tmp_path / "out.tif")] + tiny_model_args) == 0
    assert ("kind: mask (a mask model; two values, 1/2: a two-class segmentation, 2 the foreground); written as 1/2 "
            "uint8") in capsys.readouterr().out
    in_memory = tifffile.imread(tmp_path / "out.tif")
    assert in_memory.dtype == np.uint8 and set(np.unique(in_memory)) == {1, 2}
    np.testing.assert_array_equal(in_memory[::4], kept)
    out = tmp_path / "out.ome.zarr"
    assert apply.main(["--input", str(path), "--output", str(out), "--block-size", "32"] + tiny_model_args) == 0
    np.testing.assert_array_equal(zarr_io.open_image(out).read(), in_memory)


# --------------------------------------------------------------------------- #
# Large volumes and eval.py, as a new user meets them
# --------------------------------------------------------------------------- #
def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys, tiny_model_args):
    path = fiji_tiff(tmp_path / "mask.tif", mask_stack().astype(np.uint8) * 255)
    notes = tmp_path / "notes.txt"
    notes.write_text("a file, where a folder is named")
    for flags in (["--output", str(notes / "out.tif")],
                  ["--output", str(tmp_path / "out.tif"), "--save-model", str(notes / "m.pt"), "--num-epochs", "1"]):
        assert apply.main(["--input", str(path), "--dry-run"] + flags) == 2
        assert f"'{notes}' is a file, not a folder" in capsys.readouterr().err
    import eval as evaluation

    settings = dict(evaluation.default_settings(), RUN_DIRECTORY=str(path / "run"), SHOW="no")
    with pytest.raises(UserError, match="is a file, not a folder"):
        evaluation.output_paths(settings)


def test_flags_are_never_abbreviated_and_factor_is_explained(capsys):
    import eval as evaluation

    for main, args in ((apply.main, ["--input", "x.tif", "--output", "y.tif"]), (evaluation.main, [])):
        with pytest.raises(SystemExit):
            main(args + ["--factor", "4"])
        assert "unrecognized arguments: --factor 4 (there is no --factor: the factor is the Z step over the XY pixel" in \
            capsys.readouterr().err


def test_eval_sample_shape_needs_three_sizes(capsys):
    import eval as evaluation

    assert evaluation.main(["--sample-shape", "64,64", "--show", "no"]) == 2
    assert "SAMPLE_SHAPE (--sample-shape) is three positive sizes D,H,W" in capsys.readouterr().err


def test_eval_reads_the_pixel_size_of_its_input(tmp_path, capsys):
    import eval as evaluation

    path = fiji_tiff(tmp_path / "iso.tif", mask_stack().astype(np.uint8), voxel=(0.5, 0.5, 0.5))
    settings = dict(evaluation.default_settings(), INPUT_IMAGES_DIRECTORY=str(path))
    resolved = evaluation.with_input_voxel_size(settings)  # the default factor 8 kept, in the file's pixels
    assert (resolved["XY_RESOLUTION"], resolved["Z_RESOLUTION"], resolved["VOXEL_UNIT"]) == (0.5, 4.0, "um")
    typed_z = evaluation.with_input_voxel_size(dict(settings, Z_RESOLUTION=2.0), ["Z_RESOLUTION"])
    assert (typed_z["XY_RESOLUTION"], typed_z["Z_RESOLUTION"]) == (0.5, 2.0)  # factor 4
    in_nm = evaluation.with_input_voxel_size(dict(settings, VOXEL_UNIT="nm"), ["VOXEL_UNIT"])
    assert (in_nm["XY_RESOLUTION"], in_nm["Z_RESOLUTION"], in_nm["VOXEL_UNIT"]) == (500.0, 4000.0, "nm")
    typed_xy = evaluation.with_input_voxel_size(dict(settings, XY_RESOLUTION=3.0), ["XY_RESOLUTION"])
    assert (typed_xy["XY_RESOLUTION"], typed_xy["Z_RESOLUTION"], typed_xy["VOXEL_UNIT"]) == (3.0, 24.0, "um")
    store = tmp_path / "iso.ome.zarr"
    zarr_io.write_image(store, mask_stack(), (0.5, 0.5, 0.5), "um")
    from_zarr = evaluation.with_input_voxel_size(dict(settings, INPUT_IMAGES_DIRECTORY=str(store)))
    assert (from_zarr["XY_RESOLUTION"], from_zarr["Z_RESOLUTION"]) == (0.5, 4.0)
    kind, truth, _, _ = evaluation.load_evaluation_stack(dict(settings, INPUT_IMAGES_DIRECTORY=str(store)))
    assert kind == "mask" and np.array_equal(truth, mask_stack())


def test_worker_memory_below_a_workers_own_need_is_one_error(tmp_path, capsys, tiny_model_args):
    path = fiji_tiff(tmp_path / "mask.tif", mask_stack().astype(np.uint8) * 255)
    args = ["--input", str(path), "--output", str(tmp_path / "o.ome.zarr"), "--workers", "2", "--worker-memory",
            "150MiB", "--dry-run"] + tiny_model_args
    assert apply.main(args) == 2
    assert "--worker-memory 150MiB is less than a worker process needs before any block" in capsys.readouterr().err


def test_an_unreachable_scheduler_is_one_error_before_training(tmp_path, capsys, monkeypatch):
    import blocks

    monkeypatch.setattr(blocks, "SCHEDULER_TIMEOUT", "1s")
    path = fiji_tiff(tmp_path / "mask.tif", mask_stack().astype(np.uint8) * 255)
    out = tmp_path / "o.ome.zarr"
    assert apply.main(["--input", str(path), "--output", str(out), "--scheduler", "tcp://127.0.0.1:1"] + CHEAP) == 2
    assert "Cannot reach the Dask scheduler at tcp://127.0.0.1:1" in capsys.readouterr().err
    assert not out.exists()  # nothing left behind that a corrected command would meet as 'Output exists'


def test_a_damaged_zarr_chunk_is_a_damaged_file(tmp_path, capsys):
    store = tmp_path / "bad.ome.zarr"
    zarr_io.write_image(store, np.ones((5, 64, 64), bool), VOXEL, "um")
    chunk = next(p for p in sorted((store / "s0").rglob("*")) if p.is_file() and not p.name.startswith("."))
    chunk.write_bytes(np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes())
    assert apply.main(["--input", str(store), "--output", str(tmp_path / "o.tif"), "--dry-run"]) == 2
    assert "is damaged or not a valid Zarr store (a chunk of 's0' does not decode" in capsys.readouterr().err


def test_an_interrupted_run_with_save_model_resumes(tmp_path, capsys):
    path = fiji_tiff(tmp_path / "mask.tif", mask_stack((9, 64, 64)).astype(np.uint8) * 255)
    out, model = tmp_path / "o.ome.zarr", tmp_path / "m.pt"
    common = ["--input", str(path), "--output", str(out), "--save-model", str(model), "--block-size", "32"] + CHEAP
    assert apply.main(common + ["--max-blocks", "1"]) == 0
    assert "--resume" in capsys.readouterr().out
    assert apply.main(common + ["--resume"]) == 0  # the model file of the first part is no 'Output exists'
    capsys.readouterr()
    assert apply.main(["--input", str(path), "--output", str(tmp_path / "again.tif"), "--model", str(model)]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "again.tif"), zarr_io.open_image(out).read())


def test_ctrl_c_is_one_line_and_status_130(capsys):
    import eval as evaluation

    def interrupted():
        raise KeyboardInterrupt

    assert evaluation.run_cli(interrupted) == 130
    assert "interrupted (Ctrl-C)." in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# What a review of the above found
# --------------------------------------------------------------------------- #
def test_no_file_of_a_batch_is_written_over_any_input(tmp_path, capsys, tiny_model_args):
    """'data/*.tif --output data/' run twice: the first run's a_restored.tif is an input of the second."""
    kept = mask_stack().astype(np.uint8) * 255
    first, earlier = fiji_tiff(tmp_path / "a.tif", kept), fiji_tiff(tmp_path / "a_restored.tif", kept)
    assert apply.main(["--input", str(first), str(earlier), "--output", str(tmp_path), "--overwrite"]
                      + tiny_model_args) == 2
    assert f"The output '{earlier}' is the input '{earlier}'" in capsys.readouterr().err
    args = ["--input", str(first), "--output", str(tmp_path / "o.tif"), "--save-model", str(first), "--overwrite"]
    assert apply.main(args + CHEAP) == 2
    assert f"The model (--save-model) '{first}' is the input" in capsys.readouterr().err
    np.testing.assert_array_equal(tifffile.imread(first), kept)


def test_resume_replaces_only_its_own_model_file(tmp_path, capsys):
    path = fiji_tiff(tmp_path / "mask.tif", mask_stack((9, 64, 64)).astype(np.uint8) * 255)
    notes = tmp_path / "notes.pt"
    notes.write_text("not a model")
    args = ["--input", str(path), "--output", str(tmp_path / "o.ome.zarr"), "--block-size", "32", "--save-model",
            str(notes)] + CHEAP
    assert apply.main(args + ["--max-blocks", "1"]) == 2  # not a resume: an existing file is an existing file
    assert apply.main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert f"Output exists: {notes}. Choose another --save-model or pass --overwrite" in err  # the flag that named it
    assert notes.read_text() == "not a model"


def test_mask_values_come_from_every_slice_where_the_sample_misses_the_object(tmp_path, capsys, tiny_model_args):
    kept = np.zeros((33, 32, 32), np.uint8)
    kept[2:4, 10:20, 10:20] = 1  # slices the evenly spaced sample (0, 5, 9, ...) does not read
    path = fiji_tiff(tmp_path / "small.tif", kept)
    assert apply.main(["--input", str(path), "--output", str(tmp_path / "o.tif"), "--kind", "mask", "--dry-run"]
                      + tiny_model_args) == 0
    assert "written as 0/1 uint8" in capsys.readouterr().out
    two_class = zarr_io.write_image(tmp_path / "two.ome.zarr", kept + 1, VOXEL, "um", kind="intensity")
    del two_class
    for out in ("o.tif", "o.ome.zarr"):  # blocks cut where the whole stack does, though most blocks hold only 1s
        assert apply.main(["--input", str(tmp_path / "two.ome.zarr"), "--output", str(tmp_path / ("two_" + out)),
                           "--kind", "mask", "--block-size", "32"] + tiny_model_args) == 0
    assert "written as 1/2 uint8" in capsys.readouterr().out
    in_memory = tifffile.imread(tmp_path / "two_o.tif")
    np.testing.assert_array_equal(in_memory[::4], kept + 1)
    np.testing.assert_array_equal(zarr_io.open_image(tmp_path / "two_o.ome.zarr").read(), in_memory)


def test_nan_in_any_block_window_is_refused():
    import blocks

    window = np.zeros((3, 8, 8), np.float32)
    window[1, 2, 3] = np.nan
    with pytest.raises(UserError, match="holds 1 NaN or infinite values"):
        blocks._engine_input(window, None, (0.0, 1.0))
    with pytest.raises(UserError, match="holds 1 NaN or infinite values"):
        blocks._engine_input(window, None, None)  # a float mask too


def test_scheduler_addresses_and_worker_memory_edge_cases(tmp_path, capsys, tiny_model_args):
    import blocks

    for address in ("foo", "tcp://localhost:notaport"):
        with pytest.raises(UserError, match=f"--scheduler {address} is not an address"):
            blocks.check_scheduler(address)
    blocks.check_worker_memory_floor("0")  # Dask's 'no limit'
    with pytest.raises(UserError, match="is not a size"):
        blocks.check_worker_memory_floor("lots")


# --------------------------------------------------------------------------- #
# Integer grey values: an int16 tomogram stays int16
# --------------------------------------------------------------------------- #
def tiny_grey_model(path):
    """A small untrained intensity network saved for factor 4 (3 channel planes, depth 1)."""
    import torch
    from model import AttentionResUNet, save_model

    torch.manual_seed(0)
    model = AttentionResUNet(in_channels=3, depth=1, base_filters=4, output="intensity").eval()
    return save_model(path, model, {"factor": 4, "kind": "intensity", "inference_tile_size": 32,
                                    "train_xy_size": 16})


@pytest.mark.parametrize("values, written", [
    (np.array([-3000, 0, 12000], np.int16), np.int16),   # a signed tomogram (MRC mode 1)
    (np.array([-100, 0, 100], np.int8), np.int16),       # ImageJ has no 8-bit signed type
    (np.array([0, 70000], np.int32), np.float32),        # beyond 16 bits: ImageJ's 32-bit float, exact here
    (np.array([0, 4000], np.uint32), np.uint16),
    (np.array([0, 200], np.uint8), np.uint8),
])
def test_integer_grey_values_are_written_in_a_type_that_holds_them(tmp_path, values, written):
    from data import save_stack

    stack = np.resize(values, (3, 4, 4)).astype(values.dtype)
    path = save_stack(tmp_path / "grey.tif", stack, grey_values=True)
    back = tifffile.imread(path)
    assert back.dtype == written
    np.testing.assert_array_equal(back.astype(np.int64), stack.astype(np.int64))
    with pytest.raises(UserError, match="label ids 0..65535"):  # as label ids, negative values are refused
        save_stack(tmp_path / "ids.tif", np.full((3, 4, 4), -1, np.int16))


def test_an_int16_tomogram_restores_into_int16(tmp_path, capsys):
    model_path = tiny_grey_model(tmp_path / "grey.pt")
    rng = np.random.default_rng(0)
    kept = rng.integers(-2000, 2000, size=(5, 32, 32)).astype(np.int16)
    path = fiji_tiff(tmp_path / "tomogram.tif", kept)
    out = tmp_path / "restored.tif"
    assert apply.main(["--input", str(path), "--output", str(out), "--kind", "intensity", "--model",
                       str(model_path), "--precision", "fp32", "--device", "cpu"]) == 0, capsys.readouterr().err
    restored = tifffile.imread(out)
    assert restored.dtype == np.int16 and restored.shape == (17, 32, 32)
    np.testing.assert_array_equal(restored[::4], kept)  # kept slices verbatim, negative values included


# --------------------------------------------------------------------------- #
# Errors: a missing file is missing, a bug keeps its traceback, a failed save leaves no file
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", ["gone.tif", "gone.h5/raw", "gone.mrc", "no_folder"])
def test_a_missing_input_is_reported_missing_not_damaged(tmp_path, name):
    from data import InputNotFoundError, read_value_sample, stack_dtype

    for read in (stack_shape, read_calibration, stack_dtype, read_value_sample):
        with pytest.raises(InputNotFoundError, match="does not exist"):
            read(tmp_path / name)


def test_a_bug_in_the_tiff_reader_keeps_its_traceback(tmp_path, monkeypatch):
    """An IndexError raised by the reader's own code is a programming error, not a damaged file; the same
    error raised inside tifffile's read of a bad file is the file's fault."""
    import tiff_io
    from data import DamagedFileError

    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 1, 4, 4), np.uint8), imagej=True, metadata={"axes": "TZCYX"})
    namespace = {}
    exec(compile("def _chosen_pages(series, index):\n    raise IndexError('a slip in the reader')\n",
                 tiff_io.__file__, "exec"), namespace)  # a frame of tiff_io's own code
    monkeypatch.setattr(tiff_io, "_chosen_pages", namespace["_chosen_pages"])
    with pytest.raises(IndexError, match="a slip in the reader"):
        read_stack(path, tiff_io.StackChoice(timepoint=1))
    (tmp_path / "cut.tif").write_bytes(path.read_bytes()[:300])
    with pytest.raises(DamagedFileError):
        read_stack(tmp_path / "cut.tif")


def test_a_model_save_on_a_full_disk_is_one_error_and_leaves_no_file(tmp_path, monkeypatch):
    import errno

    import torch
    from model import AttentionResUNet, save_model

    def full_disk(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="No space left on device. Free some space"):
        save_model(tmp_path / "m.pt", AttentionResUNet(in_channels=3, depth=1, base_filters=4), {"factor": 4})
    assert not (tmp_path / "m.pt").exists()


def test_a_resume_with_another_grey_dtype_is_refused(tmp_path, capsys):
    kept = (100 + np.random.default_rng(1).poisson(20, size=(5, 32, 32))).astype(np.uint16)
    common = ["--input", str(fiji_tiff(tmp_path / "dim.tif", kept)), "--kind", "intensity", "--model",
              str(tiny_grey_model(tmp_path / "grey.pt")), "--precision", "fp32", "--device", "cpu",
              "--output", str(tmp_path / "dim_iso.ome.zarr"), "--block-size", "16"]
    assert apply.main(common + ["--max-blocks", "1"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert apply.main(common + ["--resume", "--grey-dtype", "float32"]) == 2
    assert "differs from the interrupted one in grey_values" in capsys.readouterr().err
    assert apply.main(common + ["--resume"]) == 0
    assert zarr_io.open_image(tmp_path / "dim_iso.ome.zarr").dtype == "uint16"


def test_grey_values_written_as_float32_on_request_in_memory_and_block_wise(tmp_path, capsys):
    """A dim 16-bit image (signal over about 40 grey levels): rounded to uint16 its restored slices hold few
    values; --grey-dtype float32 keeps them unrounded, the kept slices exact, in a TIFF and block by block."""
    model_path = tiny_grey_model(tmp_path / "grey.pt")
    kept = (100 + np.random.default_rng(1).poisson(20, size=(5, 32, 32))).astype(np.uint16)
    path = fiji_tiff(tmp_path / "dim.tif", kept)
    common = ["--input", str(path), "--kind", "intensity", "--model", str(model_path), "--precision", "fp32",
              "--device", "cpu", "--grey-dtype", "float32"]
    assert apply.main(common + ["--output", str(tmp_path / "dim_iso.tif"), "--dry-run"]) == 0
    assert "; written as float32" in capsys.readouterr().out
    assert apply.main(common + ["--output", str(tmp_path / "dim_iso.tif")]) == 0, capsys.readouterr().err
    restored = tifffile.imread(tmp_path / "dim_iso.tif")
    assert restored.dtype == np.float32 and restored.shape == (17, 32, 32)
    np.testing.assert_array_equal(restored[::4], kept.astype(np.float32))
    assert np.mean(restored[1::4] != np.round(restored[1::4])) > 0.9  # not rounded to grey levels
    assert apply.main(common + ["--output", str(tmp_path / "dim_iso.ome.zarr"), "--block-size", "16"]) == 0
    block_wise = zarr_io.open_image(tmp_path / "dim_iso.ome.zarr")
    assert block_wise.dtype == "float32"
    np.testing.assert_allclose(block_wise.read(slice(None), slice(None), slice(None)), restored, atol=1e-3)


# --------------------------------------------------------------------------- #
# A review of the changes above, its findings pinned
# --------------------------------------------------------------------------- #
def test_malformed_metadata_numbers_are_a_damaged_file_not_a_traceback(tmp_path):
    """A comma decimal in the OME-XML (PhysicalSizeX="0,5") or a spacing that is no number: the file's
    content, one error; not the reader's own bug, although float() fails on the reader's own line."""
    from data import DamagedFileError

    ome = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
           '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYZCT" Type="uint8" SizeX="4" SizeY="4" '
           'SizeZ="3" SizeC="1" SizeT="1" PhysicalSizeX="0,5" PhysicalSizeY="0,5" PhysicalSizeZ="2">'
           '<Channel ID="Channel:0:0" SamplesPerPixel="1"/><TiffData/></Pixels></Image></OME>')
    tifffile.imwrite(tmp_path / "comma.ome.tif", np.zeros((3, 4, 4), np.uint8), description=ome, metadata=None)
    tifffile.imwrite(tmp_path / "spacing.tif", np.zeros((3, 4, 4), np.uint8), resolution=(2.0, 2.0), metadata=None,
                     description="ImageJ=1.11a\nimages=3\nslices=3\nunit=um\nspacing=abc\n")
    for name in ("comma.ome.tif", "spacing.tif"):
        with pytest.raises(DamagedFileError, match=name):
            read_calibration(tmp_path / name)


def test_grey_data_range_of_wide_signed_and_constant_truths():
    from metrics import grey_data_range

    assert grey_data_range(np.array([-20000, 20000], np.int16)) == 40000  # not an int16 difference, wrapped
    assert grey_data_range(np.full((2, 2), 7, np.uint16)) == 65535  # no range of its own: the dtype's
    assert grey_data_range(np.full((2, 2), 0.5, np.float32)) == 1.0
    assert grey_data_range(np.array([3, 200], np.uint8)) == 255


def test_nan_settings_are_refused():
    from settings import Settings

    for constant in ("PROBABILITY_THRESHOLD", "DROPOUT_RATE", "MIN_CONTENT_RATIO", "DICE_WEIGHT"):
        with pytest.raises(UserError, match=f"{constant} must be at least"):
            Settings().with_values(**{constant: float("nan")}).validate()


@pytest.mark.parametrize("dtype, name, written", [
    (np.int8, "g.tif", "int16"), (np.uint32, "g.tif", "uint16, int16 or float32"), (np.uint32, "g.ome.tif", "uint32"),
    (np.int16, "g.tif", "int16"), (np.float64, "g.tif", "float32"), (np.uint32, "g.ome.zarr", "uint32"),
])
def test_the_plan_names_the_type_grey_values_are_written_in(tmp_path, capsys, dtype, name, written):
    kept = np.arange(5 * 16 * 16).reshape(5, 16, 16).astype(dtype)
    path = tmp_path / "grey.ome.tif"  # an OME-TIFF input holds every one of these dtypes
    tifffile.imwrite(path, kept, ome=True, metadata={"axes": "ZYX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25,
                                                     "PhysicalSizeZ": 1.0})
    assert apply.main(["--input", str(path), "--output", str(tmp_path / name), "--kind", "intensity",
                       "--dry-run"]) == 0
    assert f"; written as {written}" in capsys.readouterr().out


def test_an_ome_tiff_keeps_wide_integer_grey_values_exact_an_imagej_tiff_warns(tmp_path):
    from data import save_stack

    stack = np.full((2, 8, 8), 2**24 + 1, np.uint32)
    np.testing.assert_array_equal(tifffile.imread(save_stack(tmp_path / "g.ome.tif", stack, grey_values=True)), stack)
    with pytest.warns(UserWarning, match="exact only up to 2\\*\\*24"):
        save_stack(tmp_path / "g.tif", stack, grey_values=True)


def test_baselines_are_written_as_the_network_is_so_rounding_favours_neither():
    """With GREY_DTYPE float32 the network's values are unrounded: bench.py's (and eval.py's) classical rows
    are then unrounded too; with the default both are rounded to the input's integers."""
    import bench
    from settings import Settings

    truth = np.random.default_rng(5).poisson(3, size=(9, 16, 16)).astype(np.uint16)
    case = bench.Case.of("dim", truth, 4)
    for grey, dtype in (("input", np.uint16), ("float32", np.float32)):
        settings = Settings().with_values(GREY_DTYPE=grey)
        _, restored, _ = bench.intensity_row(case, "linear", "linear", settings, "cpu")
        assert restored.dtype == dtype


# --------------------------------------------------------------------------- #
# Large volumes as a connectomics user runs them: resume, Ctrl-C, the plan
# --------------------------------------------------------------------------- #
def test_a_resume_leaves_a_model_file_of_another_run_alone(tmp_path, capsys):
    """--resume --save-model FILE may write FILE again only where it holds the resumed run's own model."""
    import torch
    from model import AttentionResUNet, save_model

    path = fiji_tiff(tmp_path / "mask.tif", mask_stack((9, 64, 64)).astype(np.uint8) * 255)
    out, own = tmp_path / "o.ome.zarr", tmp_path / "own.pt"
    args = ["--input", str(path), "--output", str(out), "--block-size", "32"] + CHEAP
    assert apply.main(args + ["--save-model", str(own), "--max-blocks", "1"]) == 0
    torch.manual_seed(1)
    other = save_model(tmp_path / "other.pt", AttentionResUNet(in_channels=5, depth=1, base_filters=4), {"factor": 4})
    before = other.read_bytes()
    capsys.readouterr()
    assert apply.main(args + ["--save-model", str(other), "--resume", "--max-blocks", "1"]) == 2
    assert f"Output exists: {other}" in capsys.readouterr().err and other.read_bytes() == before
    assert apply.main(args + ["--save-model", str(own), "--resume"]) == 0  # its own model: no 'Output exists'


@pytest.mark.parametrize("source", ["tif", "ome.zarr"])
def test_a_resume_refuses_an_input_written_again(tmp_path, capsys, tiny_model_args, source):
    """A segmentation proofread and exported again under the same name: the blocks done hold the old one."""
    kept = mask_stack((9, 64, 64)).astype(np.uint8)
    path = tmp_path / f"in.{source}"
    write = (lambda values: fiji_tiff(path, values)) if source == "tif" else (
        lambda values: zarr_io.write_image(path, values, VOXEL, "um", kind="mask", overwrite=True))
    write(kept)
    args = ["--input", str(path), "--output", str(tmp_path / "o.ome.zarr"), "--block-size", "32"] + tiny_model_args
    assert apply.main(args + ["--max-blocks", "1"]) == 0
    write(kept[:, ::-1].copy())  # the same shape, dtype and voxel size
    capsys.readouterr()
    assert apply.main(args + ["--resume"]) == 2
    assert "values changed since the interrupted run" in capsys.readouterr().err
    write(kept)
    assert apply.main(args + ["--resume"]) == 0


def test_store_checksum_sees_a_rewrite_and_reads_only_a_sample(tmp_path, monkeypatch):
    import blocks

    values = np.random.default_rng(3).integers(0, 9, (20, 300, 300)).astype(np.uint16)
    zarr_io.write_image(tmp_path / "s.ome.zarr", values, VOXEL, "um", kind="intensity")
    image = zarr_io.open_image(tmp_path / "s.ome.zarr")
    reads, read = [], type(image).read
    monkeypatch.setattr(type(image), "read", lambda self, *window: reads.append(window) or read(self, *window))
    first = blocks.values_checksum(image)
    assert len(reads) == 4 * 4 and all(w[1].stop - w[1].start <= 64 and w[0].step == 3 for w in reads)
    assert blocks.values_checksum(image) == first
    zarr_io.write_image(tmp_path / "s.ome.zarr", values + 1, VOXEL, "um", kind="intensity", overwrite=True)
    assert blocks.values_checksum(zarr_io.open_image(tmp_path / "s.ome.zarr")) != first
    assert blocks.values_checksum(values) != blocks.values_checksum(values[:, ::-1].copy())


def _ignores_ctrl_c() -> bool:
    import signal

    return signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_local_workers_ignore_ctrl_c_even_when_restarted():
    """A terminal's Ctrl-C reaches every process of the job: a local cluster's workers ignore it (a plugin, so
    that a worker the nanny restarts does too), and only apply.py takes it and closes them quietly."""
    import signal

    import blocks

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite itself runs in the background
    with blocks.dask_client(workers=1, worker_memory="1GiB") as client:
        assert signal.getsignal(signal.SIGINT) is before  # this process takes Ctrl-C as before, even while they start
        assert list(client.run(_ignores_ctrl_c).values()) == [True]
        client.restart()
        assert list(client.run(_ignores_ctrl_c).values()) == [True]


def test_the_plan_names_the_level_read_the_label_images_and_a_translation_a_tiff_drops(tmp_path, capsys):
    """A multiscale OME-Zarr image, converted by bioformats2raw (its image under series 0) with a label image
    beside it and an origin: the plan says which level it reads, how to restore the labels instead, and that a
    TIFF output keeps no origin."""
    import zarr

    kept = mask_stack((5, 300, 300)).astype(np.uint8)  # wider than a chunk: a pyramid of levels
    root = tmp_path / "scan.ome.zarr"
    zarr_io.write_image(root / "0", kept, VOXEL, "um", translation_zyx=(2.0, 5.0, 7.0), kind="mask",
                        labels_dhw=kept.astype(np.uint16), label_name="cells")
    zarr.open_group(str(root), mode="a", zarr_format=2).attrs["bioformats2raw.layout"] = 3
    levels = zarr_io.open_image(root).levels
    assert levels > 1
    assert apply.main(["--input", str(root), "--output", str(tmp_path / "o.tif"), "--kind", "mask", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"input: {root} (level 0 of {levels}: full resolution)" in printed
    assert f"label images cells are not restored with the image (give {root}/0/labels/cells to restore one)" in printed
    assert "translation: 2 x 5 x 7 um (not written: a TIFF holds no origin" in printed
    assert apply.main(["--input", f"{root}/0/labels/cells", "--output", str(tmp_path / "o.ome.zarr"),
                       "--dry-run"]) == 0  # the path the hint gives is one the tool reads
    assert "translation: 2 x 5 x 7 um\n" in capsys.readouterr().out


def test_block_work_is_not_in_the_plan_of_an_isotropic_stack(tmp_path, capsys):
    path = fiji_tiff(tmp_path / "iso.tif", mask_stack((9, 64, 64)).astype(np.uint8) * 255, voxel=(0.25, 0.25, 0.25))
    assert apply.main(["--input", str(path), "--output", str(tmp_path / "o.ome.zarr"), "--block-size", "32",
                       "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "already isotropic" in printed and "block work" not in printed


def test_a_resume_of_a_finished_output_leaves_its_model_file_and_an_overwrite_saves_anew(tmp_path, capsys):
    import torch

    path = fiji_tiff(tmp_path / "mask.tif", mask_stack((9, 64, 64)).astype(np.uint8) * 255)
    out, saved = tmp_path / "o.ome.zarr", tmp_path / "m.pt"
    args = ["--input", str(path), "--output", str(out), "--block-size", "32", "--save-model", str(saved)] + CHEAP
    assert apply.main(args) == 0
    before = saved.read_bytes()
    capsys.readouterr()
    assert apply.main(args + ["--resume"]) == 0  # as a batch script reruns it
    assert "already complete" in capsys.readouterr().out and saved.read_bytes() == before
    assert apply.main(args + ["--overwrite", "--probability-threshold", "0.3"]) == 0  # the same seeded weights
    assert torch.load(saved, weights_only=True)["config"]["probability_threshold"] == 0.3
