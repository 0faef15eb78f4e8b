"""Training, tiled inference, eval.py end to end and the apply.py restore command."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import apply
import eval as eval_module
from data import downsample_z, factor_from_voxel_size, make_sample_labels, make_sample_stack, save_stack
from labeling import assign_labels
from restore import apply_model_to_stack_tiled_slice_by_slice, predict_tiled, reflect_indices, tile_starts, upscale_height
from metrics import calculate_iou, mean_label_iou, reconstructed_indices, score_reconstruction
from model import AttentionResUNet, load_model
from train import downscale_upscale_height, fit_on_sparse_stack, seed_everything

REPO = Path(__file__).resolve().parents[1]
TINY_TRAINING = dict(train_xy_size=32, train_z_size=3, train_nb=240, batch_size=16, num_epochs=4,
                     learning_rate=3e-3, base_filters=8, depth=2, progress=False)
TINY_SETTINGS = ["--sample-shape", "32,64,64", "--z-resolution", "8", "--xy-resolution", "2", "--train-xy-size",
                 "32", "--train-z-size", "3", "--train-nb", "96", "--num-epochs", "1", "--base-filters", "4",
                 "--depth", "2", "--inference-tile-size", "48", "--show", "no"]


@pytest.fixture(scope="module")
def tiny_problem():
    torch.set_num_threads(2)
    truth = make_sample_stack((40, 64, 64), seed=3)
    sparse, kept = downsample_z(truth, 4)
    model, history, _ = fit_on_sparse_stack(sparse, 4, random_state=0, **TINY_TRAINING)
    return truth, sparse, kept, model, history


def test_training_lowers_loss_and_beats_upscaled_input(tiny_problem):
    truth, sparse, kept, model, history = tiny_problem
    # Every epoch lowers the validation loss (the ratio first/last depends on how much the first epoch
    # already learnt); the IoU check below is the one that says the training is worth it.
    assert all(later < earlier for earlier, later in zip(history["val"], history["val"][1:])), history["val"]
    probabilities = apply_model_to_stack_tiled_slice_by_slice(model, sparse, 4, train_depth=3, tile_size=64,
                                                              original_depth=truth.shape[0], progress=False)
    predicted = score_reconstruction(probabilities >= 0.5, truth, kept)["iou_recon"]
    upscaled = upscale_height(sparse, 4, truth.shape[0]) >= 0.5  # the trivial prediction: the input itself
    baseline = score_reconstruction(upscaled, truth, kept)["iou_recon"]
    assert predicted > baseline + 0.02, (predicted, baseline)


def test_training_is_reproducible_on_cpu():
    sparse, _ = downsample_z(make_sample_stack((24, 48, 48), seed=1), 4)
    settings = dict(TINY_TRAINING, train_nb=64, num_epochs=2)
    _, first, _ = fit_on_sparse_stack(sparse, 4, random_state=7, **settings)
    _, second, _ = fit_on_sparse_stack(sparse, 4, random_state=7, **settings)
    assert first == second


def test_upscale_height_matches_training_degradation():
    rng = np.random.default_rng(0)
    image = (rng.random((3, 33, 20)) > 0.5).astype(np.float32)
    degraded = downscale_upscale_height(image, 4)
    # The same rows, upscaled at inference, give the same image.
    via_inference = upscale_height(image[:, ::4], 4, 33, axis=1)
    np.testing.assert_array_equal(degraded, via_inference)
    np.testing.assert_array_equal(degraded[:, ::4], image[:, ::4])


def test_upscale_height_output_depth_and_tail():
    sparse = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    assert upscale_height(sparse, 3).shape == (10, 2, 2)
    out = upscale_height(sparse, 3, original_depth=12)
    assert out.shape == (12, 2, 2)
    np.testing.assert_allclose(out[:, 0, 0], [0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2, 7 / 3, 8 / 3, 3, 3, 3], rtol=1e-6)


def test_reflect_indices_and_tile_starts():
    np.testing.assert_array_equal(reflect_indices(np.array([-2, -1, 0, 4, 5, 6]), 5), [2, 1, 0, 4, 3, 2])
    starts = tile_starts(100, 32, 8)
    assert starts[0] == 0 and starts[-1] == 68 and np.all(np.diff(starts) <= 24)
    np.testing.assert_array_equal(tile_starts(20, 32, 8), [0])


def test_tiled_prediction_agrees_with_whole_image():
    seed_everything(0)
    model = AttentionResUNet(in_channels=3, depth=2, base_filters=4).eval()
    images = np.random.default_rng(0).random((2, 3, 70, 90)).astype(np.float32)
    whole = predict_tiled(model, images, tile_size=128, overlap=0, batch_size=4)
    tiled = predict_tiled(model, images, tile_size=40, overlap=16, batch_size=5)
    assert whole.shape == tiled.shape == (2, 70, 90)
    # Convolutions see less context at tile borders; blending keeps the difference small.
    assert np.mean(np.abs(whole - tiled)) < 0.02
    assert np.max(np.abs(whole - tiled)) < 0.3


def test_cpu_batches_are_capped_by_pixels_and_give_the_same_probabilities():
    """On a CPU a forward pass holds at most ``batch_pixels`` pixels (but two tiles at least); the
    batching changes the speed, not the result (BatchNorm is in eval mode: tiles are independent)."""
    seed_everything(0)
    network = AttentionResUNet(in_channels=3, depth=2, base_filters=4).eval()
    batch_sizes = []
    network.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    images = np.random.default_rng(0).random((3, 3, 40, 40)).astype(np.float32)  # 12 tiles of 24 x 24
    settings = dict(tile_size=24, overlap=8, batch_size=5, skip_empty=False)
    uncapped = predict_tiled(network, images, batch_pixels=0, **settings)
    assert batch_sizes == [5, 5, 2]
    batch_sizes.clear()
    capped = predict_tiled(network, images, batch_pixels=3 * 24 * 24 + 10, **settings)
    assert batch_sizes == [3, 3, 3, 3]
    batch_sizes.clear()
    predict_tiled(network, images, batch_pixels=100, **settings)  # less than a tile: still two tiles
    assert batch_sizes == [2] * 6
    np.testing.assert_allclose(capped, uncapped, atol=1e-5)


def test_compiled_restore_equals_the_eager_restore_and_is_cached():
    """COMPILE runs the same network through torch.compile: the restored stack
    equals the eager one up to float rounding, for every batch size (a batch of
    one included); the second call reuses the compilation."""
    import shutil

    from model import CompiledNetwork, fuse_for_inference, compile_for_inference

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("torch.compile (inductor) needs a C++ compiler, and this machine has none")
    seed_everything(0)
    model = AttentionResUNet(in_channels=3, depth=2, base_filters=4).eval()
    sparse = np.random.default_rng(0).random((5, 24, 32)) > 0.6
    # Two tile shapes, 17 x 32 (planes along Y) and 17 x 24 (along X): the second compiles anew, static.
    settings = dict(factor=4, train_depth=3, tile_size=32, batch_size=3, precision="fp32", progress=False)
    eager = apply_model_to_stack_tiled_slice_by_slice(model, sparse, **settings)
    compiled = apply_model_to_stack_tiled_slice_by_slice(model, sparse, compile=True, **settings)
    assert compiled.shape == eager.shape == (17, 24, 32)
    np.testing.assert_allclose(compiled, eager, atol=1e-5)
    network = compile_for_inference(model, torch.device("cpu"))
    assert isinstance(network, CompiledNetwork) and network is compile_for_inference(model, torch.device("cpu"))
    assert network.architecture == model.architecture
    tiles = torch.rand(3, 3, 17, 32)
    with torch.inference_mode():
        reference = fuse_for_inference(model)(tiles)
        for count in (1, 2, 3):  # a batch of one is run duplicated, and only its own output returned
            torch.testing.assert_close(network(tiles[:count]), reference[:count], atol=1e-5, rtol=1e-5)


def test_compile_failure_is_one_clear_error():
    """Where torch.compile cannot compile (no C++ compiler, a compiler bug), the
    run stops with a UserError that names the reason and says to run without it."""
    from torch._dynamo.exc import BackendCompilerFailed

    from data import UserError
    from model import CompiledNetwork

    class FailingCompiler(torch.nn.Module):  # raises what torch.compile raises when inductor fails
        def forward(self, x):
            raise BackendCompilerFailed(lambda: None, RuntimeError("no C++ compiler found"), None)

    network = CompiledNetwork(AttentionResUNet(in_channels=3, depth=2, base_filters=4).eval())
    network.compiled = FailingCompiler()
    with pytest.raises(UserError, match="no C\\+\\+ compiler found.*Run without COMPILE"):
        network(torch.rand(2, 3, 16, 16))


def test_apply_shape_orientations_and_kept_slices(tiny_problem):
    truth, sparse, kept, model, _ = tiny_problem
    crop = sparse[:, :45, :51]  # sizes that are not multiples of the tile
    both = apply_model_to_stack_tiled_slice_by_slice(model, crop, 4, 3, tile_size=32, original_depth=39,
                                                     progress=False)
    assert both.shape == (39, 45, 51) and both.dtype == np.float32
    assert both.min() >= 0 and both.max() <= 1
    np.testing.assert_array_equal(both[kept[kept < 39]], crop[: len(kept[kept < 39])].astype(np.float32))
    only_y = apply_model_to_stack_tiled_slice_by_slice(model, crop, 4, 3, 32, original_depth=39, orientations="y",
                                                       keep_kept_slices=False, progress=False)
    only_x = apply_model_to_stack_tiled_slice_by_slice(model, crop, 4, 3, 32, original_depth=39, orientations="x",
                                                       keep_kept_slices=False, progress=False)
    fused = apply_model_to_stack_tiled_slice_by_slice(model, crop, 4, 3, 32, original_depth=39,
                                                      keep_kept_slices=False, progress=False)
    np.testing.assert_allclose(fused, (only_y + only_x) / 2, atol=1e-5)
    as_uint8 = apply_model_to_stack_tiled_slice_by_slice(model, crop, 4, 3, 32, original_depth=39,
                                                         out_dtype=np.uint8, progress=False)
    assert as_uint8.dtype == np.uint8
    assert np.max(np.abs(as_uint8 / 255.0 - both)) <= 1 / 255 + 1e-6
    with pytest.raises(ValueError, match="odd"):
        apply_model_to_stack_tiled_slice_by_slice(model, crop, 4, 4, 32)


def test_eval_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    args = TINY_SETTINGS + ["--run-directory", str(run_dir)]
    result = subprocess.run([sys.executable, "eval.py", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Computation will be performed on device: cpu" in result.stdout or "cuda" in result.stdout
    printed = {}
    for line in result.stdout.splitlines():
        if line.startswith("IoU for"):
            printed[line.split()[2]] = float(line.split(":")[1].split()[0])
    assert set(printed) == {"Morphed", "Predicted"}

    metrics = json.loads((run_dir / "metrics.json").read_text())
    truth = make_sample_stack((32, 64, 64), seed=42)
    kept = np.array(metrics["kept_indices"])
    np.testing.assert_array_equal(kept, np.arange(0, 32, 4))
    predicted = tifffile.imread(run_dir / "predicted" / "predicted_stack.tif") > 0
    morphed = tifffile.imread(run_dir / "interpolated" / "morphed_stack.tif") > 0
    probabilities = tifffile.imread(run_dir / "predicted" / "predicted_probabilities.tif")
    assert predicted.shape == morphed.shape == probabilities.shape == (32, 64, 64)
    assert probabilities.dtype == np.uint8  # held and written as 0-255, one byte per voxel
    # The reported scores are the scores of the saved arrays.
    recon = reconstructed_indices(kept, 32)
    assert metrics["scores"]["predicted"]["iou_recon"] == pytest.approx(calculate_iou(predicted[recon], truth[recon]))
    assert metrics["scores"]["morphed"]["iou_stack"] == pytest.approx(calculate_iou(morphed, truth))
    assert printed["Predicted"] == pytest.approx(calculate_iou(predicted, truth), abs=1e-4)
    with tifffile.TiffFile(run_dir / "predicted" / "predicted_stack.tif") as tif:
        assert tif.imagej_metadata["spacing"] == pytest.approx(2.0)
        assert tif.imagej_metadata["unit"] == "um"
    for name in ("loss_curve.png", "training_examples.png", "comparison.png"):
        assert (run_dir / name).stat().st_size > 1000
    model, config = load_model(run_dir / "model.pt")
    assert config["factor"] == 4 and config["train_z_size"] == 3

    again = subprocess.run([sys.executable, "eval.py", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already exist" in again.stderr


@pytest.mark.parametrize("flags, message", [
    (["--train-z-size", "4"], "TRAIN_Z_SIZE must be odd"),
    (["--z-resolution", "2", "--xy-resolution", "2"], "at least 2"),
    (["--input-images-directory", "/nonexistent/stack"], "does not exist"),
    (["--train-xy-size", "512"], "TRAIN_XY_SIZE"),
    (["--skip-merge", "sum"], "SKIP_MERGE must be one of add, concat"),
    (["--inference-batch-pixels", "-1"], "INFERENCE_BATCH_PIXELS must be 0"),
    (["--crop-pool", "0.5"], "CROP_POOL must be at least 1"),
    (["--z-resolution", "64", "--xy-resolution", "2"], "not smaller than the stack depth"),
    (["--z-resolution", "200", "--xy-resolution", "2"], "more than 64: most often the two sizes are in different"),
])
def test_eval_bad_input_fails_fast_with_clear_message(tmp_path, flags, message):
    args = TINY_SETTINGS + ["--run-directory", str(tmp_path / "run")] + flags
    result = subprocess.run([sys.executable, "eval.py", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Training" not in result.stderr  # failed before any long work


def test_viewer_builds_headless():
    stack = make_sample_stack((8, 16, 16), seed=0)
    figure = eval_module.view_stacks_interactively(stack, stack, stack, block=False)
    assert figure.get_label() == "Slice Viewer" and len(figure.axes) == 4
    figure.slider.set_val(3)
    np.testing.assert_array_equal(figure.axes[0].images[0].get_array(), stack[3])


# --------------------------------------------------------------------------- #
# apply.py: restoring a genuinely anisotropic stack
# --------------------------------------------------------------------------- #
def test_factor_from_voxel_size():
    assert factor_from_voxel_size(16.0, 2.0) == (8, 2.0)
    assert factor_from_voxel_size(0.5, 0.22) == (pytest.approx(0.5 / 0.22), 0.22)  # isotropic grid by default
    with pytest.warns(UserWarning, match="not an integer"):
        factor, z = factor_from_voxel_size(0.5, 0.22, rounding="nearest")
    assert factor == 2 and z == pytest.approx(0.25)
    # Rounding: nearest integer, halves up (2.5 -> 3, 3.5 -> 4, 3.4 -> 3), as eval.py simulates.
    with pytest.warns(UserWarning):
        assert [factor_from_voxel_size(r, 1.0, rounding="nearest")[0] for r in (2.5, 3.5, 3.4, 3.9)] == [3, 4, 3, 4]
    assert eval_module.default_settings()["Z_RESOLUTION"] / eval_module.default_settings()["XY_RESOLUTION"] == 8
    from data import resolution_factor
    with pytest.warns(UserWarning):
        assert resolution_factor(7.8, 2.0) == 4  # the seed's floor would have given 3
    with pytest.raises(ValueError, match="isotropic"):
        factor_from_voxel_size(1.2, 1.0)


def test_assign_labels_keeps_ids_and_never_merges():
    labels = make_sample_labels((33, 48, 48), seed=5)
    sparse = labels[::4]
    restored = assign_labels(labels > 0, sparse, 4)
    np.testing.assert_array_equal(restored[::4], sparse)
    assert set(np.unique(restored)) <= set(np.unique(sparse))
    # With the true foreground, nearly every voxel gets the id of its own object (the rest belong to
    # objects that no kept slice shows, which no method can name).
    foreground = labels > 0
    assert np.mean(restored[foreground] == labels[foreground]) > 0.9


def test_restore_command_from_metadata(tmp_path, tiny_problem):
    truth, sparse, kept, model, _ = tiny_problem
    source = tmp_path / "aniso.tif"
    save_stack(source, sparse, voxel_size_zyx=(0.8, 0.2, 0.2), unit="um")
    model_path = tmp_path / "model.pt"
    from model import save_model

    save_model(model_path, model, {"factor": 4, "train_z_size": 3})
    out = tmp_path / "out.tif"
    common = ["--model", str(model_path), "--train-z-size", "3", "--inference-tile-size", "64"]
    assert apply.main(["--input", str(source), "--output", str(out), "--save-probabilities", "uint8", "--preview",
                       *common]) == 0
    assert (tmp_path / "out_preview.png").stat().st_size > 1000
    restored = tifffile.imread(out) > 0
    assert restored.shape == ((len(sparse) - 1) * 4 + 1, 64, 64)
    np.testing.assert_array_equal(restored[::4], sparse)
    with tifffile.TiffFile(out) as tif:
        assert tif.imagej_metadata["spacing"] == pytest.approx(0.2)
    assert tifffile.imread(tmp_path / "out_probabilities.tif").dtype == np.uint8
    # Refuses to overwrite; --overwrite replaces.
    assert apply.main(["--input", str(source), "--output", str(out), *common]) == 2
    assert apply.main(["--input", str(source), "--output", str(out), "--overwrite", *common]) == 0


def test_restore_command_needs_a_voxel_size(tmp_path, capsys):
    source = tmp_path / "plain.tif"
    tifffile.imwrite(source, make_sample_stack((8, 32, 32), seed=0).astype(np.uint8))
    assert apply.main(["--input", str(source), "--output", str(tmp_path / "o.tif")]) == 2
    assert "carries no lateral pixel size" in capsys.readouterr().err


def test_restore_ome_metadata_and_label_round_trip(tmp_path, tiny_problem):
    *_, model, _ = tiny_problem
    labels = make_sample_labels((41, 64, 64), seed=11)
    sparse_labels = labels[::4]
    source = tmp_path / "labels.ome.tif"
    tifffile.imwrite(source, sparse_labels, ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeZ": 1.0, "PhysicalSizeY": 0.25, "PhysicalSizeX": 0.25})
    model_path = tmp_path / "m.pt"
    from model import save_model

    save_model(model_path, model, {"factor": 4})
    out_dir = tmp_path / "restored"
    # No --train-z-size: the channel count comes from the saved model.
    # many integer values in flat regions, and a mask model: a label image, without --kind
    assert apply.main(["--input", str(source), "--output", str(out_dir), "--model", str(model_path),
                       "--inference-tile-size", "64"]) == 0
    restored = tifffile.imread(out_dir / "labels_restored.ome.tif")  # an OME-TIFF input gives an OME-TIFF output
    assert tifffile.TiffFile(out_dir / "labels_restored.ome.tif").is_ome
    assert restored.shape == (41, 64, 64)
    np.testing.assert_array_equal(restored[::4], sparse_labels)
    assert set(np.unique(restored)) <= set(np.unique(sparse_labels))
    # No two input objects merged: every restored id region overlaps its own true object most.
    recon = reconstructed_indices(np.arange(0, 41, 4), 41)
    assert mean_label_iou(restored, labels, recon) > 0.3


def test_restore_command_flag_beats_saved_recipe(tmp_path, tiny_problem):
    truth, sparse, kept, model, _ = tiny_problem
    from model import save_model

    source = tmp_path / "aniso.tif"
    save_stack(source, sparse, voxel_size_zyx=(0.8, 0.2, 0.2))
    save_model(tmp_path / "strict.pt", model, {"factor": 4, "train_z_size": 3, "probability_threshold": 0.999})
    common = ["--input", str(source), "--model", str(tmp_path / "strict.pt"), "--inference-tile-size", "64"]
    assert apply.main(common + ["--output", str(tmp_path / "strict.tif")]) == 0
    # 0.5 is eval.py's default, yet typed explicitly it must override the model's 0.999.
    assert apply.main(common + ["--output", str(tmp_path / "half.tif"), "--probability-threshold", "0.5"]) == 0
    strict, half = (tifffile.imread(tmp_path / name) > 0 for name in ("strict.tif", "half.tif"))
    assert half.sum() > strict.sum()


def test_restore_command_rejects_conflicts_before_work(tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        save_stack(tmp_path / folder / "s.tif", make_sample_stack((6, 32, 32), seed=0), (0.8, 0.2, 0.2))
    out = tmp_path / "out"
    assert apply.main(["--input", str(tmp_path / "a" / "s.tif"), str(tmp_path / "b" / "s.tif"),
                       "--output", str(out)]) == 2
    assert "same output name" in capsys.readouterr().err
    assert apply.main(["--input", str(tmp_path / "a" / "s.tif"), "--output", str(tmp_path / "o.tif"),
                       "--model", "m.pt", "--save-model", str(tmp_path / "n.pt")]) == 2
    assert "--save-model" in capsys.readouterr().err
    assert apply.main(["--input", str(tmp_path / "a" / "s.tif"), "--output", str(tmp_path / "o.tif"),
                       "--upscale-method", "sdf"]) == 2
    assert "UPSCALE_METHOD" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "o.tif").exists()


def test_threshold_in_place_matches_copy():
    from restore import threshold_probabilities

    probabilities = (np.random.default_rng(0).random((4, 9, 7)) * 255).astype(np.uint8)
    expected = probabilities >= 128  # 0.5 of 255, rounded up
    copy = threshold_probabilities(probabilities.copy(), 0.5)
    in_place = threshold_probabilities(probabilities, 0.5, in_place=True)
    np.testing.assert_array_equal(copy, expected)
    np.testing.assert_array_equal(in_place, expected)
    assert np.shares_memory(in_place, probabilities)
    with pytest.raises(ValueError, match="uint8"):
        threshold_probabilities(np.zeros((1, 2, 2), np.float32), 0.5, in_place=True)
