"""Reading, writing, simulating and generating binary 3D stacks.

Every stack in this project is a numpy array with axes ``(D, H, W)``:
``D`` is the (anisotropic) Z axis, ``H`` and ``W`` the lateral Y and X axes.
Masks are ``bool``; label images are unsigned integers with 0 = background.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import struct
import warnings
import zlib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import tifffile

PathLike = Union[str, os.PathLike]
TIFF_SUFFIXES = (".tif", ".tiff")


class UserError(ValueError):
    """A problem with the user's input, settings or outputs: the command line prints
    its message as one ``error: ...`` line (exit status 2). Every other exception
    is a programming error and keeps its traceback."""


class InputNotFoundError(UserError, FileNotFoundError):
    """An input path that does not exist, or a folder without slices."""


class OutputExistsError(UserError, FileExistsError):
    """An output that exists and may not be replaced."""


class DamagedFileError(UserError):
    """A file that is cut short or is not what its header says."""


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
                f"{slices[0].shape}. For multipage TIFFs pass the file itself as input."
            )
        stack = np.stack(slices, axis=0)
    else:
        if path.suffix.lower() not in TIFF_SUFFIXES:
            raise UserError(f"'{path}' is not a TIFF file (.tif/.tiff). Give a TIFF file or a folder of TIFF slices.")
        stack = np.squeeze(read_tiff(path))
    if stack.ndim != 3 or stack.shape[0] < 2:
        raise UserError(
            f"'{path}' holds an image of shape {stack.shape}; expected a 3D stack (Z, Y, X) "
            "of at least two slices. Multi-channel or time-lapse files must be split first."
        )
    return stack


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
        shape = tuple(s for s in tif.series[0].shape if s != 1)
    if len(shape) != 3:
        raise UserError(f"'{path}' holds an image of shape {shape}; expected a 3D stack (Z, Y, X).")
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


def binarize(stack: np.ndarray, threshold: Optional[float] = None, source: str = "input") -> np.ndarray:
    """Convert a stack to ``bool`` by a documented rule.

    Rule: with ``threshold=None`` every non-zero voxel is foreground; otherwise
    voxels strictly greater than ``threshold`` are. A ``UserWarning`` says which
    rule was applied when the stack has more than two distinct values (or, with
    no threshold, two values other than {0, x}).
    """
    if stack.dtype == bool:
        return stack
    values = np.unique(stack) if stack.size <= 50_000_000 else np.unique(stack[:: max(1, stack.shape[0] // 16)])
    if threshold is None:
        if len(values) > 2 or (len(values) == 2 and values[0] != 0):
            warnings.warn(
                f"{source} is not binary ({len(values)} distinct values, range {values.min()}..{values.max()}); "
                "binarized as foreground = value != 0. Pass a threshold to use another cut "
                "(label images: use apply.py --labels to keep object ids).",
                UserWarning,
                stacklevel=2,
            )
        return stack != 0
    if len(values) > 2:
        warnings.warn(f"{source} is not binary; binarized as foreground = value > {threshold}.", UserWarning, stacklevel=2)
    return stack > threshold


def import_binary_tiff_sequence(path: PathLike, threshold: Optional[float] = None) -> np.ndarray:
    """Read a binary stack from a slice folder or a multipage TIFF.

    Parameters
    ----------
    path : str or Path
        Folder of 2D TIFF slices (natural order) or one multipage TIFF.
    threshold : float, optional
        Foreground is ``value > threshold``; default: ``value != 0``.

    Returns
    -------
    stack_dhw : ndarray of bool, shape (D, H, W)
    """
    return binarize(read_stack(path), threshold, source=f"'{path}'")


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


def _value_sample(stack: np.ndarray) -> np.ndarray:
    """The stack, or every few slices of a large one: enough to count its distinct values cheaply."""
    return stack if stack.size <= 20_000_000 else stack[:: max(1, stack.shape[0] // 8)]


def read_mask_or_labels(path: PathLike, threshold: Optional[float] = None,
                        labels: str = "auto") -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Read a segmentation as a mask, keeping the ids of a label image: the kind rule of ``apply.py``
    (:func:`read_typed_stack`); a grey-scale image is refused.

    Parameters
    ----------
    path : folder of slices or multipage TIFF
    threshold : float, optional
        Binarization cut (the stack is then a mask, see :func:`binarize`).
    labels : {'auto', 'yes', 'no'}
        'auto' decides by :func:`decide_kind`; 'yes' reads a label image; 'no'
        binarizes (with a warning for ids).

    Returns
    -------
    mask_dhw : ndarray of bool, shape (D, H, W)
    labels_dhw : ndarray of uint16, shape (D, H, W), or None
    """
    kind, stack, ids = read_typed_stack(path, {"yes": "labels", "no": "mask", "auto": "auto"}[labels], threshold)
    if kind == "intensity":
        raise UserError(f"'{path}' looks like a grey-scale image, not a mask or a label image. Give a "
                        "segmentation (bench.py --kind intensity benchmarks grey values).")
    return stack, ids


# --------------------------------------------------------------------------- #
# Simulating anisotropy
# --------------------------------------------------------------------------- #
# A Z/XY ratio above this is almost always two sizes in different units (nm and um), not a microscope.
MAX_FACTOR = 64


def factor_from_voxel_size(z_step: float, xy_size: float, minimum: int = 2) -> Tuple[int, float]:
    """The project's one factor rule: the Z/XY ratio rounded to the nearest integer (halves up).

    Used by ``eval.py`` to simulate and by ``apply.py`` to restore. Rounding
    (rather than flooring) keeps the restored Z voxel, ``z_step / factor``, as
    close to the lateral size as an integer factor allows: a ratio of 3.9
    restores 4 slices per step (Z voxel 0.98 x XY) instead of 3 (1.3 x XY).
    The kept slices stay on the output grid, verbatim, and training degrades
    by the same integer factor that inference undoes. A warning states the
    resulting voxel size when the ratio is not an integer (within 1 %).

    Parameters
    ----------
    z_step, xy_size : float, in one unit
    minimum : int
        The smallest factor accepted: 2 to simulate missing slices (eval.py),
        1 where an already isotropic stack is converted instead (apply.py).

    Returns
    -------
    factor : int
    output_z_step : float, ``z_step / factor``

    Raises
    ------
    UserError
        A size that is not positive, a ratio above :data:`MAX_FACTOR` (most
        often sizes in two units), a Z step finer than the pixels, or a
        factor below ``minimum``.
    """
    if not (z_step > 0 and xy_size > 0):
        raise UserError(f"Voxel sizes must be positive, got Z step {z_step} and XY size {xy_size}.")
    ratio = z_step / xy_size
    if ratio > MAX_FACTOR:
        raise UserError(f"The Z step ({z_step:g}) is {ratio:.0f} times the XY pixel size ({xy_size:g}), more than "
                        f"{MAX_FACTOR}: most often the two sizes are in different units (nm and um). Give both "
                        "sizes in one unit (--z-step, --xy-size and --unit).")
    factor = int(math.floor(ratio + 0.5))
    if factor < 1:
        raise UserError(f"The Z step ({z_step:g}) is less than half the XY pixel size ({xy_size:g}): nothing is "
                        "missing along Z. Check the voxel size (the Z step comes first: --z-step).")
    if factor < minimum:
        raise UserError(f"The Z step ({z_step:g}) is only {ratio:.2f} times the XY pixel size ({xy_size:g}), a factor "
                        f"of {factor}; it must be at least {minimum} for slices to be missing: the stack is already "
                        "(nearly) isotropic. Check the voxel size (Z_RESOLUTION and XY_RESOLUTION).")
    if abs(ratio - factor) > 0.01 * ratio:
        warnings.warn(f"Z/XY ratio {ratio:.3f} is not an integer; restoring {factor} slices per input step. "
                      f"Output voxel size: Z {z_step / factor:.4g} x Y {xy_size:.4g} x X {xy_size:.4g} "
                      f"({(z_step / factor) / xy_size:.3f} times XY along Z).", UserWarning, stacklevel=2)
    return factor, z_step / factor


def resolution_factor(z_resolution: float, xy_resolution: float) -> int:
    """Integer Z/XY factor of ``eval.py``'s resolutions, by :func:`factor_from_voxel_size`'s rule."""
    return factor_from_voxel_size(z_resolution, xy_resolution)[0]


def check_factor(factor: int, depth: int) -> None:
    """Raise a clear ``ValueError`` unless ``2 <= factor`` and two slices are kept."""
    if int(factor) != factor or factor < 2:
        raise UserError(f"The resolution factor must be an integer >= 2, got {factor}.")
    if factor >= depth:
        raise UserError(
            f"Resolution factor {factor} is not smaller than the stack depth {depth}: fewer than two "
            "slices would be kept. Use a deeper stack or a smaller Z_RESOLUTION / XY_RESOLUTION ratio."
        )


def downsample_z(stack_dhw: np.ndarray, factor: int) -> Tuple[np.ndarray, np.ndarray]:
    """Keep slices ``0, factor, 2*factor, ...`` of a stack.

    Returns
    -------
    sparse_dhw : ndarray, shape (len(kept_indices), H, W), same dtype
    kept_indices : ndarray of int64
    """
    check_factor(factor, stack_dhw.shape[0])
    kept_indices = np.arange(0, stack_dhw.shape[0], factor, dtype=np.int64)
    return stack_dhw[kept_indices].copy(), kept_indices


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


# --------------------------------------------------------------------------- #
# Built-in sample
# --------------------------------------------------------------------------- #
def _paint_capsule(labels: np.ndarray, p0: np.ndarray, p1: np.ndarray, radius: float, label: int) -> None:
    """Paint the voxels within ``radius`` of segment p0-p1 (coordinates z, y, x)."""
    lo = np.maximum(np.floor(np.minimum(p0, p1) - radius).astype(int), 0)
    hi = np.minimum(np.ceil(np.maximum(p0, p1) + radius).astype(int) + 1, labels.shape)
    if np.any(hi <= lo):
        return
    grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij"), axis=-1).astype(np.float32)
    seg = (p1 - p0).astype(np.float32)
    t = np.clip(((grid - p0) @ seg) / max(float(seg @ seg), 1e-6), 0.0, 1.0)
    dist2 = np.sum((grid - (p0 + t[..., None] * seg)) ** 2, axis=-1)
    box = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    box[dist2 <= radius**2] = label


def _paint_ellipsoid(labels: np.ndarray, centre: np.ndarray, radii: np.ndarray, rotation: np.ndarray, label: int) -> None:
    reach = float(np.max(radii))
    lo = np.maximum(np.floor(centre - reach).astype(int), 0)
    hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, labels.shape)
    if np.any(hi <= lo):
        return
    grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij"), axis=-1).astype(np.float32)
    local = (grid - centre) @ rotation  # coordinates in the ellipsoid's own frame
    inside = np.sum((local / radii) ** 2, axis=-1) <= 1.0
    box = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    box[inside] = label


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def make_sample_labels(shape: Tuple[int, int, int] = (128, 128, 128), seed: int = 0) -> np.ndarray:
    """Deterministic isotropic label phantom that looks like an organelle segmentation.

    Contains what makes Z interpolation hard: branching tubes that wander
    laterally (vessels, mitochondrial networks), ellipsoids of several sizes and
    orientations (nuclei, mitochondria), flat objects only 2-5 slices thick that
    fall between kept slices, and pairs of touching objects with distinct ids.

    Parameters
    ----------
    shape : (D, H, W)
    seed : int

    Returns
    -------
    labels_dhw : ndarray of uint16, 0 = background, one id per object.
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint16)
    dims = np.array(shape, dtype=np.float32)
    scale = float(np.prod(dims) / 128.0**3)  # object count follows the volume: similar density at any size
    next_id = 1

    # Branching tubes: random walks with smoothly turning direction.
    for _ in range(max(1, round(6 * scale))):
        stack = [(rng.uniform(0.1, 0.9, 3) * dims, rng.normal(size=3), 0)]
        while stack:
            point, direction, generation = stack.pop()
            radius = rng.uniform(2.0, 5.0) / (1 + 0.3 * generation)
            for _step in range(int(rng.integers(6, 14))):
                direction = direction / np.linalg.norm(direction) + rng.normal(scale=0.35, size=3)
                direction /= np.linalg.norm(direction)
                new_point = point + direction * rng.uniform(4, 8)
                _paint_capsule(labels, point, new_point, radius, next_id)
                point = new_point
                if generation < 2 and rng.random() < 0.12:
                    stack.append((point.copy(), rng.normal(size=3), generation + 1))
                if np.any(point < 0) or np.any(point >= dims):
                    break
        next_id += 1

    # Ellipsoids of several sizes; some flat ones only a few slices thick.
    n_blobs = max(4, round(55 * scale))
    for index in range(n_blobs):
        centre = rng.uniform(0.05, 0.95, 3) * dims
        if index % 4 == 0:  # flat along Z: thinner than the gap between kept slices
            radii = np.array([rng.uniform(1.0, 2.5), rng.uniform(3, 9), rng.uniform(3, 9)], dtype=np.float32)
            rotation = np.eye(3, dtype=np.float32)
        else:
            radii = np.array(sorted(rng.uniform(3.0, 14.0, 3)), dtype=np.float32)
            rotation = _random_rotation(rng)
        _paint_ellipsoid(labels, centre, radii, rotation, next_id)
        if index % 6 == 1:  # a touching partner with its own id
            offset = rotation[:, 2] * (radii[2] * 1.6)
            _paint_ellipsoid(labels, centre + offset, radii * 0.8, rotation, next_id + 1)
            next_id += 1
        next_id += 1
    return labels


def make_sample_stack(shape: Tuple[int, int, int] = (128, 128, 128), seed: int = 0) -> np.ndarray:
    """Binary version of :func:`make_sample_labels`: ``(D, H, W)`` bool."""
    return make_sample_labels(shape, seed) > 0


# --------------------------------------------------------------------------- #
# Kinds of stack: masks, label images, grey-scale intensities
# --------------------------------------------------------------------------- #
KINDS = ("auto", "mask", "labels", "intensity")


# The kind rule's evidence: in a label image almost every pair of neighbouring object pixels holds the same
# id (values change only at object borders); in a microscope image noise and texture make most of them differ.
LABEL_FLATNESS = 0.8  # at least this fraction of equal neighbour pairs: a label image
INTENSITY_FLATNESS = 0.5  # at most this fraction: a grey-scale image; in between the rule asks for --kind


def flatness(sample: np.ndarray) -> float:
    """Fraction of laterally neighbouring pixel pairs, among those of two non-zero pixels, that
    hold equal values: about 1 for piecewise-constant images (label images: ids change only
    where two objects touch), far below for images with noise or texture. 1.0 when no such
    pair exists.

    Parameters
    ----------
    sample : ndarray, shape (..., H, W)
    """
    sample = np.asarray(sample)
    equal = pairs = 0
    for axis in (-1, -2):
        first = np.take(sample, np.arange(sample.shape[axis] - 1), axis=axis)
        second = np.take(sample, np.arange(1, sample.shape[axis]), axis=axis)
        involved = (first != 0) & (second != 0)
        pairs += int(involved.sum())
        equal += int((involved & (first == second)).sum())
    return equal / pairs if pairs else 1.0


def kind_evidence(sample: np.ndarray) -> Tuple[Optional[str], str]:
    """The kind a person would read from a sample of a stack's values, and why.

    Rule, in order: a bool stack or at most two values, one of them 0 (0/1,
    0/255) -> 'mask'; non-integer values -> 'intensity'; an integer stack whose
    object pixels are piecewise constant (:func:`flatness` >= ``LABEL_FLATNESS``)
    -> 'labels'; one with noise or texture (<= ``INTENSITY_FLATNESS``) ->
    'intensity'; in between, ``None`` (the evidence is ambiguous).

    Returns
    -------
    kind : {'mask', 'labels', 'intensity'} or None
    reason : str, one phrase for the plan (e.g. "0/255 values")
    """
    if sample.dtype == bool:
        return "mask", "a boolean stack"
    values = np.unique(sample)
    if len(values) == 0:
        return None, "no values to decide from"
    if len(values) <= 2 and values[0] == 0:
        return "mask", f"{'/'.join(f'{v:g}' for v in values)} values"
    if len(values) == 1:
        return "intensity", f"one value ({values[0]:g}) other than 0"
    if not np.issubdtype(sample.dtype, np.integer) and not np.array_equal(values, np.round(values)):
        return "intensity", "non-integer values"
    if values[0] < 0:
        return "intensity", "negative values"
    share = flatness(sample)
    if share >= LABEL_FLATNESS:
        return "labels", f"piecewise constant: {share:.0%} of neighbouring object pixels are equal, {len(values)} values"
    if share <= INTENSITY_FLATNESS:
        return "intensity", f"noise or texture: only {share:.0%} of neighbouring pixels are equal"
    return None, (f"{share:.0%} of neighbouring object pixels are equal, between a label image "
                  f"(>= {LABEL_FLATNESS:.0%}) and a grey-scale image (<= {INTENSITY_FLATNESS:.0%})")


def decide_kind(stack: np.ndarray, kind: str = "auto", source: str = "input") -> str:
    """The kind of a stack: ``kind`` itself when given, else by :func:`kind_evidence`'s rule.

    'auto' raises one clear error, asking for ``--kind``, only where the
    evidence is ambiguous.
    """
    return decide_kind_and_reason(stack, kind, source)[0]


def decide_kind_and_reason(stack: np.ndarray, kind: str = "auto", source: str = "input") -> Tuple[str, str]:
    """:func:`decide_kind`, with the reason for the plan ("given as --kind", "0/255 values", ...)."""
    if kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, got '{kind}'.")
    if kind != "auto":
        return kind, "given as --kind"
    decided, reason = kind_evidence(_value_sample(stack))
    if decided is None:
        raise UserError(f"{source} cannot be told apart as a label image or a grey-scale image ({reason}). Say "
                        "which with --kind labels or --kind intensity (or --kind mask to binarise it).")
    return decided, reason


def read_typed_stack(path: PathLike, kind: str = "auto", threshold: Optional[float] = None,
                     label_dtype=np.uint16) -> Tuple[str, np.ndarray, Optional[np.ndarray]]:
    """Read a stack and decide its kind (see :func:`decide_kind`).

    Returns
    -------
    kind : {'mask', 'labels', 'intensity'}
    stack_dhw : ndarray, shape (D, H, W)
        bool foreground for masks and label images, the stored values for intensities
    labels_dhw : ndarray of ``label_dtype`` or None (label images only; ``label_dtype`` None:
        the smallest unsigned type that holds the ids, see :func:`as_label_image`)
    """
    raw = read_stack(path)
    kind = "mask" if kind == "auto" and threshold is not None else decide_kind(raw, kind, f"'{path}'")
    return kind, *as_typed_stack(raw, kind, threshold, path, label_dtype)


def as_typed_stack(raw: np.ndarray, kind: str, threshold: Optional[float], source: PathLike,
                   label_dtype=np.uint16) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """What the engine restores of a stack of a decided ``kind`` (the values read from ``source``).

    Returns
    -------
    stack_dhw : ndarray, shape (D, H, W)
        the stored values for 'intensity', else the bool foreground (:func:`binarize`)
    labels_dhw : ndarray of ``label_dtype`` or None ('labels' only)
    """
    if kind == "intensity":
        return raw, None
    if kind == "labels":
        return as_label_image(raw, source, label_dtype)
    return binarize(raw, threshold, source=f"'{source}'"), None


def as_label_image(raw: np.ndarray, source: PathLike, dtype=np.uint16) -> Tuple[np.ndarray, np.ndarray]:
    """Foreground (bool) and ids of a label image read from ``source``.

    ``dtype`` uint16 is what a TIFF (ImageJ) output holds; ``None`` (an
    OME-Zarr output) takes the smallest of uint16, uint32 and uint64 that
    holds the ids. One clear error for non-integer values, negative ids and
    ids that ``dtype`` cannot hold.
    """
    if not np.issubdtype(raw.dtype, np.integer) and not np.array_equal(raw, np.round(raw)):
        raise UserError(f"'{source}' holds non-integer values; a label image holds integer ids (0 = background).")
    low, high = (raw.min(), raw.max()) if raw.size else (0, 0)
    if low < 0:
        raise UserError(f"Label ids of '{source}' must be 0 (background) or positive; it holds {low}. Relabel the "
                        "stack first (skimage.segmentation.relabel_sequential).")
    fits = [np.dtype(t) for t in (np.uint16, np.uint32, np.uint64) if high <= np.iinfo(t).max]
    if dtype is None and fits:
        dtype = fits[0]
    if dtype is None or high > np.iinfo(dtype).max:
        advice = (" or write an OME-Zarr output (--output NAME.ome.zarr), which holds larger ids"
                  if dtype is not None and np.dtype(dtype).itemsize < 8 else "")
        top = np.iinfo(dtype or np.uint64).max
        raise UserError(f"Label ids of '{source}' reach {high}; this output holds ids 0..{top}. Relabel the stack "
                        f"first (skimage.segmentation.relabel_sequential){advice}.")
    return raw != 0, raw.astype(dtype, copy=False)


def intensity_range(stack: np.ndarray, low_percentile: float = 1.0, high_percentile: float = 99.8
                    ) -> Tuple[float, float]:
    """Robust grey-value range ``(lo, hi)`` of a stack: the given percentiles of
    (a subsample of at most about 10 million of) its values, as CARE normalises.
    ``hi > lo`` always."""
    values = np.asarray(stack).ravel()
    values = values[:: max(1, values.size // 10_000_000)]
    lo, hi = (float(v) for v in np.percentile(values, (low_percentile, high_percentile)))
    return lo, (hi if hi > lo else lo + 1.0)


def normalize_intensity(stack: np.ndarray, value_range: Tuple[float, float]) -> np.ndarray:
    """``(stack - lo) / (hi - lo)`` as float32: the network's grey-value scale."""
    lo, hi = value_range
    out = np.asarray(stack, dtype=np.float32) - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return out


def denormalize_intensity(values: np.ndarray, value_range: Tuple[float, float], dtype) -> np.ndarray:
    """Back from the network's scale to grey values of ``dtype`` (see :func:`as_grey_values`)."""
    lo, hi = value_range
    out = np.asarray(values, dtype=np.float32) * np.float32(hi - lo)
    out += np.float32(lo)
    return as_grey_values(out, dtype)


def grey_dtype(dtype) -> np.dtype:
    """The dtype grey values of ``dtype`` are written in: an integer dtype itself, float32 for
    float dtypes of 32 bits or fewer (float16 is not an ImageJ type), wider floats themselves."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer) or dtype.itemsize > 4:
        return dtype
    return np.dtype(np.float32)


def as_grey_values(values: np.ndarray, dtype) -> np.ndarray:
    """Float grey values as :func:`grey_dtype` of ``dtype``: rounded and clipped to the range
    of an integer dtype (never wrapped around)."""
    dtype = grey_dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return np.asarray(values).astype(dtype, copy=False)


def make_sample_intensity(shape: Tuple[int, int, int] = (128, 128, 128), seed: int = 0) -> np.ndarray:
    """Deterministic isotropic grey-scale phantom, EM-like, for ``--kind intensity`` runs without data.

    The objects of :func:`make_sample_labels` drawn as bright organelles with a
    dark membrane on a textured cytoplasm, blurred by a small point spread
    function and with shot-like noise.

    Returns
    -------
    image_dhw : ndarray of uint8, shape (D, H, W)
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed + 1)
    labels = make_sample_labels(shape, seed)
    inside = labels > 0
    membrane = inside & ~ndimage.binary_erosion(inside, iterations=1)
    texture = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 2.0)
    image = 0.45 + 0.6 * texture / (np.abs(texture).max() + 1e-6) * 0.25
    image += 0.25 * inside - 0.45 * membrane
    image = ndimage.gaussian_filter(image.astype(np.float32), 0.8)
    image += rng.normal(scale=0.05, size=shape).astype(np.float32)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
