"""Tests for data.py: reading, writing, Z downsampling and the sample phantom."""
import re
import warnings

import numpy as np
import pytest
import tifffile

from data import (
    downsample_z,
    factor_from_voxel_size,
    import_binary_tiff_sequence,
    kind_evidence,
    list_tiff_files,
    make_sample_labels,
    make_sample_stack,
    natural_sort_key,
    read_stack,
    read_voxel_size,
    resolution_factor,
    save_stack,
)


def _imwrite(path, arr, **kwargs):
    """tifffile.imwrite of a (D, H, W) stack as D grayscale pages (never as RGB planes)."""
    tifffile.imwrite(path, arr, photometric="minisblack", **kwargs)


def _distinct_slices(depth=11, height=12, width=9):
    """Bool stack whose slice k has row k (and only row k) set: order is visible in the content."""
    stack = np.zeros((depth, height, width), dtype=bool)
    for k in range(depth):
        stack[k, k % height, : (k % width) + 1] = True
    return stack


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #
def test_natural_sort_key_orders_numbers_numerically():
    names = ["img_10.tif", "img_2.tif", "img_1.tif", "IMG_11.tif", "img_3.tif"]
    assert sorted(names, key=natural_sort_key) == ["img_1.tif", "img_2.tif", "img_3.tif", "img_10.tif", "IMG_11.tif"]


def test_list_tiff_files_natural_order_and_filters_other_files(tmp_path):
    for name in ["b_10.tif", "b_2.TIFF", "b_1.tiff", "notes.txt", "b_3.png"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.tif").mkdir()  # a folder with a TIFF-like name is not a file
    assert [p.name for p in list_tiff_files(tmp_path)] == ["b_1.tiff", "b_2.TIFF", "b_10.tif"]


def test_folder_of_slices_round_trip_natural_order(tmp_path):
    stack = _distinct_slices(depth=11)
    folder = tmp_path / "slices"
    folder.mkdir()
    for k in range(stack.shape[0]):  # img_1.tif ... img_11.tif: lexical order would put img_10 after img_1
        tifffile.imwrite(folder / f"img_{k + 1}.tif", stack[k].astype(np.uint8) * 255)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0/255 is binary: no warning
        result = import_binary_tiff_sequence(folder)
    assert result.dtype == bool
    assert result.shape == stack.shape
    for k in range(stack.shape[0]):
        assert np.array_equal(result[k], stack[k]), f"slice {k} out of order"


def test_read_stack_keeps_stored_values_and_dtype(tmp_path):
    arr = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    path = tmp_path / "raw.tif"
    _imwrite(path, arr)
    result = read_stack(path)
    assert result.dtype == np.uint16
    assert np.array_equal(result, arr)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_multipage_tiff_round_trip(tmp_path, compression):
    stack = _distinct_slices(depth=7, height=10, width=13)
    path = tmp_path / f"stack_{compression}.tif"
    _imwrite(path, stack.astype(np.uint8), compression=compression)
    if compression:
        with tifffile.TiffFile(path) as tif:
            assert tif.pages[0].compression != 1  # really compressed on disk
    result = import_binary_tiff_sequence(path)
    assert result.dtype == bool
    assert result.shape == (7, 10, 13)
    assert np.array_equal(result, stack)


def test_save_stack_bool_written_as_0_255_and_read_back(tmp_path):
    stack = _distinct_slices(depth=5, height=8, width=6)
    path = save_stack(tmp_path / "out.tif", stack, voxel_size_zyx=(2.0, 0.5, 0.25), unit="um")
    assert path == tmp_path / "out.tif"
    on_disk = tifffile.imread(path)
    assert on_disk.dtype == np.uint8
    assert set(np.unique(on_disk).tolist()) == {0, 255}
    assert np.array_equal(on_disk == 255, stack)
    assert np.array_equal(import_binary_tiff_sequence(path), stack)
    assert read_voxel_size(path) == pytest.approx((2.0, 0.5, 0.25))
    with tifffile.TiffFile(path) as tif:
        meta = tif.imagej_metadata
    assert meta["spacing"] == pytest.approx(2.0)
    assert meta["unit"] == "um"


def test_save_stack_non_integer_resolution_round_trip(tmp_path):
    path = save_stack(tmp_path / "v.tif", np.ones((3, 4, 4), bool), voxel_size_zyx=(0.9, 0.3, 0.11))
    assert read_voxel_size(path) == pytest.approx((0.9, 0.3, 0.11), rel=1e-5)


def test_read_voxel_size_ome(tmp_path):
    path = tmp_path / "ome.ome.tif"
    arr = np.zeros((4, 6, 7), dtype=np.uint8)
    tifffile.imwrite(path, arr, ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2, "PhysicalSizeZ": 1.0})
    assert read_voxel_size(path) == pytest.approx((1.0, 0.2, 0.2))
    assert read_stack(path).shape == (4, 6, 7)


def test_read_voxel_size_none_without_calibration(tmp_path):
    path = tmp_path / "plain.tif"
    _imwrite(path, np.zeros((3, 4, 4), np.uint8))
    assert read_voxel_size(path) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_voxel_size(empty) is None


def test_binarization_warns_for_non_binary_values(tmp_path):
    arr = np.zeros((3, 4, 4), dtype=np.uint8)
    arr[0, 0, 0], arr[1, 1, 1], arr[2, 2, 2] = 1, 2, 2
    path = tmp_path / "three.tif"
    _imwrite(path, arr)
    with pytest.warns(UserWarning, match="binarized"):
        result = import_binary_tiff_sequence(path)
    assert np.array_equal(result, arr != 0)


def test_two_values_without_zero_are_a_two_class_segmentation(tmp_path):
    """ilastik's Simple Segmentation (1/2, here 3/7): the larger value is the foreground, as kind_evidence says."""
    arr = np.full((2, 3, 3), 3, dtype=np.uint8)
    arr[1, 1:] = 7
    path = tmp_path / "two.tif"
    _imwrite(path, arr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = import_binary_tiff_sequence(path)
    np.testing.assert_array_equal(result, arr == 7)
    assert kind_evidence(arr) == ("mask", "two values, 3/7: a two-class segmentation, 7 the foreground")


def test_binarization_threshold(tmp_path):
    arr = np.zeros((3, 4, 4), dtype=np.uint8)
    arr[0, 0, 0], arr[1, 1, 1], arr[2, 2, 2] = 1, 2, 3
    path = tmp_path / "three.tif"
    _imwrite(path, arr)
    with pytest.warns(UserWarning, match=r"value > 1"):
        result = import_binary_tiff_sequence(path, threshold=1)
    assert np.array_equal(result, arr > 1)
    assert result.sum() == 2


def test_binary_input_does_not_warn(tmp_path):
    arr = np.zeros((2, 3, 3), dtype=np.uint8)
    arr[0, 1, 1] = 1
    path = tmp_path / "bin.tif"
    _imwrite(path, arr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = import_binary_tiff_sequence(path)
    assert np.array_equal(result, arr == 1)


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "does_not_exist_42"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        import_binary_tiff_sequence(missing)


def test_folder_without_tiffs(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="No TIFF files"):
        import_binary_tiff_sequence(tmp_path)


def test_slices_of_different_sizes(tmp_path):
    tifffile.imwrite(tmp_path / "s_1.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "s_2.tif", np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match="different sizes"):
        import_binary_tiff_sequence(tmp_path)


def test_single_2d_image_file_is_rejected(tmp_path):
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="expected a 3D stack"):
        import_binary_tiff_sequence(path)


def test_multichannel_tiff_error_names_the_fix(tmp_path):
    import tiff_io

    path = tmp_path / "two_channels.tif"
    tifffile.imwrite(path, np.zeros((6, 2, 8, 8), np.uint8), imagej=True, metadata={"axes": "ZCYX"})
    rgb = tmp_path / "rgb.tif"  # one RGB image squeezes to 3 axes: its metadata tells
    tifffile.imwrite(rgb, np.zeros((8, 9, 3), np.uint8), photometric="rgb")
    for read in (import_binary_tiff_sequence, tiff_io.stack_shape):  # the dry run's metadata check says it too
        with pytest.raises(ValueError, match=r"holds 2 channels \(axes ZCYX, shape \(6, 2, 8, 8\)\): choose the "
                                             r"stack to restore with --channel 0\.\.1 \(CHANNEL in eval.py\)"):
            read(path)
        with pytest.raises(ValueError, match=r"shape \(8, 9, 3\) \(axes YXS\); expected a 3D stack .*single image"):
            read(rgb)
    # A 3D stack whose ImageJ metadata calls its slices channels is still read as a stack.
    tifffile.imwrite(tmp_path / "ij.tif", np.ones((4, 8, 8), np.uint8), imagej=True)
    assert tiff_io.stack_shape(tmp_path / "ij.tif") == (4, 8, 8)
    assert import_binary_tiff_sequence(tmp_path / "ij.tif").shape == (4, 8, 8)


def test_non_tiff_file_is_rejected(tmp_path):
    path = tmp_path / "stack.png"
    path.write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="not a TIFF"):
        read_stack(path)


# --------------------------------------------------------------------------- #
# Simulating anisotropy
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("depth,factor", [(11, 2), (11, 4), (12, 4), (9, 8)])
def test_downsample_z_keeps_every_factor_th_slice(depth, factor):
    stack = np.broadcast_to(np.arange(depth, dtype=np.int32)[:, None, None], (depth, 3, 4)).copy()
    sparse, kept = downsample_z(stack, factor)
    expected = np.arange(0, depth, factor)
    assert kept.dtype == np.int64
    assert np.array_equal(kept, expected)
    assert sparse.shape == (len(expected), 3, 4)
    assert sparse.dtype == stack.dtype
    assert np.array_equal(sparse[:, 0, 0], expected)
    sparse[...] = -1  # a copy, not a view
    assert stack.min() == 0


@pytest.mark.parametrize("factor", [1, 0, -3, 2.5])
def test_downsample_z_factor_too_small(factor):
    with pytest.raises(ValueError, match="integer >= 2"):
        downsample_z(np.zeros((10, 2, 2), bool), factor)


@pytest.mark.parametrize("factor", [10, 11])
def test_downsample_z_factor_not_below_depth(factor):
    with pytest.raises(ValueError, match="not smaller than the stack depth 10"):
        downsample_z(np.zeros((10, 2, 2), bool), factor)


def test_resolution_factor():
    assert resolution_factor(16, 2) == 8
    with pytest.warns(UserWarning, match="not an integer"):
        assert resolution_factor(5, 2) == 3  # 2.5 rounds half up, as apply.py does
    assert isinstance(resolution_factor(1.0, 0.25), int)
    with pytest.raises(ValueError, match="at least 2"):
        resolution_factor(2.8, 2)  # 1.4 rounds to 1
    with pytest.raises(ValueError, match="must be positive"):
        resolution_factor(4, 0)


def test_factor_near_one_is_a_conversion_said_so():
    # apply.py converts a stack whose Z/XY ratio rounds to 1 (minimum 1): the warning says nothing is added
    # (below 1.5 even the isotropic rounding rounds: a fraction of a slice is not restored).
    with pytest.warns(UserWarning, match=r"Z/XY ratio 0.938 rounds to 1: no slices are added") as caught:
        assert factor_from_voxel_size(15, 16, minimum=1) == (1, 15)
    assert "slices per input step" not in str(caught[0].message)
    with pytest.warns(UserWarning, match="not an integer; restoring 3 slices per input step"):
        assert factor_from_voxel_size(5, 2, minimum=1, rounding="nearest") == (3, 5 / 3)


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #
def test_save_stack_refuses_to_overwrite(tmp_path):
    path = tmp_path / "out.tif"
    first = np.zeros((3, 4, 4), bool)
    second = np.ones((3, 4, 4), bool)
    save_stack(path, first)
    with pytest.raises(FileExistsError, match="already exists"):
        save_stack(path, second)
    assert not import_binary_tiff_sequence(path).any()  # untouched
    save_stack(path, second, overwrite=True)
    assert import_binary_tiff_sequence(path).all()


def test_save_stack_creates_parent_folders(tmp_path):
    path = tmp_path / "a" / "b" / "out.tif"
    save_stack(path, np.ones((2, 3, 3), bool))
    assert path.is_file()


def test_save_stack_as_slices_round_trip(tmp_path):
    stack = _distinct_slices(depth=12, height=12, width=5)
    folder = save_stack(tmp_path / "slices", stack, voxel_size_zyx=(3.0, 0.5, 0.5), as_slices=True)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"slice_{k:04d}.tif" for k in range(12)]
    result = import_binary_tiff_sequence(folder)
    assert result.dtype == bool
    assert np.array_equal(result, stack)
    assert read_voxel_size(folder)[1:] == pytest.approx((0.5, 0.5))  # lateral size from the first slice
    assert read_voxel_size(folder)[0] is None  # a 2D slice has no Z step: --z-step gives it
    with pytest.raises(FileExistsError, match="not empty"):
        save_stack(folder, stack, as_slices=True)


def test_save_stack_as_slices_overwrite_with_fewer_slices(tmp_path):
    folder = tmp_path / "slices"
    save_stack(folder, np.zeros((6, 4, 4), bool), as_slices=True)
    save_stack(folder, np.ones((3, 4, 4), bool), as_slices=True, overwrite=True)
    assert import_binary_tiff_sequence(folder).shape == (3, 4, 4)


def test_save_stack_dtypes(tmp_path):
    probs = np.linspace(0, 1, 2 * 3 * 4).reshape(2, 3, 4)  # float64
    save_stack(tmp_path / "p.tif", probs)
    back = tifffile.imread(tmp_path / "p.tif")
    assert back.dtype == np.float32
    assert np.allclose(back, probs, atol=1e-6)

    labels = np.arange(2 * 3 * 4, dtype=np.int64).reshape(2, 3, 4) * 1000
    save_stack(tmp_path / "l.tif", labels)
    back = tifffile.imread(tmp_path / "l.tif")
    assert back.dtype == np.uint16
    assert np.array_equal(back, labels)

    with pytest.raises(ValueError, match="65535"):
        save_stack(tmp_path / "big.tif", np.full((2, 2, 2), 70000, dtype=np.int64))


# --------------------------------------------------------------------------- #
# Built-in sample
# --------------------------------------------------------------------------- #
def _touching_pairs(labels):
    pairs = set()
    for axis in range(labels.ndim):
        moved = np.moveaxis(labels, axis, 0)
        a, b = moved[:-1], moved[1:]
        touch = (a != 0) & (b != 0) & (a != b)
        pairs |= {tuple(sorted(p)) for p in zip(a[touch].tolist(), b[touch].tolist())}
    return pairs


@pytest.mark.parametrize("shape", [(40, 64, 48), (64, 128, 128), (128, 128, 128)])
def test_make_sample_stack_deterministic_bool_shape(shape):
    a = make_sample_stack(shape, seed=0)
    b = make_sample_stack(shape, seed=0)
    c = make_sample_stack(shape, seed=1)
    assert a.dtype == bool
    assert a.shape == shape
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_make_sample_stack_default_shape():
    stack = make_sample_stack()
    assert stack.shape == (128, 128, 128)
    assert stack.dtype == bool


@pytest.mark.parametrize("shape,seed", [((128, 128, 128), 0), ((128, 128, 128), 3), ((64, 128, 128), 0)])
def test_make_sample_stack_foreground_fraction(shape, seed):
    fraction = make_sample_stack(shape, seed=seed).mean()
    assert 0.01 <= fraction <= 0.20


def test_make_sample_stack_foreground_fraction_small_stack():
    fraction = make_sample_stack((40, 64, 48), seed=0).mean()
    assert 0.01 <= fraction <= 0.20


def test_make_sample_labels_ids_and_touching_pair():
    labels = make_sample_labels((64, 64, 64), seed=0)
    assert labels.dtype == np.uint16
    assert labels.shape == (64, 64, 64)
    ids = np.unique(labels)
    assert ids[0] == 0
    assert len(ids) - 1 >= 5
    assert len(_touching_pairs(labels)) >= 1
    assert np.array_equal(make_sample_stack((64, 64, 64), seed=0), labels > 0)



@pytest.mark.parametrize("micro", ["\u00b5m", "\u03bcm"])  # the micro sign and the Greek mu: both are in use
def test_ome_sizes_in_different_units_are_converted(tmp_path, micro):
    from data import read_calibration

    path = tmp_path / "mixed.ome.tif"
    tifffile.imwrite(path, np.zeros((3, 16, 16), np.uint8), ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeZ": 0.04, "PhysicalSizeZUnit": micro,
                               "PhysicalSizeY": 5, "PhysicalSizeYUnit": "nm",
                               "PhysicalSizeX": 5, "PhysicalSizeXUnit": "nm"})
    voxel, unit = read_calibration(path)
    assert voxel == pytest.approx((40.0, 5.0, 5.0)) and unit == "nm"


def test_resolution_factor_is_robust_to_decimal_sizes():
    assert resolution_factor(0.3, 0.1) == 3
    assert resolution_factor(0.7, 0.1) == 7


def test_read_mask_or_labels(tmp_path):
    from data import read_mask_or_labels

    labels = np.zeros((4, 16, 16), np.uint16)
    labels[:, 2:6, 2:6], labels[:, 8:12, 8:12] = 3, 7
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    mask, restored_labels = read_mask_or_labels(tmp_path / "labels.tif")
    np.testing.assert_array_equal(mask, labels > 0)
    np.testing.assert_array_equal(restored_labels, labels)
    with pytest.warns(UserWarning, match="binarized"):
        mask, none = read_mask_or_labels(tmp_path / "labels.tif", labels="no")
    assert none is None and mask.sum() == (labels > 0).sum()
    tifffile.imwrite(tmp_path / "big.tif", labels.astype(np.uint32) * 20000, photometric="minisblack")
    with pytest.raises(ValueError, match="0..65535"):
        read_mask_or_labels(tmp_path / "big.tif")
