"""TIFF stacks in and out: reading slices and multipage files, the voxel size and its unit (ImageJ, OME),
writing ImageJ TIFFs with their calibration.

Every stack is a numpy array with axes ``(D, H, W)``: ``D`` the (anisotropic) Z axis, ``H`` and ``W`` the
lateral Y and X axes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import zlib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import tifffile

from errors import DamagedFileError, InputNotFoundError, OutputExistsError, UserError

PathLike = Union[str, os.PathLike]
TIFF_SUFFIXES = (".tif", ".tiff")


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #
def natural_sort_key(name: str) -> list:
    """Key that sorts ``img_2.tif`` before ``img_10.tif``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_tiff_files(folder: PathLike) -> list:
    """TIFF files directly inside ``folder``, in natural order."""
    folder = Path(folder)
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES]
    return sorted(files, key=lambda p: natural_sort_key(p.name))


class _TiffComplaints(logging.Handler):
    """Collects what tifffile logs while it reads: it logs, rather than raises, when
    a file is cut short or its offsets point nowhere, and then returns partial data."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _tiff_guard(path: Path):
    """Turn tifffile's complaints and decoder errors about ``path`` into one :class:`DamagedFileError`."""
    logger = logging.getLogger("tifffile")
    complaints = _TiffComplaints()
    logger.addHandler(complaints)
    try:
        yield
    except UserError:
        raise
    except PermissionError as error:  # the file may be fine: the user may not read it
        raise UserError(f"'{path}' cannot be read: permission denied ({error.strerror}). Check the file's "
                        "permissions (ls -l), or copy it somewhere you can read.") from error
    except (tifffile.TiffFileError, zlib.error, struct.error, EOFError, IndexError, KeyError, ValueError,
            OSError, ET.ParseError) as error:  # only the read of one file runs inside: these are the file's faults
        raise DamagedFileError(f"'{path}' is damaged or not a valid TIFF ({type(error).__name__}: {error}). "
                               "Check that the file was copied completely, or export it again.") from error
    finally:
        logger.removeHandler(complaints)
    damaged = [m for m in complaints.messages if any(w in m.lower() for w in ("invalid", "corrupt", "truncat"))]
    if damaged:
        raise DamagedFileError(f"'{path}' is damaged or not a valid TIFF (tifffile: {damaged[0]}). "
                               "Check that the file was copied completely, or export it again.")


def read_tiff(path: PathLike) -> np.ndarray:
    """``tifffile.imread`` that refuses damaged files (cut short, random bytes behind
    a TIFF header) with one :class:`DamagedFileError` naming the file."""
    path = Path(path)
    with _tiff_guard(path):
        return tifffile.imread(path)


def read_stack(path: PathLike) -> np.ndarray:
    """Read a stack as stored: a folder of 2D TIFF slices or one multipage TIFF.

    Parameters
    ----------
    path : str or Path
        A folder holding one 2D TIFF per Z slice (sorted in natural order), or a
        single multipage / ImageJ / OME TIFF file with axes Z, Y, X.

    Returns
    -------
    stack_dhw : ndarray, shape (D, H, W)
        The stored values and dtype, untouched.

    Raises
    ------
    FileNotFoundError
        The path does not exist, or the folder holds no TIFF file.
    ValueError
        Slices of different sizes, or an image that is not a 3D stack.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(
            f"Input path '{path}' does not exist. Set INPUT_IMAGES_DIRECTORY (or --input) "
            "to a folder of 2D TIFF slices or to a multipage TIFF file."
        )
    if path.is_dir():
        files = list_tiff_files(path)
        if not files:
            raise InputNotFoundError(
                f"No TIFF files (*.tif, *.tiff) found in folder '{path}'. "
                "Point the input to a folder of 2D TIFF slices or to a multipage TIFF file."
            )
        slices = [np.squeeze(read_tiff(f)) for f in files]
        shapes = {s.shape for s in slices}
        if len(shapes) != 1:
            sizes = ", ".join(f"{f.name}: {s.shape}" for f, s in list(zip(files, slices))[:6])
            raise UserError(
                f"Slices in '{path}' have different sizes ({sizes} ...). All slices of a "
                "stack must share one height and width; crop or pad them to one size first."
            )
        if slices[0].ndim != 2:
            raise UserError(
                f"Each file in the folder '{path}' must be one 2D slice, got shape "
                f"{slices[0].shape}. For multipage TIFFs pass the file itself as input; slices with channels "
                "or RGB colours need one channel each (in Fiji: Image > Color > Split Channels, or Image > "
                "Type > 8-bit for RGB)."
            )
        stack = np.stack(slices, axis=0)
    else:
        if path.suffix.lower() not in TIFF_SUFFIXES:
            raise UserError(f"'{path}' is not a TIFF file (.tif/.tiff). Give a TIFF file or a folder of TIFF slices.")
        with _tiff_guard(path), tifffile.TiffFile(path) as tif:  # one open: the axes, then the pixels
            refuse_colour_samples(path, tif.series[0])
            stack = np.squeeze(tif.asarray())
    if stack.ndim != 3 or stack.shape[0] < 2:
        raise UserError(not_a_stack(path, stack.shape))
    return stack


def refuse_colour_samples(path: PathLike, series: "tifffile.TiffPageSeries") -> None:
    """Refuse a TIFF of colour samples (RGB: tifffile's axis 'S'), which squeezing could pass for a 3D
    stack (a single RGB image, Y x X x 3). Three axes named channels or time points are read as a
    stack, as before: ImageJ files written without axes often call their slices channels."""
    if any(axis == "S" and size > 1 for axis, size in zip(series.axes, series.shape)):
        raise UserError(not_a_stack(path, tuple(series.shape), series.axes))


def not_a_stack(path: PathLike, shape: Tuple[int, ...], axes: str = "") -> str:
    """The error for a file that is not one 3D stack, with the fix for the usual causes."""
    if len(shape) > 3 or "S" in axes:
        fix = ("it holds channels, time points or RGB colours: restore one 3D stack at a time (in Fiji: "
               "Image > Color > Split Channels, Image > Hyperstacks > Reduce Dimensionality, or Image > Type > "
               "8-bit for RGB; save each stack as TIFF)")
    elif len(shape) < 3:
        fix = "a single image has no Z to restore"
    else:
        fix = "a stack needs at least two slices"
    named = f" (axes {axes})" if axes else ""
    return f"'{path}' holds an image of shape {shape}{named}; expected a 3D stack (Z, Y, X): {fix}."


def stack_shape(path: PathLike) -> Tuple[int, ...]:
    """Shape of a stack read from its metadata only (no pixels), to validate
    inputs before long work. :func:`read_stack` gives the detailed errors."""
    path = Path(path)
    if path.is_dir():
        files = list_tiff_files(path)
        if not files:
            raise InputNotFoundError(f"No TIFF files (*.tif, *.tiff) found in folder '{path}'.")
        with _tiff_guard(files[0]), tifffile.TiffFile(files[0]) as tif:
            return (len(files),) + tuple(s for s in tif.series[0].shape if s != 1)[-2:]
    with _tiff_guard(path), tifffile.TiffFile(path) as tif:
        refuse_colour_samples(path, tif.series[0])
        shape = tuple(s for s in tif.series[0].shape if s != 1)
    if len(shape) != 3:
        raise UserError(not_a_stack(path, shape))
    return shape


def stack_dtype(path: PathLike) -> np.dtype:
    """The dtype of a stack, from its (first file's) metadata only."""
    path = Path(path)
    first = list_tiff_files(path)[0] if path.is_dir() else path
    with _tiff_guard(first), tifffile.TiffFile(first) as tif:
        return np.dtype(tif.series[0].dtype)


def read_value_sample(path: PathLike, max_slices: int = 8) -> np.ndarray:
    """At most ``max_slices`` evenly spaced slices of a stack (a multipage TIFF or a slice folder),
    read without the rest: enough to decide its kind (:func:`kind_evidence`) before any long work.

    Returns
    -------
    sample_dhw : ndarray, shape (n, H, W), the stored dtype
    """
    path = Path(path)
    depth = stack_shape(path)[0]
    indices = np.unique(np.linspace(0, depth - 1, min(depth, max_slices)).round().astype(int))
    if path.is_dir():
        files = list_tiff_files(path)
        return np.stack([np.squeeze(read_tiff(files[i])) for i in indices])
    with _tiff_guard(path), tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        if len(series.pages) != depth:  # one page holds several slices: read the stack itself
            return np.squeeze(series.asarray())[indices]
        return np.stack([np.squeeze(series.pages[int(i)].asarray()) for i in indices])


LENGTH_UNITS_IN_UM = {"pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "um": 1.0, "µm": 1.0, "micron": 1.0, "mm": 1e3,
                      "cm": 1e4, "m": 1e6}


def normal_unit(unit: Optional[str]) -> Optional[str]:
    """A unit as this project writes it: ImageJ's ``\\uXXXX`` escapes decoded, and
    'micron', 'µm' (either micro sign) all mean um; no unit or 'pixel' is None."""
    if unit is None or str(unit).strip() in ("", "pixel", "pixels"):
        return None
    unit = re.sub(r"\\u([0-9A-Fa-f]{4})", lambda m: chr(int(m.group(1), 16)), str(unit).strip())
    return "um" if unit in ("micron", "microns", "µm", "μm", "u") else unit


def read_calibration(path: PathLike) -> Optional[Tuple[Tuple[Optional[float], float, float], Optional[str]]]:
    """Voxel size ``(z, y, x)`` and its unit from a TIFF's OME or ImageJ metadata.

    Read as Fiji/ImageJ reads them:

    * OME-XML ``PhysicalSizeZ/Y/X`` with their units; axes in different units
      (Z in um, XY in nm) are converted to the unit of X.
    * ImageJ: X/Y from the resolution tags, Z from ``spacing``. ImageJ writes
      ``spacing`` only when the Z step is not 1, so a file with ImageJ metadata
      and a calibrated resolution but no ``spacing`` has a Z step of 1.
    * Without an ImageJ unit, the TIFF ResolutionUnit (inch or centimetre) is
      converted to um.
    * A folder of slices: X/Y from the first slice (natural order); Z is None
      (a 2D slice has no Z step: pass ``--z-step``).

    Returns
    -------
    ((z, y, x), unit) or None when the lateral size is not calibrated (tifffile's
    and ImageJ's default of 1 pixel per unit with no unit). ``z`` is None when
    the file does not say it; ``unit`` is None when the file names none.
    """
    path = Path(path)
    from_folder = path.is_dir()
    if from_folder:
        files = list_tiff_files(path)
        if not files:
            return None
        path = files[0]
    with _tiff_guard(path), tifffile.TiffFile(path) as tif:
        if tif.ome_metadata:
            calibration = _ome_calibration(tif.ome_metadata)
            if calibration is not None:
                (z, y, x), unit = calibration
                return ((None if from_folder else z), y, x), unit
        meta = tif.imagej_metadata
        tags = tif.pages[0].tags
        if "XResolution" not in tags:
            return None
        x_num, x_den = tags["XResolution"].value
        y_num, y_den = tags["YResolution"].value if "YResolution" in tags else (x_num, x_den)
        unit = normal_unit((meta or {}).get("unit"))
        scale = 1.0
        if unit is None and "ResolutionUnit" in tags:
            scale = {2: 25400.0, 3: 10000.0}.get(int(tags["ResolutionUnit"].value), 1.0)  # inch, cm -> um
            unit = "um" if scale != 1.0 else None
        if x_num == 0 or y_num == 0 or (x_num == x_den and y_num == y_den and unit is None):
            return None  # 1 pixel per (no) unit: the default of tifffile and ImageJ, no calibration stored
        z = None
        if meta is not None and not from_folder:
            z = float(meta.get("spacing", 1.0)) * scale
        return (z, y_den / y_num * scale, x_den / x_num * scale), unit


def read_voxel_size(path: PathLike) -> Optional[Tuple[Optional[float], float, float]]:
    """Voxel size ``(z, y, x)`` from ImageJ or OME metadata of a TIFF, else None."""
    calibration = read_calibration(path)
    return None if calibration is None else calibration[0]


def _ome_calibration(ome_xml: str) -> Optional[Tuple[Tuple[float, float, float], Optional[str]]]:
    root = ET.fromstring(ome_xml)
    for element in root.iter():
        if element.tag.endswith("Pixels"):
            z, y, x = (element.get(f"PhysicalSize{a}") for a in "ZYX")
            if x is None:
                return None
            unit_x = element.get("PhysicalSizeXUnit", "µm")
            sizes = []
            for axis, value in zip("ZYX", (z, y if y is not None else x, x)):
                unit = element.get(f"PhysicalSize{axis}Unit", "µm")
                if value is None:
                    sizes.append(None)
                    continue
                if unit != unit_x and not (unit in LENGTH_UNITS_IN_UM and unit_x in LENGTH_UNITS_IN_UM):
                    raise UserError(f"OME metadata gives {axis} in '{unit}' and X in '{unit_x}', which cannot be "
                                    "converted; pass --z-step, --xy-size and --unit.")
                scale = LENGTH_UNITS_IN_UM[unit] / LENGTH_UNITS_IN_UM[unit_x] if unit != unit_x else 1.0
                sizes.append(float(value) * scale)
            return tuple(sizes), normal_unit(unit_x)
    return None


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #
def _imagej_unit(unit: str) -> str:
    """ImageJ's description is ASCII: it writes non-ASCII letters as ``\\uXXXX`` (µm is ``\\u00B5m``)."""
    return "".join(c if ord(c) < 128 else f"\\u{ord(c):04X}" for c in str(unit))


def _check_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise OutputExistsError(f"'{path}' already exists; choose another output path or pass overwrite=True (--overwrite).")
    path.parent.mkdir(parents=True, exist_ok=True)


def _as_savable(stack: np.ndarray):
    """Data for tifffile: bool masks become 0/255 uint8 (shown as a mask in every
    viewer), converted page by page so a large mask is never copied whole."""
    if stack.dtype == bool:
        return (page.view(np.uint8) * np.uint8(255) for page in stack), dict(shape=stack.shape, dtype=np.uint8)
    if stack.dtype == np.float16:  # ImageJ reads no 16-bit floats: written as float32, page by page
        return (page.astype(np.float32) for page in stack), dict(shape=stack.shape, dtype=np.float32)
    return _as_savable_array(stack), {}


def _as_savable_array(stack: np.ndarray) -> np.ndarray:
    if stack.dtype == np.float64:  # ImageJ reads 32-bit floats only
        return stack.astype(np.float32)
    if stack.dtype in (np.int8, np.int16, np.int32, np.int64, np.uint32, np.uint64):
        if stack.size and (stack.min() < 0 or stack.max() > np.iinfo(np.uint16).max):
            raise UserError("ImageJ TIFFs hold label ids 0..65535 only; relabel the stack (e.g. "
                             "skimage.segmentation.relabel_sequential) before saving.")
        return stack.astype(np.uint16)
    return stack


def save_stack(
    path: PathLike,
    stack_dhw: np.ndarray,
    voxel_size_zyx: Sequence[float] = (1.0, 1.0, 1.0),
    unit: str = "um",
    overwrite: bool = False,
    as_slices: bool = False,
) -> Path:
    """Write a stack that Fiji/ImageJ and napari open with the right voxel size.

    Parameters
    ----------
    path : str or Path
        Output ``.tif`` file, or with ``as_slices=True`` a folder that receives
        one ``slice_0000.tif`` per Z slice (the seed's format).
    stack_dhw : ndarray, shape (D, H, W)
        bool (written as uint8 0/255), uint8/uint16 labels or float32 probabilities.
    voxel_size_zyx : (float, float, float)
        Physical voxel size, stored as ImageJ ``spacing`` and X/Y resolution.
    overwrite : bool
        Existing files are never replaced unless this is True.

    Returns
    -------
    Path written.
    """
    path = Path(path)
    stack_dhw = np.asarray(stack_dhw)
    if stack_dhw.ndim != 3:
        raise UserError(f"save_stack expects a (D, H, W) stack, got shape {stack_dhw.shape}.")
    data, page_kwargs = _as_savable(stack_dhw)
    z, y, x = (float(v) for v in voxel_size_zyx)
    kwargs = dict(
        imagej=True,
        resolution=(1.0 / x, 1.0 / y),
        metadata={"spacing": z, "unit": _imagej_unit(unit), "axes": "ZYX"},
        compression="zlib",
    )
    if as_slices:
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise OutputExistsError(f"Folder '{path}' is not empty; choose another output folder or pass overwrite=True.")
        path.mkdir(parents=True, exist_ok=True)
        foreign = [p.name for p in list_tiff_files(path) if not re.fullmatch(r"slice_\d{4,}\.tif", p.name)]
        if foreign:  # they would be read back as part of the stack; never delete a user's files
            raise OutputExistsError(f"Folder '{path}' holds other TIFF files ({', '.join(foreign[:3])}); "
                                  "choose an empty output folder.")
        for stale in path.glob("slice_*.tif"):  # a deeper stack written before must not leave extra slices
            stale.unlink()
        for index, slice_hw in enumerate(data):
            with writing_to(path / f"slice_{index:04d}.tif"):
                tifffile.imwrite(path / f"slice_{index:04d}.tif", np.asarray(slice_hw)[None], **kwargs)
        return path
    _check_writable(path, overwrite)
    with writing_to(path):
        tifffile.imwrite(path, data, **page_kwargs, **kwargs)
    return path


@contextlib.contextmanager
def writing_to(path: PathLike):
    """Turn the operating system's refusals while writing ``path`` (no permission, disk full,
    read-only file system) into one :class:`UserError` naming the path and the fix; a partly
    written file is removed, so that it is never mistaken for a result."""
    import errno

    fixes = {errno.EACCES: "choose a folder you may write to", errno.EPERM: "choose a folder you may write to",
             errno.ENOSPC: "free some space or choose another disk", errno.EDQUOT: "free some space (disk quota)",
             errno.EROFS: "choose a writable disk"}
    try:
        yield
    except OSError as error:
        if error.errno not in fixes:
            raise
        with contextlib.suppress(OSError):
            if Path(path).is_file():
                Path(path).unlink()
        raise UserError(f"Cannot write '{path}': {error.strerror or error}. {fixes[error.errno].capitalize()}."
                        ) from error
