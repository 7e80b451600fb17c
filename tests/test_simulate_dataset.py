"""Simulated folders are valid challenge data whose ground truth is the simulated motion."""

import h5py
import numpy as np
import pytest

from cli.main import main
from speckle_rec.calibration import Calibration
from speckle_rec.io import open_dataset
from speckle_rec.simulate.dataset import simulate_dataset, simulate_scan
from speckle_rec.simulate.probe import Probe
from speckle_rec.transforms import invert_rigid, transforms_from_tforms

SMALL = Probe.fit_image(96, 128)


def test_contract_formulas_give_back_the_simulated_motion():
    scan = simulate_scan(30, protocol="rotation", probe=SMALL, seed=5,
                         calibration=Calibration(np.diag([*SMALL.spacing_mm, 1, 1]), Calibration.default().image_to_tool))
    frame_to_first, frame_to_previous = transforms_from_tforms(scan.tforms, Calibration.default().image_to_tool)
    poses = scan.image_to_world
    np.testing.assert_allclose(frame_to_first, invert_rigid(poses[0]) @ poses[1:], atol=1e-9)
    np.testing.assert_allclose(frame_to_previous, invert_rigid(poses[:-1]) @ poses[1:], atol=1e-9)


@pytest.mark.parametrize("protocol, layout, folder, count, names", [
    ("rotation", "train", "landmarks", 100, ["LH_rotation", "RH_rotation"]),
    ("linear", "test", "landmark", 20, ["LH_Par_L_DtP", "LH_Par_L_PtD", "LH_Per_L_DtP", "LH_Per_L_PtD"]),
])
def test_layouts_read_back(tmp_path, protocol, layout, folder, count, names):
    hands = ("LH", "RH") if protocol == "rotation" else ("LH",)
    scans = simulate_dataset(tmp_path / "d", protocol=protocol, subjects=("007",), n_frames=6, layout=layout,
                             probe=SMALL, seed=1, hands=hands)
    ds = open_dataset(tmp_path / "d")
    assert ds.layout == layout and sorted(s.name for s in ds.scans) == sorted(names)
    assert (tmp_path / "d" / folder / "landmark_007.h5").is_file()
    by_name = {s.name: s for s in scans}
    for ref in ds.scans:
        frames = ref.read_frames()
        assert frames.dtype == np.uint8 and frames.shape == (6, 96, 128)
        assert frames[:, SMALL.fan_mask()].mean() > 5 and frames[:, ~SMALL.fan_mask()].max() == 0
        tforms = ref.read_tforms()  # validated rigid, float32 on disk like the real data
        np.testing.assert_allclose(tforms, by_name[ref.name].tforms, atol=1e-3)
        landmarks = ref.read_landmarks()  # validated: frame >= 1, inside the image
        assert landmarks.shape == (count, 3)
        assert SMALL.fan_mask()[landmarks[:, 2] - 1, landmarks[:, 1] - 1].all()
    if layout == "test":
        with h5py.File(tmp_path / "d" / "dataset_keys.h5") as f:
            assert sorted(f.keys()) == sorted(f"sub007__{n}" for n in names)


def test_same_seed_same_bytes(tmp_path):
    for name in ("a", "b"):
        simulate_dataset(tmp_path / name, subjects=("000",), n_frames=5, probe=SMALL, seed=3, hands=("LH",))
    read = lambda n: open_dataset(tmp_path / n).scans[0].read_frames()  # noqa: E731
    np.testing.assert_array_equal(read("a"), read("b"))
    simulate_dataset(tmp_path / "c", subjects=("000",), n_frames=5, probe=SMALL, seed=4, hands=("LH",))
    assert not np.array_equal(read("a"), read("c"))


def test_simulate_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["simulate", str(out), "--frames", "4", "--height", "96", "--width", "112", "--quiet",
                 "--hands", "RH", "--subjects", "003"]) == 0
    ds = open_dataset(out)
    assert [s.key for s in ds.scans] == ["003/RH_rotation"] and ds.scans[0].shape() == (4, 96, 112)
    assert main(["simulate", str(tmp_path / "bad"), "--frames", "1", "--quiet"]) == 1
    assert "need --frames >= 2" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["simulate", str(tmp_path / "tiny"), "--frames", "3", "--height", "64", "--width", "80", "--quiet"]) == 1
    assert "use a larger image" in capsys.readouterr().err
    assert not list((tmp_path / "tiny").rglob("*.h5"))
