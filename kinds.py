"""Kinds of stack (masks, label images, grey-scale intensities): the one kind rule, binarisation, label
ids and the normalisation of grey values. Masks are ``bool``; label images are unsigned integers with
0 = background."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from errors import ToolWarning, UserError
from stack_io import read_stack
from tiff_io import PathLike, StackChoice


def binarize(stack: np.ndarray, threshold: Optional[float] = None, source: str = "input") -> np.ndarray:
    """Convert a stack to ``bool`` by a documented rule.

    Rule: with ``threshold=None`` every non-zero voxel is foreground, but of two
    values neither of them 0 (a two-class segmentation: ilastik's 1/2) the larger
    is; otherwise voxels strictly greater than ``threshold`` are. A ``UserWarning``
    says which rule was applied when the stack has more than two distinct values.
    """
    if stack.dtype == bool:
        return stack
    values = np.unique(stack) if stack.size <= 50_000_000 else np.unique(stack[:: max(1, stack.shape[0] // 16)])
    if threshold is None and two_class_values(values) is not None:
        return stack > values[0]
    if threshold is None:
        if len(values) > 2:
            warnings.warn(
                f"{source} is not binary ({len(values)} distinct values, range {values.min()}..{values.max()}); "
                "binarized as foreground = value != 0. Pass a threshold to use another cut "
                "(label images: use apply.py --labels to keep object ids).",
                ToolWarning,
                stacklevel=2,
            )
        return stack != 0
    if len(values) > 2:
        warnings.warn(f"{source} is not binary; binarized as foreground = value > {threshold}.", ToolWarning,
                      stacklevel=2)
    return stack > threshold


def two_class_values(values: np.ndarray) -> Optional[Tuple[float, float]]:
    """``(background, foreground)`` of a two-class segmentation (ilastik's Simple Segmentation writes 1/2):
    exactly two values, neither of them 0 (``values`` sorted and distinct, as ``np.unique`` gives them); the
    larger is the foreground. None for anything else."""
    if len(values) == 2 and values[0] > 0:
        return values[0], values[1]
    return None


@dataclass(frozen=True)
class MaskValues:
    """The two values a restored mask is written in: the input mask's own, so that 0/1 comes back 0/1,
    0/255 comes back 0/255 and a two-class segmentation's 1/2 comes back 1/2 (the kept slices verbatim), in
    a type every output holds (uint8, uint16 or float32). The default, 0/255 uint8, is ImageJ's binary mask:
    what a mask binarised from other values (a threshold, a label image given as a mask) is written in.
    """
    foreground: float = 255
    dtype: str = "uint8"
    background: float = 0

    @classmethod
    def of(cls, sample: np.ndarray) -> "MaskValues":
        """The values of a mask whose ``sample`` (any shape, its stored dtype) holds 0 and one other value, or
        two values neither of them 0 (:func:`two_class_values`); 0/1 uint8 for a bool sample; the default,
        0/255, for any other."""
        if sample.dtype == bool:  # a 1-bit TIFF (MATLAB's logical), a bool store: 0/1
            return cls(1, "uint8")
        values = np.unique(sample)
        two_class = two_class_values(values)
        if two_class is not None:
            background, foreground = two_class
        elif len(values) in (1, 2) and values[0] == 0 and values[-1] > 0:
            background, foreground = 0, values[-1]
        else:
            return cls()
        if not np.issubdtype(sample.dtype, np.integer):
            exact = all(float(np.float32(v)) == float(v) for v in (background, foreground))
            return cls(float(foreground), "float32", float(background)) if exact else cls()
        if foreground <= np.iinfo(np.uint8).max:
            return cls(int(foreground), "uint8" if sample.dtype.itemsize == 1 else "uint16", int(background))
        return cls(int(foreground), "uint16", int(background)) if foreground <= np.iinfo(np.uint16).max else cls()

    def encode(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` (bool, or non-zero = foreground) as ``background`` / ``foreground`` of ``dtype``."""
        out = np.asarray(mask).astype(bool, copy=False).astype(self.dtype)
        if self.background != 0:
            return np.where(out, np.array(self.foreground, self.dtype), np.array(self.background, self.dtype))
        if self.foreground != 1:
            out *= np.array(self.foreground, dtype=self.dtype)
        return out

    def describe(self) -> str:
        """``0/1 uint8`` for the plan."""
        return f"{self.background:g}/{self.foreground:g} {self.dtype}"


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
# Kinds of stack: masks, label images, grey-scale intensities
# --------------------------------------------------------------------------- #
KINDS = ("auto", "mask", "labels", "intensity")


# The kind rule's evidence: in a label image almost every pair of neighbouring object pixels holds the same
# id (values change only at object borders); in a microscope image noise and texture make most of them differ.
LABEL_FLATNESS = 0.8  # at least this fraction of equal neighbour pairs: a label image
INTENSITY_FLATNESS = 0.5  # at most this fraction: a grey-scale image; in between the rule asks for --kind
# ... and its objects are regions: almost every object pixel has a lateral neighbour of its own id. The photon
# counts of a very dim image are isolated pixels of small values, whose few neighbour pairs are mostly equal
# (1 beside 1): piecewise constant by the measure above, but no objects.
LABEL_REGION_SHARE = 0.5  # below this fraction of object pixels beside their own value: not a label image


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


def region_share(sample: np.ndarray) -> float:
    """Fraction of the non-zero pixels that have a lateral (4-connected, in their own slice) neighbour of the
    same value: about 1 for the objects of a label image, small for isolated pixels (photon counts of a dim
    image, single-pixel detections). 1.0 when no pixel is non-zero.

    Parameters
    ----------
    sample : ndarray, shape (..., H, W)
    """
    sample = np.asarray(sample)
    beside_own = np.zeros(sample.shape, dtype=bool)
    for axis in (-1, -2):
        length = sample.shape[axis]
        first = np.take(sample, np.arange(length - 1), axis=axis)
        second = np.take(sample, np.arange(1, length), axis=axis)
        same = (first != 0) & (first == second)
        index = [slice(None)] * sample.ndim
        index[axis] = slice(0, length - 1)
        beside_own[tuple(index)] |= same
        index[axis] = slice(1, length)
        beside_own[tuple(index)] |= same
    objects = int(np.count_nonzero(sample))
    return int(beside_own.sum()) / objects if objects else 1.0


def kind_evidence(sample: np.ndarray) -> Tuple[Optional[str], str]:
    """The kind a person would read from a sample of a stack's values, and why.

    Rule, in order: a bool stack or at most two values, one of them 0 (0/1,
    0/255), or two positive integers (a two-class segmentation, ilastik's 1/2)
    -> 'mask'; a single value other than 0, non-integer values or negative
    values -> 'intensity'; an integer stack whose object pixels are piecewise
    constant (:func:`flatness` >= ``LABEL_FLATNESS``) and form regions
    (:func:`region_share` >= ``LABEL_REGION_SHARE``) -> 'labels'; one with
    noise or texture (<= ``INTENSITY_FLATNESS``) -> 'intensity'; in between,
    or piecewise constant without regions, ``None`` (the evidence is ambiguous).

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
    if two_class_values(values) is not None and np.array_equal(values, np.round(values)):
        return "mask", (f"two values, {values[0]:g}/{values[1]:g}: a two-class segmentation, {values[1]:g} the "
                        "foreground")
    if len(values) == 1:
        return "intensity", f"one value ({values[0]:g}) other than 0"
    if not np.issubdtype(sample.dtype, np.integer) and not np.array_equal(values, np.round(values)):
        return "intensity", "non-integer values"
    if values[0] < 0:
        return "intensity", "negative values"
    share = flatness(sample)
    regions = region_share(sample) if share >= LABEL_FLATNESS else 1.0  # asked only of what looks like labels
    if regions < LABEL_REGION_SHARE:
        return None, (f"most non-zero pixels are isolated: only {regions:.0%} lie beside a pixel of their own value, "
                      "where a label image's objects are regions (photon counts of a dim image, or single-pixel "
                      "detections?)")
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
                     label_dtype=np.uint16, choice: StackChoice = StackChoice()
                     ) -> Tuple[str, np.ndarray, Optional[np.ndarray]]:
    """Read a stack (``choice``: the channel and time point of a file that holds several,
    :func:`tiff_io.choose_stack`) and decide its kind (see :func:`decide_kind`).

    Returns
    -------
    kind : {'mask', 'labels', 'intensity'}
    stack_dhw : ndarray, shape (D, H, W)
        bool foreground for masks and label images, the stored values for intensities
    labels_dhw : ndarray of ``label_dtype`` or None (label images only; ``label_dtype`` None:
        the smallest unsigned type that holds the ids, see :func:`as_label_image`)
    """
    raw = read_stack(path, choice)
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
    refuse_non_finite(raw, source)
    if kind == "intensity":
        return raw, None
    if kind == "labels":
        return as_label_image(raw, source, label_dtype)
    return binarize(raw, threshold, source=f"'{source}'"), None


def refuse_non_finite(values: np.ndarray, source: PathLike) -> None:
    """One error, before any training, for NaN or infinite values (the padding a registration or a
    drift correction leaves, a division by zero): they spread through the network's normalisation and its
    every output. Integer and bool values pass without a look."""
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating):
        return
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise UserError(f"'{source}' holds {bad} NaN or infinite values ({bad / values.size:.2%} of those read); the "
                        "network cannot learn from or restore them. Replace them with a number first (in Fiji: "
                        "Process > Math > Remove NaNs, or Process > Math > Set; in Python: numpy.nan_to_num).")


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


def denormalize_intensity(values: np.ndarray, value_range: Tuple[float, float], dtype,
                          in_place: bool = False) -> np.ndarray:
    """Back from the network's scale to grey values of ``dtype`` (see :func:`as_grey_values`). ``in_place``
    reuses a float32 ``values`` (then changed) for the arithmetic, so that a restored volume is not held
    three or four times over (one float32 copy and the written array at most)."""
    lo, hi = value_range
    owned = in_place and isinstance(values, np.ndarray) and values.dtype == np.float32
    out = values if owned else np.array(values, dtype=np.float32)
    out *= np.float32(hi - lo)
    out += np.float32(lo)
    return _round_to_grey_values(out, dtype)


def grey_dtype(dtype, written: str = "input") -> np.dtype:
    """The dtype grey values of ``dtype`` are written in: with ``written='input'`` (``GREY_DTYPE``) an
    integer dtype itself, float32 for float dtypes of 32 bits or fewer (float16 is not an ImageJ type),
    wider floats themselves; with ``written='float32'``, float32."""
    if written == "float32":
        return np.dtype(np.float32)
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer) or dtype.itemsize > 4:
        return dtype
    return np.dtype(np.float32)


def as_grey_values(values: np.ndarray, dtype) -> np.ndarray:
    """Float grey values as :func:`grey_dtype` of ``dtype``: rounded and clipped to the range
    of an integer dtype (never wrapped around)."""
    values = np.asarray(values)
    if np.issubdtype(grey_dtype(dtype), np.integer):  # rounded on a float copy: the input is left alone
        values = np.array(values, dtype=np.result_type(values.dtype, np.float32))
    return _round_to_grey_values(values, dtype)


def _round_to_grey_values(values: np.ndarray, dtype) -> np.ndarray:
    """:func:`as_grey_values` of a float array this module owns, rounded and clipped in place (no temporaries)."""
    dtype = grey_dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        np.rint(values, out=values)
        np.clip(values, info.min, info.max, out=values)
        return values.astype(dtype)
    return values.astype(dtype, copy=False)
