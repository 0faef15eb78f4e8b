"""Tests for the training-data helpers of train.py."""
import dataclasses

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from data import UserError, downsample_z, make_sample_stack
from train import (create_cropped_image_dataset, downscale_upscale_height, draw_crops, hardest_draws,
                   split_indices)


# --------------------------------------------------------------------------- #
# downscale_upscale_height
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("phase", [0, 1, 2])
def test_downscale_upscale_height_keeps_rows(phase):
    rng = np.random.default_rng(phase)
    image = rng.random((14, 9))
    out = downscale_upscale_height(image, 3, phase=phase)
    assert out.shape == image.shape
    assert out.dtype == np.float32
    kept = np.arange(phase, 14, 3)
    assert np.allclose(out[kept], image[kept], atol=1e-7)
    # linear blend in between
    assert np.allclose(out[phase + 1], (2 * image[phase] + image[phase + 3]) / 3, atol=1e-6)
    # rows before the first / after the last kept row copy it
    assert np.allclose(out[:phase], image[phase], atol=1e-7)
    assert np.allclose(out[kept[-1]:], image[kept[-1]], atol=1e-7)


def test_downscale_upscale_height_3d_acts_on_axis_minus_2():
    rng = np.random.default_rng(0)
    crop = rng.random((3, 10, 7)) < 0.5
    out = downscale_upscale_height(crop, 4, phase=1)
    assert out.shape == crop.shape
    assert out.dtype == np.float32
    assert np.array_equal(out[:, 1::4], crop[:, 1::4].astype(np.float32))
    for c in range(3):  # each channel degraded on its own, like a 2D image
        assert np.array_equal(out[c], downscale_upscale_height(crop[c], 4, phase=1))
    assert out.min() >= 0 and out.max() <= 1


def test_downscale_upscale_height_nearest():
    image = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    out = downscale_upscale_height(image, 2, method="nearest")
    assert out[:, 0].tolist() == [0, 0, 2, 2, 4, 4, 6, 6]


def test_downscale_upscale_height_too_few_rows():
    with pytest.raises(ValueError, match="fewer than two rows"):
        downscale_upscale_height(np.zeros((5, 5)), 4, phase=2)


# --------------------------------------------------------------------------- #
# create_cropped_image_dataset
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def sparse_stack():
    stack = make_sample_stack((24, 40, 40), seed=3)
    sparse, _ = downsample_z(stack, 4)
    assert sparse.shape == (6, 40, 40)
    return sparse


def _find_source(sparse, inputs_i, label_i, factor, method="linear"):
    """(z0, y0, x0, transposed, phase) of a crop that yields this sample, or None."""
    depth, height, width = inputs_i.shape
    for transposed in (False, True):
        view = sparse.transpose(0, 2, 1) if transposed else sparse
        windows = sliding_window_view(view, (height, width), axis=(1, 2))  # (K, Y, X, h, w)
        centre_match = np.all(windows == label_i.astype(bool), axis=(-2, -1))
        for zc, y0, x0 in zip(*np.nonzero(centre_match)):
            z0 = zc - depth // 2
            if z0 < 0 or z0 + depth > view.shape[0]:
                continue
            crop = view[z0:z0 + depth, y0:y0 + height, x0:x0 + width]
            for phase in range(factor):
                if np.array_equal(downscale_upscale_height(crop, factor, phase=phase, method=method), inputs_i):
                    return z0, y0, x0, transposed, phase
    return None


def test_cropped_dataset_shapes_and_values(sparse_stack):
    inputs, labels = create_cropped_image_dataset(sparse_stack, (3, 16, 16), n_samples=6, factor=4,
                                                  random_state=0)
    assert inputs.shape == (6, 3, 16, 16) and inputs.dtype == np.float32
    assert labels.shape == (6, 1, 16, 16) and labels.dtype == np.float32
    assert set(np.unique(labels).tolist()) <= {0.0, 1.0}
    assert inputs.min() >= 0 and inputs.max() <= 1
    assert np.all(labels.mean(axis=(1, 2, 3)) >= 0.005)
    sources = []
    for i in range(6):
        # on kept rows, the degraded centre channel equals the label (for the sample's phase)
        centre = inputs[i, 1]
        assert any(np.array_equal(centre[p::4], labels[i, 0, p::4]) for p in range(4)), i
        # and the sample is an actual crop of the sparse stack, degraded along its height
        sources.append(_find_source(sparse_stack, inputs[i], labels[i, 0], 4))
        assert sources[-1] is not None, i
    assert {source[3] for source in sources} == {False, True}  # square crops: both lateral orientations
    assert len({source[4] for source in sources}) > 1  # random row phase


def test_cropped_dataset_deterministic(sparse_stack):
    a = create_cropped_image_dataset(sparse_stack, (3, 16, 16), n_samples=4, factor=4, random_state=7)
    b = create_cropped_image_dataset(sparse_stack, (3, 16, 16), n_samples=4, factor=4, random_state=7)
    c = create_cropped_image_dataset(sparse_stack, (3, 16, 16), n_samples=4, factor=4, random_state=8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_cropped_dataset_non_square_and_five_channels(sparse_stack):
    inputs, labels = create_cropped_image_dataset(sparse_stack, (5, 16, 12), n_samples=3, factor=4,
                                                  method="nearest")
    assert inputs.shape == (3, 5, 16, 12)
    assert labels.shape == (3, 1, 16, 12)
    for i in range(3):
        source = _find_source(sparse_stack, inputs[i], labels[i, 0], 4, method="nearest")
        assert source is not None and source[3] is False  # non-square crops are never transposed


def test_cropped_dataset_lateral_axes_y_degrades_along_y_only(sparse_stack):
    inputs, labels = create_cropped_image_dataset(sparse_stack, (3, 16, 16), n_samples=8, factor=4,
                                                  random_state=0, lateral_axes="y")
    for i in range(8):
        source = _find_source(sparse_stack, inputs[i], labels[i, 0], 4)
        assert source is not None and source[3] is False, i
    with pytest.raises(ValueError, match="TRAIN_LATERAL_AXES must be one of yx, y, got 'x'"):
        create_cropped_image_dataset(sparse_stack, (3, 16, 16), n_samples=2, factor=4, lateral_axes="x")


@pytest.mark.parametrize("kind", ["mask", "intensity"])
def test_cropped_dataset_crop_pool_keeps_the_crops_interpolation_gets_most_wrong(sparse_stack, kind):
    stack = sparse_stack if kind == "mask" else sparse_stack.astype(np.float32) * 0.6 + 0.2
    n = 6
    # CROP_POOL 2 ranks the 2n crops that CROP_POOL 1 draws for 2n samples, and keeps the worse half in order.
    all_x, all_y = create_cropped_image_dataset(stack, (3, 16, 16), n_samples=2 * n, factor=4, random_state=3, kind=kind)
    pool_x, pool_y = create_cropped_image_dataset(stack, (3, 16, 16), n_samples=n, factor=4, random_state=3, kind=kind,
                                                  crop_pool=2)
    centre, truth = all_x[:, 1], all_y[:, 0]
    if kind == "mask":  # the fraction of pixels on the wrong side of 0.5, computed here independently
        error = ((centre >= 0.5) != (truth > 0)).mean(axis=(1, 2))
    else:
        error = np.abs(centre - truth).mean(axis=(1, 2))
    hardest = np.sort(np.argsort(-error, kind="stable")[:n])
    assert error[hardest].min() >= np.median(error)
    np.testing.assert_array_equal(pool_x, all_x[hardest])
    np.testing.assert_array_equal(pool_y, all_y[hardest])
    # CROP_POOL 1 is the plain random draw.
    one_x, _ = create_cropped_image_dataset(stack, (3, 16, 16), n_samples=n, factor=4, random_state=3, kind=kind,
                                            crop_pool=1)
    np.testing.assert_array_equal(one_x, all_x[:n])
    with pytest.raises(ValueError, match="CROP_POOL must be at least 1"):
        create_cropped_image_dataset(stack, (3, 16, 16), n_samples=n, factor=4, crop_pool=0.5)


def test_hardest_draws_ranks_each_distinct_draw_once():
    draws = [("a",), ("b",), ("a",), ("c",), ("d",), ("b",)]
    errors = {"a": 0.9, "b": 0.1, "c": 0.5, "d": 0.7}
    ranked = []

    def error(draw):
        ranked.append(draw)
        return errors[draw[0]]

    # Three of four distinct draws: the hardest three, in the order first drawn, each once.
    assert hardest_draws(draws, 3, error) == [("a",), ("c",), ("d",)]
    assert sorted(ranked) == [("a",), ("b",), ("c",), ("d",)]  # repeats are scored once
    # Fewer distinct draws than samples: the first draws, as a pool of 1 would keep them.
    assert hardest_draws(draws, 5, error) == draws[:5]


def test_crop_pool_on_a_stack_too_small_for_a_choice_trains_on_the_random_crops():
    # Planes of the crop's size and four kept slices: 2 depths x 2 transposes x 4 phases = 16 distinct crops.
    rng = np.random.default_rng(0)
    stack = rng.random((4, 16, 16)) > 0.6
    one = create_cropped_image_dataset(stack, (3, 16, 16), n_samples=20, factor=4, random_state=5, crop_pool=1)
    pool = create_cropped_image_dataset(stack, (3, 16, 16), n_samples=20, factor=4, random_state=5, crop_pool=2)
    np.testing.assert_array_equal(pool[0], one[0])
    np.testing.assert_array_equal(pool[1], one[1])
    # With room to choose (8 samples of those 16 distinct crops), the pool ranks and changes the set.
    one = create_cropped_image_dataset(stack, (3, 16, 16), n_samples=8, factor=4, random_state=5, crop_pool=1)
    pool = create_cropped_image_dataset(stack, (3, 16, 16), n_samples=8, factor=4, random_state=5, crop_pool=2)
    assert not np.array_equal(pool[0], one[0])


def test_cropped_dataset_empty_stack():
    with pytest.raises(ValueError, match=r"hold no foreground \(every voxel is 0\)"):
        create_cropped_image_dataset(np.zeros((5, 20, 20), bool), (3, 16, 16), n_samples=2, factor=4)
    nearly_empty = np.zeros((5, 20, 20), bool)
    nearly_empty[2, 0, 0] = True
    with pytest.raises(ValueError, match="MIN_CONTENT_RATIO"):
        create_cropped_image_dataset(nearly_empty, (3, 16, 16), n_samples=2, factor=4)


def test_cropped_dataset_even_depth():
    with pytest.raises(ValueError, match="TRAIN_Z_SIZE must be odd"):
        create_cropped_image_dataset(np.ones((5, 20, 20), bool), (4, 16, 16), n_samples=2, factor=4)


def test_cropped_dataset_depth_larger_than_stack():
    with pytest.raises(ValueError, match="TRAIN_Z_SIZE=7 is larger"):
        create_cropped_image_dataset(np.ones((5, 20, 20), bool), (7, 16, 16), n_samples=2, factor=4)


@pytest.mark.parametrize("crop", [(3, 24, 16), (3, 16, 24)])
def test_cropped_dataset_crop_larger_than_slices(crop):
    with pytest.raises(ValueError, match="TRAIN_XY_SIZE"):
        create_cropped_image_dataset(np.ones((5, 20, 20), bool), crop, n_samples=2, factor=4)


def test_cropped_dataset_crop_too_small_for_factor():
    with pytest.raises(ValueError, match="too small for factor 4"):
        create_cropped_image_dataset(np.ones((5, 20, 20), bool), (3, 6, 6), n_samples=2, factor=4)


def test_split_indices_is_the_split_scikit_learn_made():
    """The validation split of every published figure came from scikit-learn's train_test_split; the
    project's own split must give the same samples (these are its outputs for the same seeds)."""
    train, val = split_indices(10, 0.2, 0)
    assert train.tolist() == [4, 9, 1, 6, 7, 3, 0, 5] and val.tolist() == [2, 8]
    train, val = split_indices(23, 0.1, 42)  # ceil(2.3) = 3 validation samples
    assert val.tolist() == [15, 9, 0]
    assert train.tolist() == [8, 17, 12, 1, 13, 5, 2, 11, 20, 3, 4, 18, 16, 21, 22, 7, 10, 14, 19, 6]


def test_library_training_defaults_are_the_command_line_recipe(monkeypatch):
    """A library caller of fit_on_sparse_stack gets the recipe eval.py and apply.py train masks with."""
    import train
    from eval import build_parser, default_settings
    from restore import training_kwargs
    from settings import Settings

    cli = Settings.from_dict(dict(default_settings(), **vars(build_parser().parse_args([]))))
    recipe = training_kwargs(cli, "mask")
    assert recipe == training_kwargs(None, "mask")  # Settings() is the command line's recipe
    training, network = train.training_recipe()
    assert {**dataclasses.asdict(training), **dataclasses.asdict(network)} == recipe
    # fit_on_sparse_stack draws its crops with that recipe.
    seen = {}

    def spy(stack, crop_size_zyx, n_samples, factor, *args):
        seen.update(crop=tuple(crop_size_zyx), n=n_samples, rest=args)
        raise StopIteration

    monkeypatch.setattr(train, "create_cropped_image_dataset", spy)
    with pytest.raises(StopIteration):
        train.fit_on_sparse_stack(np.zeros((8, 64, 64), bool), 4)
    assert seen["crop"] == (recipe["train_z_size"], recipe["train_xy_size"], recipe["train_xy_size"])
    assert seen["n"] == recipe["train_nb"]
    assert seen["rest"] == (recipe["min_content_ratio"], recipe["random_state"], recipe["upscale_method"], "mask",
                            recipe["profile_fwhm"], recipe["lateral_axes"], recipe["crop_pool"], None, None)


@pytest.mark.parametrize("crop_pool", [1.0, 2.0])
def test_cropped_dataset_never_straddles_two_panels(crop_pool):
    # Three windows of a large store side by side (blocks.training_stack): each holds one value, so a
    # crop across two of them holds two. Without panel_width some crops straddle: the test can tell.
    panel, crop = 24, 16
    values = (0.2, 0.5, 0.8)
    stack = np.concatenate([np.full((3, 20, panel), v, np.float32) for v in values], axis=2)
    stack += np.linspace(0, 0.01, 3 * panel, dtype=np.float32)  # distinct columns: crops are distinct draws

    def panels_touched(labels):
        return [len({min(range(3), key=lambda p: abs(float(x) - values[p])) for x in np.unique(label)})
                for label in labels[:, 0].round(2)]

    common = dict(n_samples=40, factor=4, random_state=3, kind="intensity", crop_pool=crop_pool)
    _, across = create_cropped_image_dataset(stack, (3, crop, crop), **common)
    assert max(panels_touched(across)) == 2
    _, within = create_cropped_image_dataset(stack, (3, crop, crop), panel_width=panel, **common)
    assert panels_touched(within) == [1] * 40
    # Crops come from every panel, and a whole stack as one panel draws exactly the crops of no panels.
    assert {int(np.argmin([abs(float(label[0, 0, 0]) - v) for v in values])) for label in within} == {0, 1, 2}
    whole = create_cropped_image_dataset(stack, (3, crop, crop), panel_width=3 * panel, **common)
    assert np.array_equal(whole[1], across)


def test_crops_as_wide_as_a_panel_start_at_every_panel_and_nowhere_else():
    # Every start inside a panel is drawn, the last one included, and no other (an off-by-one fails here).
    stack = np.ones((3, 16, 48), np.float32)
    starts = {draw[2] for draw in draw_crops(stack, (3, 16, 16), 60, 4, -np.inf, 0, "yx", panel_width=16)}
    assert starts == {0, 16, 32}
    starts = {draw[2] for draw in draw_crops(stack, (3, 16, 12), 200, 4, -np.inf, 0, "yx", panel_width=16)}
    assert starts == {p * 16 + x for p in range(3) for x in range(5)}


def test_cropped_dataset_panels_are_checked():
    stack = np.zeros((3, 20, 48), np.float32)
    with pytest.raises(ValueError, match="panel_width 20 does not divide the stack's width 48") as caught:
        create_cropped_image_dataset(stack, (3, 16, 16), 4, 4, kind="intensity", panel_width=20)
    assert type(caught.value) is ValueError  # the caller's error: a traceback, not a user's message
    with pytest.raises(UserError, match="TRAIN_XY_SIZE=16 is wider than the 12 columns of each training window"):
        create_cropped_image_dataset(stack, (3, 16, 16), 4, 4, kind="intensity", panel_width=12)
