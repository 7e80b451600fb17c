"""Trajectory plots: PNGs for transform and DDF-only predictions, untracked scans, CLI and errors."""

import sys

import h5py
import numpy as np
import pytest

from cli import commands
from cli.commands_viz import register_plot, register_volume
from cli.main import main
from speckle_rec.ddf import PixelGrid, ddfs_from_transforms
from speckle_rec.errors import DataError
from speckle_rec.evaluate import ScanTruth
from speckle_rec.io import open_dataset, write_dataset
from speckle_rec.plot import plot_predictions, scan_tracks
from speckle_rec.prediction import open_prediction, prediction_path, write_prediction
from speckle_rec.transforms import locals_from_globals, matrices_from_params, transforms_from_tforms
from speckle_rec.volume import scan_poses

from .conftest import make_scan

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def cli(monkeypatch):
    """``main`` with a registry of just the visual subcommands."""
    monkeypatch.setattr(commands, "REGISTRY", [register_plot, register_volume])
    return main


def noisy_globals(scan, calibration, rng, noise):
    g, _ = transforms_from_tforms(scan.read_tforms(), calibration.image_to_tool)
    return g @ matrices_from_params(rng.normal(scale=noise, size=(len(g), 6)))


def write_predictions(data_dir, pred_dir, *, rng, noise=0.01, ddf_only=False, keys=None):
    """Ground truth plus noise as a prediction folder (transforms, or only the four DDFs)."""
    ds = open_dataset(data_dir)
    calib = ds.calibration()
    for scan in ds.scans:
        if keys is not None and scan.key not in keys:
            continue
        g = noisy_globals(scan, calib, rng, noise)
        path = prediction_path(pred_dir, scan.subject, scan.name)
        if ddf_only:
            _, h, w = scan.shape()
            grid = PixelGrid.from_calibration(calib, h, w)
            gp, gl, lp, ll = ddfs_from_transforms(g, locals_from_globals(g), scan.read_landmarks(), grid)
            write_prediction(path, GP=gp, GL=gl, LP=lp, LL=ll)
        else:
            write_prediction(path, global_transforms=g)
    return pred_dir


def assert_png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 10_000


def test_plot_cli_writes_a_png_per_predicted_scan(train_dir, tmp_path, rng, cli, capsys):
    keys = {"000/LH_rotation", "001/RH_rotation"}
    pred = write_predictions(train_dir, tmp_path / "pred", rng=rng, keys=keys)
    assert cli(["plot", str(pred), "--data", str(train_dir), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "no prediction for 000/RH_rotation, skipped" in err and "no prediction for 001/LH_rotation" in err
    assert "wrote 2 plot(s)" in err
    names = sorted(p.name for p in (pred / "plots").iterdir())
    assert names == ["000_LH_rotation.png", "001_RH_rotation.png"]
    for path in (pred / "plots").iterdir():
        assert_png(path)
    assert cli(["plot", str(pred), "--data", str(train_dir), "--scans", "001/*", "-o", str(tmp_path / "o"),
                "--quiet"]) == 0
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["001_RH_rotation.png"]


def test_ddf_only_prediction_matches_its_transforms(train_dir, tmp_path):
    """The same noisy poses written as transforms and as DDFs give the same tracks and errors."""
    ds = open_dataset(train_dir).select("000/LH_rotation")
    scan, calib = ds.scans[0], ds.calibration()
    write_predictions(train_dir, tmp_path / "t", rng=np.random.default_rng(5), keys={scan.key})
    write_predictions(train_dir, tmp_path / "d", rng=np.random.default_rng(5), keys={scan.key}, ddf_only=True)
    truth = ScanTruth.load(scan, calib)
    tracks = {}
    for name in ("t", "d"):
        path = prediction_path(tmp_path / name, scan.subject, scan.name)
        with open_prediction(path, n_frames=truth.n_frames, n_pixels=truth.grid.n_pixels,
                             n_landmarks=len(truth.landmarks)) as prediction:
            tracks[name] = scan_tracks(truth, prediction, grid=truth.grid)
    t, d = tracks["t"], tracks["d"]
    np.testing.assert_allclose(d["pred_corners"], t["pred_corners"], atol=1e-3)
    np.testing.assert_allclose(d["true_corners"], t["true_corners"])
    for key in ("global_error", "local_error"):
        assert t[key].shape == (truth.n_frames - 1,) and np.all(t[key] > 0)
        np.testing.assert_allclose(d[key], t[key], rtol=1e-3, atol=1e-4)
    # frame 0 is the identity; the true corners of a later frame are G·q
    np.testing.assert_allclose(t["true_corners"][0], t["pred_corners"][0])
    sx, sy = truth.grid.spacing_mm
    q = np.array([sx * truth.grid.width, sy, 0.0, 1.0])  # corner (W, 1)
    np.testing.assert_allclose(t["true_corners"][5, 1], (truth.frame_to_first[4] @ q)[:3])

    written, missing = plot_predictions(ds, tmp_path / "d", progress=False)
    assert missing == [] and list(written) == [scan.key]
    assert_png(written[scan.key])


def test_non_finite_ddf_is_refused(train_dir, tmp_path, rng):
    ds = open_dataset(train_dir).select("000/LH_rotation")
    pred = write_predictions(train_dir, tmp_path / "d", rng=rng, keys={"000/LH_rotation"}, ddf_only=True)
    path = prediction_path(pred, "000", "LH_rotation")
    with h5py.File(path, "r+") as f:
        f["GP"][3, 0, 0] = np.nan  # corner (1, 1) of frame 4
    with pytest.raises(DataError, match="GP or LP contains NaN or inf") as info:
        plot_predictions(ds, pred, progress=False)
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match="GP contains NaN or inf"):
        scan_poses(ds.scans[0], ds.calibration(), pred_dir=pred)


def test_untracked_scan_is_plotted_alone(tmp_path, rng):
    scan = make_scan(rng, "050", "LH_rotation", tracked=False)
    data = write_dataset(tmp_path / "test", [scan], layout="test")
    ds = open_dataset(data)
    g = matrices_from_params(np.cumsum(rng.normal(scale=0.05, size=(11, 6)), axis=0))
    write_prediction(prediction_path(tmp_path / "pred", "050", "LH_rotation"), global_transforms=g)
    written, missing = plot_predictions(ds, tmp_path / "pred", progress=False)
    assert_png(written["050/LH_rotation"])


def test_plot_errors_are_one_line(train_dir, tmp_path, rng, cli, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    assert cli(["plot", str(tmp_path / "empty"), "--data", str(train_dir)]) == 1
    assert "no prediction for any of the 4 scan(s)" in capsys.readouterr().err
    assert cli(["plot", str(tmp_path / "nowhere"), "--data", str(train_dir)]) == 1
    assert "prediction folder not found" in capsys.readouterr().err

    # a prediction with the wrong number of frames names its file
    g = np.tile(np.eye(4), (5, 1, 1))
    write_prediction(prediction_path(tmp_path / "short", "000", "LH_rotation"), global_transforms=g)
    assert cli(["plot", str(tmp_path / "short"), "--data", str(train_dir), "--scans", "000/LH*"]) == 1
    err = capsys.readouterr().err.strip()
    assert "LH_rotation.h5" in err and "5 rows" in err and "\n" not in err

    hidden = [m for m in sys.modules if m.split(".")[0] in ("matplotlib", "mpl_toolkits")]
    for name in hidden + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    pred = write_predictions(train_dir, tmp_path / "pred", rng=rng, keys={"000/LH_rotation"})
    assert cli(["plot", str(pred), "--data", str(train_dir)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("speckle-rec plot: error: matplotlib is needed for plots: pip install 'speckle_rec[plot]'")
    with pytest.raises(DataError, match="matplotlib is needed"):
        plot_predictions(open_dataset(train_dir), pred)
