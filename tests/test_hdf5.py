"""HDF5 inputs (PlantSeg's and ilastik's segmentations, Fiji's HDF5 export): one 3D dataset, named
``file.h5/key`` or alone in its file, with the voxel size of its ``element_size_um`` attribute."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

h5py = pytest.importorskip("h5py")

import apply  # noqa: E402
from data import (StackChoice, UserError, make_sample_labels, read_calibration, read_stack,  # noqa: E402
                  read_typed_stack, read_value_sample, stack_dtype, stack_shape)


def write_plantseg_like(path, ids, voxel_um=(1.0, 0.25, 0.25), extra=True):
    """A file as PlantSeg writes it: the segmentation and (optionally) the raw and prediction datasets."""
    with h5py.File(path, "w") as handle:
        handle.create_dataset("segmentation", data=ids, chunks=True, compression="gzip")
        handle["segmentation"].attrs["element_size_um"] = voxel_um
        if extra:
            handle.create_dataset("raw", data=(ids % 7).astype(np.float32) * 10)
            handle.create_dataset("predictions", data=np.zeros((1,) + ids.shape, np.float32))
    return path


def test_hdf5_dataset_reads_like_a_tiff(tmp_path):
    ids = make_sample_labels((9, 32, 32), seed=4).astype(np.uint16)
    path = write_plantseg_like(tmp_path / "ovule.h5", ids)
    seg = tmp_path / "ovule.h5" / "segmentation"
    np.testing.assert_array_equal(read_stack(seg), ids)
    assert stack_shape(seg) == ids.shape and stack_dtype(seg) == np.uint16
    np.testing.assert_array_equal(read_value_sample(seg, 4), ids[np.unique(np.linspace(0, 8, 4).round().astype(int))])
    assert read_calibration(seg) == ((1.0, 0.25, 0.25), "um")
    kind, mask, labels = read_typed_stack(seg)
    assert kind == "labels" and np.array_equal(labels, ids)
    # A 4D dataset whose first axis has length 1 (a one-channel prediction) is its stack.
    assert stack_shape(tmp_path / "ovule.h5" / "predictions") == ids.shape
    with pytest.raises(UserError, match=r"holds 3 datasets of 3 or more axes \(predictions, raw, segmentation\): "
                                        r"name the one to restore, e\.g\. --input .*ovule\.h5/predictions"):
        read_stack(path)
    with pytest.raises(UserError, match="has no dataset 'labels'; its datasets: predictions, raw, segmentation"):
        read_stack(tmp_path / "ovule.h5" / "labels")
    with pytest.raises(UserError, match="--channel 1 is not in it"):
        read_stack(seg, StackChoice(channel=1))
    with h5py.File(tmp_path / "five.h5", "w") as handle:
        handle.create_dataset("tc", data=np.zeros((2, 9, 8, 8, 2), np.uint8))
    with pytest.raises(UserError, match=r"shape \(2, 9, 8, 8, 2\); expected a 3D stack"):
        stack_shape(tmp_path / "five.h5")
    (tmp_path / "bad.h5").write_bytes(b"not an hdf5 file")
    with pytest.raises(UserError, match="damaged or not a valid HDF5"):
        read_stack(tmp_path / "bad.h5")


def test_apply_restores_an_hdf5_label_image_as_its_tiff_twin(tmp_path, capsys, tiny_model_args):
    ids = make_sample_labels((65, 32, 32), seed=6)[::4].astype(np.uint16)
    write_plantseg_like(tmp_path / "cells.h5", ids, extra=False)  # one dataset: the file alone names it
    tifffile.imwrite(tmp_path / "cells.tif", ids, imagej=True, resolution=(4, 4),
                     metadata={"spacing": 1.0, "unit": "um"})
    common = tiny_model_args + ["--kind", "labels"]
    dry = ["--input", str(tmp_path / "cells.h5"), "--output", str(tmp_path / "out"), "--dry-run"]
    assert apply.main(dry + common) == 0
    out = capsys.readouterr().out
    assert "factor: 4 from Z 1 um, XY 0.25 um (from the file)" in out
    assert f"output: {tmp_path / 'out' / 'cells_restored.tif'}" in out
    assert apply.main(["--input", str(tmp_path / "cells.h5"), "--output", str(tmp_path / "h5.tif")] + common) == 0
    assert apply.main(["--input", str(tmp_path / "cells.tif"), "--output", str(tmp_path / "tif.tif")] + common) == 0
    capsys.readouterr()
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "h5.tif"), tifffile.imread(tmp_path / "tif.tif"))
    assert apply.main(["--input", str(tmp_path / "missing.h5" / "seg"), "--output", str(tmp_path / "x.tif")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_microscope_format_is_one_error_naming_the_conversion(tmp_path):
    path = tmp_path / "scan.czi"
    path.write_bytes(b"ZISRAWFILE")
    for read in (read_stack, stack_shape, read_calibration):  # the dry run's metadata reads say it too
        with pytest.raises(UserError, match=r"'.*scan\.czi' is not a TIFF file .*HDF5 file \(\.h5\).*bioformats2raw"):
            read(path)


def test_hdf5_byte_order_axis_layouts_and_odd_voxel_attributes(tmp_path):
    ids = make_sample_labels((9, 16, 16), seed=2).astype(np.uint16)
    with h5py.File(tmp_path / "odd.h5", "w") as handle:
        handle.create_dataset("big_endian", data=ids.astype(">u2"))
        handle["big_endian"].attrs["element_size_um"] = 1.0  # a scalar: no voxel size, not a crash
        handle.create_dataset("ilastik", data=ids[..., None])  # ilastik's (Z, Y, X, 1)
        handle["ilastik"].attrs["element_size_um"] = np.array([2.0, 0.5, 0.5, 1.0])[:3]
    big = read_stack(tmp_path / "odd.h5" / "big_endian")
    assert big.dtype == np.uint16 and big.dtype.isnative and np.array_equal(big, ids)
    assert stack_dtype(tmp_path / "odd.h5" / "big_endian") == np.dtype(np.uint16)
    assert read_value_sample(tmp_path / "odd.h5" / "big_endian", 3).dtype.isnative
    assert read_calibration(tmp_path / "odd.h5" / "big_endian") is None
    np.testing.assert_array_equal(read_stack(tmp_path / "odd.h5" / "ilastik"), ids)
    np.testing.assert_array_equal(read_value_sample(tmp_path / "odd.h5" / "ilastik", 3), ids[[0, 4, 8]])
    assert stack_shape(tmp_path / "odd.h5" / "ilastik") == ids.shape
    assert read_calibration(tmp_path / "odd.h5" / "ilastik") == ((2.0, 0.5, 0.5), "um")


def test_hdf5_channels_are_chosen_with_channel(tmp_path):
    """PlantSeg's (C, Z, Y, X) predictions and ilastik's (Z, Y, X, C) exports: the shorter end axis is the
    channels where no axes are named; ilastik's ``axistags`` name them where it writes them."""
    probabilities = np.random.default_rng(1).random((9, 16, 16, 2)).astype(np.float32)
    with h5py.File(tmp_path / "p.h5", "w") as handle:
        handle.create_dataset("ilastik", data=probabilities)
        handle.create_dataset("plantseg", data=np.moveaxis(probabilities, 3, 0))
        tagged = handle.create_dataset("tagged", data=np.moveaxis(probabilities, 3, 1))  # Z, C, Y, X
        tagged.attrs["axistags"] = json.dumps({"axes": [{"key": k} for k in "zcyx"]})
    for key in ("ilastik", "plantseg", "tagged"):
        path = tmp_path / "p.h5" / key
        with pytest.raises(UserError, match=r"holds 2 channels .*--channel 0\.\.1"):
            stack_shape(path)
        for channel in (0, 1):
            np.testing.assert_array_equal(read_stack(path, StackChoice(channel=channel)), probabilities[..., channel])
            assert stack_shape(path, StackChoice(channel=channel)) == (9, 16, 16)
        np.testing.assert_array_equal(read_value_sample(path, 3, StackChoice(channel=1)), probabilities[[0, 4, 8], ..., 1])
    with h5py.File(tmp_path / "p.h5", "a") as handle:  # X before Z: refused, never read as Z
        handle.create_dataset("xyzc", data=np.moveaxis(probabilities, 0, 2)).attrs["axistags"] = json.dumps(
            {"axes": [{"key": k} for k in "xyzc"]})
    with pytest.raises(UserError, match=r"names its axes xyzc .*only datasets stored with Z before Y before X"):
        stack_shape(tmp_path / "p.h5" / "xyzc", StackChoice(channel=1))
