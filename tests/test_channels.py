"""One stack out of a file that holds several: channels, time points and RGB colours (``--channel``,
``--timepoint``; ``CHANNEL``, ``TIMEPOINT`` in eval.py), in TIFF hyperstacks and OME-Zarr images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import apply
import zarr_io
from data import (StackChoice, UserError, choose_stack, make_sample_labels, make_sample_stack, read_stack,
                  read_typed_stack)
from tiff_io import read_value_sample, stack_shape

VOXEL = (1.0, 0.25, 0.25)  # um: factor 4


def hyperstack(n_times=2, n_slices=9, n_channels=3, size=32):
    """A T, Z, C, Y, X uint8 stack whose every 3D stack differs: channel 0 a 0/255 mask, channel 1 the ids of
    a label image, channel 2 grey values, each shifted along X by 3 pixels per time point."""
    ids = make_sample_labels((n_slices, size, size), seed=3)
    assert ids.max() < 256
    grey = (ids > 0) * 150 + np.linspace(0, 60, size)[None, None, :]
    channels = [(ids > 0) * 255, ids, grey][:n_channels]
    stacks = np.zeros((n_times, n_slices, n_channels, size, size), np.uint8)
    for t in range(n_times):
        for c, values in enumerate(channels):
            stacks[t, :, c] = np.roll(values, 3 * t, axis=2).astype(np.uint8)
    return stacks


def write_hyperstack(path, stacks, axes="TZCYX"):
    tifffile.imwrite(path, stacks, imagej=True, resolution=(1 / VOXEL[2], 1 / VOXEL[1]),
                     metadata={"axes": axes, "spacing": VOXEL[0], "unit": "um"})
    return Path(path)


# --------------------------------------------------------------------------- #
# The rule
# --------------------------------------------------------------------------- #
def test_choose_stack_index_and_its_errors():
    shape = (2, 9, 3, 32, 32)
    assert choose_stack("TZCYX", shape, StackChoice(channel=2, timepoint=1), "f") == \
        (1, slice(None), 2, slice(None), slice(None))
    # An axis of length 1 is fixed at 0 whether chosen or not; channel 0 of a file without channels is that one.
    assert choose_stack("TZCYX", (1, 9, 1, 8, 8), StackChoice(channel=0), "f") == (0, slice(None), 0, slice(None),
                                                                                  slice(None))
    assert choose_stack("ZYX", (9, 8, 8), StackChoice(0, 0), "f") == (slice(None),) * 3
    with pytest.raises(UserError, match=r"holds 2 time points and 3 channels .*--timepoint 0\.\.1 and --channel "
                                        r"0\.\.2 \(TIMEPOINT and CHANNEL in eval.py\)"):
        choose_stack("TZCYX", shape, StackChoice(), "f")
    with pytest.raises(UserError, match=r"holds 3 channels \(--channel 0\.\.2\); --channel 3 is not one of them"):
        choose_stack("TZCYX", shape, StackChoice(channel=3, timepoint=0), "f")
    with pytest.raises(UserError, match=r"holds one time point .*--timepoint 1 is not in it. Leave out --timepoint"):
        choose_stack("ZCYX", (9, 3, 8, 8), StackChoice(channel=0, timepoint=1), "f")
    with pytest.raises(UserError, match="both channels and colour samples"):
        choose_stack("ZCYXS", (9, 2, 8, 8, 3), StackChoice(channel=0), "f")
    with pytest.raises(UserError, match=r"3 colour samples \(RGB\).*--channel 0\.\.2"):
        choose_stack("ZYXS", (9, 8, 8, 3), StackChoice(), "f")
    with pytest.raises(UserError, match="single image has no Z"):  # one image of channels: no stack at all
        choose_stack("YXS", (8, 8, 3), StackChoice(channel=1), "f", unnamed_third_axis=True)
    # ImageJ files saved without axes call their slices channels: three axes are one stack, read whole with
    # --channel 0 too (a script's CHANNEL = 0 for every file); OME-Zarr names its axes, so there c is channels.
    for choice in (StackChoice(), StackChoice(channel=0), StackChoice(0, 0)):
        assert choose_stack("CYX", (4, 8, 8), choice, "f", unnamed_third_axis=True) == (slice(None),) * 3
    with pytest.raises(UserError, match=r"is one stack \(axes CYX, shape \(4, 8, 8\)\), its slices called channels "
                                        r"or frames by its metadata, read as Z: --channel 1 is not in it"):
        choose_stack("CYX", (4, 8, 8), StackChoice(channel=1), "f", unnamed_third_axis=True)
    with pytest.raises(UserError, match="single image has no Z"):
        choose_stack("CYX", (4, 8, 8), StackChoice(), "f")
    with pytest.raises(UserError, match=r"axes angle,c,z,y,x"):  # the errors name an OME-Zarr image's own axes
        choose_stack("?CZYX", (1, 2, 4, 8, 8), StackChoice(), "f", axes_shown="angle,c,z,y,x")


# --------------------------------------------------------------------------- #
# Readers
# --------------------------------------------------------------------------- #
def test_tiff_hyperstack_reads_the_chosen_stack_only(tmp_path):
    stacks = hyperstack()
    path = write_hyperstack(tmp_path / "tzc.tif", stacks)
    for t in range(2):
        for c in range(3):
            choice = StackChoice(channel=c, timepoint=t)
            expected = stacks[t, :, c]
            np.testing.assert_array_equal(read_stack(path, choice), expected)
            assert stack_shape(path, choice) == expected.shape
            sample = read_value_sample(path, 4, choice)  # the kind is decided on the chosen stack's slices
            np.testing.assert_array_equal(sample, expected[np.unique(np.linspace(0, 8, 4).round().astype(int))])
    # The kind is decided on the chosen stack: a mask, a label image and grey values in one file.
    kinds = [read_typed_stack(path, choice=StackChoice(channel=c, timepoint=1))[0] for c in range(3)]
    assert kinds == ["mask", "labels", "intensity"]
    with pytest.raises(UserError, match="--timepoint 0..1 and --channel 0..2"):
        read_stack(path)
    with pytest.raises(UserError, match="--timepoint 0..1 and --channel 0..2"):
        stack_shape(path)


def test_rgb_tiff_channel_picks_a_colour(tmp_path):
    rgb = np.zeros((6, 16, 16, 3), np.uint8)
    for colour in range(3):
        rgb[..., colour] = (colour + 1) * make_sample_stack((6, 16, 16), seed=4 + colour)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")
    for colour in range(3):
        np.testing.assert_array_equal(read_stack(path, StackChoice(channel=colour)), rgb[..., colour])
        np.testing.assert_array_equal(read_value_sample(path, 3, StackChoice(channel=colour)),
                                      rgb[[0, 2, 5], ..., colour])


def test_a_folder_of_slices_has_no_channels_to_choose(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    for z in range(3):
        tifffile.imwrite(folder / f"s{z}.tif", np.zeros((8, 8), np.uint8))
    assert read_stack(folder, StackChoice(channel=0)).shape == (3, 8, 8)
    with pytest.raises(UserError, match="folder of 2D slices, which holds one stack; --channel 1"):
        read_stack(folder, StackChoice(channel=1))


def write_zarr_channels(path, stacks_czyx):
    """An OME-Zarr image (NGFF 0.4) with axes c, z, y, x and the voxel size of :data:`VOXEL`."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=stacks_czyx.shape, chunks=(1,) + stacks_czyx.shape[1:], dtype=stacks_czyx.dtype)
    group["0"][:] = stacks_czyx
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "c", "type": "channel"}] + [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, *VOXEL]}]}]}]
    return Path(path)


def test_ome_zarr_channel_is_chosen_by_its_index(tmp_path):
    stacks = hyperstack(n_times=1)[0].transpose(1, 0, 2, 3)  # (C, Z, Y, X)
    path = write_zarr_channels(tmp_path / "cells.ome.zarr", stacks)
    with pytest.raises(UserError, match=r"holds 3 channels \(axes c,z,y,x.*--channel 0\.\.2"):
        zarr_io.open_image(path)
    image = zarr_io.open_image(path, StackChoice(channel=2))
    assert image.leading_index == (2,) and image.shape == stacks.shape[1:]
    np.testing.assert_array_equal(image.read(), stacks[2])
    # The voxel size is every channel's: read without a choice.
    assert zarr_io.read_calibration(path) == (VOXEL, "um")
    # A plain array names no channels: a choice beyond the first is refused, not ignored.
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(1, 4, 5, 6), dtype="uint8")
    assert zarr_io.open_image(tmp_path / "plain.zarr", StackChoice(channel=0)).shape == (4, 5, 6)
    with pytest.raises(UserError, match="--channel 3 is not in it"):
        zarr_io.open_image(tmp_path / "plain.zarr", StackChoice(channel=3))


# --------------------------------------------------------------------------- #
# apply.py
# --------------------------------------------------------------------------- #
def test_apply_restores_the_chosen_channel_as_its_own_file(tmp_path, capsys, tiny_model_args):
    stacks = hyperstack()
    path = write_hyperstack(tmp_path / "tzc.tif", stacks)
    alone = tmp_path / "alone.tif"  # the same stack saved by itself: the reference
    tifffile.imwrite(alone, stacks[1, :, 0], imagej=True, resolution=(1 / VOXEL[2], 1 / VOXEL[1]),
                     metadata={"spacing": VOXEL[0], "unit": "um"})
    common = tiny_model_args

    assert apply.main(["--input", str(path), "--output", str(tmp_path / "x.tif")] + common) == 2
    err = capsys.readouterr().err
    assert "holds 2 time points and 3 channels" in err and "--timepoint 0..1 and --channel 0..2" in err
    assert not (tmp_path / "x.tif").exists()

    chosen = ["--channel", "0", "--timepoint", "1"]
    assert apply.main(["--input", str(path), "--output", str(tmp_path / "out"), "--dry-run"] + chosen + common) == 0
    out = capsys.readouterr().out
    assert f"input: {path} (channel 0, time point 1)" in out and "input shape: 9 x 32 x 32 (Z, Y, X)" in out
    assert f"output: {tmp_path / 'out' / 'tzc_c0_t1_restored.tif'}" in out  # one run per channel fills a folder

    assert apply.main(["--input", str(path), "--output", str(tmp_path / "out")] + chosen + common) == 0
    assert apply.main(["--input", str(alone), "--output", str(tmp_path / "alone_restored.tif")] + common) == 0
    capsys.readouterr()
    restored = tifffile.imread(tmp_path / "out" / "tzc_c0_t1_restored.tif")
    np.testing.assert_array_equal(restored, tifffile.imread(tmp_path / "alone_restored.tif"))
    np.testing.assert_array_equal(restored[::4] > 0, stacks[1, :, 0] > 0)  # kept slices verbatim


def test_block_wise_resume_refuses_another_channel(tmp_path, capsys, tiny_model_args):
    stacks = hyperstack(n_times=1)[0].transpose(1, 0, 2, 3)
    source = write_zarr_channels(tmp_path / "cells.ome.zarr", stacks)
    output = tmp_path / "iso.ome.zarr"
    common = ["--input", str(source), "--output", str(output), "--block-size", "16", "--kind", "mask",
              *tiny_model_args]
    assert apply.main(common + ["--channel", "0", "--max-blocks", "1"]) == 0
    capsys.readouterr()
    assert apply.main(common + ["--channel", "1", "--resume"]) == 2
    assert "channel / time point index [0] -> [1]" in capsys.readouterr().err
    assert apply.main(common + ["--channel", "0", "--resume", "--max-blocks", "1"]) == 0
    capsys.readouterr()
    # A TIFF's record: channel 0 chosen and none chosen read the same stack of a one-channel file.
    import blocks
    one = np.zeros((5, 8, 9), np.uint8)
    recorded = blocks._json(blocks._describe(one, str(source), ""))
    assert blocks._input_differences(recorded, blocks._json(blocks._describe(one, str(source), "channel 0"))) == []
    assert blocks._input_differences(recorded, blocks._json(blocks._describe(one, str(source), "channel 1"))) == \
        ["stack '' -> 'channel 1'"]
    assert apply.main(common + ["--channel", "0", "--resume"]) == 0
    capsys.readouterr()
    restored = zarr_io.open_image(output).read()
    np.testing.assert_array_equal(restored[::4] > 0, stacks[0] > 0)


def test_eval_reads_the_chosen_stack_and_settings_refuse_a_negative_index(tmp_path):
    import eval as evaluation
    from eval import default_settings
    from settings import Settings

    stacks = hyperstack()
    path = write_hyperstack(tmp_path / "tzc.tif", stacks)
    settings = dict(default_settings(), INPUT_IMAGES_DIRECTORY=str(path), CHANNEL=1, TIMEPOINT=1)
    kind, truth, labels, source = evaluation.load_evaluation_stack(settings)
    assert kind == "labels" and source == str(path)
    np.testing.assert_array_equal(labels, stacks[1, :, 1])
    for constant in ("CHANNEL", "TIMEPOINT"):
        with pytest.raises(UserError, match=f"{constant} counts from 0 \\(the first\\); got -1"):
            Settings.from_dict({constant: -1}).validate()


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_bioformats2raw_store_opens_its_one_image_and_names_several(tmp_path, version):
    """A microscope file converted by bioformats2raw: images are the root's groups 0, 1, ...; one is opened
    as itself (named as the store), several are one error naming them."""
    stacks = hyperstack(n_times=1)[0][:, 0]  # (Z, Y, X) mask
    root = tmp_path / "scan.ome.zarr"
    zarr_io.write_image(root / "0", stacks, VOXEL, "um", ngff_version=version)
    group = zarr.open_group(str(root), mode="a", zarr_format=2 if version == "0.4" else 3)
    if version == "0.4":
        group.attrs["bioformats2raw.layout"] = 3
    else:
        group.attrs["ome"] = {"version": "0.5", "bioformats2raw.layout": 3}
    image = zarr_io.open_image(root)
    assert image.path.endswith("0") and image.name == "scan" and image.voxel_size_zyx == VOXEL
    np.testing.assert_array_equal(image.read(), stacks)
    assert zarr_io.read_calibration(root) == (VOXEL, "um")
    zarr_io.write_image(root / "1", stacks, VOXEL, "um", ngff_version=version)
    with pytest.raises(UserError, match=r"holds 2 images \(a bioformats2raw conversion, series 0, 1\): give one, "
                                        r"e\.g\. .*scan\.ome\.zarr/0"):
        zarr_io.open_image(root)


def test_plan_names_the_images_a_tiff_holds_beyond_the_first(tmp_path, capsys):
    """A TIFF of several images (an OME-TIFF's positions, a thumbnail beside the stack): the first is read, and
    the plan says so rather than dropping the others silently."""
    path = tmp_path / "with_thumbnail.tif"
    stack = hyperstack(n_times=1)[0][:, 0]
    tifffile.imwrite(path, stack, resolution=(1 / VOXEL[2], 1 / VOXEL[1]))
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8), append=True)
    np.testing.assert_array_equal(read_stack(path), stack)
    args = ["--output", str(tmp_path / "x.tif"), "--dry-run", "--z-step", "1", "--xy-size", "0.25", "--unit", "um"]
    assert apply.main(["--input", str(path)] + args) == 0
    assert "other images: the file holds 1 more (shapes 8 x 8); the first is restored" in capsys.readouterr().out
    single = write_hyperstack(tmp_path / "single.tif", hyperstack(n_times=1, n_channels=1)[0], axes="ZCYX")
    assert apply.main(["--input", str(single)] + args) == 0
    assert "other images" not in capsys.readouterr().out
