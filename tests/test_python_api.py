"""The library as a notebook calls it: arrays in, one clear error for bad input, a model that carries its
record, no progress output on request, the caller's random streams left alone."""
import random
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import restore
from errors import UserError
from model import AttentionResUNet, load_model, save_model
from phantoms import make_sample_labels
from settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"
# A tiny recipe on the CPU in float32: seconds per training.
TINY = Settings().with_values(NUM_EPOCHS=1, TRAIN_NB=8, BATCH_SIZE=4, TRAIN_XY_SIZE=16, TRAIN_Z_SIZE=3, DEPTH=1,
                              BASE_FILTERS=4, START_FROM="scratch", INFERENCE_TILE_SIZE=32, PRECISION="fp32",
                              DEVICE="cpu")


@pytest.fixture(scope="module")
def kept_ids():
    return make_sample_labels((33, 32, 32))[::4]  # (9, 32, 32), sparse ids


@pytest.fixture(scope="module")
def trained(kept_ids):
    model, _ = restore.train_on_stack(kept_ids > 0, 4, TINY, progress=False)
    return model


def untrained(config):
    torch.manual_seed(0)
    model = AttentionResUNet(in_channels=3, depth=1, base_filters=4).eval()
    model.config = dict(config)
    return model


@pytest.mark.parametrize("call, message", [
    (lambda m: restore.restore_stack(m[0], 4, TINY), "a single image is no stack"),
    (lambda m: restore.restore_stack(m[None], 4, TINY), "drop the axis of length 1"),
    (lambda m: restore.restore_intensity(np.zeros(m.shape + (3,), np.uint8), 4, TINY), "RGB"),
    (lambda m: restore.restore_intensity(m, 4, TINY), "bool, a mask, not grey values"),
    (lambda m: restore.restore_intensity(np.where(m, np.nan, 1.0), 4, TINY), "NaN or infinite"),
    (lambda m: restore.restore_stack(m, 0.5, TINY), "above 1"),
    (lambda m: restore.restore_stack(m, 1, TINY), "above 1"),
    (lambda m: restore.restore_stack(m, float("nan"), TINY), "above 1"),
    (lambda m: restore.restore_stack(m, "4", TINY), "above 1"),
    (lambda m: restore.restore_stack(m[:5], 4, TINY, labels=m.astype(np.uint8)), "labels has shape"),
    (lambda m: restore.restore_stack(None, 4, TINY, labels=m.astype(np.float32)), "integer ids"),
    (lambda m: restore.restore_stack(None, 4, TINY), "Give the acquired slices"),
    (lambda m: restore.restore_probabilities(m, 4, TINY, kind="nuclei"), "kind must be one of"),
    (lambda m: restore.train_on_stack(m, 4, TINY, kind="labels"), "kind must be one of"),
    (lambda m: restore.restore_stack(m, 4, TINY.with_values(PROBABILITY_THRESHOLD=2)), "PROBABILITY_THRESHOLD"),
    (lambda m: restore.restore_stack(m.tolist(), 4, TINY, device="gpu"), "not a device"),
])
def test_bad_input_is_one_clear_error_before_any_training(kept_ids, call, message, capsys):
    with pytest.raises(UserError, match=re.escape(message)):
        call(kept_ids > 0)
    assert "Training" not in capsys.readouterr().err  # refused before any work


def test_a_device_name_a_list_and_a_torch_device_restore_alike(kept_ids):
    model = untrained({"factor": 4})
    mask = kept_ids > 0
    by_name = restore.restore_stack(mask, 4, TINY, model=model, device="cpu", progress=False)[1]
    by_device = restore.restore_stack(mask.tolist(), 4, TINY, model=model, device=torch.device("cpu"),
                                      progress=False)[1]
    assert by_name.shape == (33, 32, 32) and np.array_equal(by_name, by_device)


def test_a_model_carries_its_record_and_refuses_another_factor(trained, kept_ids, tmp_path):
    mask = kept_ids > 0
    assert trained.config["factor"] == 4 and trained.config["restores"] == "foreground"
    assert trained.config["train_xy_size"] == 16  # the recipe the training used
    with pytest.raises(UserError, match="trained at factor 4"):
        restore.restore_stack(mask, 8, TINY, model=trained)
    restored = restore.restore_stack(mask, 8, TINY, model=trained, allow_factor_mismatch=True, progress=False)[0]
    assert restored.shape == (65, 32, 32) and np.array_equal(restored[::8], mask)
    with pytest.raises(UserError, match="boundaries"):  # a foreground model for a dense label image
        restore.restore_dense_labels(kept_ids.astype(np.int64) + 1, 4, TINY, model=trained)
    with pytest.raises(UserError, match="config is a mapping"):
        save_model(tmp_path / "settings.pt", trained, TINY)
    loaded, config = load_model(save_model(tmp_path / "m.pt", trained), "cpu")  # the record saved by default
    assert config == loaded.config and config["factor"] == 4 and config["train_xy_size"] == 16
    expected = restore.restore_stack(mask, 4, TINY, model=trained, progress=False)[1]
    assert np.array_equal(restore.restore_stack(mask, 4, TINY, model=loaded, progress=False)[1], expected)


def test_a_model_without_settings_restores_with_what_it_records(kept_ids):
    """As ``apply.py --model`` does: here a threshold so high that only the kept slices stay foreground."""
    mask = kept_ids > 0
    strict = untrained({"factor": 4, "train_z_size": 3, "inference_tile_size": 32, "probability_threshold": 0.999})
    assert restore.recipe_for(None, strict).inference.probability_threshold == 0.999
    restored = restore.restore_stack(mask, 4, model=strict, device="cpu", progress=False)[0]
    loose = restore.restore_stack(mask, 4, TINY.with_values(PROBABILITY_THRESHOLD=0.001), model=strict,
                                  progress=False)[0]
    between = np.ones(len(restored), bool)
    between[::4] = False
    assert np.array_equal(restored[::4], mask) and not restored[between].any()
    assert loose[between].any()


def test_training_leaves_the_callers_random_streams_and_repeats(kept_ids):
    mask = kept_ids > 0
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    first, _ = restore.train_on_stack(mask, 4, TINY, progress=False)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    second, _ = restore.train_on_stack(mask, 4, TINY, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_progress_false_prints_nothing(trained, kept_ids, capsys):
    mask = kept_ids > 0
    restore.train_on_stack(mask, 4, TINY, progress=False)
    restore.restore_stack(None, 4, TINY, model=trained, labels=kept_ids, progress=False)
    restore.restore_dense_labels(kept_ids.astype(np.int64) + 1, 4, TINY, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_settings_names_are_checked():
    with pytest.raises(UserError, match="did you mean NUM_EPOCHS"):
        Settings().with_values(NUM_EPOCH=3)
    with pytest.raises(UserError, match="NUM_EPOCHS, not 'num_epochs'"):
        restore.as_settings({"num_epochs": 3})
    assert Settings().with_values(NUM_EPOCHS=3).training.num_epochs == 3


def test_the_readmes_python_example_names_what_the_library_has():
    block = re.search(r"### From Python\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    compile(block, "README.md", "exec")
    for module, names in re.findall(r"^from (\w+) import (.+)$", block, re.M):
        imported = __import__(module)
        for name in names.split(","):
            assert hasattr(imported, name.strip()), f"README: {module}.{name.strip()} does not exist"
    for call in ("restore_stack", "restore_intensity", "save_model", "load_model"):
        assert call + "(" in block


@pytest.mark.parametrize("factor", [Fraction(25, 8), np.array(4.0), np.float32(3.125), 2])
def test_any_real_factor_above_1_is_a_factor(factor):
    assert restore.check_factor(factor) == float(factor)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_cuda_index_is_a_device():
    with pytest.raises(UserError, match="no CUDA GPU"):
        restore.restore_stack(np.ones((3, 16, 16), bool), 4, TINY, model=untrained({"factor": 4}), device=0)


def test_settings_that_change_the_networks_input_must_agree_with_the_model(kept_ids):
    """A model learned from one input (how Z was upsampled; for dense label images whether the interfaces are
    in it): other settings are refused, the model's own restore."""
    mask = kept_ids > 0
    linear = untrained({"factor": 4, "upscale_method": "linear"})
    with pytest.raises(UserError, match="UPSCALE_METHOD 'linear'"):
        restore.restore_stack(mask, 4, TINY.with_values(UPSCALE_METHOD="nearest"), model=linear)
    dense = kept_ids.astype(np.int64) + 1
    boundaries = untrained({"factor": 4, "boundary_input": "linear", "restores": "boundaries"})
    with pytest.raises(UserError, match="BOUNDARY_INPUT 'linear'"):
        restore.restore_dense_labels(dense, 4, TINY, model=boundaries)  # TINY: interfaces, the default
    restored = restore.restore_dense_labels(dense, 4, TINY.with_model_record(boundaries.config), model=boundaries,
                                            progress=False)[0]
    assert np.array_equal(restored[::4], dense)
    # A record from before the setting existed was trained as the setting's model_absent says (linear input).
    older = untrained({"factor": 4, "restores": "boundaries"})
    with pytest.raises(UserError, match="BOUNDARY_INPUT 'linear'"):
        restore.restore_dense_labels(dense, 4, TINY, model=older)


def test_apply_refuses_what_the_model_or_the_kind_cannot_restore_before_reading(tmp_path, capsys):
    """The command line's wording, at plan time (a dry run), for a TIFF and an OME-Zarr output alike."""
    import apply
    import tifffile
    from data import save_stack

    mask = np.zeros((9, 32, 32), np.uint8)
    mask[:, 8:20, 10:24] = 255
    save_stack(tmp_path / "mask.tif", mask, (1.0, 0.25, 0.25), "um")
    tifffile.imwrite(tmp_path / "bits.tif", mask > 0)  # 1 bit per pixel, as bilevel masks are saved
    boundaries = untrained({"factor": 4, "kind": "labels", "restores": "boundaries"})
    save_model(tmp_path / "dense.pt", boundaries)
    save_model(tmp_path / "linear.pt", untrained({"factor": 4, "upscale_method": "linear"}))
    cases = [(["--input", tmp_path / "bits.tif", "--kind", "intensity", "--z-step", "4", "--xy-size", "1", "--unit",
               "um"], "1-bit (bool) image"),
             (["--input", tmp_path / "mask.tif", "--model", tmp_path / "dense.pt"], "restores the boundaries"),
             (["--input", tmp_path / "mask.tif", "--model", tmp_path / "linear.pt", "--upscale-method", "nearest"],
              "UPSCALE_METHOD 'linear'")]
    for arguments, message in cases:
        for output in ("o.tif", "o.ome.zarr"):
            status = apply.main([str(a) for a in arguments + ["--output", tmp_path / output, "--dry-run"]])
            assert status == 2 and message in capsys.readouterr().err, (arguments, output)
