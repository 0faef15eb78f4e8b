"""Label ids of the restored voxels, from the ids of the kept slices: the two rules of label images.

* Sparse label images (objects on background: nuclei, mitochondria, vesicles), :func:`assign_labels`: the
  network restores the foreground, and each restored voxel takes the id of the nearest labelled voxel of the
  two kept slices around it, among the ids its own restored object touches.
* Dense label images (:func:`is_dense_label_image`: ids on most voxels, or ids that mostly touch each other: a
  connectomics or tissue segmentation, a tissue in an organ on a 0 background),
  :func:`grow_labels`: the network restores the boundaries between ids (``morph.label_boundaries``), and the
  kept slices' ids grow between them, gap by gap, a seeded watershed on the boundary probabilities blended with
  per-label shape-based interpolation's interfaces (:func:`shape_based_interfaces`).

Both guarantee that ids come only from the kept slices and that the kept slices come back verbatim; both work
on a lateral window as on the whole stack, so the block-wise restore (``blocks.py``) gives the in-memory
result. No network code here: numpy, SciPy and scikit-image (``restore.py`` runs the network, and calls these).
"""
from __future__ import annotations

import functools
import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from morph import ON_GRID_TOLERANCE, bracket, fill_label_gap, kept_positions, label_boundaries, slices_on_grid
from settings import Inference


def assign_labels(foreground_dhw: np.ndarray, sparse_labels_khw: np.ndarray, factor: float,
                  progress: bool = True, offset: float = 0.0) -> np.ndarray:
    """Give every restored foreground voxel the id of the nearest labelled voxel of
    the two neighbouring kept slices, among the ids its own restored object touches.

    Each restored slice is split into connected foreground components (2D,
    4-connected). A component can take only the ids whose labelled voxels it
    overlaps (in XY) in the kept slices that bracket it; each voxel takes the
    nearest voxel of those ids (3D distance, Z step = ``factor`` voxels). A
    component that overlaps no label takes the nearest id of all.

    Guaranteed: ids only come from the kept slices; kept slices keep their ids
    verbatim; a voxel never takes the id of an object that its own restored
    component does not touch, so where object A's restored region moves away
    from a touching object B, B cannot lend A's voxels its id. Where A and B
    share one restored component, the boundary between them is the midway
    surface between their labelled voxels. An object seen in a single kept
    slice can shrink away with the foreground.

    Parameters
    ----------
    foreground_dhw : ndarray of bool, shape (D, H, W)
    sparse_labels_khw : ndarray of uint, shape (K, H, W), 0 = background
    factor : float
    progress : bool
        Show a tqdm bar over the slices.
    offset : float, in (-factor, 0]
        Output position of kept slice 0: a slab of the output (``blocks``'
        label pass) starts at the first output slice after it.

    Returns
    -------
    labels_dhw : ndarray, dtype of ``sparse_labels_khw``, shape (D, H, W)
    """
    from scipy import ndimage

    if sparse_labels_khw.size and int(sparse_labels_khw.max()) > np.iinfo(np.int32).max:
        # Ids beyond 32 bits (connectomics' uint64 ids): the search below compares ids through int64 keys and
        # float64 promotions, exact only for smaller ids, so it runs on the ids renumbered 1..n (0 stays 0).
        known = np.union1d(np.zeros(1, sparse_labels_khw.dtype), sparse_labels_khw)
        compact = np.searchsorted(known, sparse_labels_khw).astype(np.uint32)
        return known[assign_labels(foreground_dhw, compact, factor, progress, offset)]
    depth = foreground_dhw.shape[0]
    positions = kept_positions(len(sparse_labels_khw), factor) + offset
    lower, upper, _ = bracket(positions, depth)
    out = np.zeros(foreground_dhw.shape, dtype=sparse_labels_khw.dtype)

    @functools.lru_cache(maxsize=2)  # slices are visited in order: two kept slices suffice
    def nearest_label(k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Label of, and squared distance to, the nearest labelled pixel of kept slice k."""
        labels_hw = sparse_labels_khw[k]
        if not labels_hw.any():
            return np.zeros_like(labels_hw), np.full(labels_hw.shape, np.inf, np.float32)
        distance, (iy, ix) = ndimage.distance_transform_edt(labels_hw == 0, return_indices=True)
        return labels_hw[iy, ix], (distance**2).astype(np.float32)

    for z in tqdm(range(depth), desc="Assigning label ids", unit="slice", leave=False, disable=not progress):
        foreground = foreground_dhw[z]
        if not foreground.any():
            continue
        sides = [(sparse_labels_khw[k], float(z - positions[k]) ** 2) for k in (int(lower[z]), int(upper[z]))]
        (label_a, dist_a), (label_b, dist_b) = nearest_label(int(lower[z])), nearest_label(int(upper[z]))
        nearest = np.where(dist_a + sides[0][1] <= dist_b + sides[1][1], label_a, label_b)
        components, _ = ndimage.label(foreground)
        touched = _touched_ids(components, [labels_hw for labels_hw, _ in sides])
        stray = foreground & ~_allowed(components, nearest, touched)
        for component in np.unique(components[stray]):
            voxels = stray & (components == component)
            nearest[voxels] = _nearest_of_ids(voxels, touched[component], sides)
        out[z] = np.where(foreground, nearest, 0)
    kept, on_grid = slices_on_grid(len(sparse_labels_khw), factor, depth, offset)
    out[on_grid] = sparse_labels_khw[kept]
    return out


def _touched_ids(components: np.ndarray, kept_labels: Sequence[np.ndarray]) -> Dict[int, np.ndarray]:
    """For each restored component, the ids it overlaps in the kept slices (components touching none are absent)."""
    pairs = [np.stack([components[both], labels_hw[both].astype(np.int64)], axis=1)
             for labels_hw in kept_labels for both in [(components > 0) & (labels_hw > 0)]]
    pairs = np.unique(np.concatenate(pairs), axis=0)
    return {int(c): pairs[pairs[:, 0] == c, 1] for c in np.unique(pairs[:, 0])}


def _allowed(components: np.ndarray, ids: np.ndarray, touched: Dict[int, np.ndarray]) -> np.ndarray:
    """True where a voxel's id is one its component touches, or its component touches none."""
    keys = components.astype(np.int64) * (int(ids.max()) + 1) + ids
    allowed_keys = [c * (int(ids.max()) + 1) + i for c, touched_ids in touched.items() for i in touched_ids]
    return np.isin(keys, allowed_keys) | ~np.isin(components, list(touched))


def _nearest_of_ids(voxels: np.ndarray, ids: np.ndarray, sides: Sequence[Tuple[np.ndarray, float]]) -> np.ndarray:
    """Ids of the nearest voxel (3D, over both bracketing kept slices) carrying one of ``ids``,
    for the pixels of ``voxels``. ``sides`` holds each kept slice's labels and its squared Z distance."""
    from scipy import ndimage

    best_id, best_d2 = None, None
    for labels_hw, dz2 in sides:
        source = np.isin(labels_hw, ids)
        if not source.any():
            continue
        distance, (iy, ix) = ndimage.distance_transform_edt(~source, return_indices=True)
        d2, found = distance[voxels] ** 2 + dz2, labels_hw[iy, ix][voxels]
        if best_id is None:
            best_id, best_d2 = found, d2
        else:
            best_id = np.where(d2 < best_d2, found, best_id)
            best_d2 = np.minimum(d2, best_d2)
    return best_id


# A label image whose ids cover at least this fraction of the voxels is dense (neurons of a connectomics
# segmentation, cells of a tissue): its ids are restored from the boundaries between them, not from a foreground.
DENSE_LABEL_FRACTION = 0.5
# Ids whose outlines lie mostly against other ids are packed (cells of a tissue), whatever the background around
# them: an organ's cells on a 0 background fill a third of a stack and share 90 % of their outline pixels.
PACKED_OUTLINE_SHARE = 0.5


def touching_share(labels_khw: np.ndarray) -> float:
    """The share of the ids' in-plane outline that lies against another id (not 0): over every pair of
    in-plane neighbours with two different values, the sides that hold an id, and of those the ones whose
    neighbour is an id too. 0 for objects on background, 1 for a tessellation without 0; 0 without outline."""
    outline = touching = 0
    for a, b in ((labels_khw[..., :-1, :], labels_khw[..., 1:, :]), (labels_khw[..., :-1], labels_khw[..., 1:])):
        differ = a != b
        a_id, b_id = differ & (a != 0), differ & (b != 0)
        outline += np.count_nonzero(a_id) + np.count_nonzero(b_id)
        touching += 2 * np.count_nonzero(a_id & b_id)
    return touching / outline if outline else 0.0


def is_dense_label_image(labels_khw: np.ndarray) -> bool:
    """Whether a label image is restored by the dense rule (:func:`grow_labels`): its ids cover at least
    :data:`DENSE_LABEL_FRACTION` of the voxels, or at least :data:`PACKED_OUTLINE_SHARE` of their outline lies
    against other ids (:func:`touching_share`: cells packed in a tissue, with background around them)."""
    return bool(np.count_nonzero(labels_khw) >= DENSE_LABEL_FRACTION * labels_khw.size
                or touching_share(labels_khw) >= PACKED_OUTLINE_SHARE)


# Ties between equal boundary probabilities are broken by a position hash of this size: far below one uint8
# level (1/255) or a float16 step, so it only orders voxels that are equal.
TIE_BREAK = 1e-9


# The interfaces of per-label shape-based interpolation enter the ids' elevation smoothed by a Gaussian of this
# many voxels (in Z and in-plane), so that they pull the watershed towards them over a voxel or two.
SHAPE_PRIOR_SIGMA = 1.0
# Distances beyond this many pixels do not count in those interfaces (morph.fill_label_gap's cap), so that they
# are local: a block's window with a halo wider than this (plus the smoothing) gives the whole slices' interfaces.
SHAPE_PRIOR_CAP = 16.0


# Where the restored boundary is sure, a voxel becomes 0 if the kept slices' boundaries nearby are mostly 0 (drawn
# boundaries, background) rather than ids touching each other: their share (zero_boundary_share) is taken within a
# Gaussian of this many pixels, so that an organ's cells keep touching while its background and membranes are 0.
ZERO_SHARE_SIGMA = 1.0


def zero_boundary_share(labels_hw: np.ndarray, boundaries_hw: np.ndarray, elsewhere: float) -> np.ndarray:
    """The share of a kept slice's boundary pixels (:func:`label_boundaries`) near each pixel that are id 0,
    within a Gaussian of :data:`ZERO_SHARE_SIGMA` pixels; ``elsewhere`` where no boundary pixel is that near.
    Returns float32 (H, W) in [0, 1]."""
    from scipy.ndimage import gaussian_filter

    zero = gaussian_filter((labels_hw == 0).astype(np.float32), ZERO_SHARE_SIGMA)
    near = gaussian_filter(boundaries_hw.astype(np.float32), ZERO_SHARE_SIGMA)
    share = np.full(labels_hw.shape, elsewhere, dtype=np.float32)
    np.divide(zero, near, out=share, where=near > 0)
    return share


def zero_share_reach() -> int:
    """How far, in pixels, :func:`zero_boundary_share` at a pixel depends on the kept slice: the Gaussian's radius
    (``gaussian_filter``'s truncation at 4 sigma) and one pixel for :func:`label_boundaries`."""
    return int(4.0 * ZERO_SHARE_SIGMA + 0.5) + 1


def shape_prior_reach() -> int:
    """How far, in pixels, the shape-based interfaces at a pixel depend on the kept slices: the distance cap,
    a pixel for the distances' rounding and one for :func:`label_boundaries`, and the smoothing's radius
    (``gaussian_filter``'s default truncation at 4 sigma)."""
    return int(np.ceil(SHAPE_PRIOR_CAP)) + 2 + int(4.0 * SHAPE_PRIOR_SIGMA + 0.5)


def shape_based_interfaces(labels_a: np.ndarray, labels_b: Optional[np.ndarray], boundaries_a: np.ndarray,
                           boundaries_b: Optional[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Where per-label shape-based interpolation puts the boundaries between ids in one gap, smoothed.

    The gap's slices at ``weights`` (0 at ``labels_a``, 1 at ``labels_b``) are filled by
    :func:`morph.fill_label_gap` (distances capped at :data:`SHAPE_PRIOR_CAP`, so that the result at a pixel only
    depends on the kept slices within :func:`shape_prior_reach` of it), their :func:`label_boundaries` stacked between the two kept slices'
    (``boundaries_b`` None: an open gap after the last kept slice, which copies ``labels_a``), and the stack
    smoothed by a Gaussian of :data:`SHAPE_PRIOR_SIGMA` voxels within the gap (edges: nearest).

    Returns
    -------
    interfaces : ndarray of float32, shape (len(weights) + 1 or + 2, H, W), values in [0, 1]
        Kept slice a, the gap's slices, kept slice b (when given): the planes of :func:`grow_labels`'
        elevation of the gap.
    """
    from scipy.ndimage import gaussian_filter

    if boundaries_b is None:
        between = np.repeat(boundaries_a[None], len(weights), axis=0)
        planes = [boundaries_a[None], between]
    else:
        filled = fill_label_gap(labels_a, labels_b, weights, cap=SHAPE_PRIOR_CAP)
        between = label_boundaries(filled) if len(weights) else np.zeros((0,) + labels_a.shape, dtype=bool)
        planes = [boundaries_a[None], between, boundaries_b[None]]
    return gaussian_filter(np.concatenate(planes).astype(np.float32), SHAPE_PRIOR_SIGMA, mode="nearest")


def position_hash(z: np.ndarray, shape_hw: Tuple[int, int], origin_yx: Tuple[int, int] = (0, 0)) -> np.ndarray:
    """A fixed pseudo-random value in [0, 1) for every voxel of the planes ``z`` (global indices) of a window of
    ``shape_hw`` at ``origin_yx``: a function of the voxel's global position only. Returns float64 (len(z), h, w)."""
    zz = np.asarray(z, dtype=np.uint64)[:, None, None]
    yy = (np.arange(shape_hw[0], dtype=np.uint64) + np.uint64(origin_yx[0]))[None, :, None]
    xx = (np.arange(shape_hw[1], dtype=np.uint64) + np.uint64(origin_yx[1]))[None, None, :]
    mixed = (zz * np.uint64(73856093)) ^ (yy * np.uint64(19349663)) ^ (xx * np.uint64(83492791))
    mixed = (mixed * np.uint64(2654435761)) % np.uint64(2**32)
    return mixed.astype(np.float64) / 2.0**32


def grow_labels(boundary_probabilities_dhw: np.ndarray, sparse_labels_khw: np.ndarray, factor: float,
                threshold: float = 0.5, progress: bool = True, drawn_boundaries: Optional[bool] = None,
                boundaries_khw: Optional[np.ndarray] = None, offset: float = 0.0,
                origin_zyx: Tuple[int, int, int] = (0, 0, 0),
                shape_prior: float = Inference.shape_prior) -> np.ndarray:
    """Ids of a dense label image, grown from the kept slices into the compartments of a restored boundary.

    Each gap between two kept slices is flooded (seeded watershed, ``skimage.segmentation.watershed``, on the
    restored boundary probability) from the ids of its two kept slices, boundary pixels left out of the seeds:
    an id reaches a voxel along the path of least boundary, so two neurites meet where the network put the
    sheet between them, and an object that ends between two slices ends where its closing boundary is. Where
    the kept slices hold id 0 (boundaries drawn as 0), a restored voxel whose boundary probability is at least
    ``threshold`` becomes 0; a volume without 0 stays without.

    With ``shape_prior`` w > 0 the flooding runs on ``(1 - w) * probability + w * interfaces``, where
    ``interfaces`` are those of per-label shape-based interpolation of the gap (:func:`shape_based_interfaces`):
    the network places the boundary sheets where it is sure, the ids' outlines keep moving continuously
    between the kept slices where it is not. Which voxels become 0 is decided by the probability and by what the
    kept slices' boundaries are nearby: 0 where they are mostly 0 (:func:`zero_boundary_share` at least one half,
    blended between the two kept slices), the ids left touching where they touch (a tissue's cells inside an
    organ whose background is 0).

    Guaranteed as by :func:`assign_labels`: ids only from the two kept slices around a voxel, kept slices
    verbatim.

    Parameters
    ----------
    boundary_probabilities_dhw : ndarray, shape (D, H, W)
        Restored probability of :func:`label_boundaries` (float in [0, 1], or uint8 read as 0-255).
    sparse_labels_khw : ndarray of uint, shape (K, H, W)
    factor : float
    threshold : float
    progress : bool
    drawn_boundaries : bool, optional
        Whether the segmentation holds id 0 (boundaries drawn as 0, or a background); default: whether
        ``sparse_labels_khw`` holds a 0. A window of a larger volume (``blocks``) passes the volume's answer.
        Without, no voxel becomes 0; with, a sure boundary far from any boundary of the kept slices does.
    boundaries_khw : ndarray of bool, shape (K, H, W), optional
        :func:`label_boundaries` of the kept slices; a window passes the
        whole slices' (at its edge, ids touching across it count).
    offset : float, in (-factor, 0]
        Output position of kept slice 0, as in :func:`assign_labels` (a slab of the output).
    origin_zyx : (z, y, x)
        Where the arrays' first voxel sits in the whole volume. Equal boundary probabilities (uint8 has
        256 levels) are flooded in an order set by their global position (:func:`position_hash`), not by
        where they sit in the arrays, so that a window of a volume (``blocks``) grows the ids of the whole.
    shape_prior : float in [0, 1)
        Weight of the shape-based interfaces in the elevation (0: the probability alone).

    Returns
    -------
    labels_dhw : ndarray, dtype of ``sparse_labels_khw``, shape (D, H, W)
    """
    from skimage.segmentation import watershed

    depth = boundary_probabilities_dhw.shape[0]
    scale = 255.0 if np.issubdtype(boundary_probabilities_dhw.dtype, np.integer) else 1.0
    boundaries_khw = label_boundaries(sparse_labels_khw) if boundaries_khw is None else boundaries_khw
    seeds_khw = np.where(boundaries_khw, 0, sparse_labels_khw)
    if drawn_boundaries is None:
        drawn_boundaries = bool((sparse_labels_khw == 0).any())
    out = np.zeros(boundary_probabilities_dhw.shape, dtype=sparse_labels_khw.dtype)
    n_kept = len(sparse_labels_khw)
    positions = kept_positions(n_kept, factor).astype(np.float64) + offset
    inside = positions <= depth - 1 + ON_GRID_TOLERANCE
    kept_on_grid, z_on_grid = slices_on_grid(n_kept, factor, depth, offset)
    on_grid = dict(zip(kept_on_grid.tolist(), z_on_grid.tolist()))
    blend_weights = bracket(positions, depth)[2]  # of each output slice between its two kept slices

    @functools.lru_cache(maxsize=2)  # a kept slice closes one gap and opens the next
    def zero_share(k: int) -> np.ndarray:
        return zero_boundary_share(sparse_labels_khw[k], boundaries_khw[k], 1.0)

    def kept_plane(k: int) -> np.ndarray:
        """Elevation of kept slice k: its output slice where it has one, else its own boundary mask."""
        if k in on_grid:
            return boundary_probabilities_dhw[on_grid[k]]
        return (boundaries_khw[k] * scale).astype(boundary_probabilities_dhw.dtype)

    for k in tqdm(range(n_kept), desc="Growing label ids", unit="gap", leave=False, disable=not progress):
        if not inside[k]:
            break
        # The output slices strictly between kept slices k and k + 1 (to the end after the last one inside).
        first = int(np.floor(positions[k] + ON_GRID_TOLERANCE)) + 1
        closed = k + 1 < n_kept and inside[k + 1]
        end = int(np.ceil(positions[k + 1] - ON_GRID_TOLERANCE)) if closed else depth
        planes = [kept_plane(k)[None], boundary_probabilities_dhw[first:end]] + ([kept_plane(k + 1)[None]]
                                                                                 if closed else [])
        elevation = np.concatenate(planes)
        elevation = elevation.astype(np.float32) if elevation.dtype == np.float16 else elevation
        markers = np.zeros(elevation.shape, dtype=np.int64)
        markers[0] = seeds_khw[k]
        if closed:
            markers[-1] = seeds_khw[k + 1]
        if not markers.any() or end <= first:
            continue
        z_planes = np.arange(first - 1, first + len(elevation) - 1) + origin_zyx[0]
        flooded = elevation / scale
        if shape_prior > 0:
            interfaces = shape_based_interfaces(sparse_labels_khw[k], sparse_labels_khw[k + 1] if closed else None,
                                                boundaries_khw[k], boundaries_khw[k + 1] if closed else None,
                                                blend_weights[first:end])
            flooded *= 1.0 - shape_prior  # in place: the gap's elevation is the largest array here
            flooded += shape_prior * interfaces
        grown = watershed(flooded + TIE_BREAK * position_hash(z_planes, elevation.shape[1:], origin_zyx[1:]), markers)
        if drawn_boundaries:
            share_a = zero_share(k)
            share_b = zero_share(k + 1) if closed else share_a
            for i, weight in enumerate(blend_weights[first:end], start=1):
                sure = elevation[i] >= threshold * scale
                sure &= (1.0 - weight) * share_a + weight * share_b >= 0.5
                grown[i][sure] = 0
        out[first:end] = grown[1:1 + end - first]
    out[z_on_grid] = sparse_labels_khw[kept_on_grid]
    return out


# Peak bytes grow_labels adds to its input and output (resident memory, measured at factors 2.5-16 on windows of
# 512-640 px, with and without 0 boundaries, shape prior 0 and 0.4: 155-270 MiB), bounded by a cost per voxel of
# the gap it floods (its output slices and its two kept slices: the float elevation, int64 markers, the
# watershed's own arrays) and one per plane pixel (the kept slices' seeds, boundaries and per-label distances).
GROW_LABELS_GAP_BYTES = 64
GROW_LABELS_PLANE_BYTES = 160


def grow_labels_memory(factor: float, plane_pixels: int) -> int:
    """Rough peak bytes :func:`grow_labels` adds to its input and output on planes of ``plane_pixels`` pixels
    (it floods one gap at a time, so the number of slices does not count)."""
    return int(plane_pixels * ((math.ceil(factor) + 1) * GROW_LABELS_GAP_BYTES + GROW_LABELS_PLANE_BYTES))
