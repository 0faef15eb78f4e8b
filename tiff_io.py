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
import warnings
import zlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import tifffile

from errors import DamagedFileError, InputNotFoundError, OutputExistsError, ToolWarning, UserError, writing_to

PathLike = Union[str, os.PathLike]
TIFF_SUFFIXES = (".tif", ".tiff")


# --------------------------------------------------------------------------- #
# Which 3D stack of a file that holds several
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class StackChoice:
    """Which 3D stack to restore of a file that holds several: a channel (or a colour sample of an RGB file)
    and a time point, each counted from 0 (``--channel``, ``--timepoint``; ``CHANNEL``, ``TIMEPOINT`` in
    eval.py). None: the file must hold only one along that axis."""
    channel: Optional[int] = None
    timepoint: Optional[int] = None

    def describe(self) -> str:
        """'channel 1, time point 0' for the plan; '' when nothing is chosen."""
        parts = [f"{name} {value}" for name, value in (("channel", self.channel), ("time point", self.timepoint))
                 if value is not None]
        return ", ".join(parts)


# Axis letters (tifffile's; an OME-Zarr image's axes are mapped onto them) and the choice that fixes each:
# T time points, C channels, S colour samples (RGB), which --channel picks as well.
CHOICE_OF_AXIS = {"T": "timepoint", "C": "channel", "S": "channel"}
FLAG_OF_CHOICE = {"channel": "--channel", "timepoint": "--timepoint"}


def choose_stack(axes: str, shape: Sequence[int], choice: StackChoice, where: str,
                 unnamed_third_axis: bool = False, axes_shown: Optional[str] = None) -> Tuple[Union[int, slice], ...]:
    """The index that takes the chosen 3D stack out of an array with ``axes`` (one letter per axis of
    ``shape``; T, C and S are chosen from, every other axis is kept).

    Parameters
    ----------
    axes : str
        One letter per axis, as tifffile names them ('TZCYX', 'QYXS', ...).
    shape : sequence of int
    choice : StackChoice
    where : str
        The file, for the errors.
    unnamed_third_axis : bool
        Exactly three axes longer than 1, none of them colour samples, are a stack whatever the first is
        called (ImageJ files written without axes call their slices channels or frames), unless ``choice``
        picks one of them: TIFF files, not OME-Zarr, whose axes are named by the standard. Such a file is
        one stack, so a choice of 0 (a script's ``CHANNEL = 0``) reads it whole, and any other is an error.
    axes_shown : str, optional
        The axes as the errors name them (an OME-Zarr image's axis names); default ``axes``.

    Returns
    -------
    index : tuple of int and slice, one per axis: a chosen axis is an int (0 for an axis of length 1)

    Raises
    ------
    UserError
        A channel or time point that is not in the file; several along an axis and none chosen.
    """
    axes_shown = axes if axes_shown is None else axes_shown
    named = f"(axes {axes_shown}, shape {tuple(shape)})"
    long_axes = [letter for letter, size in zip(axes, shape) if size > 1]
    if unnamed_third_axis and len(long_axes) == 3 and "S" not in long_axes and ("C" in long_axes or "T" in long_axes):
        beyond = [f"{FLAG_OF_CHOICE[name]} {value}" for name, value in (("channel", choice.channel),
                                                                       ("timepoint", choice.timepoint))
                  if value not in (None, 0)]
        if beyond:
            raise UserError(f"'{where}' is one stack {named}, its slices called channels or frames by its "
                            f"metadata, read as Z: {' and '.join(beyond)} is not in it. Leave it out.")
        return tuple(0 if size == 1 else slice(None) for size in shape)
    index: List[Union[int, slice]] = []
    open_axes = []  # chosen from but not chosen: (choice name, letter, length)
    for letter, size in zip(axes, shape):
        name = CHOICE_OF_AXIS.get(letter)
        wanted = None if name is None else getattr(choice, name)
        if name is None:
            index.append(slice(None))
        elif size == 1 and wanted in (None, 0):
            index.append(0)
        elif wanted is None:
            open_axes.append((name, letter, size))
            index.append(slice(None))
        elif not 0 <= wanted < size:
            raise UserError(f"'{where}' holds {size} {_plural(letter, size)} ({FLAG_OF_CHOICE[name]} 0..{size - 1}); "
                            f"{FLAG_OF_CHOICE[name]} {wanted} is not one of them.")
        else:
            index.append(int(wanted))
    for name, flag in FLAG_OF_CHOICE.items():
        wanted = getattr(choice, name)
        if wanted not in (None, 0) and not any(CHOICE_OF_AXIS.get(letter) == name for letter in axes):
            raise UserError(f"'{where}' holds one {_plural(name[0].upper(), 1)} {named}; "
                            f"{flag} {wanted} is not in it. Leave out {flag}.")
    if sum(1 for letter, size in zip(axes, shape) if CHOICE_OF_AXIS.get(letter) == "channel" and size > 1) > 1:
        raise UserError(f"'{where}' holds both channels and colour samples {named}; "
                        "split them first (in Fiji: Image > Color > Split Channels) and restore one stack at a time.")
    spatial = [size for letter, size in zip(axes, shape) if letter not in CHOICE_OF_AXIS and size > 1]
    if len(spatial) < 3:  # one image, whatever channels it has: no Z to restore
        raise UserError(f"'{where}' holds an image of shape {tuple(shape)} (axes {axes_shown}); expected a 3D stack "
                        "(Z, Y, X): a single image has no Z to restore.")
    if open_axes:
        held = " and ".join(f"{size} {_plural(letter, size)}" for _, letter, size in open_axes)
        flags = " and ".join(f"{FLAG_OF_CHOICE[name]} 0..{size - 1}" for name, _, size in open_axes)
        constants = " and ".join(name.upper() for name, _, _ in open_axes)
        raise UserError(f"'{where}' holds {held} {named}: choose the stack to restore with "
                        f"{flags} ({constants} in eval.py), one run per stack.")
    return tuple(index)


def _plural(letter: str, count: int) -> str:
    """What ``count`` positions along an axis named ``letter`` are called in the errors."""
    words = {"C": ("channel", "channels"), "T": ("time point", "time points"),
             "S": ("colour sample", "colour samples (RGB)")}[letter]
    return words[count != 1]


def _chosen_shape(shape: Sequence[int], index: Sequence[Union[int, slice]]) -> Tuple[int, ...]:
    """The shape :func:`choose_stack`'s ``index`` leaves, axes of length 1 dropped."""
    return tuple(size for i, size in zip(index, shape) if isinstance(i, slice) and size != 1)


def _series_index(path: PathLike, series: "tifffile.TiffPageSeries", choice: StackChoice
                  ) -> Tuple[Union[int, slice], ...]:
    """:func:`choose_stack` of a TIFF file's first series."""
    return choose_stack(series.axes, series.shape, choice, str(path), unnamed_third_axis=True)


def _plane_axes(series: "tifffile.TiffPageSeries") -> int:
    """How many of a series' last axes one page holds: Y, X, and colour samples when the file has them."""
    return 3 if series.axes.endswith("S") else 2


def _chosen_pages(series: "tifffile.TiffPageSeries", index: Sequence[Union[int, slice]]) -> Optional[np.ndarray]:
    """The page numbers holding the chosen planes, shaped as ``index`` leaves the axes in front of the plane,
    or None when the file's pages are not one plane each (then the whole series is read)."""
    leading = tuple(series.shape[:len(series.shape) - _plane_axes(series)])
    if len(series.pages) != int(np.prod(leading, dtype=np.int64)):
        return None
    return np.arange(len(series.pages)).reshape(leading)[tuple(index[:len(leading)])]


def first_series(tif: "tifffile.TiffFile") -> "tifffile.TiffPageSeries":
    """The file's first image series, the one read; a file without any is damaged (an empty page list)."""
    if not tif.series:
        raise DamagedFileError.of(tif.filehandle.path, "TIFF", "no image in it")
    return tif.series[0]


def _read_chosen(tif: "tifffile.TiffFile", index: Sequence[Union[int, slice]]) -> np.ndarray:
    """The chosen stack of a file's first series (``index`` of :func:`choose_stack`), reading only its own
    pages where each page is one plane: one channel of a large hyperstack costs that channel's bytes."""
    series = first_series(tif)
    if all(isinstance(i, slice) for i in index):
        return series.asarray()
    pages = _chosen_pages(series, index)
    if pages is None:
        return series.asarray()[tuple(index)]
    n_leading = len(series.shape) - _plane_axes(series)
    planes = tif.asarray(key=pages.ravel().tolist(), series=0)
    planes = planes.reshape(pages.shape + tuple(series.shape[n_leading:]))
    return planes[(slice(None),) * pages.ndim + tuple(index[n_leading:])]


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #
def natural_sort_key(name: str) -> list:
    """Key that sorts ``img_2.tif`` before ``img_10.tif``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_tiff_files(folder: PathLike) -> list:
    """TIFF files directly inside ``folder``, in natural order; hidden files (``.name``: the ``._name.tif``
    that macOS writes beside each file on a shared disk) are not slices, as ImageJ's folder opener skips them."""
    folder = Path(folder)
    files = [p for p in folder.iterdir()
             if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_sort_key(p.name))


class _TiffComplaints(logging.Handler):
    """Collects what tifffile logs while it reads: it logs, rather than raises, when
    a file is cut short or its offsets point nowhere, and then returns partial data."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _damage_reported(complaints: _TiffComplaints) -> list:
    """tifffile's messages that say the file is damaged."""
    return [m for m in complaints.messages if any(w in m.lower() for w in ("invalid", "corrupt", "truncat"))]


@contextlib.contextmanager
def _tiff_guard(path: Path):
    """Turn tifffile's complaints and decoder errors about ``path`` into one :class:`DamagedFileError`."""
    logger = logging.getLogger("tifffile")
    complaints = _TiffComplaints()
    logger.addHandler(complaints)
    try:
        yield
    except UserError:
        # A file cut short may read as fewer pages than it holds (one image, not a stack): its damage, which
        # tifffile reported on the way, is the error to name, not the shape that damage left.
        damaged = _damage_reported(complaints)
        if not damaged:
            raise
        raise _damaged(path, f"tifffile: {damaged[0]}") from None
    except PermissionError as error:  # the file may be fine: the user may not read it
        raise UserError(f"'{path}' cannot be read: permission denied ({error.strerror}). Check the file's "
                        "permissions (ls -l), or copy it somewhere you can read.") from error
    except (IndexError, KeyError, ValueError) as error:
        damaged = _damage_reported(complaints)
        # An IndexError or KeyError in this module's own code, on a file tifffile read without complaint, is a
        # slip of that code: a bug keeps its traceback. A ValueError here is the content's (a metadata number
        # written '0,5', a page count that does not fit the axes): the file's fault.
        if not isinstance(error, ValueError) and raised_here(error) and not damaged:
            raise
        detail = f"tifffile: {damaged[0]}" if damaged else f"{type(error).__name__}: {error}"
        raise _damaged(path, detail) from error
    except (tifffile.TiffFileError, zlib.error, struct.error, EOFError, OSError, ET.ParseError) as error:
        if "imagecodecs" in str(error):  # a compression tifffile decodes only through imagecodecs (LZW, JPEG, ...)
            raise UserError(f"'{path}' is compressed in a way that needs the imagecodecs package ({error}). Install "
                            "it (pip install -r requirements.txt, or pip install imagecodecs) and run again.") from error
        raise _damaged(path, f"{type(error).__name__}: {error}") from error
    finally:
        logger.removeHandler(complaints)
    damaged = _damage_reported(complaints)
    if damaged:
        raise _damaged(path, f"tifffile: {damaged[0]}")


def raised_here(error: BaseException) -> bool:
    """Whether ``error`` was raised by this module's own code (its innermost frame is here), not inside the
    tifffile or numpy calls a damaged file makes fail."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and Path(frame.tb_frame.f_code.co_filename).resolve() == Path(__file__).resolve()


def _damaged(path: Path, detail: str) -> DamagedFileError:
    """The one error for a damaged TIFF, with what was wrong."""
    return DamagedFileError.of(path, "TIFF", detail)


def read_tiff(path: PathLike) -> np.ndarray:
    """``tifffile.imread`` that refuses damaged files (cut short, random bytes behind
    a TIFF header) with one :class:`DamagedFileError` naming the file."""
    path = Path(path)
    with _tiff_guard(path):
        return tifffile.imread(path)


def read_stack(path: PathLike, choice: StackChoice = StackChoice()) -> np.ndarray:
    """Read a stack as stored: a folder of 2D TIFF slices or one multipage TIFF.

    Parameters
    ----------
    path : str or Path
        A folder holding one 2D TIFF per Z slice (sorted in natural order), or a
        single multipage / ImageJ / OME TIFF file with axes Z, Y, X.
    choice : StackChoice
        The channel and time point of a file that holds several (:func:`choose_stack`);
        only its own pages are read.

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
        refuse_choice_in_folder(path, choice)
        folder_slice_shape(path, files)
        stack = np.stack([np.squeeze(read_tiff(f)) for f in files], axis=0)
    else:
        refuse_other_formats(path)
        with _tiff_guard(path), tifffile.TiffFile(path) as tif:  # one open: the axes, then the pixels
            stack = np.squeeze(_read_chosen(tif, _series_index(path, first_series(tif), choice)))
    if stack.ndim != 3 or stack.shape[0] < 2:
        raise UserError(not_a_stack(path, stack.shape))
    return stack


def folder_slice_shape(folder: PathLike, files: Sequence[Path]) -> Tuple[int, int]:
    """The (H, W) every slice of a folder shares, from each file's header (no pixels read); one error for a
    file that is not one 2D slice (RGB colours, channels, several pages) or slices of different sizes."""
    shapes = []
    for file in files:
        with _tiff_guard(file), tifffile.TiffFile(file) as tif:
            shapes.append(tuple(int(n) for n in first_series(tif).shape if n != 1))
    odd = [(file, shape) for file, shape in zip(files, shapes) if len(shape) != 2]
    if odd:
        file, shape = odd[0]
        raise UserError(
            f"Each file in the folder '{folder}' must be one 2D slice; '{file.name}' has shape {shape}. For "
            "multipage TIFFs pass the file itself as input; slices with channels or RGB colours need one channel "
            "each (in Fiji: Image > Color > Split Channels, or Image > Type > 8-bit for RGB).")
    if len(set(shapes)) != 1:
        sizes = ", ".join(f"{file.name}: {shape}" for file, shape in list(zip(files, shapes))[:6])
        raise UserError(
            f"Slices in '{folder}' have different sizes ({sizes} ...). All slices of a stack must share one "
            "height and width; crop or pad them to one size first.")
    return shapes[0]


def refuse_other_formats(path: Path) -> None:
    """One error for a file that is no TIFF by its name, naming the formats read and how to convert the rest."""
    if not path.is_dir() and path.suffix.lower() not in TIFF_SUFFIXES:
        raise UserError(f"'{path}' is not a TIFF file (.tif/.tiff). Give a TIFF file, a folder of TIFF slices, an "
                        "HDF5 file (.h5), an MRC file (.mrc) or an OME-Zarr image (.ome.zarr); a microscope's own "
                        "format (.czi, .lif, .nd2, .ims, ...) converts to one in Fiji (File > Save As > Tiff) or with "
                        "bioformats2raw.")


def refuse_choice_in_folder(path: PathLike, choice: StackChoice) -> None:
    """A folder of 2D slices holds one stack: a channel or time point chosen beyond the first is an error."""
    chosen = [f"{FLAG_OF_CHOICE[name]} {value}" for name, value in (("channel", choice.channel),
                                                                    ("timepoint", choice.timepoint))
              if value not in (None, 0)]
    if chosen:
        raise UserError(f"'{path}' is a folder of 2D slices, which holds one stack; {' and '.join(chosen)} choose "
                        "from a multipage TIFF or an OME-Zarr image. Leave them out, or give the file that holds "
                        "the channels.")


def not_a_stack(path: PathLike, shape: Tuple[int, ...], axes: str = "") -> str:
    """The error for a file that is not one 3D stack, with the fix for the usual causes."""
    if len(shape) > 3 or "S" in axes:
        fix = ("it holds channels, time points or RGB colours besides Z, Y and X: choose one stack with --channel "
               "and --timepoint where its axes are named, or save each stack as its own TIFF (in Fiji: Image > "
               "Color > Split Channels, Image > Hyperstacks > Reduce Dimensionality)")
    elif len(shape) < 3:
        fix = "a single image has no Z to restore"
    else:
        fix = "a stack needs at least two slices"
    named = f" (axes {axes})" if axes else ""
    return f"'{path}' holds an image of shape {shape}{named}; expected a 3D stack (Z, Y, X): {fix}."


def stack_shape(path: PathLike, choice: StackChoice = StackChoice()) -> Tuple[int, ...]:
    """Shape of a stack (of the chosen channel and time point) read from its metadata only (no pixels),
    to validate inputs before long work. :func:`read_stack` gives the detailed errors."""
    path = Path(path)
    if path.is_dir():
        files = list_tiff_files(path)
        if not files:
            raise InputNotFoundError(f"No TIFF files (*.tif, *.tiff) found in folder '{path}'.")
        refuse_choice_in_folder(path, choice)
        return (len(files),) + folder_slice_shape(path, files)
    with _tiff_guard(path), tifffile.TiffFile(path) as tif:
        series = first_series(tif)
        shape = _chosen_shape(series.shape, _series_index(path, series, choice))
        if len(shape) != 3:  # axes beyond Z, Y, X that are neither channels nor time points
            raise UserError(not_a_stack(path, tuple(series.shape), series.axes))
    return shape


def other_series(path: PathLike) -> List[Tuple[int, ...]]:
    """The shapes of the images a TIFF file holds beyond the first (tifffile's series: the positions of an
    OME-TIFF, a thumbnail a microscope stores beside the stack), which is the one read; [] for a folder."""
    path = Path(path)
    if path.is_dir():
        return []
    with _tiff_guard(path), tifffile.TiffFile(path) as tif:
        return [tuple(series.shape) for series in tif.series[1:]]


def stack_dtype(path: PathLike) -> np.dtype:
    """The dtype of a stack, from its (first file's) metadata only."""
    path = Path(path)
    first = list_tiff_files(path)[0] if path.is_dir() else path
    with _tiff_guard(first), tifffile.TiffFile(first) as tif:
        return np.dtype(first_series(tif).dtype)


def sample_slices(depth: int, max_slices: int) -> np.ndarray:
    """At most ``max_slices`` evenly spaced slice indices of a stack ``depth`` slices deep, first and last
    included (every reader's :func:`read_value_sample`)."""
    return np.unique(np.linspace(0, depth - 1, min(depth, max_slices)).round().astype(int))


def read_value_sample(path: PathLike, max_slices: int = 8, choice: StackChoice = StackChoice()) -> np.ndarray:
    """At most ``max_slices`` evenly spaced slices of a stack (a multipage TIFF or a slice folder; of the
    chosen channel and time point), read without the rest: enough to decide its kind (:func:`kind_evidence`)
    before any long work.

    Returns
    -------
    sample_dhw : ndarray, shape (n, H, W), the stored dtype
    """
    path = Path(path)
    depth = stack_shape(path, choice)[0]
    indices = sample_slices(depth, max_slices)
    if path.is_dir():
        files = list_tiff_files(path)
        return np.stack([np.squeeze(read_tiff(files[i])) for i in indices])
    with _tiff_guard(path), tifffile.TiffFile(path) as tif:
        series = first_series(tif)
        index = _series_index(path, series, choice)
        pages = _chosen_pages(series, index)
        pages = None if pages is None else np.squeeze(pages)
        if pages is None or pages.shape != (depth,):  # pages are not one slice each: read the stack itself
            return np.squeeze(_read_chosen(tif, index))[indices]
        samples = index[len(series.shape) - _plane_axes(series):]  # the colour sample chosen, if any
        return np.stack([np.squeeze(series.pages[int(pages[i])].asarray()[tuple(samples)]) for i in indices])


LENGTH_UNITS_IN_UM = {"pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "um": 1.0, "µm": 1.0, "micron": 1.0, "mm": 1e3,
                      "cm": 1e4, "m": 1e6}


def length_scale(from_unit: Optional[str], to_unit: Optional[str]) -> Optional[float]:
    """The factor that expresses lengths in ``from_unit`` in ``to_unit`` (short names, ``LENGTH_UNITS_IN_UM``):
    1.0 for one unit, None where either is no length unit (the callers' errors say what to pass). Spellings of one
    unit are one unit (:func:`normal_unit`: the Greek mu of an OME-TIFF's 'μm' is the micro sign's 'µm')."""
    from_unit, to_unit = normal_unit(from_unit) or from_unit, normal_unit(to_unit) or to_unit
    if from_unit == to_unit:
        return 1.0
    if from_unit not in LENGTH_UNITS_IN_UM or to_unit not in LENGTH_UNITS_IN_UM:
        return None
    return LENGTH_UNITS_IN_UM[from_unit] / LENGTH_UNITS_IN_UM[to_unit]


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
        first_series(tif)  # a file without an image is damaged, not an IndexError
        tags = tif.pages[0].tags
        if "XResolution" not in tags:
            return None
        x_num, x_den = tags["XResolution"].value
        y_num, y_den = tags["YResolution"].value if "YResolution" in tags else (x_num, x_den)
        unit = normal_unit((meta or {}).get("unit"))
        scale = 1.0
        if unit is None and "ResolutionUnit" in tags:
            resolution_unit = int(tags["ResolutionUnit"].value)
            if resolution_unit == 2 and x_den and y_den and x_num / x_den == y_num / y_den == 72.0:
                return None  # 72 dpi: the default of MATLAB, PIL, GIMP and Photoshop; ImageJ reads it as uncalibrated
            scale = {2: 25400.0, 3: 10000.0}.get(resolution_unit, 1.0)  # inch, cm -> um
            unit = "um" if scale != 1.0 else None
        if x_num == 0 or y_num == 0 or (x_num == x_den and y_num == y_den and unit is None):
            return None  # 1 pixel per (no) unit: the default of tifffile and ImageJ, no calibration stored
        z = None
        if meta is not None and not from_folder:
            z = float(meta.get("spacing", 1.0)) * scale * _zunit_scale(meta, unit)
        return (z, y_den / y_num * scale, x_den / x_num * scale), unit


def _zunit_scale(imagej_metadata: Dict[str, Any], unit: Optional[str]) -> float:
    """The factor from ImageJ's ``zunit`` (written when Z is calibrated in another unit than X and Y,
    e.g. Z in micron, X/Y in nm) to ``unit``; 1 when there is none or either is not a length."""
    zunit = normal_unit(imagej_metadata.get("zunit"))
    return (zunit is not None and unit is not None and length_scale(zunit, unit)) or 1.0


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
                scale = length_scale(unit, unit_x)
                if scale is None:
                    raise UserError(f"OME metadata gives {axis} in '{unit}' and X in '{unit_x}', which cannot be "
                                    "converted; pass --z-step, --xy-size and --unit.")
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


def _as_savable(stack: np.ndarray, encode_mask: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                grey_values: bool = False, ome: bool = False):
    """Data for tifffile: bool masks become 0/255 uint8 (shown as a mask in every viewer), or what
    ``encode_mask`` makes of each page, converted page by page so a large mask is never copied whole;
    integer grey values the type that holds them (:func:`tiff_grey_dtype`)."""
    if stack.dtype == bool and encode_mask is not None and len(stack):
        dtype = encode_mask(stack[:1]).dtype
        return (encode_mask(page) for page in stack), dict(shape=stack.shape, dtype=dtype)
    if stack.dtype == bool:
        return (page.view(np.uint8) * np.uint8(255) for page in stack), dict(shape=stack.shape, dtype=np.uint8)
    if stack.dtype == np.float16:  # ImageJ reads no 16-bit floats: written as float32, page by page
        return (page.astype(np.float32) for page in stack), dict(shape=stack.shape, dtype=np.float32)
    if grey_values and np.issubdtype(stack.dtype, np.integer):
        written = tiff_grey_dtype(stack.dtype, ome) or imagej_grey_dtype(stack)
        largest = max(abs(int(stack.min())), abs(int(stack.max()))) if stack.size else 0
        if written == np.float32 and largest > 2**24:
            warnings.warn(f"Grey values up to {largest} are written as float32, exact only up to 2**24 = 16777216: "
                          "larger values are rounded. Write an .ome.tif or .ome.zarr output to keep them exact.",
                          ToolWarning)
        return stack.astype(written, copy=False), {}
    return _as_savable_array(stack), {}


# Integer pixel types an OME-TIFF holds as they are (OME's int8 ... uint32); 64-bit integers it does not.
OME_INTEGER_DTYPES = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32))


def tiff_grey_dtype(dtype, ome: bool = False) -> Optional[np.dtype]:
    """The dtype integer grey values of ``dtype`` are written in a TIFF, where it follows from the dtype:
    an OME-TIFF's own integer types as they are; in an ImageJ TIFF uint8, uint16 and int16 as they are and
    int8 as int16. None where the values decide (:func:`imagej_grey_dtype`: wider integers become uint16,
    int16 or float32)."""
    dtype = np.dtype(dtype)
    if ome and dtype in OME_INTEGER_DTYPES:
        return dtype
    if dtype in (np.uint8, np.uint16, np.int16):
        return dtype
    return np.dtype(np.int16) if dtype == np.int8 else None


def imagej_grey_dtype(stack: np.ndarray) -> np.dtype:
    """The ImageJ pixel type that holds integer grey values exactly: where the dtype decides, its rule
    (:func:`tiff_grey_dtype`: uint8, uint16 and int16 as they are, int8 as int16); for wider integers uint16
    for non-negative values up to 65535, int16 (ImageJ's calibrated signed 16-bit) for values within it, else
    float32 (exact up to 2**24; ImageJ has no 32-bit integers)."""
    by_dtype = tiff_grey_dtype(stack.dtype)
    if by_dtype is not None:
        return by_dtype
    low, high = (int(stack.min()), int(stack.max())) if stack.size else (0, 0)
    if low >= 0 and high <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if np.iinfo(np.int16).min <= low and high <= np.iinfo(np.int16).max:
        return np.dtype(np.int16)
    return np.dtype(np.float32)


def _as_savable_array(stack: np.ndarray) -> np.ndarray:
    if stack.dtype == np.float64:  # ImageJ reads 32-bit floats only
        return stack.astype(np.float32)
    if stack.dtype in (np.int8, np.int16, np.int32, np.int64, np.uint32, np.uint64):
        if stack.size and (stack.min() < 0 or stack.max() > np.iinfo(np.uint16).max):
            raise UserError("ImageJ TIFFs hold label ids 0..65535 only; relabel the stack (e.g. "
                             "skimage.segmentation.relabel_sequential) before saving.")
        return stack.astype(np.uint16)
    return stack


def is_ome_tiff_path(path: PathLike) -> bool:
    """Whether a file name asks for an OME-TIFF (``name.ome.tif`` or ``name.ome.tiff``)."""
    return Path(path).name.lower().endswith((".ome.tif", ".ome.tiff"))


def save_stack(
    path: PathLike,
    stack_dhw: np.ndarray,
    voxel_size_zyx: Sequence[float] = (1.0, 1.0, 1.0),
    unit: str = "um",
    overwrite: bool = False,
    as_slices: bool = False,
    encode_mask: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    grey_values: bool = False,
) -> Path:
    """Write a stack that Fiji/ImageJ and napari open with the right voxel size.

    Parameters
    ----------
    path : str or Path
        Output ``.tif`` file, or with ``as_slices=True`` a folder that receives
        one ``slice_0000.tif`` per Z slice (the seed's format).
    stack_dhw : ndarray, shape (D, H, W)
        bool (written as uint8 0/255, or by ``encode_mask``), label ids (any integer dtype, ids 0..65535,
        written as uint16 unless uint8), float probabilities or grey values (float32; float64 and float16
        are written as float32), or integer grey values with ``grey_values``.
    voxel_size_zyx : (float, float, float)
        Physical voxel size, stored as ImageJ ``spacing`` and X/Y resolution.
    unit : str
        Length unit of ``voxel_size_zyx`` ('um', 'nm', ...).
    overwrite : bool
        Existing files are never replaced unless this is True.
    as_slices : bool
        Write a folder of one TIFF per Z slice instead of one file.
    encode_mask : callable, optional
        How a bool mask's pages are written (``data.MaskValues.encode``: the input mask's own values, uint8,
        uint16 or float32); default 0/255 uint8.
    grey_values : bool
        ``stack_dhw`` holds grey values, not label ids: integers are written in a type that holds them
        (:func:`tiff_grey_dtype`: an OME-TIFF's own integer types as they are; in an ImageJ TIFF an int16
        tomogram stays int16, see :func:`imagej_grey_dtype`), never refused as ids.

    Returns
    -------
    Path written.
    """
    path = Path(path)
    stack_dhw = np.asarray(stack_dhw)
    if stack_dhw.ndim != 3:
        raise UserError(f"save_stack expects a (D, H, W) stack, got shape {stack_dhw.shape}.")
    data, page_kwargs = _as_savable(stack_dhw, encode_mask, grey_values, is_ome_tiff_path(path) and not as_slices)
    z, y, x = (float(v) for v in voxel_size_zyx)
    kwargs = dict(
        imagej=True,
        resolution=(1.0 / x, 1.0 / y),
        metadata={"spacing": z, "unit": _imagej_unit(unit), "axes": "ZYX"},
        compression="zlib",
    )
    if is_ome_tiff_path(path) and not as_slices:  # the name promises OME-XML: Fiji's Bio-Formats, QuPath, OMERO
        ome_unit = "µm" if normal_unit(unit) == "um" else str(unit)
        kwargs.update(imagej=False, ome=True, photometric="minisblack", metadata={
            "axes": "ZYX", **{f"PhysicalSize{axis}": size for axis, size in zip("ZYX", (z, y, x))},
            **{f"PhysicalSize{axis}Unit": ome_unit for axis in "ZYX"}})
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


