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
import os  # noqa: E402
import tempfile  # noqa: E402

os.environ["AXIAL_SR_CACHE"] = tempfile.mkdtemp(prefix="axial-sr-test-cache-")
