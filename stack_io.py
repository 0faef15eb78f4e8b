"""A stack read from a file, whatever its format: a TIFF (a multipage file or a folder of slices, ``tiff_io``), an
HDF5 dataset (``h5_io``) or an MRC file (``mrc_io``), chosen by the path. OME-Zarr images are read window by
window by ``zarr_io``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

import h5_io
import mrc_io
import tiff_io
from errors import InputNotFoundError
from tiff_io import PathLike, StackChoice


def _reader(path: PathLike):
    """The module that reads ``path``; a missing input or a file of any other format is one error here, before
    anything is opened (a missing file is not reported as a damaged one)."""
    if not input_exists(path):
        raise InputNotFoundError(f"Input '{path}' does not exist.")
    if h5_io.is_hdf5_path(path):
        return h5_io
    if mrc_io.is_mrc_path(path):
        return mrc_io
    if os.path.exists(path):
        tiff_io.refuse_other_formats(Path(path))
    return tiff_io


def read_stack(path: PathLike, choice: StackChoice = StackChoice()) -> np.ndarray:
    """The stack ``(D, H, W)`` as stored (``tiff_io.read_stack``, ``h5_io.read_stack``)."""
    return _reader(path).read_stack(path, choice)


def stack_shape(path: PathLike, choice: StackChoice = StackChoice()) -> Tuple[int, ...]:
    """The stack's (Z, Y, X) shape from the file's metadata."""
    return _reader(path).stack_shape(path, choice)


def stack_dtype(path: PathLike) -> np.dtype:
    """The stack's dtype from the file's metadata."""
    return _reader(path).stack_dtype(path)


def read_value_sample(path: PathLike, max_slices: int = 8, choice: StackChoice = StackChoice()) -> np.ndarray:
    """At most ``max_slices`` evenly spaced slices ``(n, H, W)``, read without the rest."""
    return _reader(path).read_value_sample(path, max_slices, choice)


def read_calibration(path: PathLike) -> Optional[Tuple[Tuple[Optional[float], float, float], Optional[str]]]:
    """Voxel size ``(z, y, x)`` and unit from the file's metadata, or None."""
    return _reader(path).read_calibration(path)


def other_series(path: PathLike) -> List[Tuple[int, ...]]:
    """Shapes of the images the file holds beyond the one read."""
    return _reader(path).other_series(path)


def input_exists(path: PathLike) -> bool:
    """Whether the input exists: the file (or folder), or for ``file.h5/key`` the HDF5 file."""
    return h5_io.hdf5_exists(path) if h5_io.is_hdf5_path(path) else os.path.exists(path)
