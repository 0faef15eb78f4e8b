"""Stacks: the factor rule and simulated anisotropy, and the names users know from earlier versions.

The rest lives in modules with one job each, re-exported here so that ``from data import ...`` keeps
working: ``errors`` (the user errors), ``tiff_io`` (TIFF reading, writing, voxel size), ``stack_io`` (a stack
from a TIFF or an HDF5 file, ``h5_io``), ``kinds`` (the
kind rule, binarisation, label ids, grey values), ``phantoms`` (the built-in samples).

Every stack in this project is a numpy array with axes ``(D, H, W)``: ``D`` is the (anisotropic) Z axis,
``H`` and ``W`` the lateral Y and X axes.
"""
from __future__ import annotations

import math
import warnings
from typing import Tuple

import numpy as np

from errors import DamagedFileError, InputNotFoundError, OutputExistsError, ToolWarning, UserError  # noqa: F401
from kinds import (INTENSITY_FLATNESS, KINDS, LABEL_FLATNESS, MaskValues, as_grey_values, as_label_image,  # noqa: F401
                   as_typed_stack, binarize, decide_kind, decide_kind_and_reason, denormalize_intensity, flatness,
                   grey_dtype, import_binary_tiff_sequence, intensity_range, kind_evidence, normalize_intensity,
                   read_mask_or_labels, read_typed_stack, refuse_non_finite)
from phantoms import make_sample_intensity, make_sample_labels, make_sample_stack  # noqa: F401
from stack_io import (input_exists, other_series, read_calibration, read_stack, read_value_sample,  # noqa: F401
                      stack_dtype, stack_shape)
from tiff_io import (LENGTH_UNITS_IN_UM, TIFF_SUFFIXES, PathLike, StackChoice, choose_stack,  # noqa: F401
                     length_scale, list_tiff_files, natural_sort_key, normal_unit, read_tiff, read_voxel_size, save_stack,
                     writing_to)


# --------------------------------------------------------------------------- #
# Simulating anisotropy
# --------------------------------------------------------------------------- #
# A Z/XY ratio above this is almost always two sizes in different units (nm and um), not a microscope.
MAX_FACTOR = 64


# How a non-integer Z/XY ratio becomes the factor (the setting FACTOR_ROUNDING).
FACTOR_ROUNDINGS = ("isotropic", "nearest")
# A ratio this close to an integer (relative) is that integer: the output Z step is then within 0.5 % of XY.
INTEGER_RATIO_TOLERANCE = 0.005
# Below this ratio a non-integer one is rounded (to 1: converted, or 2): fewer than one slice is missing per step.
SMALLEST_FRACTIONAL_RATIO = 1.5


def factor_from_voxel_size(z_step: float, xy_size: float, minimum: int = 2,
                           rounding: str = "isotropic") -> Tuple[float, float]:
    """The project's one factor rule: how many output Z steps one input Z step becomes.

    Used by ``eval.py`` to simulate and by ``apply.py`` to restore. A ratio
    within 0.5 % of an integer is that integer. Otherwise:

    * ``rounding='isotropic'`` (the default) keeps the ratio itself, for a
      ratio of at least 1.5: the output Z step is exactly the XY pixel size,
      the kept slices fall where they fall on that grid (a kept slice between
      two output slices is restored around, not copied), and training degrades
      by the same non-integer factor.
    * ``rounding='nearest'`` rounds the ratio (halves up): the kept slices stay
      on the output grid, verbatim, and the output Z step is ``z_step / factor``
      (a ratio of 1.57 gives 2: 22 % off isotropic); a warning states it.

    Parameters
    ----------
    z_step, xy_size : float, in one unit
    minimum : int
        The smallest factor accepted: 2 to simulate missing slices (eval.py),
        1 where a stack of factor 1 (isotropic, or a ratio below 1.5) is
        converted instead (apply.py).
    rounding : {'isotropic', 'nearest'}

    Returns
    -------
    factor : int, or float at a non-integer ratio with ``rounding='isotropic'``
    output_z_step : float, ``z_step / factor``

    Raises
    ------
    UserError
        A size that is not positive, a ratio above :data:`MAX_FACTOR` (most
        often sizes in two units), a Z step finer than the pixels, a factor
        below ``minimum``, or an unknown ``rounding``.
    """
    if rounding not in FACTOR_ROUNDINGS:
        raise UserError(f"FACTOR_ROUNDING must be one of {', '.join(FACTOR_ROUNDINGS)}, got '{rounding}'.")
    if not (z_step > 0 and xy_size > 0):
        raise UserError(f"Voxel sizes must be positive, got Z step {z_step} and XY size {xy_size}.")
    ratio = z_step / xy_size
    if ratio > MAX_FACTOR:
        raise UserError(f"The Z step ({z_step:g}) is {ratio:.0f} times the XY pixel size ({xy_size:g}), more than "
                        f"{MAX_FACTOR}: most often the two sizes are in different units (nm and um). Give both "
                        "sizes in one unit (--z-step, --xy-size and --unit).")
    nearest = int(math.floor(ratio + 0.5))
    if nearest < 1:
        raise UserError(f"The Z step ({z_step:g}) is less than half the XY pixel size ({xy_size:g}): nothing is "
                        "missing along Z. Check the voxel size: the Z step comes first (--z-step), and both sizes are "
                        "in one unit (a size typed without --unit is taken in the file's unit: add --unit nm or um).")
    integer = abs(ratio - nearest) <= INTEGER_RATIO_TOLERANCE * ratio
    fractional = not integer and rounding == "isotropic" and ratio >= SMALLEST_FRACTIONAL_RATIO
    factor = ratio if fractional else nearest
    if factor < minimum:
        raise UserError(f"The Z step ({z_step:g}) is only {ratio:.2f} times the XY pixel size ({xy_size:g}), a factor "
                        f"of {factor:g}; it must be at least {minimum} for slices to be missing: the stack is already "
                        "(nearly) isotropic. Check the voxel size (Z_RESOLUTION and XY_RESOLUTION).")
    if not integer and not fractional and factor == 1:
        warnings.warn(f"Z/XY ratio {ratio:.3f} rounds to 1: no slices are added, the output keeps the input's Z step "
                      f"({ratio:.3f} times XY along Z).", ToolWarning, stacklevel=2)
    elif not integer and not fractional:
        warnings.warn(f"Z/XY ratio {ratio:.6g} is not an integer; restoring {factor} slices per input step "
                      f"(FACTOR_ROUNDING nearest): the output Z step is {(z_step / factor) / xy_size:.3f} times the "
                      "XY pixel size.", ToolWarning, stacklevel=2)
    return factor, (xy_size if fractional else z_step / factor)


def resolution_factor(z_resolution: float, xy_resolution: float) -> int:
    """Integer Z/XY factor of ``eval.py``'s resolutions, by :func:`factor_from_voxel_size`'s rule with
    ``rounding='nearest'``: eval.py simulates missing slices by keeping every factor-th slice of an
    isotropic stack, which needs a whole number."""
    return factor_from_voxel_size(z_resolution, xy_resolution, rounding="nearest")[0]


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


def simulate_isotropic_grid(stack_dhw: np.ndarray, step: int, z_step: float, xy_size: float, binary: bool = True
                            ) -> Tuple[np.ndarray, float, np.ndarray]:
    """Keep every ``step``-th slice of a finely sliced stack and put the truth on the isotropic output grid.

    A stack sliced at ``z_step`` with pixels of ``xy_size`` (UroCell: 15 nm and
    16 nm) kept every ``step``-th slice has kept slices ``step * z_step`` apart:
    a Z/XY ratio of ``step * z_step / xy_size`` (7 x 15 / 16 = 6.5625), which
    :func:`factor_from_voxel_size` keeps as the factor of an isotropic output
    (Z step = ``xy_size``). The kept slices are real slices; the truth is
    resampled onto the output grid (:func:`morph.sample_rows`: blended between
    the two slices around each output position, a mask's thresholded at 0.5),
    so that a restore is scored where it puts its voxels.

    Parameters
    ----------
    stack_dhw : ndarray, shape (D, H, W)
    step : int >= 2
    z_step, xy_size : float, in one unit
    binary : bool
        The truth is a mask (True) or grey values.

    Returns
    -------
    sparse_khw : ndarray, shape (K, H, W), the kept slices (same dtype)
    factor : float, the Z/XY ratio of the kept slices (an int where it is one)
    truth_dhw : ndarray, shape (restored_depth(K, factor), H, W): bool, or float32 grey values
    """
    from morph import restored_depth, sample_rows

    sparse, _ = downsample_z(stack_dhw, step)
    factor, _ = factor_from_voxel_size(step * z_step, xy_size)
    depth = restored_depth(len(sparse), factor)
    truth = sample_rows(stack_dhw, np.arange(depth) * (xy_size / z_step), axis=0, binary=binary)
    return sparse, factor, truth
