"""HDF5 stacks in: one 3D dataset of an ``.h5`` file (PlantSeg's and ilastik's segmentations and predictions,
Fiji's HDF5 export), named ``file.h5/key`` or found alone in the file, with its voxel size from the
``element_size_um`` attribute those tools write.

The functions mirror ``tiff_io``'s readers (same names, arguments and returns), so that ``stack_io`` can
pick either by the path. ``h5py`` is imported where a file is opened.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

from errors import DamagedFileError, InputNotFoundError, UserError
from tiff_io import StackChoice, choose_stack, sample_slices

PathLike = Union[str, os.PathLike]
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
# The attribute PlantSeg, ilastik and Fiji's HDF5 plugin give a dataset's voxel size in (Z, Y, X order, um).
VOXEL_ATTRIBUTE = "element_size_um"


def split_hdf5_path(path: PathLike) -> Tuple[Path, Optional[str]]:
    """``file.h5/group/key`` as the file and the dataset's key inside it (None when only the file is named).
    Raises ValueError for a path with no HDF5 file in it (see :func:`is_hdf5_path`)."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if part.lower().endswith(HDF5_SUFFIXES):
            key = "/".join(parts[i + 1:])
            return Path(*parts[:i + 1]), key or None
    raise ValueError(f"'{path}' names no HDF5 file ({', '.join(HDF5_SUFFIXES)}).")


def is_hdf5_path(path: PathLike) -> bool:
    """Whether ``path`` is an HDF5 file, or a dataset inside one (``file.h5/key``)."""
    return any(part.lower().endswith(HDF5_SUFFIXES) for part in Path(path).parts)


def hdf5_exists(path: PathLike) -> bool:
    """Whether the HDF5 file of ``path`` exists (its dataset is checked when the file is opened)."""
    return split_hdf5_path(path)[0].is_file()


def _open(path: PathLike):
    """The open file and the dataset ``path`` names (the file's only 3D-or-more dataset when it names none)."""
    try:
        import h5py
    except ImportError:  # a dependency, but a user's environment may lack it
        raise UserError("Reading HDF5 files needs h5py: pip install h5py (or pip install -r requirements.txt).") \
            from None
    try:
        import hdf5plugin  # noqa: F401  (registers the compression filters of Blosc, Zstd, ... where installed)
    except ImportError:
        pass
    file_path, key = split_hdf5_path(path)
    if not file_path.is_file():
        raise InputNotFoundError(f"Input '{file_path}' does not exist.")
    if not os.access(file_path, os.R_OK):  # h5py reports it as an unreadable (damaged-looking) file
        raise UserError(f"'{file_path}' cannot be read: permission denied. Check the file's permissions (ls -l), "
                        "or copy it somewhere you can read.")
    try:
        handle = h5py.File(file_path, "r")
    except OSError as error:
        raise DamagedFileError.of(file_path, "HDF5 file", str(error)) from None
    try:
        return handle, _dataset(handle, file_path, key)
    except BaseException:  # no handle is left open behind an error
        handle.close()
        raise


def _dataset(handle, file_path: Path, key: Optional[str]):
    """The dataset ``key`` of an open file, or its one dataset of 3 or more axes when ``key`` is None."""
    import h5py

    if key is None:
        found: List[str] = []
        handle.visititems(lambda name, node: found.append(name) if isinstance(node, h5py.Dataset) and node.ndim >= 3
                          else None)
        if len(found) != 1:
            listed = ", ".join(found[:8]) + (" ..." if len(found) > 8 else "") if found else "none"
            raise UserError(f"'{file_path}' holds {len(found)} datasets of 3 or more axes ({listed}): name the one "
                            f"to restore, e.g. --input {file_path}/{found[0] if found else 'KEY'}.")
        key = found[0]
    node = handle.get(key)
    if not isinstance(node, h5py.Dataset):
        raise UserError(f"'{file_path}' has no dataset '{key}'; its datasets: {', '.join(_datasets(file_path))}.")
    return node


def _datasets(file_path: Path) -> List[str]:
    import h5py

    with h5py.File(file_path, "r") as handle:
        names: List[str] = []
        handle.visititems(lambda name, node: names.append(name) if isinstance(node, h5py.Dataset) else None)
    return names


def _index(path: PathLike, shape: Tuple[int, ...], choice: StackChoice, axes: Optional[str] = None) -> tuple:
    """The index of the dataset's stack (:func:`tiff_io.choose_stack` by its axes, :func:`_axes`). A dataset whose
    axes are not named has three axes longer than 1, Z, Y and X in order, and every other axis of length 1
    wherever it is (a one-channel prediction in front, as PlantSeg writes it, or behind), or one more axis at
    either end, the shorter: its channels (PlantSeg's (C, Z, Y, X) predictions, ilastik's (Z, Y, X, C))."""
    if axes is None:
        axes = _unnamed_axes(path, shape)
    if [letter for letter in axes if letter in "ZYX"] != list("ZYX"):
        raise UserError(f"'{path}' names its axes {axes.lower()} (ilastik's axistags); only datasets stored with Z "
                        "before Y before X are read. Export it again in zyx order (ilastik: Export Settings > axis "
                        "order), or transpose it (numpy.transpose) into a dataset of its own.")
    index = choose_stack(axes, tuple(shape), choice, str(path))
    # Axes of length 1 that are neither chosen from nor Z, Y, X (a prediction's one class) are dropped.
    return tuple(0 if isinstance(i, slice) and size == 1 and letter not in "ZYX" else i
                 for i, size, letter in zip(index, shape, axes))


def _unnamed_axes(path: PathLike, shape: Tuple[int, ...]) -> str:
    """The axes :func:`_index` assumes where none are named: Z, Y, X for the three axes longer than 1 and, of four
    such axes at the start or the end of ``shape``, C for the shorter end one; Q for every axis of length 1."""
    long_axes = [i for i, size in enumerate(shape) if size > 1]
    at_an_end = long_axes in (list(range(4)), list(range(len(shape) - 4, len(shape))))
    if len(long_axes) == 4 and at_an_end:
        first, last = long_axes[0], long_axes[-1]
        channel = first if shape[first] < shape[last] else last
    elif len(long_axes) == 3:
        channel = None
    else:
        raise UserError(f"'{path}' holds a dataset of shape {tuple(shape)}; expected a 3D stack (Z, Y, X), other "
                        "axes of length 1 or one axis of channels: write one channel or time point as its own dataset "
                        "first.")
    letters = iter("ZYX")
    return "".join("C" if i == channel else next(letters) if size > 1 else "Q" for i, size in enumerate(shape))


def _axes(node) -> Optional[str]:
    """The axes ilastik names in its ``axistags`` attribute (``'ZYXC'``), or None: most HDF5 datasets name none."""
    tags = node.attrs.get("axistags")
    if tags is None:
        return None
    try:
        keys = [axis["key"] for axis in json.loads(tags if isinstance(tags, str) else tags.decode())["axes"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    letters = "".join(str(key).upper()[:1] for key in keys)
    return letters if len(letters) == node.ndim and {"Z", "Y", "X"} <= set(letters) else None


def _read(node, index: tuple, path: PathLike) -> np.ndarray:
    """``node[index]`` in native byte order; a compression filter this installation lacks is one clear error."""
    try:
        values = np.asarray(node[index])
    except OSError as error:
        raise UserError(f"'{path}' cannot be decoded here ({error}): it is compressed with a filter HDF5 lacks; "
                        "pip install hdf5plugin, then run again.") from None
    return values.astype(values.dtype.newbyteorder("="), copy=False)


def stack_shape(path: PathLike, choice: StackChoice = StackChoice()) -> Tuple[int, ...]:
    """The dataset's (Z, Y, X) shape, from its metadata."""
    handle, node = _open(path)
    with handle:
        index = _index(path, node.shape, choice, _axes(node))
        return tuple(size for i, size in zip(index, node.shape) if isinstance(i, slice))


def stack_dtype(path: PathLike) -> np.dtype:
    """The dataset's dtype, in native byte order (as it is read)."""
    handle, node = _open(path)
    with handle:
        return np.dtype(node.dtype).newbyteorder("=")


def read_stack(path: PathLike, choice: StackChoice = StackChoice()) -> np.ndarray:
    """The whole dataset ``(D, H, W)``, stored values and dtype (native byte order)."""
    handle, node = _open(path)
    with handle:
        stack = _read(node, _index(path, node.shape, choice, _axes(node)), path)
    if stack.shape[0] < 2:
        raise UserError(f"'{path}' holds a dataset of shape {stack.shape}; a stack needs at least two slices.")
    return stack


def read_value_sample(path: PathLike, max_slices: int = 8, choice: StackChoice = StackChoice()) -> np.ndarray:
    """At most ``max_slices`` evenly spaced slices, read without the rest (``tiff_io.read_value_sample``)."""
    handle, node = _open(path)
    with handle:
        index = _index(path, node.shape, choice, _axes(node))
        z_axis = next(axis for axis, i in enumerate(index) if isinstance(i, slice))
        depth = node.shape[z_axis]
        slices = sample_slices(depth, max_slices)
        return np.stack([_read(node, index[:z_axis] + (int(z),) + index[z_axis + 1:], path) for z in slices])


def read_calibration(path: PathLike) -> Optional[Tuple[Tuple[Optional[float], float, float], Optional[str]]]:
    """Voxel size ``(z, y, x)`` in um from the dataset's ``element_size_um`` (its last three values), or None
    when it has none or none that reads as three sizes."""
    handle, node = _open(path)
    with handle:
        sizes = node.attrs.get(VOXEL_ATTRIBUTE)
    try:
        values = np.atleast_1d(np.asarray(sizes, dtype=float)).ravel()
    except (TypeError, ValueError):
        return None
    if sizes is None or values.size < 3:
        return None
    z, y, x = (float(v) for v in values[-3:])
    return (z, y, x), "um"


def other_series(path: PathLike) -> List[Tuple[int, ...]]:
    """An HDF5 dataset is one image: nothing beside it is read (``tiff_io.other_series``)."""
    return []
