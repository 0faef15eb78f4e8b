"""The built-in samples: deterministic isotropic phantoms (label image, mask, grey-scale rendering), so that
``python eval.py`` runs with no data."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


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


def _box_around(labels: np.ndarray, centre: np.ndarray, reach: float) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The part of ``labels`` within ``reach`` of ``centre`` (a view) and its voxels' (z, y, x) coordinates,
    float32 ``(d, h, w, 3)``; None where that box is outside the volume."""
    lo = np.maximum(np.floor(centre - reach).astype(int), 0)
    hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, labels.shape)
    if np.any(hi <= lo):
        return None
    grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij"), axis=-1).astype(np.float32)
    return labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], grid


def _paint_ellipsoid(labels: np.ndarray, centre: np.ndarray, radii: np.ndarray, rotation: np.ndarray, label: int) -> None:
    around = _box_around(labels, centre, float(np.max(radii)))
    if around is None:
        return
    box, grid = around
    local = (grid - centre) @ rotation  # coordinates in the ellipsoid's own frame
    box[np.sum((local / radii) ** 2, axis=-1) <= 1.0] = label


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


def _paint_bent_disc(labels: np.ndarray, centre: np.ndarray, radii: np.ndarray, rotation: np.ndarray,
                     bend: Tuple[float, float], label: int) -> None:
    """Paint a thin ellipsoid (``radii[0]`` is its half-thickness) bent along its normal: in the disc's own
    frame (w, u, v) a voxel is inside where ``((w - bend_u u^2 - bend_v v^2) / r0)^2 + (u / r1)^2 + (v / r2)^2 <= 1``."""
    around = _box_around(labels, centre, float(np.max(radii)) + float(np.max(np.abs(bend))) * float(np.max(radii)) ** 2)
    if around is None:
        return
    box, grid = around
    w, u, v = np.moveaxis((grid - centre) @ rotation, -1, 0)
    w = w - bend[0] * u**2 - bend[1] * v**2
    box[(w / radii[0]) ** 2 + (u / radii[1]) ** 2 + (v / radii[2]) ** 2 <= 1.0] = label


def make_sheet_labels(shape: Tuple[int, int, int] = (128, 128, 128), seed: int = 0) -> np.ndarray:
    """Deterministic isotropic phantom of thin structures: what compact-object phantoms lack.

    Sheets 2-5 voxels thick at every orientation: curved membranes (level sets of a smooth random field, with
    ends), bent flat discs alone (fusiform vesicles) and in stacks of 3-6 parallel ones a few voxels apart
    (Golgi cisternae).

    Returns
    -------
    labels_dhw : ndarray of uint16, 0 = background, one id per object (a membrane patch, a disc).
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint16)
    dims = np.array(shape, dtype=np.float32)
    scale = float(np.prod(dims) / 128.0**3)
    # Membranes: |g| / |grad g| is the distance to the level set g = 0 of a smooth field; its patches are cut
    # by a second field so that the sheets end, as a cell's membranes do within a crop.
    field = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), rng.uniform(7, 12))
    gradient = np.sqrt(sum(g**2 for g in np.gradient(field))) + 1e-12
    half_thickness = rng.uniform(0.9, 2.0)
    region = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 10) > 0.0
    membranes, n_patches = ndimage.label((np.abs(field) / gradient <= half_thickness) & region)
    labels[membranes > 0] = membranes[membranes > 0].astype(np.uint16)
    next_id = int(n_patches) + 1
    # Bent discs, alone (vesicles) and stacked (cisternae).
    for index in range(max(3, round(40 * scale))):
        centre = rng.uniform(0.05, 0.95, 3) * dims
        rotation = _random_rotation(rng)
        radii = np.array([rng.uniform(1.0, 2.5), rng.uniform(6, 22), rng.uniform(4, 14)], dtype=np.float32)
        bend = (float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04)))
        n_stacked = int(rng.integers(3, 7)) if index % 4 == 0 else 1
        spacing = rng.uniform(2.5, 5.0) + 2 * radii[0]
        for level in range(n_stacked):
            shrink = 1.0 - 0.12 * level
            _paint_bent_disc(labels, centre + rotation[:, 0] * spacing * level,
                             radii * np.array([1.0, shrink, shrink], dtype=np.float32), rotation, bend, next_id)
            next_id += 1
    return labels


def make_tissue_labels(shape: Tuple[int, int, int] = (128, 128, 128), seed: int = 0, n_cells: int = 200,
                       membrane: bool = False) -> np.ndarray:
    """Deterministic dense label phantom: a Voronoi tessellation whose faces are bent by a smooth random
    displacement, as packed cells of a tissue or neurites in a dense segmentation are. With ``membrane`` the
    ids are separated by 0 voxels (a boundary drawn 1-2 voxels thick), else every voxel has an id.

    Returns
    -------
    labels_dhw : ndarray of uint16
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, dtype=np.int32)
    seeds[tuple(rng.integers(0, shape, size=(n_cells, 3)).T)] = np.arange(1, n_cells + 1)
    cells = seeds[tuple(ndimage.distance_transform_edt(seeds == 0, return_indices=True)[1])]
    amplitude = rng.uniform(200, 500)
    displacement = [ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 8) * amplitude for _ in range(3)]
    grid = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    coords = [np.clip(g + d, 0, n - 1) for g, d, n in zip(grid, displacement, shape)]
    labels = ndimage.map_coordinates(cells, coords, order=0).astype(np.uint16)
    if membrane:
        eroded = ndimage.grey_erosion(labels, size=(1, 2, 2)) != ndimage.grey_dilation(labels, size=(1, 2, 2))
        labels[eroded] = 0
    return labels


def make_organ_labels(shape: Tuple[int, int, int] = (65, 160, 160), seed: int = 21, n_cells: int = 400,
                      membrane: bool = False) -> np.ndarray:
    """Deterministic phantom of a tissue in an organ: the packed cells of :func:`make_tissue_labels` inside an
    ellipsoid centred in the stack (semi-axes 0.6 of its depth, 0.4 of its height and width; cut by the stack's
    first and last slices), on a 0 background, as a plant organ's or an embryo's segmentation is. The cells
    touch each other (with ``membrane``, mostly across a 0 boundary) and fill about a third of the voxels.

    Returns
    -------
    labels_dhw : ndarray of uint16
    """
    cells = make_tissue_labels(shape, seed=seed, n_cells=n_cells, membrane=membrane)
    z, y, x = (np.arange(n, dtype=np.float32) for n in shape)
    radii = 0.6 * shape[0], 0.4 * shape[1], 0.4 * shape[2]
    inside = (((z - shape[0] // 2) / radii[0]) ** 2)[:, None, None] + (((y - shape[1] // 2) / radii[1]) ** 2)[None, :, None] \
        + (((x - shape[2] // 2) / radii[2]) ** 2)[None, None, :] <= 1
    return np.where(inside, cells, 0).astype(np.uint16)
