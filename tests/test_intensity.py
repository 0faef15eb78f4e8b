"""Grey-scale stacks: kind detection, normalisation, cubic baseline, scores, the engine and the workflow."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

import apply
from data import (UserError, decide_kind, denormalize_intensity, downsample_z, intensity_range,
                  make_sample_intensity, normalize_intensity, save_stack)
from eval import default_settings
from metrics import score_intensity_reconstruction
from morph import interpolate_along_axis
from restore import restore_intensity, training_kwargs, upscale_height
from settings import RECIPE_BY_KIND

REPO = Path(__file__).resolve().parents[1]
TINY = ["--train-xy-size", "32", "--train-z-size", "3", "--train-nb", "96", "--num-epochs", "1",
        "--base-filters", "4", "--depth", "2", "--inference-tile-size", "48"]


class CentreChannel(nn.Module):
    """Stand-in intensity model: returns its centre input channel, i.e. the linear upscaling."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.architecture = {"in_channels": channels, "output": "intensity"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, x.shape[1] // 2: x.shape[1] // 2 + 1] + 0 * self.dummy


def test_decide_kind_asks_only_where_the_evidence_is_ambiguous():
    assert decide_kind(np.zeros((2, 3, 3), bool)) == "mask"
    assert decide_kind(np.array([0, 255], np.uint8).repeat(9).reshape(2, 3, 3)) == "mask"
    assert decide_kind(np.linspace(0, 1, 18, dtype=np.float32).reshape(2, 3, 3)) == "intensity"
    # every neighbour differs (noise, texture): grey values; flat regions of ids: a label image
    assert decide_kind(np.arange(18, dtype=np.uint8).reshape(2, 3, 3)) == "intensity"
    assert decide_kind(np.array([[3, 3, 3, 7, 7, 7, 9, 9, 9]] * 4, np.uint8)[None].repeat(2, 0)) == "labels"
    # two values neither 0 are a two-class segmentation (ilastik's 1/2), a mask
    assert decide_kind(np.array([[3, 3, 7, 7]] * 4, np.uint8)[None].repeat(2, 0)) == "mask"
    # two thirds of the neighbouring pairs equal: between the two, so --kind is asked for
    ambiguous = np.array([[1, 1, 2, 3]] * 4, np.uint8)[None].repeat(2, 0)
    with pytest.raises(UserError, match="--kind labels or --kind intensity"):
        decide_kind(ambiguous)
    assert decide_kind(ambiguous, "labels") == "labels"
    with pytest.raises(UserError, match="--kind must be one of"):
        decide_kind(np.zeros((2, 3, 3)), "grey")


def test_normalisation_round_trip_and_range():
    stack = np.random.default_rng(0).integers(0, 256, (4, 50, 50)).astype(np.uint8)
    lo, hi = intensity_range(stack)
    assert lo == pytest.approx(np.percentile(stack, 1.0)) and hi == pytest.approx(np.percentile(stack, 99.8))
    normalized = normalize_intensity(stack, (lo, hi))
    assert normalized.dtype == np.float32
    np.testing.assert_allclose(normalized, (stack - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
    back = denormalize_intensity(normalized, (lo, hi), np.uint8)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, stack)
    # Out-of-range values are clipped to the dtype, not wrapped around.
    np.testing.assert_array_equal(denormalize_intensity(np.array([-5.0, 5.0]), (0, 255), np.uint8), [0, 255])
    assert intensity_range(np.full((2, 2, 2), 7.0)) == (7.0, 8.0)  # a flat stack still has hi > lo


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.float32])
def test_denormalising_in_place_gives_the_same_values_and_reuses_the_array(dtype):
    """The restore denormalises its float32 volume in place (one copy fewer, two temporaries fewer): the same
    values as the copying path, out-of-range values clipped, the input left alone unless in_place."""
    values = np.random.default_rng(1).normal(0.5, 0.6, (3, 20, 20)).astype(np.float32)
    value_range = (-100.0, 900.0)
    kept = values.copy()
    expected = denormalize_intensity(values, value_range, dtype)
    np.testing.assert_array_equal(values, kept)  # the copying path leaves its input alone
    got = denormalize_intensity(values, value_range, dtype, in_place=True)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    if np.dtype(dtype) == np.float32:
        assert got is values  # float32 out: the very array, no copy at all
    else:
        assert not np.array_equal(values, kept)  # its buffer was used for the arithmetic


def test_cubic_interpolation_reproduces_a_cubic_along_z():
    z = np.arange(25, dtype=np.float64)
    profile = 0.001 * (z - 3) * (z - 11) * (z - 20) + 2.0
    stack = (profile[:, None, None] * np.ones((1, 2, 3))).astype(np.float32)
    kept = np.arange(0, 25, 4)
    cubic = interpolate_along_axis(stack[kept], kept, 25, method="cubic")
    np.testing.assert_allclose(cubic[: kept[-1] + 1], stack[: kept[-1] + 1], rtol=1e-4)
    np.testing.assert_array_equal(cubic[kept[-1]:], np.repeat(stack[kept[-1]][None], 25 - kept[-1], axis=0))


def test_psnr_and_ssim_on_reconstructed_slices_only():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 256, (9, 32, 32)).astype(np.uint8)
    predicted = truth.copy()
    predicted[1:4] = np.clip(truth[1:4].astype(int) + 10, 0, 255)  # error in reconstructed slices only
    predicted[0] = 0  # kept slice: not scored
    scores = score_intensity_reconstruction(predicted, truth, kept_indices=[0, 4, 8])
    mse = np.mean((predicted[[1, 2, 3, 5, 6, 7]].astype(float) - truth[[1, 2, 3, 5, 6, 7]]) ** 2)
    assert scores["psnr_recon"] == pytest.approx(10 * np.log10(255**2 / mse), rel=1e-6)
    assert 0 < scores["ssim_recon"] < 1
    with np.errstate(divide="ignore"):  # PSNR of a perfect restoration is infinite
        assert score_intensity_reconstruction(truth, truth, [0, 4, 8])["ssim_recon"] == pytest.approx(1.0)


def test_16_bit_grey_values_are_scored_over_their_own_range():
    """A 12-bit camera's image in a uint16 file (offset 100, 1000 grey levels): PSNR over the dtype's 65535 would
    add 36 dB to any method and SSIM would read 1.000; the scores are taken over the truth's range."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(2)
    truth = (100 + rng.integers(0, 1001, (9, 32, 32))).astype(np.uint16)
    truth[0, 0, :2] = 100, 1100  # the range, exactly
    predicted = np.clip(truth.astype(int) + rng.integers(-200, 201, truth.shape), 0, None).astype(np.uint16)
    scores = score_intensity_reconstruction(predicted, truth, kept_indices=[0, 4, 8])
    recon = [1, 2, 3, 5, 6, 7]
    mse = np.mean((predicted[recon].astype(float) - truth[recon]) ** 2)
    assert scores["data_range"] == 1000
    assert scores["psnr_recon"] == pytest.approx(10 * np.log10(1000**2 / mse), rel=1e-6)
    reference = np.mean([structural_similarity(t.astype(float), p.astype(float), data_range=1000)
                         for t, p in zip(truth[recon], predicted[recon])])
    over_dtype = np.mean([structural_similarity(t.astype(float), p.astype(float), data_range=65535)
                          for t, p in zip(truth[recon], predicted[recon])])
    assert scores["ssim_recon"] == pytest.approx(reference) and over_dtype > scores["ssim_recon"] + 0.05


def test_engine_with_a_pass_through_model_is_linear_interpolation():
    """Independent reference: a model returning its centre channel restores exactly the
    linear interpolation along Z, mapped back to uint8; kept slices verbatim."""
    image = make_sample_intensity((33, 40, 48), seed=2)
    sparse, kept = downsample_z(image, 4)
    settings = dict(default_settings(), TRAIN_Z_SIZE=3, INFERENCE_TILE_SIZE=32, PRECISION="fp32")
    restored, _, info = restore_intensity(sparse, 4, settings, model=CentreChannel(3), original_depth=33,
                                          device=torch.device("cpu"))
    assert restored.dtype == np.uint8 and restored.shape == image.shape
    np.testing.assert_array_equal(restored[kept], sparse)
    lo, hi = info["value_range"]
    expected = denormalize_intensity(upscale_height(normalize_intensity(sparse, (lo, hi)), 4, 33), (lo, hi), np.uint8)
    assert np.abs(restored.astype(int) - expected).max() <= 1  # float rounding at .5 only
    assert np.mean(restored != expected) < 1e-3


def test_intensity_model_cannot_restore_a_mask_and_vice_versa():
    from restore import restore_probabilities

    sparse = np.zeros((5, 16, 16), bool)
    with pytest.raises(UserError, match="trained on grey-scale"):
        restore_probabilities(sparse, 4, dict(default_settings(), TRAIN_Z_SIZE=3), model=CentreChannel(3))


def test_training_recipe_by_kind_unless_given():
    settings = default_settings()
    # The defaults: each kind's recipe.
    assert settings["NUM_EPOCHS"] is None and settings["LEARNING_RATE"] is None and settings["CROP_POOL"] is None
    mask, grey = training_kwargs(settings, "mask"), training_kwargs(settings, "intensity")
    # The numeric sentinels of earlier versions (0 = by kind) give the same recipes.
    legacy = dict(settings, NUM_EPOCHS=0, LEARNING_RATE=0.0, CROP_POOL=0.0)
    assert training_kwargs(legacy, "mask") == mask and training_kwargs(legacy, "intensity") == grey
    # Masks: 3 epochs fine-tuning the phantom-trained starting model (4 from random weights).
    assert (mask["num_epochs"], mask["learning_rate"], mask["crop_pool"]) == (3, 3e-3, 2.0)
    assert (grey["num_epochs"], grey["learning_rate"], grey["crop_pool"]) == (20, 6e-3, 1.0)
    assert all(mask[k] == grey[k] for k in mask if k not in RECIPE_BY_KIND["mask"])
    settings.update(NUM_EPOCHS=3, LEARNING_RATE=1e-3, CROP_POOL=1.5)
    for kind in ("mask", "intensity"):
        given = training_kwargs(settings, kind)
        assert (given["num_epochs"], given["learning_rate"], given["crop_pool"]) == (3, 1e-3, 1.5)
    result = subprocess.run([sys.executable, "eval.py", "--num-epochs", "-1", "--show", "no"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "NUM_EPOCHS must be 0 (by kind)" in result.stderr


def test_trained_intensity_network_beats_linear_on_a_tiny_problem():
    """A short training on the grey-scale phantom improves on linear interpolation along Z."""
    torch.set_num_threads(2)
    truth = make_sample_intensity((41, 64, 64), seed=3)
    sparse, kept = downsample_z(truth, 4)
    settings = dict(default_settings(), TRAIN_XY_SIZE=32, TRAIN_Z_SIZE=3, TRAIN_NB=400, NUM_EPOCHS=4,
                    BASE_FILTERS=8, DEPTH=2, INFERENCE_TILE_SIZE=64, RANDOM_STATE=0)
    restored, _, info = restore_intensity(sparse, 4, settings, original_depth=truth.shape[0], progress=False)
    linear = np.clip(np.rint(interpolate_along_axis(sparse, kept, truth.shape[0], method="linear")), 0, 255)
    network = score_intensity_reconstruction(restored, truth, kept)
    baseline = score_intensity_reconstruction(linear.astype(np.uint8), truth, kept)
    assert network["psnr_recon"] > baseline["psnr_recon"] + 0.3, (network, baseline)
    assert info["history"]["val"][-1] < info["history"]["val"][0]


def test_eval_intensity_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    args = ["--kind", "intensity", "--sample-shape", "32,64,64", "--z-resolution", "8", "--xy-resolution", "2",
            *TINY, "--show", "no", "--run-directory", str(run_dir)]
    result = subprocess.run([sys.executable, "eval.py", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    printed = [line for line in result.stdout.splitlines() if line.startswith("PSNR / SSIM for")]
    assert [line.split()[4] for line in printed] == ["Linear", "Cubic", "Predicted"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["kind"] == "intensity"
    truth = make_sample_intensity((32, 64, 64), seed=42)
    predicted = tifffile.imread(run_dir / "predicted" / "predicted_stack.tif")
    assert predicted.dtype == np.uint8 and predicted.shape == truth.shape
    kept = np.array(metrics["kept_indices"])
    np.testing.assert_array_equal(predicted[kept], truth[kept])
    scored = score_intensity_reconstruction(predicted, truth, kept)
    assert metrics["scores"]["predicted"]["psnr_recon"] == pytest.approx(scored["psnr_recon"])
    assert (run_dir / "comparison.png").stat().st_size > 1000


def test_apply_intensity_keeps_dtype_range_and_voxel_size(tmp_path, capsys):
    image = make_sample_intensity((48, 64, 64), seed=5)
    sparse = (image[::4].astype(np.uint16) * 200)  # 16-bit grey values
    source = tmp_path / "em.tif"
    save_stack(source, sparse, (0.2, 0.05, 0.05), "um")
    out = tmp_path / "em_iso.tif"
    # --kind auto reads 16-bit grey values with noise and texture as grey values, and says why
    assert apply.main(["--input", str(source), "--output", str(out), "--dry-run", *TINY]) == 0
    assert "kind: intensity (noise or texture" in capsys.readouterr().out
    assert not out.exists()
    assert apply.main(["--input", str(source), "--output", str(out), *TINY]) == 0
    restored = tifffile.imread(out)
    assert restored.dtype == np.uint16 and restored.shape == ((len(sparse) - 1) * 4 + 1, 64, 64)
    np.testing.assert_array_equal(restored[::4], sparse)
    assert restored.max() <= 255 * 200 * 1.1  # no wrap-around, grey values in the input's range
    with tifffile.TiffFile(out) as tif:
        assert tif.imagej_metadata["spacing"] == pytest.approx(0.05)


def test_ssim_losses_use_skimages_ssim_and_vanish_for_a_perfect_match():
    """The SSIM of the 'ssim' and 'mse+ssim' losses is skimage's default SSIM (uniform 7 x 7 window,
    sample covariance), mixed with L1 or MSE as documented."""
    from skimage.metrics import structural_similarity
    from train import SSIM_MIX, SSIM_WEIGHT_WITH_MSE, intensity_criterion, ssim_map

    rng = np.random.default_rng(5)
    target = rng.random((2, 1, 30, 40))
    predicted = np.clip(target + 0.1 * rng.standard_normal(target.shape), 0, 1)
    reference = np.mean([structural_similarity(t[0], p[0], data_range=1.0) for t, p in zip(target, predicted)])
    as_tensor = torch.from_numpy
    assert ssim_map(as_tensor(predicted), as_tensor(target)).mean().item() == pytest.approx(reference, rel=1e-9)
    loss = intensity_criterion("ssim")(as_tensor(predicted), as_tensor(target)).item()
    l1 = np.abs(predicted - target).mean()
    assert loss == pytest.approx(SSIM_MIX * (1 - reference) + (1 - SSIM_MIX) * l1, rel=1e-9)
    mixed = intensity_criterion("mse+ssim")(as_tensor(predicted), as_tensor(target)).item()
    mse = np.mean((predicted - target) ** 2)
    assert mixed == pytest.approx(mse + SSIM_WEIGHT_WITH_MSE * (1 - reference), rel=1e-9)
    for name in ("ssim", "mse+ssim"):
        assert intensity_criterion(name)(as_tensor(target), as_tensor(target)).item() == pytest.approx(0.0, abs=1e-12)
    # A crop smaller than the 7 x 7 window (DEPTH=1 trains on 4-pixel crops) is scored with a 3 x 3 window.
    small_target, small_predicted = target[..., :4, :4], predicted[..., :4, :4]
    small_reference = np.mean([structural_similarity(t[0], p[0], data_range=1.0, win_size=3)
                               for t, p in zip(small_target, small_predicted)])
    small = ssim_map(as_tensor(small_predicted), as_tensor(small_target))
    assert small.shape[-2:] == (2, 2) and small.mean().item() == pytest.approx(small_reference, rel=1e-9)


def test_an_unknown_intensity_loss_is_refused_with_the_choices():
    from settings import Settings

    with pytest.raises(UserError, match="INTENSITY_LOSS must be one of mse, l1, ssim, mse\\+ssim, got 'ssmi'"):
        Settings().with_values(INTENSITY_LOSS="ssmi").validate()
