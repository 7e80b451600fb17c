"""Reading every challenge layout, and every kind of bad input, with one-line errors naming the file."""

import h5py
import numpy as np
import pytest

from speckle_rec.errors import DataError
from speckle_rec.io import ScanData, check_landmarks, open_dataset, write_dataset

from .conftest import make_scan, random_walk_tforms


def test_train_layout(train_dir):
    ds = open_dataset(train_dir)
    assert ds.layout == "train"
    assert [s.key for s in ds.scans] == ["000/LH_rotation", "000/RH_rotation", "001/LH_rotation", "001/RH_rotation"]
    scan = ds.scans[0]
    assert scan.tracked and scan.shape() == (12, 24, 40)
    assert scan.read_frames(2, 5).shape == (3, 24, 40)
    with scan.frames() as frames:  # lazy: an h5py dataset, sliced on demand
        assert isinstance(frames, h5py.Dataset) and frames[7].shape == (24, 40)
    tforms = scan.read_tforms()
    assert tforms.dtype == np.float64 and tforms.shape == (12, 4, 4)
    lm = scan.read_landmarks()
    assert lm.dtype == np.int64 and lm.shape == (20, 3) and lm[:, 0].min() >= 1
    assert ds.calibration().spacing_mm[0] == pytest.approx(0.229389190673828)
    assert [s.key for s in ds.select("001/*").scans] == ["001/LH_rotation", "001/RH_rotation"]


def test_test_layout_2024_keys_order_and_landmark_folder(test_dir):
    ds = open_dataset(test_dir)
    assert ds.layout == "test"
    # dataset_keys.h5 is iterated in h5py (alphabetical) order, which fixes the scan order
    assert [s.key for s in ds.scans] == ["050/LH_Par_C_PtD", "050/RH_Per_L_DtP"]
    assert all(s.tracked for s in ds.scans)
    assert ds.scans[0].landmarks_path.parent.name == "landmark"
    assert ds.scans[0].read_landmarks().shape == (20, 3)


def test_untracked_test_data_and_no_keys_file(tmp_path, rng):
    root = write_dataset(tmp_path / "t", [make_scan(rng, "070", "LH_rotation", tracked=False)], layout="test")
    (root / "dataset_keys.h5").unlink()
    ds = open_dataset(root)
    assert not ds.scans[0].tracked
    with pytest.raises(DataError, match="has no tforms"):
        ds.scans[0].read_tforms()


def _train_file(train_dir):
    return train_dir / "frames_transfs" / "000" / "LH_rotation.h5"


def _rewrite(path, **datasets):
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        open_dataset(tmp_path / "nothing")
    (tmp_path / "frames_transfs").mkdir()
    with pytest.raises(DataError, match="no scans found in frames_transfs/"):
        open_dataset(tmp_path)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: dict(tforms=t), "missing dataset 'frames' \\(found: tforms\\)"),
        (lambda t: dict(frames=np.zeros((12, 24, 40), np.float32), tforms=t), "expected frames of dtype uint8"),
        (lambda t: dict(frames=np.zeros((24, 40), np.uint8), tforms=t), r"expected frames of shape \(N, H, W\)"),
    ],
)
def test_bad_frames(train_dir, make, message):
    path = _train_file(train_dir)
    tforms = h5py.File(path, "r")["tforms"][()]
    _rewrite(path, **make(tforms))
    scan = open_dataset(train_dir).scans[0]
    with pytest.raises(DataError, match=message) as info:
        scan.read_frames()
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t[:, :3, :], r"expected tforms of shape \(N, 4, 4\), got \(12, 3, 4\)"),
        (lambda t: t[:10], "tforms has 10 poses but LH_rotation.h5 has 12 frames"),
        (lambda t: np.where(np.arange(12)[:, None, None] == 4, np.nan, t), r"tforms\[4\] contains NaN"),
        (lambda t: t * np.array([1, 1, 1.2, 1])[None, :, None], "is not a rigid transform"),
        (lambda t: t.astype(np.int32), "expected floating-point tforms"),
    ],
)
def test_bad_tforms(train_dir, mutate, message):
    path = _train_file(train_dir)
    with h5py.File(path, "r") as f:
        frames, tforms = f["frames"][()], f["tforms"][()]
    _rewrite(path, frames=frames, tforms=mutate(tforms))
    with pytest.raises(DataError, match=message) as info:
        open_dataset(train_dir).scans[0].read_tforms()
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_and_garbage_h5(train_dir):
    path = _train_file(train_dir)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="cannot open HDF5 file") as info:
        open_dataset(train_dir).scans[0].shape()
    assert str(path) in str(info.value)
    path.write_text("not hdf5")
    with pytest.raises(DataError, match="truncated or not HDF5"):
        open_dataset(train_dir).scans[0].read_tforms()


@pytest.mark.parametrize(
    "landmarks, message",
    [
        ([[0, 5, 5]], "frame index 0 outside 1..11 \\(landmarks on frame 0 are invalid\\)"),
        ([[12, 5, 5]], "frame index 12 outside 1..11"),
        ([[3, 41, 5]], "x 41 outside 1..40"),
        ([[3, 5, 0]], "y 0 outside 1..24"),
        ([[3, 5]], r"shape \(K, 3\)"),
        ([[3.5, 5, 5]], "non-integer"),
    ],
)
def test_bad_landmarks(landmarks, message):
    with pytest.raises(DataError, match=message):
        check_landmarks(np.array(landmarks), (12, 24, 40), source="landmark_000.h5[LH_rotation]")


def test_missing_landmark_scan_key(train_dir):
    path = train_dir / "landmarks" / "landmark_000.h5"
    with h5py.File(path, "a") as f:
        del f["LH_rotation"]
    with pytest.raises(DataError, match="missing dataset 'LH_rotation' \\(found: RH_rotation\\)") as info:
        open_dataset(train_dir).scans[0].read_landmarks()
    assert str(path) in str(info.value)


def test_dataset_keys_naming_missing_scan(test_dir):
    with h5py.File(test_dir / "dataset_keys.h5", "a") as f:
        f.create_dataset("sub051__LH_rotation", data=0)
    with pytest.raises(DataError, match="missing: frames/051/LH_rotation.h5"):
        open_dataset(test_dir)
    with h5py.File(test_dir / "dataset_keys.h5", "a") as f:
        del f["sub051__LH_rotation"]
        f.create_dataset("bad_key", data=0)
    with pytest.raises(DataError, match="not of the form sub<subject>__<scan>"):
        open_dataset(test_dir)


def test_write_is_atomic_on_bad_frames(tmp_path, rng):
    bad = ScanData("000", "LH_rotation", np.zeros((4, 8, 8), np.float32), random_walk_tforms(rng, 4))
    with pytest.raises(DataError, match="expected uint8"):
        write_dataset(tmp_path / "d", [bad])
    assert list((tmp_path / "d").rglob("*.h5")) == []
