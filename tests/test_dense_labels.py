"""Dense label images: the label scores (metrics.score_label_reconstruction), the per-label
shape-based baseline (morph.interpolate_labels_sdf), bench.py's label table and, when
../shared/data is there, the reference figures of the FIB-25 neuron crop."""
import re
from pathlib import Path

import numpy as np
import pytest

from errors import UserError
from metrics import adapted_rand_error, mean_label_iou, reconstructed_indices, score_label_reconstruction
from morph import bracket, interpolate_along_axis, interpolate_labels_sdf, signed_distance

FIB25 = Path(__file__).resolve().parents[2] / "shared" / "data" / "labels" / "fib25_medulla_crop_neurons.tif"


# --------------------------------------------------------------------------- #
# Scores
# --------------------------------------------------------------------------- #
def four_columns(depth=9):
    """Ids 1-4 as vertical bands of 2 voxels across the slice, 0 between 2 and 3."""
    labels = np.zeros((depth, 2, 9), dtype=np.uint16)
    labels[..., 0:2], labels[..., 2:4], labels[..., 5:7], labels[..., 7:9] = 1, 2, 3, 4
    return labels


def test_perfect_prediction_scores():
    truth = four_columns()
    scores = score_label_reconstruction(truth.copy(), truth, kept_indices=[0, 4, 8])
    assert scores == {"accuracy_recon": 1.0, "label_iou_recon": 1.0, "are_recon": 0.0}


def test_swapped_ids_cost_accuracy_and_iou_not_rand_error():
    truth = four_columns()
    predicted = truth.copy()
    predicted[truth == 1], predicted[truth == 2] = 2, 1  # the same segmentation, two ids renamed
    scores = score_label_reconstruction(predicted, truth, kept_indices=[0, 4, 8])
    assert scores["accuracy_recon"] == pytest.approx(5 / 9)  # 4 of 9 columns wrong
    assert scores["label_iou_recon"] == pytest.approx(0.5)  # ids 1 and 2 score 0, 3 and 4 score 1
    assert scores["are_recon"] == pytest.approx(0.0)  # the adapted Rand error is blind to names


def merged_are(c):
    """skimage's adapted Rand error by hand for the merge below, ``c`` voxels per true id: the
    contingency table (true-0 voxels left out) has 4 cells of c; true sizes (c, c, c, c),
    predicted sizes (c, c, 2c); n = 4c. ARE = 1 - sum_p / (sum_a / 2 + sum_b / 2)."""
    n = 4 * c
    sum_p = 4 * c**2 - n
    sum_a = 4 * c**2 - n
    sum_b = 2 * c**2 + (2 * c) ** 2 - n
    return 1 - sum_p / (0.5 * sum_a + 0.5 * sum_b)


def test_merge_known_rand_error_and_true_zero_ignored():
    truth = four_columns()
    predicted = truth.copy()
    predicted[truth == 4] = 3  # ids 3 and 4 merged
    predicted[truth == 0] = 1  # the 0-valued boundary column taken: ignored by the Rand error only
    scores = score_label_reconstruction(predicted, truth, kept_indices=[0, 8])
    assert scores["accuracy_recon"] == pytest.approx(12 / 18)  # columns 4, 7 and 8 wrong
    assert scores["label_iou_recon"] == pytest.approx((4 / 6 + 1 + 4 / 8 + 0) / 4)
    assert merged_are(4) == pytest.approx(0.25)
    assert adapted_rand_error(predicted[:1], truth[:1]) == pytest.approx(merged_are(4))
    assert scores["are_recon"] == pytest.approx(merged_are(4 * 7))  # 7 reconstructed slices


def test_only_reconstructed_slices_count():
    truth = four_columns(depth=10)  # kept 0, 4, 8; slice 9 comes after the last kept one
    predicted = truth.copy()
    predicted[[0, 4, 8, 9]] = 7  # errors where nothing was reconstructed
    assert reconstructed_indices([0, 4, 8], 10).tolist() == [1, 2, 3, 5, 6, 7]
    assert score_label_reconstruction(predicted, truth, [0, 4, 8]) == {
        "accuracy_recon": 1.0, "label_iou_recon": 1.0, "are_recon": 0.0}


def test_label_iou_over_true_ids_only():
    """An id only in the prediction adds no 0 term (mean_label_iou's default 'either' counts it)."""
    truth = four_columns(depth=3)
    predicted = truth.copy()
    predicted[1, :, 0] = 9  # id 9 takes one column of id 1 on the reconstructed slice
    truth_only = score_label_reconstruction(predicted, truth, [0, 2])["label_iou_recon"]
    assert truth_only == pytest.approx((0.5 + 3) / 4)
    assert mean_label_iou(predicted, truth, [1]) == pytest.approx((0.5 + 3 + 0) / 5)
    assert mean_label_iou(predicted, truth, [1], over="truth") == pytest.approx(truth_only)
    with pytest.raises(ValueError, match="over"):
        mean_label_iou(predicted, truth, over="both")


def test_scores_with_huge_ids_and_no_true_ids():
    truth = four_columns(depth=3).astype(np.uint64) * np.uint64(2**40)
    predicted = truth.copy()
    predicted[1, 0] = 2**63  # one row of the reconstructed slice wrong
    scores = score_label_reconstruction(predicted, truth, [0, 2])
    assert scores["accuracy_recon"] == pytest.approx(0.5)
    assert 0 < scores["are_recon"] < 1
    empty = np.zeros((3, 2, 2), np.uint8)
    scores = score_label_reconstruction(empty, empty, [0, 2])
    assert scores["accuracy_recon"] == 1.0 and np.isnan(scores["label_iou_recon"]) and np.isnan(scores["are_recon"])


# --------------------------------------------------------------------------- #
# Per-label shape-based interpolation
# --------------------------------------------------------------------------- #
def moving_boundary(depth=17, width=40):
    """Id 1 left of column 8 + z, id 2 from there on: two touching boxes whose shared face moves
    one column per slice (full height, so the distances are one-dimensional)."""
    labels = np.full((depth, 5, width), 2, dtype=np.uint16)
    for z in range(depth):
        labels[z, :, : 8 + z] = 1
    return labels


def test_moving_boundary_lands_in_the_middle():
    truth = moving_boundary()
    kept = np.arange(0, 17, 8)
    restored = interpolate_labels_sdf(truth[kept], kept, truth.shape[0])
    assert restored.dtype == truth.dtype and restored.shape == truth.shape
    # Midway between the faces at columns 8 and 16: column 12.
    assert np.all(restored[4, :, :12] == 1) and np.all(restored[4, :, 12:] == 2)
    np.testing.assert_array_equal(restored, truth)  # a linearly moving face is restored exactly
    # The nearest kept slice is wrong by up to half a gap.
    nearest = interpolate_along_axis(truth[kept], kept, truth.shape[0], method="nearest")
    assert score_label_reconstruction(nearest, truth, kept)["accuracy_recon"] < 0.95
    assert score_label_reconstruction(restored, truth, kept)["accuracy_recon"] == 1.0


def test_ids_only_from_kept_slices_and_kept_slices_verbatim():
    truth = moving_boundary(depth=19)
    truth[3:6, 1:4, 30:34] = 5  # an object entirely between two kept slices: cannot come back
    truth[16, 0:2, 36:40] = 0  # background in kept slice 16 only
    truth[18, 2:4, 20:22] = 7  # an id in the last slice only, after the last kept one
    kept = np.arange(0, 19, 8)
    restored = interpolate_labels_sdf(truth[kept], kept, truth.shape[0])
    assert set(np.unique(restored)) <= set(np.unique(truth[kept])) == {0, 1, 2}
    np.testing.assert_array_equal(restored[kept], truth[kept])
    np.testing.assert_array_equal(restored[17:], truth[[16, 16]])  # after the last kept slice: a copy
    assert not np.any(restored[9:16] == 0)  # id 0 is missing from kept slice 8: it ends at kept slice 16


def test_gap_without_common_ids_copies_the_nearer_slice():
    sparse = np.stack([np.full((4, 4), 3, np.uint8), np.full((4, 4), 4, np.uint8)])
    restored = interpolate_labels_sdf(sparse, [0, 4], 5)
    assert restored[:, 0, 0].tolist() == [3, 3, 3, 4, 4]  # the midway tie goes to the lower slice, as 'nearest'


def brute_force(sparse, kept, depth):
    """Every id's signed distance over the whole slice, blended; the smallest wins (ties: smaller id)."""
    lower, upper, weight = bracket(kept, depth)
    ids = np.unique(sparse)
    out = np.empty((depth,) + sparse.shape[1:], sparse.dtype)
    for z in range(depth):
        if weight[z] == 0:
            out[z] = sparse[lower[z]]
            continue
        blended = np.stack([(1 - weight[z]) * -signed_distance(sparse[lower[z]] == i)
                            + weight[z] * -signed_distance(sparse[upper[z]] == i) for i in ids])
        out[z] = ids[np.argmin(np.nan_to_num(blended, nan=np.inf), axis=0)]
    return out


@pytest.mark.parametrize("margin", [None, 1, 3])
def test_bounding_boxes_give_the_whole_slice_result(margin):
    rng = np.random.default_rng(0)
    seeds = rng.integers(0, 48, size=(12, 2))
    yy, xx = np.mgrid[:48, :48]
    slices = []
    for k in range(4):  # Voronoi cells whose seeds drift, 0-valued borders, ids coming and going
        moved = seeds + rng.integers(-4, 5, size=seeds.shape)
        distance = (yy[None] - moved[:, 0, None, None]) ** 2 + (xx[None] - moved[:, 1, None, None]) ** 2
        cells = np.argmin(distance, axis=0).astype(np.uint16) + 10 * k % 3 + 1
        borders = np.ones_like(cells, bool)
        borders[:-1] &= cells[:-1] == cells[1:]
        borders[:, :-1] &= cells[:, :-1] == cells[:, 1:]
        slices.append(np.where(borders, cells, 0))
    sparse = np.stack(slices)
    kept = [0, 5, 10, 16]
    restored = interpolate_labels_sdf(sparse, kept, 18, margin=margin)
    np.testing.assert_array_equal(restored, brute_force(sparse, kept, 18))


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="integers"):
        interpolate_labels_sdf(np.zeros((2, 3, 3), np.float32), [0, 2], 3)
    with pytest.raises(ValueError, match="kept indices"):
        interpolate_labels_sdf(np.zeros((2, 3, 3), np.uint8), [0, 2, 4], 5)


# --------------------------------------------------------------------------- #
# bench.py's label table
# --------------------------------------------------------------------------- #
def test_bench_label_rows(tmp_path, capsys):
    import bench
    from data import save_stack

    truth = moving_boundary(depth=17)
    truth[:, 4] = 3  # a third id: a label image, not a mask
    source = tmp_path / "boxes.tif"
    save_stack(source, truth, (1.0, 1.0, 1.0))
    report = bench.run_benchmark(bench.build_parser().parse_args(
        ["--input", str(source), "--factors", "8", "--methods", "nearest", "sdf", "--out", str(tmp_path / "b")]))
    rows = report["label_rows"]
    assert [r["method"] for r in rows] == ["nearest", "sdf", "sdf-labels"]
    assert all(tuple(r) == bench.LABEL_ROW_KEYS for r in rows)
    kept = np.arange(0, 17, 8)
    for row, restored in ((rows[0], interpolate_along_axis(truth[kept], kept, 17, method="nearest")),
                          (rows[2], interpolate_labels_sdf(truth[kept], kept, 17))):
        expected = score_label_reconstruction(restored, truth, kept)
        assert [row[key] for key in expected] == pytest.approx(list(expected.values()), abs=1e-5)
    assert rows[2]["accuracy_recon"] > rows[0]["accuracy_recon"]
    out = capsys.readouterr().out
    assert "| stack | factor | method | accuracy_recon | label_iou_recon | are_recon | labels_s |" in out
    assert "| boxes.tif | 8 | sdf-labels | " in out
    assert "sdf-labels" in (tmp_path / "b" / "bench_results.md").read_text()


# --------------------------------------------------------------------------- #
# Reference figures (../shared/data/README.md), factor 4
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def fib25():
    if not FIB25.exists():
        pytest.skip("../shared/data/labels/fib25_medulla_crop_neurons.tif is absent")
    import tifffile

    labels = tifffile.imread(FIB25)
    kept = np.arange(0, labels.shape[0], 4)
    return labels, kept


def rounded(scores):
    return tuple(round(scores[key], 3) for key in ("accuracy_recon", "label_iou_recon", "are_recon"))


def test_fib25_per_label_shape_based_reference(fib25):
    labels, kept = fib25
    restored = interpolate_labels_sdf(labels[kept], kept, labels.shape[0])
    assert rounded(score_label_reconstruction(restored, labels, kept)) == (0.921, 0.557, 0.037)


def test_fib25_nearest_reference_breaks_midway_ties_upwards(fib25):
    """The README's nearest figures take the upper kept slice at the midway slice (z = 2, 6, ...);
    the project's 'nearest' takes the lower one (morph.interpolate_along_axis), which bench.py reports."""
    labels, kept = fib25
    lower, upper, weight = bracket(kept, labels.shape[0])
    ties_up = labels[kept][np.where(weight < 0.5, lower, upper)]
    assert rounded(score_label_reconstruction(ties_up, labels, kept)) == (0.897, 0.570, 0.074)
    nearest = interpolate_along_axis(labels[kept], kept, labels.shape[0], method="nearest")
    assert rounded(score_label_reconstruction(nearest, labels, kept)) == (0.897, 0.573, 0.072)


# --------------------------------------------------------------------------- #
# The network's rule for dense label images: restore the boundaries, grow the ids between them
# --------------------------------------------------------------------------- #
def test_label_boundaries_marks_zeros_and_both_sides_of_touching_ids():
    from morph import label_boundaries

    labels = np.array([[[1, 1, 2, 2, 0, 3]]], dtype=np.uint16)
    assert label_boundaries(labels)[0, 0].tolist() == [False, True, True, False, True, False]
    column = labels.transpose(0, 2, 1)  # the same along Y
    assert label_boundaries(column)[0, :, 0].tolist() == [False, True, True, False, True, False]


def test_density_decides_the_rule():
    from labeling import is_dense_label_image

    assert is_dense_label_image(four_columns())  # 8 of 9 columns hold ids
    sparse_objects = np.zeros((3, 10, 10), dtype=np.uint16)
    sparse_objects[:, 2:4, 2:4] = 5
    assert not is_dense_label_image(sparse_objects)
    # Cells packed in an organ that fills a third of the image: few ids per voxel, but they touch each other.
    organ = np.zeros((3, 30, 30), dtype=np.uint16)
    organ[:, 5:23, 5:10], organ[:, 5:23, 10:16], organ[:, 5:23, 16:22] = 1, 2, 3
    assert np.count_nonzero(organ) < organ.size / 2 and is_dense_label_image(organ)
    organ[:, :, 10], organ[:, :, 16] = 0, 0  # the same cells apart, drawn with 0 between them: objects again
    assert not is_dense_label_image(organ)


def test_touching_share_counts_the_outline_against_other_ids():
    from labeling import touching_share

    row = np.array([[[0, 1, 1, 2, 2, 0]]], dtype=np.uint16)
    # Outline sides: 1 against 0, 1 against 2, 2 against 1, 2 against 0: half of them against another id.
    assert touching_share(row) == 0.5
    assert touching_share(np.ones((2, 4, 4), np.uint8)) == 0.0
    assert touching_share(np.array([[[1, 2], [3, 4]]])) == 1.0


def moving_interface(depth=9, factor=4, with_zero=False):
    """Ids 1 (left) and 2 (right) whose interface moves one column per slice; optionally a 0 column
    between them. Returns the truth and its boundary mask (what a perfect network restores)."""
    from morph import label_boundaries

    truth = np.zeros((depth, 6, 24), dtype=np.uint16)
    for z in range(depth):
        edge = 8 + z
        truth[z, :, :edge], truth[z, :, edge:] = 1, 2
        if with_zero:
            truth[z, :, edge] = 0
    return truth, label_boundaries(truth)


@pytest.mark.parametrize("with_zero", [False, True])
def test_grow_labels_follows_a_perfect_boundary_exactly(with_zero):
    from labeling import grow_labels

    truth, boundaries = moving_interface(with_zero=with_zero)
    kept = np.arange(0, 9, 4)
    restored = grow_labels(boundaries.astype(np.float32), truth[kept], 4, progress=False)
    if with_zero:  # the 0 sheet is restored as drawn, the ids on either side of it
        assert np.array_equal(restored, truth)
    else:  # no 0 drawn, none made; the interface is off by at most the boundary's one-pixel width
        assert not (restored == 0).any()
        assert np.count_nonzero(restored != truth) <= 6 * 9
    np.testing.assert_array_equal(restored[kept], truth[kept])


def test_touching_ids_stay_touching_where_the_background_is_0():
    """An organ's cells on a 0 background: a perfect boundary restores the background as 0 and leaves the cells'
    moving interface to the ids, no 0 drawn between two ids that touch; without the background the same ids."""
    from labeling import grow_labels
    from morph import label_boundaries

    cells, _ = moving_interface()
    organ = cells.copy()
    organ[:, :, :3], organ[:, :, -3:] = 0, 0  # background on both sides of the two cells
    kept = np.arange(0, 9, 4)
    restored = grow_labels(label_boundaries(organ).astype(np.float32), organ[kept], 4, progress=False)
    alone = grow_labels(label_boundaries(cells).astype(np.float32), cells[kept], 4, progress=False)
    np.testing.assert_array_equal(restored == 0, organ == 0)
    np.testing.assert_array_equal(restored[:, :, 3:-3], alone[:, :, 3:-3])


def test_where_every_boundary_is_0_the_0_rule_is_the_probability_alone(monkeypatch):
    """A segmentation whose boundaries are all drawn as 0 (FIB-25's) restores as it did before the share of 0:
    every sure boundary voxel becomes 0, whatever the probabilities."""
    from scipy import ndimage

    import labeling

    truth = dense_phantom(shape=(13, 40, 48), with_zero=True)
    assert labeling.touching_share(truth) == 0.0
    rng = np.random.default_rng(3)
    probabilities = ndimage.gaussian_filter(rng.random(truth.shape, dtype=np.float32), 1.5)
    probabilities = (probabilities - probabilities.min()) / np.ptp(probabilities)
    kept = truth[::4]
    restored = labeling.grow_labels(probabilities, kept, 4, progress=False)
    monkeypatch.setattr(labeling, "zero_boundary_share", lambda labels, boundaries, elsewhere: np.ones(labels.shape))
    np.testing.assert_array_equal(restored, labeling.grow_labels(probabilities, kept, 4, progress=False))
    between = np.arange(13) % 4 != 0
    assert ((restored[between] == 0) & (probabilities[between] >= 0.5)).sum() > 100  # the rule paints there


def test_zero_share_of_a_window_is_the_whole_slices():
    """labeling.zero_share_reach is how far the share of 0 among the boundaries depends on the kept slice: a window
    that reaches that far around a region gives the whole slice's share there, bit for bit (the boundaries given
    are the whole slice's: the reach's pixel for label_boundaries is spare here); two pixels less does not."""
    from labeling import zero_boundary_share, zero_share_reach
    from morph import label_boundaries
    from phantoms import make_organ_labels

    ids = make_organ_labels((1, 80, 96), seed=5, n_cells=40)[0]
    boundaries = label_boundaries(ids[None])[0]  # of the whole slice: a window gets them so (blocks.LabelBoundaries)
    whole = zero_boundary_share(ids, boundaries, 1.0)
    region = (slice(56, 70), slice(30, 66))  # across the organ's edge: cells, their interfaces, the background
    assert whole[region].min() == 0 and whole[region].max() == 1 and ((whole[region] > 0) & (whole[region] < 1)).any()

    def in_window(margin):
        rows, cols = slice(56 - margin, 70 + margin), slice(30 - margin, 66 + margin)
        share = zero_boundary_share(ids[rows, cols], boundaries[rows, cols], 1.0)
        return share[margin:-margin, margin:-margin]

    reach = zero_share_reach()
    np.testing.assert_array_equal(in_window(reach), whole[region])
    assert not np.array_equal(in_window(reach - 2), whole[region])


def test_shape_prior_moves_the_ids_as_shape_based_interpolation_where_the_network_is_unsure():
    """With a boundary probability that says nothing (0 everywhere), the watershed alone floods in hash order;
    with the shape-based interfaces in the elevation the ids follow per-label shape-based interpolation, which
    on this linearly moving interface is the truth. A perfect probability still gives the truth exactly."""
    from morph import interpolate_labels_sdf
    from labeling import grow_labels

    truth, boundaries = moving_interface()
    kept = np.arange(0, 9, 4)
    unsure = np.zeros(truth.shape, np.float32)
    alone = grow_labels(unsure, truth[kept], 4, progress=False, shape_prior=0.0)
    with_prior = grow_labels(unsure, truth[kept], 4, progress=False, shape_prior=0.4)
    np.testing.assert_array_equal(interpolate_labels_sdf(truth[kept], kept, 9), truth)
    assert np.count_nonzero(alone != truth) > 6 * 9  # more than the interface's width on every restored slice
    np.testing.assert_array_equal(with_prior, truth)
    perfect = grow_labels(boundaries.astype(np.float32), truth[kept], 4, progress=False, shape_prior=0.4)
    np.testing.assert_array_equal(perfect, truth)


def test_capped_shape_based_fill_is_local():
    """With a cap, per-label shape-based interpolation of a gap at a pixel only depends on the kept slices within
    the cap: a window gives the whole slices' ids beyond cap + 2 pixels from its cut edge, including an id that
    leaves the window between the two slices (the reference definition, no cap, is not local there)."""
    from morph import fill_label_gap

    rng = np.random.default_rng(3)
    cells = rng.integers(10, 60, size=(2, 6, 12)).astype(np.uint16)  # 16-pixel cells, different on each slice
    a, b = (c.repeat(16, 0).repeat(16, 1) for c in cells)  # 96 x 192
    a[16:32, 16:32], b[16:32, 16:32], b[16:32, 160:176] = 1, 99, 1  # id 1 leaves the window on slice b
    weights = np.arange(1, 8) / 8.0
    cap, cut = 16.0, 96
    inner = slice(0, cut - int(cap) - 2)
    whole = fill_label_gap(a, b, weights, cap=cap)
    window = fill_label_gap(a[:, :cut], b[:, :cut], weights, cap=cap)
    np.testing.assert_array_equal(window[:, :, inner], whole[:, :, inner])
    reference = fill_label_gap(a, b, weights), fill_label_gap(a[:, :cut], b[:, :cut], weights)
    assert not np.array_equal(reference[0][:, :, inner], reference[1][:, :, inner])


def test_block_wise_shape_prior_window_grows_the_whole_slices_ids():
    """grow_labels on a window plus a halo of the prior's reach gives the block the whole slices' ids, where an
    id leaves the window between the kept slices (what blocks.dense_label_block relies on)."""
    from labeling import grow_labels, shape_prior_reach
    from morph import label_boundaries

    cells = np.arange(4)[:, None] * 100 + np.arange(10)[None, :] + 10
    a = cells.repeat(16, 0).repeat(16, 1).astype(np.uint32)  # 64 x 160
    b = a.copy()
    a[16:32, 16:32], b[16:32, 16:32], b[16:32, 112:128] = 1, 999, 1
    kept = np.stack([a, b])
    boundaries = label_boundaries(kept)
    probabilities = np.full((9, 64, 160), 0.3, np.float32)
    probabilities[0], probabilities[-1] = boundaries
    whole = grow_labels(probabilities, kept, 8, progress=False, drawn_boundaries=False, shape_prior=0.4)
    cols = slice(0, 48 + shape_prior_reach())
    window = grow_labels(probabilities[:, :, cols], kept[:, :, cols], 8, progress=False, drawn_boundaries=False,
                         boundaries_khw=boundaries[:, :, cols], shape_prior=0.4)
    np.testing.assert_array_equal(window[:, :, :48], whole[:, :, :48])


def test_resume_refuses_dense_blocks_grown_with_another_shape_prior():
    """A dense run recorded before the shape prior existed grew its ids with weight 0: resuming it with another
    weight is a difference; an equal weight, or a sparse label run, is not."""
    from blocks import _plan_differences

    old_dense, old_sparse = {"label_rule": "dense", "factor": 4}, {"label_rule": "sparse", "factor": 4}
    assert _plan_differences(old_dense, {**old_dense, "shape_prior": 0.4}) == ["shape_prior"]
    assert _plan_differences(old_dense, {**old_dense, "shape_prior": 0.0}) == []
    assert _plan_differences({**old_dense, "shape_prior": 0.4}, {**old_dense, "shape_prior": 0.4}) == []
    assert _plan_differences(old_sparse, dict(old_sparse)) == []


def test_shape_prior_is_checked():
    from data import UserError
    from settings import Settings

    with pytest.raises(UserError, match="SHAPE_PRIOR must be at least 0 and below 1"):
        Settings.from_dict({"SHAPE_PRIOR": 1.0}).validate()


def test_grow_labels_ids_come_only_from_the_bracketing_kept_slices():
    from labeling import grow_labels

    kept_labels = np.zeros((3, 8, 8), dtype=np.uint16)
    kept_labels[0], kept_labels[1], kept_labels[2] = 1, 2, 3  # each slice one id, no boundary at all
    restored = grow_labels(np.zeros((9, 8, 8), np.float32), kept_labels, 4, progress=False)
    for z in range(1, 4):
        assert set(np.unique(restored[z])) <= {1, 2}
    for z in range(5, 8):
        assert set(np.unique(restored[z])) <= {2, 3}
    np.testing.assert_array_equal(restored[[0, 4, 8]], kept_labels)


@pytest.mark.parametrize("factor", [2.5, 4, 8, 16])
def test_grow_labels_stays_within_its_memory_estimate(factor):
    """The plan's memory per worker counts labeling.grow_labels_memory for the id pass: the arrays grow_labels
    allocates beyond its output (tracemalloc sees numpy's) stay below it, with the shape prior on, and do not
    grow with the number of gaps."""
    import tracemalloc

    from scipy import ndimage as ndi

    from labeling import grow_labels, grow_labels_memory
    from morph import label_boundaries

    rng = np.random.default_rng(0)
    edge = 144
    kept = ndi.zoom(rng.integers(1, 60, size=(5, 12, 12)), (1, 12, 12), order=0).astype(np.uint16)
    kept[label_boundaries(kept)] = 0  # neurites with 0 boundaries between them
    probabilities = rng.integers(0, 256, size=(int(np.floor(4 * factor)) + 1, edge, edge)).astype(np.uint8)
    grow_labels(probabilities[:8], kept[:2], factor, progress=False)  # imports and caches are not the id pass
    tracemalloc.start()
    try:
        out = grow_labels(probabilities, kept, factor, progress=False, shape_prior=0.4)
        peak = tracemalloc.get_traced_memory()[1] - out.nbytes
    finally:
        tracemalloc.stop()
    assert 0.5 * grow_labels_memory(factor, edge * edge) < peak <= grow_labels_memory(factor, edge * edge)


def test_plan_memory_counts_the_id_pass_of_a_dense_label_image():
    """In memory the ids grow on whole slices after the restore's tiles are freed: the plan's memory is the
    larger of the two, here the id pass (a wide, shallow stack at factor 8)."""
    import dataclasses

    from plan import RestorePlan
    from labeling import grow_labels_memory
    from settings import Settings

    from restore import tiles_per_batch

    # A given model (trained=False): no training samples, so the restore and the id pass are compared alone.
    dense = RestorePlan(Path("neurons.tif"), Path("out.tif"), "labels", "", 8, "", (9, 1024, 1024),
                        np.dtype("uint16"), (0.04, 0.005, 0.005), "um", (0.0, 0.0, 0.0), Settings(), False,
                        label_rule="dense", dense_labels=True)
    sparse = dataclasses.replace(dense, label_rule="sparse", dense_labels=False)
    inference = dense.inference()
    one_tile = min(65 * 1024, inference["tile_size"] ** 2)
    from model import select_device

    tiles = tiles_per_batch(inference["batch_size"], inference["batch_pixels"], one_tile,
                            select_device(None).type) * one_tile * 256
    assert grow_labels_memory(8, 1024 * 1024) > tiles
    assert dense.memory_bytes() - sparse.memory_bytes() == grow_labels_memory(8, 1024 * 1024) - tiles
    # Training it instead holds its samples (four times a mask's crops for dense labels): the larger part here.
    trained = dataclasses.replace(dense, trained=True)
    assert trained.memory_bytes() - dense.memory_bytes() == trained.training_bytes() - grow_labels_memory(8, 1024 * 1024)
    assert trained.training_bytes() > 2880 * 6 * 128 * 128 * 4


def test_restore_stack_takes_the_boundary_rule_for_dense_labels():
    """A dense label image goes through the boundary network and grow_labels: ids only from the kept
    slices, kept slices verbatim, and the probabilities returned are those of the boundaries."""
    from eval import default_settings
    from restore import restore_stack

    truth, boundaries = moving_interface(depth=17)
    truth = np.tile(truth, (1, 6, 2))  # 36 x 48 slices: room for 32-pixel crops
    kept = np.arange(0, 17, 4)
    settings = {**default_settings(), "TRAIN_XY_SIZE": 32, "TRAIN_NB": 16, "NUM_EPOCHS": 1, "BASE_FILTERS": 4,
                "BATCH_SIZE": 4, "MIN_CONTENT_RATIO": 0.0}
    restored, probabilities, model, info = restore_stack(truth[kept] != 0, 4, settings, labels=truth[kept])
    assert restored.shape == truth.shape and restored.dtype == truth.dtype
    np.testing.assert_array_equal(restored[kept], truth[kept])
    assert set(np.unique(restored)) <= {1, 2}
    # The probabilities are the boundaries' (kept slices hold their boundary mask verbatim), not the foreground's.
    from morph import label_boundaries
    np.testing.assert_array_equal(probabilities[kept], label_boundaries(truth[kept]).astype(np.uint8) * 255)
    # Test-time flips by kind (settings.TTA_BY_KIND): the boundaries of a dense label image take four passes.
    _, _, _, plain = restore_stack(truth[kept] != 0, 4, {**settings, "TTA_FLIPS": False}, model=model,
                                   labels=truth[kept])
    assert info["inference"]["pixels_run"] == 4 * plain["inference"]["pixels_run"] > 0
    # The caller's decision overrules the image's (apply.py passes the one its plan printed): the foreground rule
    # returns the foreground's probabilities, 255 on the kept slices where every voxel holds an id; it trains a
    # foreground model, as the boundaries' model is refused for it.
    with pytest.raises(UserError, match="restores the boundaries"):
        restore_stack(truth[kept] != 0, 4, settings, model=model, labels=truth[kept], dense_labels=False)
    _, foreground_probabilities, _, _ = restore_stack(truth[kept] != 0, 4, settings, labels=truth[kept],
                                                      dense_labels=False)
    assert (foreground_probabilities[kept] == 255).all()


def test_apply_plans_the_label_rule_and_refuses_a_model_of_the_other_rule(tmp_path, capsys):
    """The plan says how ids are restored; a model saved from a sparse label image is refused on a dense one."""
    import torch

    from model import AttentionResUNet, save_model
    from test_first_contact import plan_of, run_apply, write_tif

    dense, _ = moving_interface(depth=17)
    dense_path = write_tif(tmp_path / "neurons.tif", np.tile(dense[::4], (1, 4, 1)))  # 5 x 24 x 24
    sparse = np.zeros((5, 24, 24), dtype=np.uint16)
    sparse[:, 4:9, 4:9], sparse[:, 14:20, 12:18] = 3, 7
    sparse_path = write_tif(tmp_path / "nuclei.tif", sparse)
    rules = {}
    for name, path in (("dense", dense_path), ("sparse", sparse_path)):
        status, printed, err = run_apply(capsys, "--input", path, "--output", tmp_path / f"{name}_out.tif",
                                         "--kind", "labels", "--dry-run")
        assert status == 0, err
        rules[name] = plan_of(printed)["label ids"]
        assert plan_of(printed)["test-time flips"].startswith("on (by kind" if name == "dense" else "off (by kind")
    assert re.match(r"dense \(its ids cover \d+% of the voxels and \d+% of their outline lies against other ids\): "
                    "the network restores the boundaries between ids", rules["dense"]), rules["dense"]
    assert rules["dense"].endswith("(--shape-prior 0.4)")
    assert rules["sparse"] == "the nearest id of the kept slices within each restored object"
    status, printed, err = run_apply(capsys, "--input", dense_path, "--output", tmp_path / "d.tif", "--kind", "labels",
                                     "--dry-run", "--shape-prior", "0")
    assert status == 0 and plan_of(printed)["label ids"].endswith("on the network's boundaries alone (--shape-prior 0)")
    # What the boundary network sees: the interfaces by default, the upsampled mask alone on request or with a
    # model saved before the interfaces existed (its record does not say).
    assert "(--boundary-input interfaces)" in rules["dense"]
    status, printed, err = run_apply(capsys, "--input", dense_path, "--output", tmp_path / "d.tif", "--kind", "labels",
                                     "--dry-run", "--boundary-input", "linear")
    assert status == 0 and "sees the boundary mask upsampled (--boundary-input linear)" in plan_of(printed)["label ids"]
    older = save_model(tmp_path / "older.pt", AttentionResUNet(base_filters=4),
                       {"factor": 4, "kind": "labels", "restores": "boundaries", "train_z_size": 5})
    status, printed, err = run_apply(capsys, "--input", dense_path, "--output", tmp_path / "d.tif", "--model", older,
                                     "--dry-run")
    assert status == 0, err
    assert "(--boundary-input linear)" in plan_of(printed)["label ids"]
    assert plan_of(printed)["kind"].startswith("labels (a label model; ")
    # Into OME-Zarr the image is the ids' foreground: the plan says where the ids go.
    status, printed, err = run_apply(capsys, "--input", dense_path, "--output", tmp_path / "d.ome.zarr", "--dry-run",
                                     "--kind", "labels")
    assert status == 0, err
    assert plan_of(printed)["output"].endswith(f"; the ids in {tmp_path / 'd.ome.zarr'}/labels/neurons, the image "
                                               "their foreground")
    status, _, err = run_apply(capsys, "--input", dense_path, "--output", tmp_path / "d.tif", "--shape-prior", "1")
    assert status != 0 and "SHAPE_PRIOR must be at least 0 and below 1" in err
    torch.manual_seed(0)
    model_path = save_model(tmp_path / "nuclei_model.pt", AttentionResUNet(base_filters=4),
                            {"factor": 4, "kind": "labels", "restores": "foreground", "train_z_size": 5})
    status, _, err = run_apply(capsys, "--input", dense_path, "--output", tmp_path / "o.tif", "--model", model_path)
    assert status != 0 and "restores the foreground of sparse label images" in err and "leave out --model" in err
    assert not (tmp_path / "o.tif").exists()


def test_dense_label_boundaries_train_on_four_times_the_crops(tmp_path, capsys, monkeypatch):
    """TRAIN_NB by kind: the plan of a dense label image trains on 2880 crops (at most 4 draws of each distinct
    crop of a smaller stack) where a mask of the same size trains on 720, and restore_stack's boundary network
    is trained with that recipe ('dense labels')."""
    import apply
    import restore as restore_module
    import train
    from eval import default_settings
    from restore import restore_stack
    from test_first_contact import plan_of, run_apply, write_tif

    labels = dense_phantom((17, 136, 136), with_zero=True)
    paths = {"labels": write_tif(tmp_path / "cells.tif", labels),
             "mask": write_tif(tmp_path / "mask.tif", (labels != 0).astype(np.uint8) * 255)}
    lines = {}
    for kind, path in paths.items():
        status, printed, err = run_apply(capsys, "--input", path, "--output", tmp_path / f"{kind}_o.tif",
                                         "--kind", kind, "--dry-run")
        assert status == 0, err
        lines[kind] = plan_of(printed)["training"]
    # The file's 17 slices are the kept ones: 13 z positions x 2 x 2 lateral x 2 orientations x 4 phases = 416
    # distinct crops, so the dense label image's 2880 are capped at 4 draws each.
    assert train.distinct_crops((17, 136, 136), (5, 128, 128), 4) == 416
    assert lines["labels"].startswith("1664 crops of 5 x 128 x 128 (624.0 MiB in memory), 3 epochs") and lines["mask"].startswith("720 crops")
    # What the training draws, in memory and block-wise: the crops the plan printed.
    seen = []

    class Stop(Exception):
        pass

    def spy(stack, crop_size_zyx, n_samples, *args, **kwargs):
        seen.append(n_samples)
        raise Stop  # no training needed: how many crops it was asked to draw is the point

    monkeypatch.setattr(train, "create_cropped_image_dataset", spy)
    for output in ("o.tif", "o.ome.zarr"):
        with pytest.raises(Stop):
            apply.main(["--input", str(paths["labels"]), "--output", str(tmp_path / output), "--kind", "labels"])
    with pytest.raises(Stop):
        restore_stack(labels[::4] != 0, 4, labels=labels[::4])
    # 5 kept slices of 136 x 136: 1 z position x 2 x 2 lateral x 2 orientations x 4 phases = 32 distinct crops.
    assert seen == [1664, 1664, min(2880, 4 * 32)]
    # A saved model records the crops its training used, not "by kind".
    fitted, _ = restore_module.fit_recipe_to_stack(default_settings(), (17, 136, 136), 4, kind="dense labels")
    assert restore_module.model_config(fitted, 4)["train_nb"] is None
    assert restore_module.model_config(fitted, 4, "dense labels")["train_nb"] == 1664
    assert restore_module.model_config(fitted, 4, "mask")["train_nb"] == 720


# --------------------------------------------------------------------------- #
# Block-wise: the same ids as in memory
# --------------------------------------------------------------------------- #
def dense_phantom(shape=(25, 70, 90), seed=6, with_zero=True):
    """A dense label image: the phantom's cells grown to fill every voxel (nearest cell), optionally with
    a 0 drawn on one side of every in-plane interface between two ids."""
    from scipy import ndimage

    from data import make_sample_labels

    cells = make_sample_labels(shape, seed=seed)
    _, nearest = ndimage.distance_transform_edt(cells == 0, return_indices=True)
    dense = cells[tuple(nearest)]
    if with_zero:
        interface = np.zeros(dense.shape, bool)
        interface[:, 1:] |= dense[:, 1:] != dense[:, :-1]
        interface[:, :, 1:] |= dense[:, :, 1:] != dense[:, :, :-1]
        dense[interface] = 0
    return dense


@pytest.mark.parametrize("factor,with_zero", [(3, True), (4, False), (2.5, True), (4, "organ")])
def test_block_wise_dense_labels_equal_the_in_memory_ones(tmp_path, factor, with_zero):
    import zarr

    import blocks
    from eval import default_settings
    from morph import kept_positions
    from labeling import is_dense_label_image
    from restore import restore_stack

    from phantoms import make_organ_labels

    truth = (make_organ_labels((25, 70, 90), seed=6, n_cells=60) if with_zero == "organ"
             else dense_phantom(with_zero=with_zero))
    n_kept = int(24 // factor) + 1
    kept_ids = truth[np.round(kept_positions(n_kept, factor)).astype(int)]  # ids cannot be blended: nearest slice
    assert is_dense_label_image(kept_ids)
    settings = {**default_settings(), "TRAIN_Z_SIZE": 3, "TRAIN_XY_SIZE": 32, "TRAIN_NB": 16, "NUM_EPOCHS": 1,
                "BASE_FILTERS": 4, "BATCH_SIZE": 4, "INFERENCE_TILE_SIZE": 32, "INFERENCE_BATCH_SIZE": 8,
                "PRECISION": "fp32", "DEVICE": "cpu", "MIN_CONTENT_RATIO": 0.0, "START_FROM": "scratch",
                "BLOCK_SIZE": 32}
    # The organ: no shape prior and the smallest first halo, so that the windows start smaller than the slices and
    # grow only as far as the ids need (the share of 0's own reach: test_zero_share_of_a_window_is_the_whole_slices).
    organ = with_zero == "organ"
    settings.update({"SHAPE_PRIOR": 0.0} if organ else {})
    restored, probabilities, model, _ = restore_stack(kept_ids != 0, factor, settings, labels=kept_ids)
    out = tmp_path / "out.ome.zarr"
    summary = blocks.restore_to_ome_zarr(kept_ids != 0, out, factor, settings,
                                         blocks.OutputMetadata((1.0, 1.0, 1.0), "um", label_name="cells"),
                                         model=model, labels_source=kept_ids, label_rule="dense", progress=False,
                                         **({"label_halo": 1} if organ else {}))
    ids = np.asarray(zarr.open_array(store=str(out / "labels" / "cells"), path="s0", mode="r")[:])
    mask = np.asarray(zarr.open_array(store=str(out), path="s0", mode="r")[:])
    assert summary["state"] == "complete" and summary["label_blocks_inexact"] == 0
    assert len(summary["label_halos"]) == 9  # 3 x 3 blocks of 32 px over 70 x 90
    np.testing.assert_array_equal(ids, restored)
    np.testing.assert_array_equal(mask, np.where(restored != 0, 255, 0))
    assert (restored == 0).any() == bool(with_zero)


def test_ties_are_broken_by_global_position_so_a_window_floods_as_the_whole():
    """grow_labels orders equal boundary probabilities by a hash of the voxel's position in the volume: the
    hash of a window is the window of the whole volume's hash, and it never reorders two uint8 levels."""
    from labeling import TIE_BREAK, position_hash

    whole = position_hash(np.arange(3, 9), (40, 50))
    window = position_hash(np.arange(5, 8), (10, 20), origin_yx=(12, 25))
    np.testing.assert_array_equal(window, whole[2:5, 12:22, 25:45])
    assert 0.0 <= whole.min() and whole.max() < 1.0 and len(np.unique(whole)) > 0.99 * whole.size
    assert TIE_BREAK * 1.0 < 1 / 255 / 1000  # far below one uint8 level


# --------------------------------------------------------------------------- #
# The boundary network's input with interfaces (BOUNDARY_INPUT 'interfaces')
# --------------------------------------------------------------------------- #
def fill_rows_by_hand(kept_rows, positions, height, cap):
    """morph.fill_label_rows pixel by pixel: each id's distance along the row found by scanning it."""
    n, n_rows, width = kept_rows.shape
    out = np.zeros((n, height, width), dtype=kept_rows.dtype)

    def signed(row, label, x):
        if row[x] == label:  # inside: minus the distance to the nearest other pixel
            others = [abs(x - c) for c in range(width) if row[c] != label]
            return -min(min(others), cap) if others else -cap
        mine = [abs(x - c) for c in range(width) if row[c] == label]
        return min(min(mine), cap) if mine else cap

    for i in range(n):
        for r in range(height):
            below = max([j for j in range(n_rows) if positions[j] <= r], default=0)
            above = min([j for j in range(n_rows) if positions[j] >= r], default=n_rows - 1)
            t = 0.0 if above == below else (r - positions[below]) / (positions[above] - positions[below])
            t = np.float32(t)  # the blend in float32, as the tool computes it, so that ties tie alike
            for x in range(width):
                best = None
                for label in sorted(set(kept_rows[i].ravel().tolist())):  # ties: the smaller id
                    a, b = np.float32(signed(kept_rows[i, below], label, x)), np.float32(signed(kept_rows[i, above],
                                                                                               label, x))
                    score = (np.float32(1) - t) * a + t * b
                    if best is None or score < best:
                        best, out[i, r, x] = score, label
    return out


@pytest.mark.parametrize("positions,height", [([0, 3, 6], 7), ([0.0, 2.5, 5.0], 6)])
def test_fill_label_rows_equals_a_pixel_by_pixel_reference(positions, height):
    from morph import fill_label_rows

    rng = np.random.default_rng(3)
    kept_rows = np.repeat(rng.integers(0, 4, size=(3, 3, 7)), 2, axis=2).astype(np.uint16)  # runs of 2+ pixels
    kept_rows[2, 1] = 5  # a row of one id: an id missing elsewhere counts as cap away
    for cap in (2.0, 16.0):
        np.testing.assert_array_equal(fill_label_rows(kept_rows, positions, height, cap),
                                      fill_rows_by_hand(kept_rows, np.asarray(positions, float), height, cap))


def test_row_interfaces_follow_an_id_that_moves():
    """An interface that moved 8 columns between two kept rows lies, on the rows between, where shape-based
    interpolation puts it: one step of a column per row, not twice (faintly) as a linear blend of the masks."""
    from morph import row_interfaces

    rows = np.zeros((1, 2, 30), dtype=np.uint16)
    rows[0, 0, :10], rows[0, 0, 10:] = 1, 2
    rows[0, 1, :18], rows[0, 1, 18:] = 1, 2
    interfaces = row_interfaces(rows, [0, 8], 9)[0]
    for r in range(9):
        assert np.flatnonzero(interfaces[r]).tolist() == [9 + r, 10 + r]


def test_engine_input_with_interfaces_is_the_mix_of_both_guesses_in_memory_and_in_a_window():
    """The kernel that takes interfaces restores what a network given, plane by plane, the linear upsampling of
    the boundary mask mixed with morph.row_interfaces of whole planes restores; a window of ids reaching
    restore.interfaces_reach() around the read window gives the same; a narrower one is refused."""
    import dataclasses

    import torch

    from model import AttentionResUNet
    from morph import kept_positions, label_boundaries, mix_interfaces, row_interfaces
    from restore import (Kernel, LabelWindow, apply_model_to_stack_tiled_slice_by_slice, interfaces_reach,
                         read_window, restore_block)

    kept = dense_phantom(shape=(13, 96, 110), with_zero=False)[::4]
    depth, positions = 13, kept_positions(len(kept), 4)
    torch.manual_seed(0)
    model = AttentionResUNet(in_channels=3, n_classes=1, depth=3, base_filters=4).eval()
    kernel = Kernel(train_depth=3, tile_size=32, batch_size=8, channel_stride=2, interfaces=True,
                    keep_kept_slices=False)
    boundaries = label_boundaries(kept)
    restored = apply_model_to_stack_tiled_slice_by_slice(model, boundaries, 4, kernel=kernel, label_ids=kept,
                                                         progress=False)
    linear = interpolate_along_axis(boundaries, positions, depth, method="linear")
    by_hand = []
    for orientation, axes, back in (("y", (1, 0, 2), (1, 0, 2)), ("x", (2, 0, 1), (1, 2, 0))):
        interfaces = row_interfaces(kept.transpose(axes), positions, depth, 16.0).transpose(back)
        planes = mix_interfaces(linear, interfaces.astype(np.float32)).astype(np.float32)
        one = dataclasses.replace(kernel, interfaces=False, orientations=(orientation,))
        by_hand.append(apply_model_to_stack_tiled_slice_by_slice(model, planes, 1, kernel=one, progress=False))
    np.testing.assert_allclose(restored, (by_hand[0] + by_hand[1]) / 2, atol=1e-6)
    assert not np.array_equal(restored, apply_model_to_stack_tiled_slice_by_slice(
        model, boundaries, 4, kernel=dataclasses.replace(kernel, interfaces=False), progress=False))

    height, width = kept.shape[1:]
    region = ((40, 60), (45, 65))  # its read window is inside the slices: (22, 74) x (20, 90)
    (wy0, wy1), (wx0, wx1) = read_window((height, width), region, 3, 2, 32)
    reach = interfaces_reach()
    y0, y1, x0, x1 = max(0, wy0 - reach), min(height, wy1 + reach), max(0, wx0 - reach), min(width, wx1 + reach)
    window = restore_block(model, boundaries[:, wy0:wy1, wx0:wx1], (wy0, wx0), (height, width), region, 4, kernel,
                           labels=LabelWindow(kept[:, y0:y1, x0:x1], (y0, x0)), progress=False)
    assert 0 < wy0 and wy1 < height and 0 < wx0 and wx1 < width
    np.testing.assert_allclose(window, restored[:, 40:60, 45:65], atol=1e-6)
    with pytest.raises(ValueError, match="must reach"):
        restore_block(model, boundaries[:, wy0:wy1, wx0:wx1], (wy0, wx0), (height, width), region, 4, kernel,
                      labels=LabelWindow(kept[:, wy0:wy1, wx0:wx1], (wy0, wx0)), progress=False)
    with pytest.raises(ValueError, match="exactly when the kernel takes interfaces"):
        restore_block(model, boundaries, (0, 0), (height, width), ((0, height), (0, width)), 4, kernel,
                      progress=False)


def test_training_inputs_with_interfaces_mix_the_degraded_mask_and_the_ids_interfaces():
    from morph import label_boundaries, mix_interfaces
    from train import create_cropped_image_dataset, degrade_label_interfaces, downscale_upscale_height, draw_crops

    ids = dense_phantom(shape=(5, 48, 48), with_zero=True)
    boundaries = label_boundaries(ids)
    crop = (3, 32, 32)
    for factor in (4, 2.5):
        inputs, labels = create_cropped_image_dataset(boundaries, crop, 6, factor, 0.0, random_state=1,
                                                      label_ids=ids)
        plain, plain_labels = create_cropped_image_dataset(boundaries, crop, 6, factor, 0.0, random_state=1)
        np.testing.assert_array_equal(labels, plain_labels)  # the same crops, the same targets
        for i, (z0, y0, x0, transposed, phase) in enumerate(draw_crops(boundaries, crop, 6, factor, 0.0, 1, "yx")):
            take = (slice(z0, z0 + 3), slice(y0, y0 + 32), slice(x0, x0 + 32))
            mask, labelled = boundaries[take], ids[take]
            if transposed:
                mask, labelled = mask.transpose(0, 2, 1), labelled.transpose(0, 2, 1)
            linear = downscale_upscale_height(mask, factor, phase)
            np.testing.assert_array_equal(plain[i], linear)
            np.testing.assert_array_equal(inputs[i], mix_interfaces(linear, degrade_label_interfaces(labelled, factor,
                                                                                                    phase)))
    with pytest.raises(ValueError, match="must match"):
        create_cropped_image_dataset(boundaries, crop, 6, 4, 0.0, label_ids=ids[:, :40])


def test_a_model_saved_before_interfaces_restores_with_the_linear_input():
    from errors import UserError
    from restore import inference_kwargs, uses_interfaces
    from settings import Settings

    assert Settings().training.boundary_input == "interfaces"
    assert uses_interfaces(Settings(), "dense labels") and not uses_interfaces(Settings(), "mask")
    old = Settings().with_model_record({"factor": 4, "train_z_size": 5})  # a record without the setting
    assert old.training.boundary_input == "linear" and not inference_kwargs(old, kind="dense labels")["interfaces"]
    new = Settings().with_model_record({"factor": 4, "boundary_input": "interfaces"})
    assert inference_kwargs(new, kind="dense labels")["interfaces"]
    assert Settings().with_model_record({}).training.boundary_input == "interfaces"  # no model: the setting's
    with pytest.raises(UserError, match="BOUNDARY_INPUT"):
        Settings.from_dict({"BOUNDARY_INPUT": "cubic"}).validate()


def test_block_memory_counts_the_ids_and_the_interfaces_of_a_kernel_that_takes_them():
    import blocks
    from restore import CHUNK_VALUES, inference_kwargs, interfaces_reach
    from settings import Settings

    plan = blocks.BlockPlan((161, 4096, 4096), 512)
    with_interfaces = inference_kwargs(Settings(), kind="dense labels")
    linear = inference_kwargs(Settings().with_values(BOUNDARY_INPUT="linear"), kind="dense labels")
    assert with_interfaces["interfaces"] and not linear["interfaces"]
    (wy0, wy1), (wx0, wx1) = blocks.read_window_for((4096, 4096), plan.middle_region(), 8, with_interfaces)
    window = (wy1 - wy0 + 2 * interfaces_reach()) * (wx1 - wx0 + 2 * interfaces_reach())
    extra = (blocks.estimate_block_memory(plan, 21, 8, with_interfaces, "uint8", label_dtype=np.uint32)
             - blocks.estimate_block_memory(plan, 21, 8, linear, "uint8", label_dtype=np.uint32))
    assert extra == 21 * window * 4 + CHUNK_VALUES * (4 + 4 + 6)
    assert blocks.estimate_block_memory(plan, 21, 8, with_interfaces, "uint8") == blocks.estimate_block_memory(
        plan, 21, 8, linear, "uint8")  # no ids, no interfaces: a mask
