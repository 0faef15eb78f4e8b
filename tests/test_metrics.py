"""Tests for metrics.py: overlap scores, reconstructed-slice selection and distances."""
import math
import tracemalloc

import numpy as np
import pytest

from metrics import (
    calculate_dice,
    calculate_iou,
    mean_label_iou,
    mean_surface_distance,
    reconstructed_indices,
    score_reconstruction,
)


def cube(shape=(16, 16, 16), lo=5, hi=11):
    mask = np.zeros(shape, bool)
    mask[lo:hi, lo:hi, lo:hi] = True
    return mask


# --------------------------------------------------------------------------- #
# IoU / Dice
# --------------------------------------------------------------------------- #
def test_iou_dice_known_values():
    a = np.array([[1, 1, 0, 0]], dtype=bool)
    b = np.array([[1, 0, 1, 0]], dtype=bool)
    assert calculate_iou(a, b) == pytest.approx(1 / 3)
    assert calculate_dice(a, b) == pytest.approx(0.5)
    a3 = np.zeros((2, 3, 3), bool)
    a3[0, :2, :2] = True  # 4 voxels
    b3 = np.zeros((2, 3, 3), bool)
    b3[0, :2, :] = True  # 6 voxels, 4 shared
    assert calculate_iou(a3, b3) == pytest.approx(4 / 6)
    assert calculate_dice(a3, b3) == pytest.approx(8 / 10)


def test_iou_dice_accept_non_bool():
    a = np.array([0, 3, 5, 0])
    b = np.array([0, 1, 0, 0])
    assert calculate_iou(a, b) == pytest.approx(0.5)
    assert calculate_dice(a, b) == pytest.approx(2 / 3)


def test_iou_dice_empty_cases():
    empty = np.zeros((3, 4), bool)
    some = empty.copy()
    some[1, 2] = True
    assert calculate_iou(empty, empty) == 1.0
    assert calculate_dice(empty, empty) == 1.0
    assert calculate_iou(empty, some) == 0.0
    assert calculate_dice(some, empty) == 0.0
    assert calculate_iou(some, some) == 1.0


@pytest.mark.parametrize("func", [calculate_iou, calculate_dice, mean_surface_distance, mean_label_iou])
def test_shape_mismatch_raises(func):
    with pytest.raises(ValueError, match=r"Cannot compare stacks of shapes \(2, 3, 4\) and \(2, 4, 3\)"):
        func(np.zeros((2, 3, 4), np.uint8), np.zeros((2, 4, 3), np.uint8))


# --------------------------------------------------------------------------- #
# reconstructed_indices / score_reconstruction
# --------------------------------------------------------------------------- #
def test_reconstructed_indices():
    assert reconstructed_indices([0, 4, 8], 11).tolist() == [1, 2, 3, 5, 6, 7]
    assert reconstructed_indices([0, 4, 8], 9).tolist() == [1, 2, 3, 5, 6, 7]
    assert reconstructed_indices([0, 2], 3).tolist() == [1]
    assert reconstructed_indices([0, 1, 2], 3).tolist() == []


def test_score_reconstruction_keys_and_perfect():
    rng = np.random.default_rng(1)
    truth = rng.random((9, 6, 6)) < 0.4
    scores = score_reconstruction(truth.copy(), truth, [0, 4, 8])
    assert set(scores) == {"iou_recon", "dice_recon", "iou_stack", "dice_stack"}
    assert all(value == pytest.approx(1.0) for value in scores.values())


def test_score_reconstruction_recon_uses_only_non_kept_slices():
    depth, kept = 11, [0, 4, 8]
    truth = np.zeros((depth, 4, 4), bool)
    truth[:, 1:3, 1:3] = True  # 4 voxels per slice
    predicted = truth.copy()
    recon = [1, 2, 3, 5, 6, 7]
    predicted[recon] = ~truth[recon]  # kept (and trailing) slices perfect, reconstructed ones all wrong
    scores = score_reconstruction(predicted, truth, kept)
    assert scores["iou_recon"] == 0.0
    assert scores["dice_recon"] == 0.0
    # whole stack: 5 perfect slices (0, 4, 8, 9, 10) with 4 shared voxels each;
    # 6 wrong slices with 4 truth + 12 predicted voxels, none shared
    assert scores["iou_stack"] == pytest.approx(20 / (20 + 6 * 16))
    assert scores["dice_stack"] == pytest.approx(2 * 20 / (2 * 20 + 6 * 16))


def test_score_reconstruction_ignores_errors_in_kept_slices():
    truth = np.zeros((9, 4, 4), bool)
    truth[:, :2] = True
    predicted = truth.copy()
    predicted[[0, 4, 8]] = ~truth[[0, 4, 8]]
    scores = score_reconstruction(predicted, truth, [0, 4, 8])
    assert scores["iou_recon"] == 1.0
    assert scores["iou_stack"] < 1.0


def test_score_reconstruction_shape_mismatch():
    with pytest.raises(ValueError, match="Cannot compare"):
        score_reconstruction(np.zeros((9, 4, 4), bool), np.zeros((8, 4, 4), bool), [0, 4])


# --------------------------------------------------------------------------- #
# mean_surface_distance
# --------------------------------------------------------------------------- #
def test_surface_distance_identical_is_zero():
    mask = cube()
    assert mean_surface_distance(mask, mask) == 0.0
    empty = np.zeros_like(mask)
    assert mean_surface_distance(empty, empty) == 0.0
    assert math.isnan(mean_surface_distance(mask, empty))
    assert math.isnan(mean_surface_distance(empty, mask))


def test_surface_distance_shifted_cube():
    a = cube()
    b = np.roll(a, 1, axis=2)
    d1 = mean_surface_distance(a, b)
    assert 0.0 < d1 <= 1.0
    # 152 surface voxels per 6^3 cube; per cube, the trailing face (36) and the
    # interior of the leading face (16) are 1 voxel from the other surface, the rest 0.
    assert d1 == pytest.approx(52 / 152, rel=1e-5)
    assert mean_surface_distance(b, a) == pytest.approx(d1)
    d3 = mean_surface_distance(a, np.roll(a, 3, axis=2))
    assert d3 > d1
    assert d3 <= 3.0


def test_surface_distance_z_indices_restricts_slices():
    a = cube()
    b = np.roll(a, 2, axis=0)  # shifted along Z: the side walls of slice 8 coincide
    assert mean_surface_distance(a, b) > 0.5
    assert mean_surface_distance(a, b, z_indices=[8]) == 0.0
    assert mean_surface_distance(a, b, z_indices=[5]) > 0.0  # a's bottom face


# --------------------------------------------------------------------------- #
# mean_label_iou
# --------------------------------------------------------------------------- #
def two_labels():
    labels = np.zeros((4, 6, 6), np.uint16)
    labels[:, :3, :3] = 1
    labels[:, 3:, 3:] = 2
    return labels


def test_label_iou_identical_and_swapped():
    labels = two_labels()
    assert mean_label_iou(labels, labels) == 1.0
    swapped = labels.copy()
    swapped[labels == 1], swapped[labels == 2] = 2, 1
    assert mean_label_iou(swapped, labels) == 0.0
    assert calculate_iou(swapped > 0, labels > 0) == 1.0  # the binary masks agree; only ids differ


def test_label_iou_known_value():
    truth = two_labels()
    predicted = truth.copy()
    predicted[2:][truth[2:] == 1] = 0  # id 1: half of its voxels lost -> IoU 0.5; id 2: IoU 1
    assert mean_label_iou(predicted, truth) == pytest.approx(0.75)
    assert mean_label_iou(predicted, truth, z_indices=[0, 1]) == pytest.approx(1.0)
    assert mean_label_iou(predicted, truth, z_indices=[2, 3]) == pytest.approx(0.5)


def test_label_iou_no_labels():
    empty = np.zeros((2, 3, 3), np.uint16)
    assert mean_label_iou(empty, empty) == 1.0


def test_label_iou_memory_does_not_grow_with_id_value():
    labels = np.zeros((2, 4, 4), np.uint16)
    labels[0, 0, 0], labels[1, 1, 1] = 2000, 7
    tracemalloc.start()
    try:
        assert mean_label_iou(labels, labels) == 1.0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000  # 32 voxels need kilobytes; the current code takes ~32 MB
