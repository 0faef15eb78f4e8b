"""Checks on the real segmentations in ../shared/data (skipped when the folder is absent)."""
from pathlib import Path

import numpy as np
import pytest

from data import downsample_z, import_binary_tiff_sequence, read_voxel_size
from metrics import score_reconstruction
from morph import interpolate_along_axis, morph_stack_interpolated

UROCELL = Path(__file__).resolve().parents[2] / "shared" / "data" / "urocell_fib1-4-3-0_mito.tif"
pytestmark = pytest.mark.skipif(not UROCELL.exists(), reason="../shared/data is not available")


@pytest.fixture(scope="module")
def urocell():
    return import_binary_tiff_sequence(UROCELL)


def test_reads_real_stack_and_its_voxel_size(urocell):
    assert urocell.shape == (256, 256, 256) and urocell.dtype == bool
    assert 0.05 < urocell.mean() < 0.06
    assert urocell.sum() == 923_933  # measured: 5.507 % of 256^3
    assert read_voxel_size(UROCELL) == pytest.approx((15.0, 16.0, 16.0))


# (factor, measured sdf, measured nearest, published sdf, published nearest). The measured IoUs are
# deterministic (no training) and pinned tightly; the published ones (../shared/data/README.md:
# 0.90183 / 0.85319 and 0.80972 / 0.76393) are a looser sanity check.
@pytest.mark.parametrize("factor, sdf_measured, nearest_measured, sdf_published, nearest_published", [
    (4, 0.901833, 0.853193, 0.902, 0.853),
    (8, 0.809717, 0.763931, 0.810, 0.764),
])
def test_classical_baselines_match_published_reference(urocell, factor, sdf_measured, nearest_measured,
                                                       sdf_published, nearest_published):
    sparse, kept = downsample_z(urocell, factor)
    sdf = morph_stack_interpolated(sparse, kept, urocell.shape[0], progress=False)
    nearest = interpolate_along_axis(sparse, kept, urocell.shape[0], method="nearest")
    np.testing.assert_array_equal(sdf[kept], sparse)
    sdf_iou = score_reconstruction(sdf, urocell, kept)["iou_recon"]
    nearest_iou = score_reconstruction(nearest, urocell, kept)["iou_recon"]
    assert sdf_iou == pytest.approx(sdf_measured, abs=1e-4)
    assert nearest_iou == pytest.approx(nearest_measured, abs=1e-4)
    assert sdf_iou == pytest.approx(sdf_published, abs=0.005)
    assert nearest_iou == pytest.approx(nearest_published, abs=0.005)
