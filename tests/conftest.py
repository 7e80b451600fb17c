"""Shared fixtures: small synthetic scans in the challenge layouts with known ground truth."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from speckle_rec.calibration import Calibration
from speckle_rec.io import ScanData, write_dataset


def random_rigid(rng, n, *, rotation_deg=5.0, translation_mm=5.0):
    """(n, 4, 4) random rigid transforms."""
    out = np.tile(np.eye(4), (n, 1, 1))
    out[:, :3, :3] = Rotation.from_rotvec(
        rng.normal(size=(n, 3)) * np.deg2rad(rotation_deg) / np.sqrt(3)
    ).as_matrix()
    out[:, :3, 3] = rng.normal(size=(n, 3)) * translation_mm
    return out


def random_walk_tforms(rng, n_frames):
    """Tool → camera poses of a smooth random walk (float64)."""
    steps = random_rigid(rng, n_frames, rotation_deg=0.5, translation_mm=0.4)
    poses = np.empty_like(steps)
    poses[0] = random_rigid(rng, 1, rotation_deg=40.0, translation_mm=100.0)[0]
    for k in range(1, n_frames):
        poses[k] = poses[k - 1] @ steps[k]
    return poses


def random_landmarks(rng, n_frames, height, width, count):
    return np.stack(
        [rng.integers(1, n_frames, count), rng.integers(1, width + 1, count), rng.integers(1, height + 1, count)],
        axis=1,
    ).astype(np.int64)


def make_scan(rng, subject, name, *, n_frames=12, height=24, width=40, landmarks=20, tracked=True):
    frames = rng.integers(0, 256, size=(n_frames, height, width), dtype=np.uint8)
    return ScanData(
        subject=subject,
        name=name,
        frames=frames,
        tforms=random_walk_tforms(rng, n_frames) if tracked else None,
        landmarks=random_landmarks(rng, n_frames, height, width, landmarks),
    )


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def calibration():
    return Calibration.default()


@pytest.fixture
def train_dir(tmp_path, rng):
    """A 2025-style train folder: 2 subjects x 2 scans, 24x40 images (not 480x640 on purpose)."""
    scans = [make_scan(rng, s, n) for s in ("000", "001") for n in ("LH_rotation", "RH_rotation")]
    return write_dataset(tmp_path / "train", scans, layout="train")


@pytest.fixture
def test_dir(tmp_path, rng):
    """A 2024-style validation folder (frames/, transfs/, landmark/, dataset_keys.h5)."""
    scans = [make_scan(rng, "050", n, landmarks=20) for n in ("RH_Per_L_DtP", "LH_Par_C_PtD")]
    return write_dataset(tmp_path / "val", scans, layout="test", landmark_folder="landmark")
