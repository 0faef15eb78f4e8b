"""OME-Zarr reading and writing: voxel size, unit, translation, pyramid, labels.

Reading: an OME-Zarr image (NGFF 0.4 on Zarr v2, NGFF 0.5 on Zarr v3), one of
its label images (``image.ome.zarr/labels/NAME``) or a plain Zarr array. The
voxel size, unit and translation come from the multiscale's
``coordinateTransformations`` and ``axes``; a plain array has none (the
command line then needs ``--z-step``, ``--xy-size`` and ``--unit``). Pixels are
never loaded whole: :class:`ZarrImage` names the array and reads windows.

Writing: :func:`create_output` lays out an OME-Zarr whose arrays are filled
later, region by region (``blocks.py`` writes them from many processes): the
restored mask as the image (in the input mask's values, as the TIFF output) or the restored
grey values (in the input's dtype), the restored ids as a label image under
``labels/NAME`` with ``image-label`` metadata, and a pyramid made by
max-pooling (masks), averaging (grey values) or striding (labels,
probabilities), never by interpolation. The metadata is written with the
``ome-zarr`` package's writer, completed where it falls short of the NGFF
specification (the multiscales ``type`` of the pyramid, the ``ome.version`` of
an NGFF 0.5 ``labels`` group) and by an ``omero`` display window for grey values
(the input's 0.1 / 99.9 percentiles, :func:`display_window`). The outputs
validate against ``ome-zarr-models`` (the pydantic models of the specification);
``ome_zarr.reader`` and napari-ome-zarr read them back.

Label ids: a label image is written in an integer dtype NGFF allows
(:func:`ngff_label_dtype`); ids read from a TIFF for an OME-Zarr output may exceed a
TIFF's 65535 (``data.as_label_image`` with ``dtype=None``: the smallest of uint16, uint32 and uint64 that
holds them).

NGFF 0.4 (Zarr v2) is the default: Fiji's readers (N5/BigDataViewer,
MoBIE) and most released tools read it, while 0.5 (Zarr v3) readers are
still arriving. ``--ngff-version 0.5`` writes the newer format.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import zarr

from data import (DamagedFileError, InputNotFoundError, MaskValues, OutputExistsError, StackChoice,
                  UserError, as_grey_values, as_typed_stack, choose_stack, decide_kind, length_scale, normal_unit)

PathLike = Union[str, Path]
NGFF_VERSIONS = ("0.4", "0.5")
DEFAULT_NGFF_VERSION = "0.4"
# Output chunks (Z, Y, X): 64 x 256 x 256 bytes = 4 MiB of uint8 per chunk, a size that viewers
# (napari, neuroglancer, BigDataViewer) load quickly in 2D and 3D, and few enough files per volume.
CHUNK_Z = 64
CHUNK_XY = 256
# The project's short units (data.LENGTH_UNITS_IN_UM, data.length_scale) and their NGFF (UDUNITS-2) names.
NGFF_UNITS = {"pm": "picometer", "Å": "angstrom", "nm": "nanometer", "um": "micrometer", "mm": "millimeter",
              "cm": "centimeter", "m": "meter"}
SHORT_UNITS = {name: short for short, name in NGFF_UNITS.items()}
# Where an apply.py run keeps its own record in the output's attributes (outside the 'ome' namespace).
RESTORE_ATTRIBUTE = "axial_restore"
# Each pyramid rule of :func:`downsample`, as the multiscales 'type' names it, and what it does.
DOWNSAMPLING_DESCRIPTIONS = {
    "max": "max-pooling: a voxel of a coarser level holds the largest value of the (up to) 2 x 2 x 2 voxels "
           "below it (foreground where any voxel below it is), placed at their centre",
    "mean": "local mean: a voxel of a coarser level holds the mean of the (up to) 2 x 2 x 2 voxels below it, "
            "rounded to the image's dtype, placed at their centre",
    "stride": "striding (nearest neighbour, no interpolation): a voxel of a coarser level is the first of the "
              "(up to) 2 x 2 x 2 voxels below it, so ids are never mixed",
}
# The percentiles of the input's grey values that an output's 'omero' display window spans.
DISPLAY_PERCENTILES = (0.1, 99.9)
DISPLAY_SAMPLE_VALUES = 10_000_000  # values read (at most, about) to find the display window of a store
# The integer dtypes NGFF allows for label images.
LABEL_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64,
                                           np.int64))


def is_zarr_path(path: PathLike) -> bool:
    """True for a name ending in ``.zarr`` (``.ome.zarr``, which need not exist yet: an output) or an
    existing Zarr store (:func:`is_zarr_store`)."""
    text = str(path).rstrip("/")
    return text.lower().endswith(".zarr") or is_zarr_store(text)


def is_zarr_store(path: PathLike) -> bool:
    """A folder with Zarr metadata at its top: the only kind of folder --overwrite may delete."""
    folder = Path(path)
    return folder.is_dir() and any((folder / name).exists() for name in (".zgroup", ".zarray", "zarr.json"))


def zarr_stem(path: PathLike) -> str:
    """A store's name without ``.zarr`` and ``.ome`` (``seg.ome.zarr`` -> ``seg``)."""
    name = Path(str(path).rstrip("/")).name
    for suffix in (".zarr", ".ome"):
        name = name[: -len(suffix)] if name.lower().endswith(suffix) else name
    return name


def ngff_unit(unit: str) -> str:
    """The NGFF name of a unit (``um`` -> ``micrometer``); NGFF names pass through."""
    normal = normal_unit(unit) or unit
    return NGFF_UNITS.get(normal, normal)


def short_unit(unit: Optional[str]) -> Optional[str]:
    """The project's short name of an NGFF unit (``micrometer`` -> ``um``), as TIFF metadata writes it."""
    if unit is None:
        return None
    return SHORT_UNITS.get(unit, unit)


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #
# What the codecs say of a chunk that does not decode (blosc, zstd, gzip, crc32c, a short read).
CHUNK_DAMAGE_WORDS = ("decompress", "decode", "codec", "checksum", "crc", "truncat", "corrupt", "invalid data",
                      "unexpected end", "incorrect header")


@dataclass(frozen=True)
class ZarrImage:
    """One 3D image in a Zarr store, described without its pixels (small, picklable).

    Attributes
    ----------
    path : str
        The group (OME-Zarr image or label image) or plain array the user named.
    component : str
        The array inside ``path`` holding full resolution (``'0'``, ``'s0'``), ``''`` for a plain array.
    leading_index : tuple of int
        Indices of the singleton axes (``t``, ``c``) in front of ``z, y, x``.
    shape : (K, H, W)
    dtype : str
    voxel_size_zyx : (float, float, float) or None
        None when the store says nothing (a plain array, or scale 1 without units).
    unit : str or None
        Short unit (``um``, ``nm``), as ``data.read_calibration`` gives it.
    translation_zyx : (float, float, float)
        Physical position of voxel (0, 0, 0), in ``unit``.
    is_label : bool
        The group carries ``image-label`` metadata.
    name : str
        The image's (or label's) name: the last part of ``path``.
    ngff_version : str or None
    levels : int
        Resolution levels of the multiscale image (level 0, full resolution, is the one read).
    label_images : tuple of str
        Names of the label images in the image's ``labels`` group (not read with it).
    """
    path: str
    component: str
    leading_index: Tuple[int, ...]
    shape: Tuple[int, int, int]
    dtype: str
    voxel_size_zyx: Optional[Tuple[float, float, float]] = None
    unit: Optional[str] = None
    translation_zyx: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    is_label: bool = False
    name: str = ""
    ngff_version: Optional[str] = None
    levels: int = 1
    label_images: Tuple[str, ...] = ()

    def array(self, mode: str = "r") -> zarr.Array:
        """The lazy Zarr array (all its axes, ``t``/``c`` included)."""
        return _open_array(self.path, self.component, mode)

    def read(self, z: slice = slice(None), y: slice = slice(None), x: slice = slice(None)) -> np.ndarray:
        """The pixels of one window, ``(z, y, x)`` order, as stored; only the chunks it touches are read. A chunk
        that does not decode (a store copied in part, a disk error) is one :class:`DamagedFileError`."""
        try:
            return np.asarray(self.array()[self.leading_index + (z, y, x)])
        except (RuntimeError, ValueError, OSError) as error:
            if not any(word in str(error).lower() for word in CHUNK_DAMAGE_WORDS):
                raise
            raise DamagedFileError.of(self.path, "Zarr store", f"a chunk of '{self.component or '/'}' does not decode: "
                                      f"{type(error).__name__}: {error}") from error


def _open_array(path: str, component: str, mode: str = "r") -> zarr.Array:
    """Open an array (reads one small metadata document; not cached, so a rewritten store is seen anew)."""
    return zarr.open_array(store=path, path=component or None, mode=mode)


def _ome_attributes(node: Union[zarr.Group, zarr.Array]) -> Dict[str, Any]:
    """The OME metadata of a node: under ``ome`` for NGFF 0.5 (Zarr v3), at the top for 0.4."""
    attributes = node.attrs.asdict()
    return attributes.get("ome", attributes)


def _axis_letter(axis: Union[str, Dict[str, Any]]) -> str:
    """An NGFF axis in front of z, y, x as :func:`tiff_io.choose_stack`'s letter: T for time, C for channels
    (by type, else by the names t and c), '?' for any other."""
    name = axis if isinstance(axis, str) else str(axis.get("name"))
    kind = None if isinstance(axis, str) else axis.get("type")
    return {"time": "T", "channel": "C"}.get(kind) or {"t": "T", "c": "C"}.get(name, "?")


def _spatial_layout(axes: Optional[list], shape: Tuple[int, ...], where: str, choice: StackChoice = StackChoice()
                    ) -> Tuple[Tuple[int, ...], List[str]]:
    """Indices fixing the non-spatial axes at the chosen channel and time point, and each spatial axis' unit
    (or None)."""
    if axes is None:  # NGFF 0.1/0.2: always t, c, z, y, x
        axes = ["t", "c", "z", "y", "x"][-len(shape):]
    names = [a if isinstance(a, str) else a.get("name") for a in axes]
    units = [None if isinstance(a, str) else a.get("unit") for a in axes]
    if names[-3:] != ["z", "y", "x"]:
        raise UserError(f"'{where}' has axes {names}; expected a 3D image with axes z, y, x last.")
    letters = "".join(_axis_letter(axis) for axis in axes[:-3])
    unknown = [(name, size) for name, letter, size in zip(names, letters, shape) if letter == "?" and size != 1]
    if unknown:
        raise UserError(f"'{where}' has {', '.join(f'{n}={s}' for n, s in unknown)} besides z, y and x: restore one "
                        "3D image at a time (write it as its own image first).")
    index = choose_stack(letters + "ZYX", shape, choice, where, axes_shown=",".join(map(str, names)))
    return tuple(0 if isinstance(i, slice) else i for i in index[:-3]), units[-3:]


def _transform_of(transformations: Optional[list], ndim: int) -> Tuple[np.ndarray, np.ndarray]:
    """Scale and translation vectors of an NGFF ``coordinateTransformations`` list (identity when absent)."""
    scale, translation = np.ones(ndim), np.zeros(ndim)
    for transform in transformations or []:
        if transform.get("type") == "scale" and "scale" in transform:
            scale = scale * np.asarray(transform["scale"], dtype=float)
        elif transform.get("type") == "translation" and "translation" in transform:
            translation = translation + np.asarray(transform["translation"], dtype=float)
        elif transform.get("type") not in (None, "identity", "scale", "translation") or "path" in transform:
            raise UserError(f"Unsupported coordinate transformation {transform}; only scale and translation "
                            "values stored in the metadata are read.")
    return scale, translation


def _bioformats2raw_series(root: zarr.Group) -> List[str]:
    """The images of a bioformats2raw store: the ``series`` its ``OME`` group lists, else its groups named by
    numbers, in order."""
    if "OME" in root and "series" in _ome_attributes(root["OME"]):
        return [str(name) for name in _ome_attributes(root["OME"])["series"]]
    names = [name for name, _ in root.groups() if name.isdigit()]
    return sorted(names, key=int)


def open_image(path: PathLike, choice: StackChoice = StackChoice()) -> ZarrImage:
    """Describe the 3D image at ``path`` (OME-Zarr image, label image or plain array) without reading pixels;
    of an image with channels or time points, the stack ``choice`` names (:func:`tiff_io.choose_stack`).

    Raises
    ------
    InputNotFoundError
        Nothing at ``path``.
    UserError
        Not a Zarr store, not 3D, several channels or time points, a
        ``labels`` group instead of one label image, or a bioformats2raw
        store of several images (one of them is opened as itself).
    """
    path_text = str(path)
    if "://" not in path_text and not Path(path_text).exists():
        raise InputNotFoundError(f"Input '{path_text}' does not exist.")
    try:
        node = zarr.open(store=path_text, mode="r")
    except Exception as error:  # zarr raises assorted errors for folders that are not stores
        raise DamagedFileError(f"'{path_text}' is not a readable Zarr store ({type(error).__name__}: {error}).") from None
    name = zarr_stem(path_text)
    if isinstance(node, zarr.Array):
        if node.ndim < 3 or any(size != 1 for size in node.shape[:-3]):
            raise UserError(f"'{path_text}' holds an array of shape {node.shape}; expected a 3D stack (Z, Y, X): "
                            "restore one channel or time point at a time (write it as its own array first).")
        choose_stack("?" * (node.ndim - 3) + "ZYX", node.shape, choice, path_text)  # no channels to choose from
        return ZarrImage(path_text, "", (0,) * (node.ndim - 3), tuple(node.shape[-3:]), str(node.dtype), name=name)
    ome = _ome_attributes(node)
    multiscales = ome.get("multiscales")
    if not multiscales and "bioformats2raw.layout" in ome:
        # A microscope file converted by bioformats2raw: its images (series) are groups 0, 1, ... of the root.
        series = _bioformats2raw_series(node)
        if len(series) != 1:
            raise UserError(f"'{path_text}' holds {len(series)} images (a bioformats2raw conversion, series "
                            f"{', '.join(series) or 'none'}): give one, e.g. {path_text.rstrip('/')}/"
                            f"{series[0] if series else '0'}.")
        return dataclasses.replace(open_image(f"{path_text.rstrip('/')}/{series[0]}", choice), name=name)
    if not multiscales:
        if "labels" in ome:
            raise UserError(f"'{path_text}' is a labels group holding {ome['labels']}: give one label image, "
                            f"e.g. {path_text.rstrip('/')}/{ome['labels'][0]}.")
        raise UserError(f"'{path_text}' is a Zarr group without OME-Zarr 'multiscales' metadata; give an OME-Zarr "
                        "image or a Zarr array.")
    multiscale = multiscales[0]
    dataset = multiscale["datasets"][0]
    array = node[dataset["path"]]
    leading, units = _spatial_layout(multiscale.get("axes"), array.shape, path_text, choice)
    ndim = array.ndim
    scale, translation = _transform_of(dataset.get("coordinateTransformations"), ndim)
    global_scale, global_translation = _transform_of(multiscale.get("coordinateTransformations"), ndim)
    # The multiscale-level transformations apply after the dataset's (NGFF 0.4 and 0.5).
    scale, translation = scale * global_scale, translation * global_scale + global_translation
    voxel, offset = scale[-3:], translation[-3:]
    unit_x = units[2] or units[1] or units[0]
    voxel_size: Optional[Tuple[float, float, float]] = tuple(float(v) for v in voxel)
    if unit_x is None and np.allclose(voxel, 1.0):
        voxel_size = None  # scale 1 without a unit is a writer's default, not a calibration
    elif unit_x is not None:
        converted = []
        for axis, unit in zip("zyx", units):
            unit = unit or unit_x
            scale = 1.0 if unit == unit_x else length_scale(short_unit(unit), short_unit(unit_x))
            if scale is None:
                raise UserError(f"'{path_text}' gives {axis} in '{unit}' and x in '{unit_x}', which cannot be "
                                "converted; pass --z-step, --xy-size and --unit.")
            converted.append(scale)
        voxel_size = tuple(float(v * c) for v, c in zip(voxel, converted))
        offset = np.asarray(offset) * np.asarray(converted)
    version = multiscale.get("version") or ome.get("version")
    return ZarrImage(path_text, dataset["path"], leading, tuple(array.shape[-3:]), str(array.dtype), voxel_size,
                     short_unit(unit_x), tuple(float(v) for v in offset), "image-label" in ome, name,
                     None if version is None else str(version), len(multiscale["datasets"]), _label_images(node))


def _label_images(node: zarr.Group) -> Tuple[str, ...]:
    """The names an image's ``labels`` group lists (NGFF ``labels`` metadata), or none."""
    try:
        labels = node["labels"]
    except (KeyError, FileNotFoundError):
        return ()
    names = _ome_attributes(labels).get("labels") if isinstance(labels, zarr.Group) else None
    return tuple(str(name) for name in names) if isinstance(names, list) else ()


def read_calibration(path: PathLike) -> Optional[Tuple[Tuple[Optional[float], float, float], Optional[str]]]:
    """Voxel size ``(z, y, x)`` and unit of a Zarr image, as ``data.read_calibration`` gives them for a TIFF.

    Returns None when the store holds no calibration (a plain array, or scale 1 without units).
    """
    image = open_image(path, StackChoice(0, 0))  # every channel and time point has the same voxel size
    return None if image.voxel_size_zyx is None else (image.voxel_size_zyx, image.unit)


def sample_for_label_detection(image: ZarrImage, max_side: int = 2048) -> np.ndarray:
    """The central window (at most ``max_side`` square) of the middle slice: enough to tell a mask, a
    label image and a grey-scale image apart."""
    depth, height, width = image.shape
    y0, x0 = max(0, (height - max_side) // 2), max(0, (width - max_side) // 2)
    return image.read(slice(depth // 2, depth // 2 + 1), slice(y0, y0 + max_side), slice(x0, x0 + max_side))


def image_kind(image: ZarrImage, kind: str = "auto", threshold: Optional[float] = None) -> str:
    """The kind of ``image`` by the rule of ``data.read_typed_stack``: ``kind`` when given; with 'auto',
    a mask when a binarization threshold is set, a label image by its ``image-label`` metadata, else
    ``data.decide_kind`` on a central sample (a two-valued image is a mask, a float one grey-scale, an
    integer one with more values needs ``--kind``)."""
    if kind != "auto":
        return decide_kind(np.zeros(0, bool), kind)  # checks the name only: nothing needs reading
    if threshold is not None:
        return "mask"
    if image.is_label:
        return "labels"
    return decide_kind(sample_for_label_detection(image), kind, f"'{image.path}'")


def read_typed_image(image: ZarrImage, kind: str = "auto", threshold: Optional[float] = None,
                     label_dtype=np.uint16) -> Tuple[str, np.ndarray, Optional[np.ndarray]]:
    """The whole image in memory, typed as ``data.read_typed_stack`` types a TIFF (see :func:`image_kind`).

    For outputs held in memory anyway: a TIFF output, whose ids are limited to 0..65535 (``label_dtype``
    uint16), or an isotropic input converted to OME-Zarr (``label_dtype`` None: the smallest that holds
    the ids); the block-wise restore reads windows instead.

    Returns
    -------
    kind : {'mask', 'labels', 'intensity'}
    stack_dhw : ndarray, shape (K, H, W)
        bool foreground for masks and label images, the stored values for intensities
    labels_dhw : ndarray of ``label_dtype``, shape (K, H, W), or None
    """
    kind = image_kind(image, kind, threshold)
    return kind, *as_typed_stack(image.read(), kind, threshold, image.path, label_dtype)


def foreground(window: np.ndarray, threshold: Optional[float] = None) -> np.ndarray:
    """Mask of a window by ``data.binarize``'s rule (non-zero, or ``> threshold``), without its
    whole-stack value census (a window cannot tell a binary stack from a grey one)."""
    if window.dtype == bool:
        return window
    return window != 0 if threshold is None else window > threshold


def sample_values(image: ZarrImage, max_values: int) -> np.ndarray:
    """About ``max_values`` of a store's values, flat, read slice by slice: every n-th slice and every m-th
    row of those (as many slices as rows are skipped), so that a large store is never read whole; a store
    of at most ``max_values`` values gives all of them."""
    depth, height, width = image.shape
    slice_step = max(1, min(depth, int(math.sqrt(depth * height * width / max_values))))
    row_step = max(1, math.ceil(math.ceil(depth / slice_step) * height * width / max_values))
    return np.concatenate([image.read(slice(k, k + 1), slice(0, height, row_step)).ravel()
                           for k in range(0, depth, slice_step)])


def display_window(source: Union[np.ndarray, ZarrImage], percentiles: Tuple[float, float] = DISPLAY_PERCENTILES,
                   max_values: int = DISPLAY_SAMPLE_VALUES) -> Tuple[float, float]:
    """The grey-value window ``(start, end)`` a viewer should open an image of ``source`` at: the
    ``percentiles`` (0.1 and 99.9) of its values, for the ``omero`` block of a grey-scale output
    (:func:`create_output`'s ``display_window``).

    An array gives the percentiles of (every n-th of at most about ``max_values`` of) its values; a
    store those of a sample read slice by slice (every n-th slice, every m-th row of those), so a large
    store is never read whole. Integer values give an integer window, widened outwards; a constant
    image gives a window one unit wide (viewers refuse an empty one); NaN and infinite values are left
    out ((0, 1) when nothing else is left).
    """
    if isinstance(source, np.ndarray):
        values = source.ravel()[:: max(1, source.size // max_values)]
        dtype = source.dtype
    else:
        values, dtype = sample_values(source, max_values), np.dtype(source.dtype)
    if dtype == bool:
        values, dtype = values.view(np.uint8), np.dtype(np.uint8)
    if not np.issubdtype(dtype, np.integer):
        values = values[np.isfinite(values)]  # NaN and infinities have no place in a window
    if values.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, percentiles))
    if np.issubdtype(dtype, np.integer):
        low, high = float(math.floor(low)), float(math.ceil(high))
    if high <= low:
        top = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else math.inf
        low, high = (low, low + 1.0) if low + 1.0 <= top else (high - 1.0, high)
    return low, high


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #
def _ome_zarr_writer():
    """``ome_zarr.writer``, imported without the DeprecationWarning it raises about its own defaults."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr import writer
    return writer


def ngff_format(ngff_version: str) -> Any:
    """The ome-zarr package's Format (``ome_zarr.format.FormatV04`` or ``FormatV05``) of an NGFF version, or a
    UserError naming the versions written."""
    from ome_zarr.format import FormatV04, FormatV05

    if ngff_version not in NGFF_VERSIONS:
        raise UserError(f"--ngff-version must be one of {', '.join(NGFF_VERSIONS)}, got '{ngff_version}'.")
    return FormatV04() if ngff_version == "0.4" else FormatV05()


def ngff_label_dtype(dtype) -> np.dtype:
    """``dtype`` as the dtype of a label image, or a UserError: NGFF label images hold integer ids
    (``LABEL_DTYPES``: 8 to 64 bits, signed or not)."""
    dtype = np.dtype(dtype)
    if dtype not in LABEL_DTYPES:
        raise UserError(f"Label ids are written as integers ({', '.join(str(t) for t in LABEL_DTYPES)}); got "
                        f"{dtype}. Convert the label image to an integer type first.")
    return dtype


def omero_metadata(dtype, window: Tuple[float, float], label: str, ngff_version: str, depth: int = 1
                   ) -> Dict[str, Any]:
    """The ``omero`` block of a one-channel grey-scale image: shown in grey, opened at ``window``
    (``start``, ``end``) within the range of ``dtype`` (``min``, ``max``), as OMERO, napari-ome-zarr and
    ``ome_zarr.reader`` read it."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer) or dtype == bool:
        info = np.iinfo(np.uint8 if dtype == bool else dtype)
        low, high = int(info.min), int(info.max)
    else:
        info = np.finfo(dtype)
        low, high = float(info.min), float(info.max)
    start, end = (float(v) for v in window)
    if not (math.isfinite(start) and math.isfinite(end) and start < end):
        raise ValueError(f"A display window needs finite start < end, got {window}.")
    channel = {"active": True, "coefficient": 1.0, "color": "FFFFFF", "family": "linear", "inverted": False,
               "label": label, "window": {"min": low, "max": high, "start": start, "end": end}}
    omero: Dict[str, Any] = {"name": label, "channels": [channel],
                             "rdefs": {"defaultT": 0, "defaultZ": int(depth) // 2, "model": "greyscale"}}
    if ngff_version == "0.4":  # NGFF 0.5 keeps one version, the 'ome' namespace's
        omero["version"] = ngff_version
    return omero


def default_display_window(dtype) -> Optional[Tuple[float, float]]:
    """The window of a grey-scale image whose values are not known yet: an integer dtype's whole range
    (what viewers assume); None for floating-point values, which have no such range."""
    dtype = np.dtype(dtype)
    if dtype == bool:
        return 0.0, 1.0
    if np.issubdtype(dtype, np.integer):
        return float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
    return None


def _update_ome_attributes(group: zarr.Group, ngff_version: str, values: Dict[str, Any]) -> None:
    """Add ``values`` to a group's OME metadata: at the top for NGFF 0.4, under ``ome`` for 0.5
    (where ``version`` comes first)."""
    if ngff_version == "0.4":
        group.attrs.update(values)
        return
    ome = dict(group.attrs.asdict().get("ome", {}))
    ome.update(values)
    group.attrs["ome"] = {"version": ome.pop("version", ngff_version), **ome}


def output_chunks(shape_dhw: Sequence[int], chunk_xy: int = CHUNK_XY) -> Tuple[int, int, int]:
    """Chunks ``(Z, Y, X)`` of an output array, clipped to its shape."""
    depth, height, width = shape_dhw
    return min(CHUNK_Z, depth), min(chunk_xy, height), min(chunk_xy, width)


def pyramid_factors(shape_dhw: Sequence[int], chunk_xy: int, max_levels: int = 8) -> List[Tuple[int, int, int]]:
    """Per-level downsampling factors ``(z, y, x)`` relative to the level before (level 0: none).

    Every axis longer than one voxel halves at each level (the restored stack
    is isotropic, so all of its levels are too), until the lateral extent fits
    in one chunk.
    """
    factors = [(1, 1, 1)]
    shape = list(shape_dhw)
    while max(shape[1:]) > chunk_xy and len(factors) < max_levels:
        step = tuple(2 if size > 1 else 1 for size in shape)
        shape = [math.ceil(size / f) for size, f in zip(shape, step)]
        factors.append(step)
    return factors


@dataclass(frozen=True)
class OmeZarrImage:
    """An OME-Zarr multiscale image being written (small, picklable: workers open it by path).

    ``downsampling`` is ``'max'`` (masks: max-pooling, a voxel of a coarse
    level is foreground when any voxel below it is), ``'mean'`` (grey values:
    the average of the voxels below, in the image's dtype) or ``'stride'``
    (labels, probabilities: every second voxel, ids are never mixed).
    """
    path: str
    levels: Tuple[str, ...]
    shapes: Tuple[Tuple[int, int, int], ...]
    factors: Tuple[Tuple[int, int, int], ...]
    chunks: Tuple[int, int, int]
    dtype: str
    downsampling: str = "max"

    def level(self, index: int = 0, mode: str = "r+") -> zarr.Array:
        return zarr.open_array(store=self.path, path=self.levels[index], mode=mode)

    def write(self, region_zyx: Tuple[slice, slice, slice], values: np.ndarray, level: int = 0) -> None:
        """Write one region of a level (chunk-aligned regions: no two writers share a chunk)."""
        self.level(level)[region_zyx] = values


def _level_transforms(voxel_size_zyx: Sequence[float], translation_zyx: Sequence[float],
                      factors: Sequence[Tuple[int, int, int]], downsampling: str) -> List[List[Dict[str, Any]]]:
    """Scale and translation of every level. Striding keeps voxel 0 where it was; max-pooling and
    averaging put a coarse voxel at the centre of the block it summarises."""
    transforms, cumulative = [], np.ones(3)
    for step in factors:
        cumulative = cumulative * np.asarray(step)
        scale = np.asarray(voxel_size_zyx, dtype=float) * cumulative
        shift = np.zeros(3) if downsampling == "stride" else (cumulative - 1) / 2 * np.asarray(voxel_size_zyx)
        translation = np.asarray(translation_zyx, dtype=float) + shift
        transforms.append([{"type": "scale", "scale": [float(v) for v in scale]},
                           {"type": "translation", "translation": [float(v) for v in translation]}])
    return transforms


@dataclass(frozen=True)
class ImageFormat:
    """How a multiscale image is stored: the default is a mask (uint8 0/255, max-pooled pyramid).

    Attributes
    ----------
    dtype : numpy dtype of every level
    downsampling : {'max', 'mean', 'stride'}
        The pyramid rule (:class:`OmeZarrImage`): 'max' for masks, 'mean' for
        grey values, 'stride' for labels and probabilities. The multiscales
        metadata names it as its ``type`` (described in its ``metadata``).
    display_window : (start, end), optional
        The values a viewer opens the image at: an ``omero`` block (one grey
        channel, :func:`omero_metadata`); None writes none.
    """
    dtype: Any = np.uint8
    downsampling: str = "max"
    display_window: Optional[Tuple[float, float]] = None


def create_multiscale_image(group: zarr.Group, shape_dhw: Sequence[int], image_format: ImageFormat,
                            voxel_size_zyx: Sequence[float], unit: str, translation_zyx: Sequence[float],
                            ngff_version: str, chunk_xy: int = CHUNK_XY, name: Optional[str] = None,
                            pyramid: bool = True) -> OmeZarrImage:
    """Create the (empty, zero-filled) arrays of a multiscale image in ``group`` and write its metadata.

    Parameters
    ----------
    group : zarr.Group of the NGFF version's Zarr format
    shape_dhw : (D, H, W) of level 0
    image_format : ImageFormat
        dtype, pyramid rule and display window.
    voxel_size_zyx, translation_zyx : level 0's voxel size and origin, in ``unit``
    unit : short (``um``) or NGFF (``micrometer``) unit name
    chunk_xy : lateral chunk edge (Z chunks are ``CHUNK_Z``)
    pyramid : bool
        False: level 0 only.

    Returns
    -------
    OmeZarrImage
    """
    dtype, downsampling, display_window = image_format.dtype, image_format.downsampling, image_format.display_window
    if downsampling not in DOWNSAMPLING_DESCRIPTIONS:
        raise ValueError(f"Unknown downsampling '{downsampling}'.")
    fmt = ngff_format(ngff_version)
    factors = pyramid_factors(shape_dhw, chunk_xy) if pyramid else [(1, 1, 1)]
    shapes, shape = [], tuple(int(s) for s in shape_dhw)
    chunks = output_chunks(shape, chunk_xy)
    extra = ({"chunk_key_encoding": {"name": "v2", "separator": "/"}} if fmt.zarr_format == 2
             else {"dimension_names": ["z", "y", "x"]})
    levels = []
    for index, step in enumerate(factors):
        shape = tuple(math.ceil(s / f) for s, f in zip(shape, step))
        shapes.append(shape)
        levels.append(f"s{index}")
        group.create_array(levels[-1], shape=shape, chunks=tuple(min(c, s) for c, s in zip(chunks, shape)),
                           dtype=dtype, fill_value=0, overwrite=True, **extra)
    transforms = _level_transforms(voxel_size_zyx, translation_zyx, factors, downsampling)
    datasets = [{"path": level, "coordinateTransformations": transform} for level, transform in zip(levels, transforms)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ome-zarr warns about units outside its list; ours are valid
        _ome_zarr_writer().write_multiscales_metadata(group, datasets, fmt=fmt, axes=["z", "y", "x"],
                                                      axes_units={axis: ngff_unit(unit) for axis in "zyx"},
                                                      name=name)
    # What ome-zarr's writer leaves out: the pyramid's downsampling method, and the display window.
    multiscales = _ome_attributes(group)["multiscales"]
    multiscales[0] = {**multiscales[0], "type": downsampling,
                      "metadata": {"description": DOWNSAMPLING_DESCRIPTIONS[downsampling],
                                   "method": "zarr_io.downsample", "kwargs": {"method": downsampling}}}
    extra: Dict[str, Any] = {"multiscales": multiscales}
    if display_window is not None:
        extra["omero"] = omero_metadata(dtype, display_window, name or "image", ngff_version, shapes[0][0])
    _update_ome_attributes(group, ngff_version, extra)
    store_path = str(Path(str(group.store.root)) / group.path) if group.path else str(group.store.root)
    return OmeZarrImage(store_path, tuple(levels), tuple(shapes), tuple(factors), chunks, str(np.dtype(dtype)),
                        downsampling)


@dataclass(frozen=True)
class OutputLayout:
    """What :func:`create_output` laid out: the image, and the label image when ids are restored."""
    path: str
    ngff_version: str
    image: OmeZarrImage
    labels: Optional[OmeZarrImage] = None
    label_name: Optional[str] = None


def remove_store(path: PathLike) -> None:
    """Delete an existing Zarr store; refuse anything else (a user's folder is never deleted)."""
    path = Path(path)
    if not path.exists():
        return
    if not is_zarr_store(path):
        raise OutputExistsError(f"'{path}' exists and is not a Zarr store; it is not replaced. Choose another "
                                "output.")
    shutil.rmtree(path)


def create_output(path: PathLike, shape_dhw: Sequence[int], voxel_size_zyx: Sequence[float], unit: str,
                  translation_zyx: Sequence[float] = (0.0, 0.0, 0.0), ngff_version: str = DEFAULT_NGFF_VERSION,
                  label_dtype=None, label_name: str = "restored", image_format: ImageFormat = ImageFormat(),
                  chunk_xy: int = CHUNK_XY, name: Optional[str] = None, pyramid: bool = True) -> OutputLayout:
    """Create a new OME-Zarr output (the folder must not exist) with empty arrays and full metadata.

    The image at the root holds the restored mask (max-pooled pyramid; uint8 0/255 with the default
    ``image_format``, the input mask's dtype with its own) or, with an ``image_format`` of the
    input's dtype and ``downsampling='mean'``, the restored grey values, with an
    ``omero`` display window. With
    ``label_dtype``, ``labels/<label_name>`` is a label image (``image-label``
    metadata, strided pyramid) of that dtype. The metadata is valid NGFF 0.4 or
    0.5 (``ome-zarr-models`` validates it).

    Parameters
    ----------
    path : output folder (``.ome.zarr``)
    shape_dhw : (D, H, W) of the restored stack
    voxel_size_zyx : isotropic voxel size of the output, in ``unit``
    unit : length unit ('um', 'nm', ...), written as its NGFF name
    translation_zyx : the input's origin (voxel 0 of the output is voxel 0 of the input)
    ngff_version : '0.4' (Zarr v2) or '0.5' (Zarr v3)
    label_dtype : numpy dtype, optional
        An integer dtype (:func:`ngff_label_dtype`).
    label_name : str
        With ``label_dtype``: the label image's name under ``labels/``.
    image_format : ImageFormat
        The root image's dtype, pyramid rule and display window (the grey values
        a viewer opens it at: the input's 0.1 / 99.9 percentiles,
        :func:`display_window`). Without a window, grey values
        (``downsampling='mean'``) of an integer dtype get the dtype's range and
        floating-point ones no ``omero`` block; a mask (or probabilities) gets
        one only when it is given.
    chunk_xy : lateral chunk edge (Z chunks are ``CHUNK_Z``)
    name : the root image's name (default: the folder's)
    pyramid : bool
        False: level 0 only (e.g. an input written for a test or a benchmark).

    Returns
    -------
    OutputLayout
    """
    path = Path(path)
    if path.exists():
        raise OutputExistsError(f"'{path}' already exists.")
    fmt = ngff_format(ngff_version)
    labels_dtype = None if label_dtype is None else ngff_label_dtype(label_dtype)
    if image_format.display_window is None and image_format.downsampling == "mean":
        image_format = dataclasses.replace(image_format, display_window=default_display_window(image_format.dtype))
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    image = create_multiscale_image(root, shape_dhw, image_format, voxel_size_zyx, unit, translation_zyx,
                                    ngff_version, chunk_xy, name=name or path.name, pyramid=pyramid)
    labels = None
    if labels_dtype is not None:
        labels_group = root.create_group("labels")
        label_group = labels_group.create_group(label_name)
        labels = create_multiscale_image(label_group, shape_dhw, ImageFormat(labels_dtype, "stride"), voxel_size_zyx,
                                         unit, translation_zyx, ngff_version, chunk_xy, name=label_name,
                                         pyramid=pyramid)
        _ome_zarr_writer().write_label_metadata(labels_group, label_name, fmt=fmt, source={"image": "../../"})
        if ngff_version != "0.4":  # ome-zarr's writer gives an NGFF 0.5 labels group no ome.version
            _update_ome_attributes(labels_group, ngff_version, {"version": ngff_version})
    return OutputLayout(str(path), ngff_version, image, labels, label_name if labels else None)


def open_output(path: PathLike, mode: str = "r+") -> Tuple[zarr.Group, Dict[str, Any]]:
    """The root group of an existing output (opened in ``mode``) and its ``axial_restore`` record ({} when
    absent)."""
    root = zarr.open_group(str(path), mode=mode)
    return root, dict(root.attrs.asdict().get(RESTORE_ATTRIBUTE, {}))


def layout_from_record(record: Dict[str, Any], path: PathLike) -> OutputLayout:
    """Rebuild the :class:`OutputLayout` of the output at ``path`` from :func:`layout_record`'s record."""
    def image(entry: Optional[Dict[str, Any]]) -> Optional[OmeZarrImage]:
        if entry is None:
            return None
        return OmeZarrImage(os.path.normpath(os.path.join(str(path), entry["path"])), tuple(entry["levels"]),
                            tuple(tuple(s) for s in entry["shapes"]), tuple(tuple(f) for f in entry["factors"]),
                            tuple(entry["chunks"]), entry["dtype"], entry["downsampling"])

    return OutputLayout(str(path), record["ngff_version"], image(record["image"]), image(record.get("labels")),
                        record.get("label_name"))


def layout_record(layout: OutputLayout) -> Dict[str, Any]:
    """A JSON-able description of an :class:`OutputLayout`, paths relative to the output (stored in it for
    ``--resume``, which then works after the output was moved)."""
    def entry(image: Optional[OmeZarrImage]) -> Optional[Dict[str, Any]]:
        if image is None:
            return None
        return {"path": os.path.relpath(image.path, layout.path), "levels": list(image.levels),
                "shapes": [list(s) for s in image.shapes], "factors": [list(f) for f in image.factors],
                "chunks": list(image.chunks), "dtype": image.dtype, "downsampling": image.downsampling}

    return {"ngff_version": layout.ngff_version, "image": entry(layout.image), "labels": entry(layout.labels),
            "label_name": layout.label_name}


def pyramid_regions(image: OmeZarrImage, level: int) -> List[Tuple[slice, slice, slice]]:
    """The chunks of a pyramid level, one region each (each is written by one task)."""
    shape = image.shapes[level]
    chunks = tuple(min(c, s) for c, s in zip(image.chunks, shape))
    return [(slice(z, min(z + chunks[0], shape[0])), slice(y, min(y + chunks[1], shape[1])),
             slice(x, min(x + chunks[2], shape[2])))
            for z in range(0, shape[0], chunks[0]) for y in range(0, shape[1], chunks[1])
            for x in range(0, shape[2], chunks[2])]


def downsample(values: np.ndarray, factors: Sequence[int], method: str) -> np.ndarray:
    """One pyramid step of a block: max-pooling (padding with zeros at the end), averaging or striding.

    Averaging pads by repeating the last voxel (factors are 1 or 2, so a block cut
    by the image's end averages the voxels it has) and rounds integer grey values
    (``data.as_grey_values``).

    Parameters
    ----------
    values : ndarray, shape (d, h, w)
    factors : per-axis factors (1 or 2)
    method : {'max', 'mean', 'stride'}

    Returns
    -------
    ndarray, shape ``ceil(d / fz), ceil(h / fy), ceil(w / fx)``, same dtype
    """
    if method == "stride":
        return values[:: factors[0], :: factors[1], :: factors[2]]
    if method not in ("max", "mean"):
        raise ValueError(f"Unknown downsampling '{method}'.")
    padding = [(0, math.ceil(s / f) * f - s) for s, f in zip(values.shape, factors)]
    if any(after for _, after in padding):
        values = np.pad(values, padding, mode="constant" if method == "max" else "edge")
    (d, h, w), (fz, fy, fx) = values.shape, factors
    blocks = values.reshape(d // fz, fz, h // fy, fy, w // fx, fx)
    if method == "max":
        return blocks.max(axis=(1, 3, 5))
    return as_grey_values(blocks.mean(axis=(1, 3, 5), dtype=np.float64), values.dtype)


def write_pyramid_region(image: OmeZarrImage, level: int, region: Tuple[slice, slice, slice]) -> None:
    """Compute one region of ``level`` from the level before it (reads twice the region, at most)."""
    factors = image.factors[level]
    source = tuple(slice(r.start * f, r.stop * f) for r, f in zip(region, factors))
    values = image.level(level - 1, mode="r")[source]
    image.write(region, downsample(values, factors, image.downsampling), level=level)


def write_image(path: PathLike, image_dhw: np.ndarray, voxel_size_zyx: Sequence[float], unit: str,
                translation_zyx: Sequence[float] = (0.0, 0.0, 0.0), ngff_version: str = DEFAULT_NGFF_VERSION,
                kind: str = "mask", labels_dhw: Optional[np.ndarray] = None, label_name: str = "labels",
                overwrite: bool = False, mask_values: MaskValues = MaskValues()) -> OutputLayout:
    """Write a whole stack held in memory as a new OME-Zarr image, with its pyramid (an isotropic
    input converted to OME-Zarr without restoring).

    Parameters
    ----------
    path : str or Path
        The ``.ome.zarr`` store written.
    image_dhw : ndarray, shape (D, H, W)
        A mask (bool or non-zero = foreground, written in ``mask_values``: 0/255 by default) or, with
        ``kind='intensity'``, grey values (written in their dtype, with the
        input's display window).
    voxel_size_zyx, unit, translation_zyx, ngff_version
        As in :func:`create_output`.
    kind : {'mask', 'labels', 'intensity'}
    labels_dhw : ndarray of uint, shape (D, H, W), optional
        Ids, written as ``labels/<label_name>``.
    label_name : str
        The label image's name inside the store.
    overwrite : bool
        Replace an existing store (never a folder that is not one).
    mask_values : data.MaskValues
        The two values a mask is written in (the input mask's own).
    """
    if overwrite:
        remove_store(path)
    grey = kind == "intensity"
    values = image_dhw if grey else mask_values.encode(image_dhw)
    layout = create_output(path, values.shape, voxel_size_zyx, unit, translation_zyx, ngff_version,
                           label_dtype=None if labels_dhw is None else labels_dhw.dtype, label_name=label_name,
                           image_format=ImageFormat(values.dtype, "mean", display_window(values)) if grey
                           else ImageFormat(values.dtype))
    everything = (slice(None),) * 3
    for image, stack in ((layout.image, values), (layout.labels, labels_dhw)):
        if image is None:
            continue
        image.write(everything, stack)
        for level in range(1, len(image.levels)):
            for region in pyramid_regions(image, level):
                write_pyramid_region(image, level, region)
    return layout
