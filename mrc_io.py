"""MRC stacks in: the volume EM format (FIB-SEM and serial-section stacks, tomograms, IMOD segmentations;
``.mrc``, ``.mrcs``, ``.rec``, ``.st``, ``.ali``, ``.map``), its voxel size from the header (Angstrom, given in nm).

The functions mirror ``tiff_io``'s readers (same names, arguments and returns), so that ``stack_io`` can
pick either by the path. The file is memory-mapped: a sample of slices reads only those slices.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

from errors import DamagedFileError, InputNotFoundError, UserError
from tiff_io import StackChoice, choose_stack, sample_slices

PathLike = Union[str, os.PathLike]
MRC_SUFFIXES = (".mrc", ".rec", ".st", ".ali", ".map", ".mrcs")
# IMOD marks mode-0 (8-bit) data as unsigned with this stamp and bit 0 of its flags; mrcfile reads int8 anyway.
IMOD_STAMP = 1146047817


def is_mrc_path(path: PathLike) -> bool:
    """Whether ``path`` names an MRC file by its suffix."""
    return Path(path).suffix.lower() in MRC_SUFFIXES


def _open(path: PathLike):
    """The memory-mapped file (read-only); one clear error when it is missing or not an MRC file."""
    try:
        import mrcfile
    except ImportError:  # a dependency, but a user's environment may lack it
        raise UserError("Reading MRC files needs mrcfile: pip install mrcfile (or pip install -r "
                        "requirements.txt).") from None
    if not Path(path).is_file():
        raise InputNotFoundError(f"Input '{path}' does not exist.")
    try:
        return mrcfile.mmap(str(path), mode="r", permissive=False)
    except (ValueError, OSError) as error:
        raise DamagedFileError.of(path, "MRC file", str(error)) from None


def _volume(path: PathLike, handle, choice: StackChoice) -> np.ndarray:
    """The file's data as a (Z, Y, X) volume (a memory map; 8-bit data IMOD marks unsigned as uint8): an image
    stack of one slice or more than three axes is refused, and an MRC file has no channels to choose from."""
    data = handle.data
    if data is None or data.ndim != 3:
        shape = None if data is None else data.shape
        raise UserError(f"'{path}' holds data of shape {shape}; expected a 3D stack (Z, Y, X).")
    choose_stack("ZYX", data.shape, choice, str(path))
    if data.dtype == np.int8 and _imod_unsigned(handle.header):
        return data.view(np.uint8)
    return data


def _imod_unsigned(header) -> bool:
    """Whether IMOD marked the 8-bit data unsigned: its stamp and flags, header bytes 152-159 (inside the
    ``extra2`` field, which starts at byte 112), in the header's byte order."""
    stamp, flags = np.frombuffer(np.asarray(header.extra2).tobytes()[40:48], dtype=header.nx.dtype)
    return int(stamp) == IMOD_STAMP and bool(int(flags) & 1)


def _native(values: np.ndarray) -> np.ndarray:
    """``values`` in native byte order (MRC files may be big-endian)."""
    return values.astype(values.dtype.newbyteorder("="), copy=False)


def stack_shape(path: PathLike, choice: StackChoice = StackChoice()) -> Tuple[int, ...]:
    """The stack's (Z, Y, X) shape, from the header."""
    with _open(path) as handle:
        return tuple(_volume(path, handle, choice).shape)


def stack_dtype(path: PathLike) -> np.dtype:
    """The stack's dtype as it is read (native byte order; IMOD's unsigned 8-bit as uint8)."""
    with _open(path) as handle:
        return np.dtype(_volume(path, handle, StackChoice()).dtype).newbyteorder("=")


def read_stack(path: PathLike, choice: StackChoice = StackChoice()) -> np.ndarray:
    """The whole stack ``(D, H, W)``, stored values and dtype (native byte order)."""
    with _open(path) as handle:
        stack = _native(np.array(_volume(path, handle, choice)))
    if stack.shape[0] < 2:
        raise UserError(f"'{path}' holds a stack of shape {stack.shape}; a stack needs at least two slices.")
    return stack


def read_value_sample(path: PathLike, max_slices: int = 8, choice: StackChoice = StackChoice()) -> np.ndarray:
    """At most ``max_slices`` evenly spaced slices, read without the rest (``tiff_io.read_value_sample``)."""
    with _open(path) as handle:
        volume = _volume(path, handle, choice)
        slices = sample_slices(volume.shape[0], max_slices)
        return _native(np.array(volume[slices]))


def read_calibration(path: PathLike) -> Optional[Tuple[Tuple[Optional[float], float, float], Optional[str]]]:
    """Voxel size ``(z, y, x)`` in nm from the header (stored in Angstrom); None where the pixel size is unset
    (0), and Z None where only it is (``--z-step`` then gives it)."""
    with _open(path) as handle:
        size = handle.voxel_size
        z, y, x = float(size.z), float(size.y), float(size.x)
    if min(y, x) <= 0:
        return None
    return (z / 10.0 if z > 0 else None, y / 10.0, x / 10.0), "nm"


def other_series(path: PathLike) -> List[Tuple[int, ...]]:
    """An MRC file holds one stack: nothing beside it is read (``tiff_io.other_series``)."""
    return []
