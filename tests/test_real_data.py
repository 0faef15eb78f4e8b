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
    assert read_voxel_size(UROCELL) == pytest.approx((15.0, 16.0, 16.0))


@pytest.mark.parametrize("factor, sdf_reference, nearest_reference", [(4, 0.902, 0.853), (8, 0.810, 0.766)])
def test_classical_baselines_match_published_reference(urocell, factor, sdf_reference, nearest_reference):
    sparse, kept = downsample_z(urocell, factor)
    sdf = morph_stack_interpolated(sparse, kept, urocell.shape[0], progress=False)
    nearest = interpolate_along_axis(sparse, kept, urocell.shape[0], method="nearest")
    np.testing.assert_array_equal(sdf[kept], sparse)
    assert score_reconstruction(sdf, urocell, kept)["iou_recon"] == pytest.approx(sdf_reference, abs=0.005)
    assert score_reconstruction(nearest, urocell, kept)["iou_recon"] == pytest.approx(nearest_reference, abs=0.005)
