"""Tests for morph.py: bracket weights, signed distances and shape-based interpolation."""
import numpy as np
import pytest

from morph import bracket, interpolate_along_axis, morph_stack_interpolated, signed_distance

YY, XX = np.mgrid[:64, :64]


def disc(cy, cx, r):
    return (YY - cy) ** 2 + (XX - cx) ** 2 <= r**2


def iou(a, b):
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def recon_indices(kept, depth):
    return [z for z in range(kept[0], min(kept[-1] + 1, depth)) if z not in set(kept)]


def morph_downsampled(truth, factor):
    kept = np.arange(0, truth.shape[0], factor)
    return morph_stack_interpolated(truth[kept], kept, truth.shape[0], progress=False), list(kept)


# --------------------------------------------------------------------------- #
# bracket
# --------------------------------------------------------------------------- #
def test_bracket_weights_inside_and_after_kept_range():
    lower, upper, weight = bracket([0, 4, 8], 11)
    assert lower.dtype == np.int64 and upper.dtype == np.int64 and weight.dtype == np.float32
    assert lower.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert upper.tolist() == [0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]
    assert np.allclose(weight, [0, 0.25, 0.5, 0.75, 0, 0.25, 0.5, 0.75, 0, 0, 0])


def test_bracket_before_first_kept_copies_it():
    lower, upper, weight = bracket([2, 6], 8)
    assert lower.tolist()[:3] == [0, 0, 0]
    assert upper.tolist()[:3] == [0, 0, 0]
    assert np.allclose(weight, [0, 0, 0, 0.25, 0.5, 0.75, 0, 0])
    assert lower[-2:].tolist() == [1, 1] and upper[-2:].tolist() == [1, 1]


def test_bracket_single_position():
    lower, upper, weight = bracket([3], 5)
    assert lower.tolist() == [0] * 5 and upper.tolist() == [0] * 5
    assert np.all(weight == 0)


@pytest.mark.parametrize("positions", [[], [0, 0, 4], [4, 2]])
def test_bracket_rejects_bad_positions(positions):
    with pytest.raises(ValueError, match="strictly increasing"):
        bracket(positions, 6)


# --------------------------------------------------------------------------- #
# signed_distance
# --------------------------------------------------------------------------- #
def test_signed_distance_sign_and_threshold():
    mask = disc(32, 32, 8)
    sdf = signed_distance(mask)
    assert sdf.dtype == np.float32
    assert np.array_equal(sdf > 0, mask)
    assert np.all(sdf[mask] >= 1) and np.all(sdf[~mask] <= -1)
    assert sdf[32, 32] == pytest.approx(sdf.max())
    assert np.all(np.isinf(signed_distance(np.zeros((4, 4), bool))) & (signed_distance(np.zeros((4, 4))) < 0))
    assert np.all(np.isposinf(signed_distance(np.ones((4, 4), bool))))


# --------------------------------------------------------------------------- #
# interpolate_along_axis
# --------------------------------------------------------------------------- #
def test_linear_exact_midpoint_factor_2():
    sparse = np.stack([np.zeros((3, 3)), np.ones((3, 3))])
    out = interpolate_along_axis(sparse, [0, 2], 3, method="linear")
    assert out.dtype == np.float32
    assert out.shape == (3, 3, 3)
    assert np.all(out[0] == 0) and np.all(out[1] == 0.5) and np.all(out[2] == 1)


def test_linear_factor_4_and_tail():
    sparse = np.array([0.0, 1.0, 0.0])
    out = interpolate_along_axis(sparse, [0, 4, 8], 10, method="linear")
    assert np.allclose(out, [0, 0.25, 0.5, 0.75, 1, 0.75, 0.5, 0.25, 0, 0])


def test_nearest_ties_go_to_lower_slice():
    sparse = np.array([[1], [2], [3]], dtype=np.int32)
    out = interpolate_along_axis(sparse, [0, 2, 6], 8, method="nearest")
    assert out.dtype == np.int32
    # index 1 ties between 0 and 2 -> lower; index 4 ties between 2 and 6 -> lower
    assert out[:, 0].tolist() == [1, 1, 2, 2, 2, 3, 3, 3]


def test_interpolate_along_other_axis():
    image = np.zeros((4, 7), dtype=np.float32)
    image[:, 0], image[:, 3], image[:, 6] = 0.0, 1.0, 0.0
    sparse = image[:, [0, 3, 6]]
    out = interpolate_along_axis(sparse, [0, 3, 6], 7, axis=1, method="linear")
    assert out.shape == (4, 7)
    assert np.allclose(out[0], [0, 1 / 3, 2 / 3, 1, 2 / 3, 1 / 3, 0])


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="Unknown interpolation method 'quintic'"):
        interpolate_along_axis(np.zeros((2, 3, 3)), [0, 2], 3, method="quintic")


def test_positions_count_mismatch_raises():
    with pytest.raises(ValueError, match="3 positions"):
        interpolate_along_axis(np.zeros((2, 3, 3)), [0, 2, 4], 5)


# --------------------------------------------------------------------------- #
# morph_stack_interpolated (shape-based / sdf)
# --------------------------------------------------------------------------- #
def test_morph_keeps_kept_slices_exactly():
    rng = np.random.default_rng(0)
    truth = rng.random((13, 20, 24)) < 0.3
    out, kept = morph_downsampled(truth, 4)
    assert out.dtype == bool
    assert out.shape == truth.shape
    for z in kept:
        assert np.array_equal(out[z], truth[z])


def test_morph_accepts_non_bool_input():
    sparse = np.stack([disc(32, 32, 6) * 255, disc(32, 32, 6) * 7]).astype(np.uint8)
    out = morph_stack_interpolated(sparse, [0, 4], 5, progress=False)
    assert out.dtype == bool
    assert np.array_equal(out[2], disc(32, 32, 6))


def test_morph_disc_moving_laterally():
    depth = 33
    truth = np.stack([disc(32, 20 + 0.75 * z, 10) for z in range(depth)])
    out, kept = morph_downsampled(truth, 4)
    scores = [iou(out[z], truth[z]) for z in recon_indices(kept, depth)]
    assert len(scores) == 24
    assert min(scores) > 0.9
    # the reconstruction really moves: the centroid follows the truth within 1 px
    for z in recon_indices(kept, depth):
        assert abs(XX[out[z]].mean() - (20 + 0.75 * z)) < 1.0


def test_morph_growing_disc():
    depth = 33
    truth = np.stack([disc(32, 32, 10 + 0.4 * z) for z in range(depth)])
    out, kept = morph_downsampled(truth, 4)
    scores = [iou(out[z], truth[z]) for z in recon_indices(kept, depth)]
    assert min(scores) > 0.9
    areas = out.sum(axis=(1, 2))
    assert np.all(np.diff(areas) >= 0)  # grows monotonically


def test_morph_sphere():
    depth = 33
    zz = np.arange(depth)[:, None, None]
    truth = (zz - 16) ** 2 + (YY - 32) ** 2 + (XX - 32) ** 2 <= 20**2
    out, kept = morph_downsampled(truth, 4)
    recon = recon_indices(kept, depth)
    assert iou(out[recon], truth[recon]) > 0.9
    assert min(iou(out[z], truth[z]) for z in recon) > 0.85


@pytest.mark.parametrize("empty_first", [False, True])
def test_morph_object_vanishing_in_gap(empty_first):
    obj = disc(32, 32, 10) | disc(10, 50, 4)
    empty = np.zeros_like(obj)
    sparse = np.stack([empty, obj] if empty_first else [obj, empty])
    out = morph_stack_interpolated(sparse, [0, 8], 9, progress=False)
    areas = out.sum(axis=(1, 2))
    if empty_first:
        out, areas = out[::-1], areas[::-1]  # read from the object side
    assert areas[0] == obj.sum()
    assert np.all(np.diff(areas) <= 0)  # shrinks monotonically
    assert np.all(areas[4:] == 0)  # gone by the middle of the gap
    assert not out.all(axis=(1, 2)).any()  # never all foreground
    for z in range(1, 9):  # shrinking: never grows outside the object
        assert not (out[z] & ~obj).any()


def test_morph_two_empty_slices_stay_empty():
    sparse = np.zeros((2, 16, 16), bool)
    out = morph_stack_interpolated(sparse, [0, 4], 5, progress=False)
    assert not out.any()


def test_morph_full_slice_next_to_object():
    obj = disc(32, 32, 10)
    sparse = np.stack([np.ones_like(obj), obj])
    out = morph_stack_interpolated(sparse, [0, 8], 9, progress=False)
    areas = out.sum(axis=(1, 2))
    assert out[0].all() and np.array_equal(out[8], obj)
    assert np.all(np.diff(areas) <= 0)  # background shrinks back towards the object
    for z in range(9):
        assert (out[z] | ~obj).all()  # the object itself is never lost


def test_morph_slices_after_last_kept_copy_it():
    depth, factor = 35, 4  # kept 0..32; slices 33 and 34 lie after the last kept one
    truth = np.stack([disc(32, 32, 5 + 0.3 * z) for z in range(depth)])
    out, kept = morph_downsampled(truth, factor)
    assert kept[-1] == 32
    assert np.array_equal(out[33], truth[32])
    assert np.array_equal(out[34], truth[32])


def test_morph_vanishing_does_not_depend_on_background_extent():
    small = np.zeros((24, 24), bool)
    small[(YY[:24, :24] - 12) ** 2 + (XX[:24, :24] - 12) ** 2 <= 36] = True
    large = np.zeros((96, 96), bool)
    large[:24, :24] = small
    out_small = morph_stack_interpolated(np.stack([small, np.zeros_like(small)]), [0, 8], 9, progress=False)
    out_large = morph_stack_interpolated(np.stack([large, np.zeros_like(large)]), [0, 8], 9, progress=False)
    assert np.array_equal(out_small, out_large[:, :24, :24])
