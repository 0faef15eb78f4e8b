"""OME-Zarr outputs are valid OME-NGFF 0.4 (Zarr v2) and 0.5 (Zarr v3), checked by ``ome-zarr-models``
(the pydantic models of the specification): images, the ``labels`` group and its image-label groups, as
zarr_io's writers and the block-wise restore (blocks.py) write them. Also: the multiscales ``type`` names
the pyramid rule really used, grey values carry an ``omero`` display window, label ids above 65535 are
written as uint32, and the readers viewers use (``ome_zarr.reader``, napari-ome-zarr where installed) read
the layers back."""
import warnings

import numpy as np
import pytest
import tifffile
import torch
import zarr

import blocks
import zarr_io
from data import (UserError, as_label_image, downsample_z, make_sample_intensity, make_sample_labels,
                  read_typed_stack)
from eval import default_settings
from model import AttentionResUNet

pytest.importorskip("ome_zarr_models")
import ome_zarr_models  # noqa: E402
from ome_zarr_models.common.omero import Omero  # noqa: E402
from ome_zarr_models.v04.image import Image as ImageV04  # noqa: E402
from ome_zarr_models.v04.image_label import ImageLabel as ImageLabelV04  # noqa: E402
from ome_zarr_models.v04.labels import Labels as LabelsV04  # noqa: E402
from ome_zarr_models.v05.image import Image as ImageV05  # noqa: E402
from ome_zarr_models.v05.image_label import ImageLabel as ImageLabelV05  # noqa: E402
from ome_zarr_models.v05.labels import Labels as LabelsV05  # noqa: E402

MODELS = {"0.4": (ImageV04, LabelsV04, ImageLabelV04), "0.5": (ImageV05, LabelsV05, ImageLabelV05)}
VERSIONS = ("0.4", "0.5")
SHAPE = (13, 40, 70)  # (D, H, W) of the isotropic truth of the block-wise runs
BLOCK = 32
UM = blocks.OutputMetadata((1.0, 1.0, 1.0), "um")  # the restored stack's voxel size and unit
CELLS_UM = blocks.OutputMetadata((1.0, 1.0, 1.0), "um", label_name="cells")
CHUNK = 32  # lateral chunk of the outputs made here: 70 voxels wide gives a pyramid of 3 levels


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return AttentionResUNet(in_channels=3, depth=1, base_filters=4).eval()


@pytest.fixture(scope="module")
def tiny_intensity_model():
    torch.manual_seed(1)
    return AttentionResUNet(in_channels=3, depth=1, base_filters=4, output="intensity").eval()


def tiny_settings(**overrides):
    settings = default_settings()
    settings.update(TRAIN_Z_SIZE=3, TRAIN_XY_SIZE=16, INFERENCE_TILE_SIZE=32, INFERENCE_BATCH_SIZE=8,
                    PRECISION="fp32", PROBABILITY_THRESHOLD=0.5, DEVICE="cpu")
    settings.update(overrides)
    return settings


def kept_labels(factor, seed=0, shape=SHAPE):
    return downsample_z(make_sample_labels(shape, seed=seed), factor)[0]


def ome(path):
    """The OME metadata of a group: under 'ome' (0.5) or at the top (0.4)."""
    attributes = zarr.open_group(str(path), mode="r").attrs.asdict()
    return attributes.get("ome", attributes)


def grey_values(dtype, shape=(9, 40, 70), seed=1):
    """The grey-scale phantom: uint8 as made, uint16 scaled, float32 with negative values."""
    values = make_sample_intensity(shape, seed=seed)
    if np.dtype(dtype) == np.uint16:
        return values.astype(np.uint16) * 200
    return values if np.dtype(dtype) == np.uint8 else (values / np.float32(255) * 3.7 - 0.5).astype(dtype)


def write_all_levels(image, values):
    """Level 0 from ``values``, the pyramid as blocks.py makes it (region by region, level after level)."""
    image.write((slice(None),) * 3, values)
    for level in range(1, len(image.levels)):
        for region in zarr_io.pyramid_regions(image, level):
            zarr_io.write_pyramid_region(image, level, region)


def validate(path, version, label_names=()):
    """Validate an output with ome-zarr-models: the image (its labels group included, as the image models
    open it), the labels group, each image-label group, and the omero block (NGFF 0.5's models keep it as
    an extra field without checking it). Returns the image model."""
    image_model, labels_model, label_model = MODELS[version]
    opened = ome_zarr_models.open_ome_zarr(str(path), version=version)
    assert type(opened) is image_model
    image = image_model.from_zarr(zarr.open_group(str(path), mode="r"))
    if label_names:
        labels = labels_model.from_zarr(zarr.open_group(str(path / "labels"), mode="r"))
        attributes = labels.attributes.ome if version == "0.5" else labels.attributes
        assert attributes.labels == list(label_names)
        for name in label_names:
            label_model.from_zarr(zarr.open_group(str(path / "labels" / name), mode="r"))
            assert type(ome_zarr_models.open_ome_zarr(str(path / "labels" / name), version=version)) is label_model
    else:
        assert not (path / "labels").exists()
    if "omero" in ome(path):
        Omero.model_validate(ome(path)["omero"])
    return image


def assert_multiscales_type(path, method):
    multiscale = ome(path)["multiscales"][0]
    assert multiscale["type"] == method
    assert multiscale["metadata"]["kwargs"] == {"method": method}
    assert multiscale["metadata"]["description"] == zarr_io.DOWNSAMPLING_DESCRIPTIONS[method]


def assert_window(path, start, end, dtype_range):
    """One grey channel, opened at (start, end), within the dtype's (min, max)."""
    omero = ome(path)["omero"]
    (channel,) = omero["channels"]
    assert channel["window"] == {"min": dtype_range[0], "max": dtype_range[1], "start": start, "end": end}
    assert channel["color"] == "FFFFFF" and channel["active"] is True and channel["label"]
    assert omero["rdefs"]["model"] == "greyscale"


def assert_labels_group_version(path, version):
    attributes = zarr.open_group(str(path / "labels"), mode="r").attrs.asdict()
    if version == "0.5":
        assert attributes["ome"]["version"] == "0.5"
        assert list(attributes["ome"]) == ["version", "labels"]
    else:  # NGFF 0.4 keeps versions in the multiscales and image-label blocks
        assert set(attributes) == {"labels"}


# --------------------------------------------------------------------------- #
# zarr_io's writers
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("version", VERSIONS)
def test_mask_with_labels_is_valid_ngff(tmp_path, version):
    ids = make_sample_labels((9, 40, 70), seed=2).astype(np.uint16)
    path = tmp_path / "mask.ome.zarr"
    layout = zarr_io.create_output(path, ids.shape, (0.5, 0.5, 0.5), "um", (1.0, 2.0, 3.0), version,
                                   label_dtype=np.uint16, label_name="cells", chunk_xy=CHUNK)
    assert len(layout.image.levels) == 3
    write_all_levels(layout.image, np.where(ids > 0, 255, 0).astype(np.uint8))
    write_all_levels(layout.labels, ids)
    image = validate(path, version, ["cells"])
    multiscales = image.attributes.ome.multiscales if version == "0.5" else image.attributes.multiscales
    assert multiscales[0].type == "max"  # the models read the type
    assert_multiscales_type(path, "max")
    assert_multiscales_type(path / "labels" / "cells", "stride")
    assert_labels_group_version(path, version)
    # A mask is shown as written: no display window.
    assert "omero" not in ome(path)
    label_ome = ome(path / "labels" / "cells")
    assert label_ome["image-label"]["source"] == {"image": "../../"} and "omero" not in label_ome
    assert zarr.open_group(str(path), mode="r").info._zarr_format == (2 if version == "0.4" else 3)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_grey_values_carry_the_display_window(tmp_path, version, dtype):
    values = grey_values(dtype)
    window = zarr_io.display_window(values)
    np.testing.assert_allclose(window, np.percentile(values, (0.1, 99.9)), atol=1.0)
    path = tmp_path / "grey.ome.zarr"
    layout = zarr_io.create_output(path, values.shape, (1.0, 1.0, 1.0), "nm", ngff_version=version,
                                   image_format=zarr_io.ImageFormat(dtype, "mean", window), chunk_xy=CHUNK)
    write_all_levels(layout.image, values)
    validate(path, version)
    assert_multiscales_type(path, "mean")
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else np.finfo(dtype)
    assert_window(path, window[0], window[1], (info.min, info.max))
    assert ome(path)["omero"]["rdefs"]["defaultZ"] == values.shape[0] // 2
    assert ("version" in ome(path)["omero"]) == (version == "0.4")


@pytest.mark.parametrize("version", VERSIONS)
def test_default_window_and_probabilities(tmp_path, version):
    """Without a window: integer grey values open at their dtype's range, float ones get no omero block
    (no range to guess), and an image of another kind gets one only when asked (probabilities 0..1)."""
    zarr_io.create_output(tmp_path / "u16.ome.zarr", (5, 20, 20), (1.0, 1.0, 1.0), "um", ngff_version=version,
                          image_format=zarr_io.ImageFormat(np.uint16, "mean"))
    assert_window(tmp_path / "u16.ome.zarr", 0.0, 65535.0, (0, 65535))
    zarr_io.create_output(tmp_path / "f32.ome.zarr", (5, 20, 20), (1.0, 1.0, 1.0), "um", ngff_version=version,
                          image_format=zarr_io.ImageFormat(np.float32, "mean"))
    assert "omero" not in ome(tmp_path / "f32.ome.zarr")
    path = tmp_path / "probs.ome.zarr"
    layout = zarr_io.create_output(path, (9, 40, 70), (1.0, 1.0, 1.0), "um", ngff_version=version,
                                   image_format=zarr_io.ImageFormat(np.float32, "stride", (0.0, 1.0)), chunk_xy=CHUNK)
    write_all_levels(layout.image, np.random.default_rng(0).random((9, 40, 70), dtype=np.float32))
    for name in ("u16.ome.zarr", "f32.ome.zarr", "probs.ome.zarr"):
        validate(tmp_path / name, version)
    assert_multiscales_type(path, "stride")
    assert_window(path, 0.0, 1.0, (float(np.finfo(np.float32).min), float(np.finfo(np.float32).max)))


def test_validator_catches_the_old_labels_defect(tmp_path):
    """An NGFF 0.5 labels group without ome.version (what ome-zarr's writer leaves) fails validation: the
    check above is not vacuous."""
    path = tmp_path / "old.ome.zarr"
    zarr_io.create_output(path, (5, 20, 20), (1.0, 1.0, 1.0), "um", ngff_version="0.5", label_dtype=np.uint16)
    validate(path, "0.5", ["restored"])
    group = zarr.open_group(str(path / "labels"), mode="r+")
    group.attrs["ome"] = {"labels": ["restored"]}
    with pytest.raises(Exception, match="version"):
        LabelsV05.from_zarr(zarr.open_group(str(path / "labels"), mode="r"))
    with pytest.raises(Exception):
        ome_zarr_models.open_ome_zarr(str(path), version="0.5")


def test_display_window_of_arrays_and_stores(tmp_path):
    values = make_sample_intensity((9, 40, 70), seed=3).astype(np.uint16) * 40
    low, high = np.percentile(values, (0.1, 99.9))
    assert zarr_io.display_window(values) == (np.floor(low), np.ceil(high))
    path = tmp_path / "in.ome.zarr"
    layout = zarr_io.create_output(path, values.shape, (4.0, 1.0, 1.0), "um",
                                   image_format=zarr_io.ImageFormat(np.uint16, "mean"), chunk_xy=CHUNK, pyramid=False)
    layout.image.write((slice(None),) * 3, values)
    store = zarr_io.open_image(path)
    assert zarr_io.display_window(store) == zarr_io.display_window(values)  # a small store is read whole
    sampled = zarr_io.display_window(store, max_values=5_000)  # a large one: every few slices and rows
    assert abs(sampled[0] - low) < 0.1 * (high - low) and abs(sampled[1] - high) < 0.1 * (high - low)
    floats = make_sample_intensity((4, 30, 30), seed=0).astype(np.float32) / 255 - 0.5
    assert zarr_io.display_window(floats) == tuple(float(v) for v in np.percentile(floats, (0.1, 99.9)))
    with_nan = floats.copy()
    with_nan[0, 0, :3] = np.nan, np.inf, -np.inf
    assert zarr_io.display_window(with_nan) == tuple(float(v) for v in np.percentile(
        with_nan[np.isfinite(with_nan)], (0.1, 99.9)))
    # A constant image: one unit wide, inside the dtype.
    assert zarr_io.display_window(np.full((2, 4, 4), 7, np.uint8)) == (7.0, 8.0)
    assert zarr_io.display_window(np.full((2, 4, 4), 255, np.uint8)) == (254.0, 255.0)
    with pytest.raises(ValueError, match="start < end"):
        zarr_io.create_output(tmp_path / "bad.ome.zarr", (2, 4, 4), (1.0, 1.0, 1.0), "um",
                              image_format=zarr_io.ImageFormat(np.uint8, "mean", (5, 5)))


# --------------------------------------------------------------------------- #
# Label ids above 65535
# --------------------------------------------------------------------------- #
def test_label_ids_above_65535_are_written_as_uint32(tmp_path):
    ids = make_sample_labels((6, 30, 40), seed=1).astype(np.uint32)
    big = np.where(ids > 0, ids + 70_000, 0).astype(np.uint32)
    tifffile.imwrite(tmp_path / "big.tif", big, photometric="minisblack")
    kind, foreground, read = read_typed_stack(tmp_path / "big.tif", "labels", label_dtype=None)
    assert kind == "labels" and read.dtype == np.uint32
    np.testing.assert_array_equal(read, big)
    np.testing.assert_array_equal(foreground, big > 0)
    # Ids that fit keep the TIFF's uint16; negative or fractional ids are refused.
    assert as_label_image(ids, "small", None)[1].dtype == np.uint16
    assert as_label_image(np.array([0, 2**33], np.int64), "huge", None)[1].dtype == np.uint64
    with pytest.raises(UserError, match="positive"):
        as_label_image(np.array([-1, 3], np.int32), "neg", None)
    with pytest.raises(UserError, match="non-integer"):
        as_label_image(np.array([0.5, 3.0]), "frac", None)
    with pytest.raises(UserError, match="integers"):
        zarr_io.ngff_label_dtype(np.float32)
    # The other kinds read as data.read_typed_stack reads them.
    tifffile.imwrite(tmp_path / "mask.tif", (big > 0).astype(np.uint8) * 255, photometric="minisblack")
    kind, mask, none = read_typed_stack(tmp_path / "mask.tif", label_dtype=None)
    assert kind == "mask" and mask.dtype == bool and none is None

    for version in VERSIONS:
        path = tmp_path / f"big_{version}.ome.zarr"
        layout = zarr_io.create_output(path, big.shape, (1.0, 1.0, 1.0), "um", ngff_version=version,
                                       label_dtype=read.dtype, label_name="cells", chunk_xy=16)
        write_all_levels(layout.image, np.where(big > 0, 255, 0).astype(np.uint8))
        write_all_levels(layout.labels, read)
        validate(path, version, ["cells"])
        stored = zarr_io.open_image(path / "labels" / "cells")
        assert stored.dtype == "uint32" and stored.is_label
        np.testing.assert_array_equal(stored.read(), big)


def test_blockwise_restore_keeps_uint32_ids(tmp_path, tiny_model):
    factor = 3
    ids = kept_labels(factor, seed=6).astype(np.uint32)
    ids = np.where(ids > 0, ids + 100_000, 0).astype(np.uint32)
    out = tmp_path / "big_ids.ome.zarr"
    blocks.restore_to_ome_zarr(ids > 0, out, factor, tiny_settings(BLOCK_SIZE=BLOCK, NGFF_VERSION="0.5"), CELLS_UM,
                               model=tiny_model, labels_source=ids, progress=False)
    validate(out, "0.5", ["cells"])
    restored = zarr_io.open_image(out / "labels" / "cells")
    assert restored.dtype == "uint32"
    values = restored.read()
    np.testing.assert_array_equal(values[::factor], ids)
    assert set(np.unique(values)) <= set(np.unique(ids))


def test_cli_tif_ids_above_65535_into_ome_zarr(tmp_path):
    import apply

    factor = 4
    ids = kept_labels(factor, seed=3).astype(np.uint32)
    big = np.where(ids > 0, ids + 70_000, 0).astype(np.uint32)
    tifffile.imwrite(tmp_path / "cells.tif", big, photometric="minisblack")
    out = tmp_path / "cells_iso.ome.zarr"
    assert apply.main(["--train-xy-size", "16", "--train-z-size", "3", "--train-nb", "32", "--num-epochs", "1",
                       "--base-filters", "4", "--depth", "1", "--inference-tile-size", "32", "--precision", "fp32",
                       "--device", "cpu", "--input", str(tmp_path / "cells.tif"), "--z-step", "4", "--xy-size", "1",
                       "--unit", "um", "--kind", "labels", "--block-size", str(BLOCK), "--ngff-version", "0.5",
                       "--output", str(out)]) == 0
    labels = zarr_io.open_image(out / "labels" / "cells")
    assert labels.dtype == "uint32"
    np.testing.assert_array_equal(labels.read()[::factor], big)
    validate(out, "0.5", ["cells"])


# --------------------------------------------------------------------------- #
# The block-wise restore (blocks.py) writes valid outputs
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("version", VERSIONS)
def test_blockwise_mask_labels_and_probabilities_are_valid(tmp_path, tiny_model, version):
    factor = 3
    ids = kept_labels(factor, seed=4)
    out, probs = tmp_path / "out.ome.zarr", tmp_path / "probs.ome.zarr"
    summary = blocks.restore_to_ome_zarr(ids > 0, out, factor, tiny_settings(BLOCK_SIZE=BLOCK, NGFF_VERSION=version),
                                         blocks.OutputMetadata((0.5, 0.5, 0.5), "um", label_name="cells"),
                                         model=tiny_model, labels_source=ids, probabilities="float32",
                                         probabilities_output=probs, progress=False)
    assert summary["state"] == "complete" and len(summary["layout"].image.levels) == 3
    validate(out, version, ["cells"])
    validate(probs, version)
    assert_multiscales_type(out, "max")
    assert_multiscales_type(out / "labels" / "cells", "stride")
    assert_multiscales_type(probs, "stride")
    assert_labels_group_version(out, version)
    # The run's own record sits beside the OME metadata, outside the 'ome' namespace.
    root = zarr.open_group(str(out), mode="r").attrs.asdict()
    assert root[zarr_io.RESTORE_ATTRIBUTE]["state"] == "complete"


@pytest.mark.parametrize("version", VERSIONS)
def test_blockwise_grey_values_are_valid_and_carry_a_window(tmp_path, tiny_intensity_model, version):
    factor = 4
    sparse = downsample_z(make_sample_intensity(SHAPE, seed=2), factor)[0]
    out = tmp_path / "grey.ome.zarr"
    blocks.restore_to_ome_zarr(sparse, out, factor, tiny_settings(BLOCK_SIZE=BLOCK, NGFF_VERSION=version), UM,
                               kind="intensity", model=tiny_intensity_model, progress=False)
    validate(out, version)
    assert_multiscales_type(out, "mean")
    window = ome(out)["omero"]["channels"][0]["window"]
    assert (window["min"], window["max"]) == (0, 255) and 0 <= window["start"] < window["end"] <= 255


def test_blockwise_grey_output_opens_at_the_inputs_percentiles(tmp_path, tiny_intensity_model):
    factor = 4
    sparse = (downsample_z(make_sample_intensity(SHAPE, seed=2), factor)[0].astype(np.uint16) * 50)
    out = tmp_path / "grey16.ome.zarr"
    blocks.restore_to_ome_zarr(sparse, out, factor, tiny_settings(BLOCK_SIZE=BLOCK), UM, kind="intensity",
                               model=tiny_intensity_model, progress=False)
    start, end = zarr_io.display_window(sparse)
    assert_window(out, start, end, (0, 65535))


# --------------------------------------------------------------------------- #
# Readers: ome_zarr.reader (the reader of ome-zarr-py), napari-ome-zarr where installed
# --------------------------------------------------------------------------- #
def written_output(tmp_path, version):
    """A restored mask with ids (uint32) and a grey-scale output, both at voxel 0.5 um from (1, 2, 3)."""
    ids = make_sample_labels((9, 40, 70), seed=2).astype(np.uint32) * 1000
    mask = tmp_path / f"mask_{version}.ome.zarr"
    layout = zarr_io.create_output(mask, ids.shape, (0.5, 0.5, 0.5), "um", (1.0, 2.0, 3.0), version,
                                   label_dtype=np.uint32, label_name="cells", chunk_xy=CHUNK)
    write_all_levels(layout.image, np.where(ids > 0, 255, 0).astype(np.uint8))
    write_all_levels(layout.labels, ids)
    values = make_sample_intensity((9, 40, 70), seed=1).astype(np.uint16) * 100
    grey = tmp_path / f"grey_{version}.ome.zarr"
    layout = zarr_io.create_output(grey, values.shape, (0.5, 0.5, 0.5), "um", (1.0, 2.0, 3.0), version,
                                   image_format=zarr_io.ImageFormat(np.uint16, "mean", zarr_io.display_window(values)),
                                   chunk_xy=CHUNK)
    write_all_levels(layout.image, values)
    return mask, grey, ids, values


@pytest.mark.parametrize("version", VERSIONS)
def test_ome_zarr_reader_reads_layers_scale_and_window(tmp_path, version):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    mask, grey, ids, values = written_output(tmp_path, version)
    nodes = list(Reader(parse_url(str(mask)))())
    image = next(n for n in nodes if n.load(Multiscales) and not n.load(Label))
    label = next(n for n in nodes if n.load(Label))
    assert len(image.data) == len(label.data) == 3
    assert label.metadata["name"] == "cells"
    np.testing.assert_array_equal(np.asarray(label.data[0]), ids)
    for node in (image, label):
        transforms = node.metadata["coordinateTransformations"]
        assert transforms[0][0] == {"type": "scale", "scale": [0.5, 0.5, 0.5]}
        assert transforms[0][1] == {"type": "translation", "translation": [1.0, 2.0, 3.0]}
    (grey_node,) = [n for n in Reader(parse_url(str(grey)))() if n.load(Multiscales)]
    start, end = zarr_io.display_window(values)
    assert grey_node.metadata["contrast_limits"] == [[start, end]]
    assert grey_node.metadata["channel_names"] == [grey.name]


@pytest.mark.parametrize("version", VERSIONS)
def test_napari_ome_zarr_reader_gives_image_and_labels_layers(tmp_path, version):
    """napari-ome-zarr's reader, called without a display (it needs the napari package, not a window).
    Skipped where napari-ome-zarr is not installed (it is not in requirements.txt: napari is heavy)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader_module = pytest.importorskip("napari_ome_zarr._reader")
    mask, grey, ids, values = written_output(tmp_path, version)
    layers = reader_module.napari_get_reader(str(mask))(str(mask))
    by_kind = {kind: (data, metadata) for data, metadata, kind in layers}
    assert set(by_kind) == {"image", "labels"}
    for kind in ("image", "labels"):
        data, metadata = by_kind[kind]
        assert len(data) == 3 and tuple(data[0].shape) == ids.shape
        assert list(metadata["scale"]) == [0.5, 0.5, 0.5]
    assert by_kind["labels"][0][0].dtype == np.uint32
    np.testing.assert_array_equal(np.asarray(by_kind["labels"][0][0]), ids)
    ((data, metadata, kind),) = reader_module.napari_get_reader(str(grey))(str(grey))
    assert kind == "image" and list(metadata["scale"]) == [0.5, 0.5, 0.5]
    assert list(metadata["contrast_limits"]) == list(zarr_io.display_window(values))
