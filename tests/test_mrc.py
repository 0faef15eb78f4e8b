"""MRC inputs (volume EM: FIB-SEM and serial-section stacks, tomograms, IMOD segmentations), the voxel size from
the header (Angstrom, read in nm)."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

mrcfile = pytest.importorskip("mrcfile")

import apply  # noqa: E402
from data import (StackChoice, UserError, make_sample_labels, read_calibration, read_stack,  # noqa: E402
                  read_typed_stack, read_value_sample, stack_dtype, stack_shape)


def write_mrc(path, stack, voxel_angstrom=(40.0, 40.0, 160.0)):
    """An MRC file with a voxel size of (x, y, z) Angstrom, as mrcfile and IMOD write it."""
    with mrcfile.new(str(path), overwrite=True) as handle:
        handle.set_data(stack)
        handle.voxel_size = voxel_angstrom
    return path


def test_mrc_reads_like_a_tiff(tmp_path):
    ids = make_sample_labels((9, 32, 32), seed=4).astype(np.uint16)
    path = write_mrc(tmp_path / "cells.mrc", ids)
    np.testing.assert_array_equal(read_stack(path), ids)
    assert stack_shape(path) == ids.shape and stack_dtype(path) == np.uint16
    np.testing.assert_array_equal(read_value_sample(path, 4), ids[np.unique(np.linspace(0, 8, 4).round().astype(int))])
    assert read_calibration(path) == ((16.0, 4.0, 4.0), "nm")
    assert read_typed_stack(path)[0] == "labels"
    with pytest.raises(UserError, match="--channel 1 is not in it"):
        read_stack(path, StackChoice(channel=1))
    unset = write_mrc(tmp_path / "unset.mrc", ids, (0.0, 0.0, 0.0))
    assert read_calibration(unset) is None  # an unset header says nothing, not 0 nm
    (tmp_path / "bad.mrc").write_bytes(b"not an mrc file" * 100)
    with pytest.raises(UserError, match="damaged or not a valid MRC file"):
        stack_shape(tmp_path / "bad.mrc")


def test_apply_restores_an_mrc_stack_as_its_tiff_twin(tmp_path, capsys, tiny_model_args):
    mask = (make_sample_labels((65, 32, 32), seed=6)[::4] > 0).astype(np.uint8) * 255
    write_mrc(tmp_path / "fib.mrc", mask, (40.0, 40.0, 160.0))
    tifffile.imwrite(tmp_path / "fib.tif", mask, imagej=True, resolution=(0.25, 0.25),
                     metadata={"spacing": 16.0, "unit": "nm"})
    common = tiny_model_args
    dry = ["--input", str(tmp_path / "fib.mrc"), "--output", str(tmp_path / "x.tif"), "--dry-run"]
    assert apply.main(dry + common) == 0
    assert "factor: 4 from Z 16 nm, XY 4 nm (from the file)" in capsys.readouterr().out
    assert apply.main(["--input", str(tmp_path / "fib.mrc"), "--output", str(tmp_path / "mrc.tif")] + common) == 0
    assert apply.main(["--input", str(tmp_path / "fib.tif"), "--output", str(tmp_path / "tif.tif")] + common) == 0
    capsys.readouterr()
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "mrc.tif"), tifffile.imread(tmp_path / "tif.tif"))


def test_mrc_imod_unsigned_bytes_big_endian_and_a_missing_z_size(tmp_path):
    values = np.arange(4 * 8 * 8, dtype=np.int64).reshape(4, 8, 8) % 256
    path = tmp_path / "imod.mrc"
    with mrcfile.new(str(path), overwrite=True) as handle:
        handle.set_data(values.astype(np.uint8).view(np.int8))  # mode 0, as IMOD writes unsigned bytes
        extra = bytearray(np.asarray(handle.header.extra2).tobytes())  # IMOD's stamp and flags: header bytes 152-159
        extra[40:48] = np.array([1146047817, 1], dtype=handle.header.nx.dtype).tobytes()
        handle.header.extra2 = bytes(extra)
        handle.voxel_size = (40.0, 40.0, 0.0)  # Z unset
    stack = read_stack(path)
    assert stack.dtype == np.uint8 and np.array_equal(stack, values)
    assert stack_dtype(path) == np.dtype(np.uint8)
    assert read_calibration(path) == ((None, 4.0, 4.0), "nm")  # --z-step gives the rest
    big = tmp_path / "big.mrc"
    with mrcfile.new(str(big), overwrite=True) as handle:
        handle.set_data(values.astype(">f4"))
    assert read_stack(big).dtype.isnative and np.array_equal(read_stack(big), values.astype(np.float32))
