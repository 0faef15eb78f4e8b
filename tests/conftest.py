"""Shared pytest setup: import the flat-layout modules from the repository root."""
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

# Put the repository root first so that ``import data`` etc. find the project's
# modules and not an installed package of the same name.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Runs of apply.py record their throughput for the plan's expected time: tests keep theirs out of the user's
# cache (subprocesses inherit this too).
import atexit  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

os.environ["AXIAL_SR_CACHE"] = tempfile.mkdtemp(prefix="axial-sr-test-cache-")
# Removed when the test run ends, so that runs of the suite leave nothing behind in the temporary folder.
atexit.register(shutil.rmtree, os.environ["AXIAL_SR_CACHE"], ignore_errors=True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_args(tmp_path_factory):
    """apply.py flags restoring with a small untrained network saved for factor 4 (3 channel planes, depth 1) on
    the CPU in float32: quick and deterministic, for tests that compare one input read two ways."""
    import torch
    from model import AttentionResUNet, save_model

    torch.manual_seed(0)
    model = AttentionResUNet(in_channels=3, depth=1, base_filters=4).eval()
    path = save_model(tmp_path_factory.mktemp("model") / "m.pt", model,
                      {"factor": 4, "inference_tile_size": 32, "train_xy_size": 16})
    return ["--model", str(path), "--precision", "fp32", "--device", "cpu"]
