"""The phantom-trained starting model: which trainings start from it, and that it is what it says it is."""
import pytest
import torch

from model import STARTING_MODEL_PATH, load_model, network_architecture, save_model, starting_weights


def test_shipped_starting_model_was_not_trained_on_evaluated_phantoms():
    """The prior's phantoms are not the volumes eval.py (RANDOM_STATE) and bench.py (seeds 0, 1) score."""
    from eval import RANDOM_STATE

    model, config = load_model(STARTING_MODEL_PATH)
    seeds = set(config["STARTING_MODEL"]["phantom_seeds"])
    assert seeds and not seeds & {0, 1, 7, RANDOM_STATE}
    assert model.architecture == network_architecture()  # the default network: what a default run trains


def test_default_mask_training_fine_tunes_the_starting_model():
    state, reason = starting_weights(network_architecture(), "mask")
    shipped = load_model(STARTING_MODEL_PATH)[0].state_dict()
    assert state is not None and "phantom" in reason
    assert all(torch.equal(state[name], shipped[name]) for name in shipped)
    state["head.weight"].add_(1.0)  # a copy: fine-tuning never changes the shipped weights
    assert not torch.equal(state["head.weight"], load_model(STARTING_MODEL_PATH)[0].state_dict()["head.weight"])


@pytest.mark.parametrize("architecture, kind, start_from, why", [
    (network_architecture(), "mask", "scratch", "START_FROM scratch"),
    (network_architecture(output="intensity"), "intensity", "phantom", "grey values"),
    (network_architecture(base_filters=32), "mask", "phantom", "base_filters 16, not 32"),
    (network_architecture(in_channels=3), "mask", "phantom", "in_channels 5, not 3"),
])
def test_trainings_the_starting_model_does_not_fit_start_from_random_weights(architecture, kind, start_from, why):
    state, reason = starting_weights(architecture, kind, start_from)
    assert state is None and why in reason


def test_another_dropout_rate_still_fine_tunes():
    assert starting_weights(network_architecture(dropout_rate=0.3), "mask")[0] is not None


def test_missing_starting_model_file_means_random_weights(tmp_path):
    state, reason = starting_weights(network_architecture(), "mask", path=tmp_path / "absent.pt")
    assert state is None and "no starting model" in reason


def test_unknown_start_from_is_one_clear_error():
    from data import UserError

    with pytest.raises(UserError, match="START_FROM must be one of"):
        starting_weights(network_architecture(), "mask", "imagenet")


def test_recipe_takes_fewer_epochs_only_where_the_starting_model_is_used():
    from eval import default_settings
    from restore import training_kwargs
    from settings import FINE_TUNING_EPOCHS, RECIPE_BY_KIND

    settings = default_settings()
    assert training_kwargs(settings, "mask")["num_epochs"] == FINE_TUNING_EPOCHS
    assert training_kwargs({**settings, "START_FROM": "scratch"}, "mask")["num_epochs"] == RECIPE_BY_KIND["mask"]["num_epochs"]
    assert training_kwargs({**settings, "BASE_FILTERS": 32}, "mask")["num_epochs"] == RECIPE_BY_KIND["mask"]["num_epochs"]
    assert training_kwargs({**settings, "NUM_EPOCHS": 7}, "mask")["num_epochs"] == 7  # a typed value is kept
    assert training_kwargs(settings, "intensity")["num_epochs"] == RECIPE_BY_KIND["intensity"]["num_epochs"]


def test_zero_epoch_fine_tuning_returns_the_starting_model():
    """fit_on_sparse_stack really loads the starting weights (no step taken: the weights are the prior's)."""
    from data import downsample_z, make_sample_stack
    from train import fit_on_sparse_stack

    sparse, _ = downsample_z(make_sample_stack((48, 64, 64), seed=3), 4)
    model, _, _ = fit_on_sparse_stack(sparse, 4, train_xy_size=32, train_nb=16, num_epochs=0, progress=False)
    shipped = load_model(STARTING_MODEL_PATH)[0].state_dict()
    assert all(torch.equal(model.state_dict()[name], shipped[name]) for name in shipped)


def test_building_the_starting_model_is_reproducible(tmp_path):
    """A tiny build twice gives the same weights (the shipped one is rebuilt by `python starting_model.py`)."""
    from eval import default_settings
    from restore import training_kwargs
    from starting_model import build_starting_model

    recipe = {**training_kwargs(default_settings(), "mask"), "train_xy_size": 32}

    def build():
        return build_starting_model(seeds=(101,), factors=(4,), shape=(40, 64, 64), crops_per_volume=12,
                                    num_epochs=1, recipe=recipe, progress=False)

    first, config = build()
    second, _ = build()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert config["STARTING_MODEL"]["phantom_seeds"] == [101]
    path = save_model(tmp_path / "prior.pt", first, config)
    assert starting_weights(network_architecture(), "mask", path=path)[0] is not None


def test_reading_the_starting_model_leaves_the_random_stream_alone():
    """A cold cache (the file read inside a seeded training) and a warm one give the same random stream."""
    import torch

    import model as model_module

    model_module._starting_model.cache_clear()
    torch.manual_seed(5)
    before = torch.get_rng_state().clone()
    weights, _ = model_module.starting_weights(model_module.network_architecture(), "mask")
    assert weights is not None
    assert torch.equal(torch.get_rng_state(), before)


def test_sheet_phantom_is_thin_structure_at_every_orientation():
    """Sheets 2-5 voxels thick: eroding by 3 voxels leaves almost nothing (the objects phantom keeps much),
    and they are not all flat in one plane: their foreground covers many slices along each axis."""
    import numpy as np
    from scipy import ndimage

    from phantoms import make_sample_stack, make_sheet_labels

    sheets = make_sheet_labels((64, 64, 64), seed=201) > 0
    objects = make_sample_stack((64, 64, 64), seed=101)
    ball = ndimage.generate_binary_structure(3, 1)

    def surviving(mask):
        return ndimage.binary_erosion(mask, ball, iterations=3).sum() / mask.sum()

    assert 0.03 < sheets.mean() < 0.3
    assert surviving(sheets) < 0.05 < surviving(objects)
    normals = np.stack(np.gradient(ndimage.gaussian_filter(sheets.astype(np.float32), 1.5)), axis=-1)[sheets]
    normals = normals[np.linalg.norm(normals, axis=-1) > 1e-3]
    dominant = np.abs(normals).argmax(axis=-1)
    assert all(0.1 < np.mean(dominant == axis) for axis in range(3))  # sheets facing Z, Y and X alike
    assert np.array_equal(sheets, make_sheet_labels((64, 64, 64), seed=201) > 0)  # deterministic


@pytest.mark.parametrize("membrane", [False, True])
def test_tissue_phantom_is_a_dense_label_image(membrane):
    import numpy as np

    from phantoms import make_tissue_labels
    from labeling import is_dense_label_image

    labels = make_tissue_labels((48, 64, 64), seed=302, n_cells=60, membrane=membrane)
    background = np.mean(labels == 0)
    assert (0.03 < background < 0.3) if membrane else background == 0
    assert 30 <= len(np.unique(labels[labels > 0])) <= 60
    assert is_dense_label_image(labels)


def test_boundary_phantoms_teach_the_boundary_mask_a_dense_label_image_restores():
    import numpy as np

    from phantoms import make_tissue_labels
    from morph import label_boundaries
    from starting_model import PHANTOMS, TISSUE_CELLS, phantom_mask

    seed = PHANTOMS["boundaries"][0]
    n_cells, membrane = TISSUE_CELLS[seed]
    expected = label_boundaries(make_tissue_labels((32, 48, 48), seed=seed, n_cells=n_cells, membrane=membrane))
    assert np.array_equal(phantom_mask(seed, (32, 48, 48)), expected)
    assert set(PHANTOMS) == {"objects", "sheets", "boundaries"}
