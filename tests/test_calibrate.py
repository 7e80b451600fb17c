"""Calibration of the decorrelation curves from tracked scans: truth geometry, pair sampling, fit, CLI."""

import json
import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cli import commands
from cli import main as cli_main
from cli.commands_calibrate import register_calibrate
from speckle_rec.calibrate import CalibrationSamples, band_residuals, calibrate_model, pair_geometry, sample_pairs
from speckle_rec.decorrelation import DecorrelationModel
from speckle_rec.errors import DataError
from speckle_rec.inplane import InplaneMotion
from speckle_rec.io import open_dataset, write_dataset
from speckle_rec.outofplane import PlaneFit, pair_transform
from speckle_rec.simulate.dataset import simulate_dataset
from speckle_rec.simulate.probe import Probe
from speckle_rec.simulate.tissue import Beam

from .conftest import make_scan

PROBE = Probe.fit_image(240, 320)


def run_cli(argv, monkeypatch):
    """``speckle-rec ARGV`` through cli.main.main, with calibrate registered if the lead has not yet."""
    if register_calibrate not in commands.REGISTRY:
        monkeypatch.setattr(commands, "REGISTRY", commands.REGISTRY + [register_calibrate])
    return cli_main.main(argv)


@pytest.fixture(scope="module")
def tracked_dir(tmp_path_factory):
    """A small simulated tracked folder: a linear sweep and a rotation scan, 200 frames of 240 x 320."""
    root = tmp_path_factory.mktemp("calib") / "data"
    simulate_dataset(root, protocol="linear", subjects=("000",), n_frames=200, probe=PROBE, seed=3, hands=("LH",),
                     planes=("per",), directions=("DtP",))
    simulate_dataset(root, protocol="rotation", subjects=("001",), n_frames=200, probe=PROBE, seed=3, hands=("RH",))
    return root


@pytest.fixture(scope="module")
def calibrated(tracked_dir):
    return calibrate_model(open_dataset(tracked_dir), pairs_per_scan=300, seed=1, threads=2, progress=False)


# --------------------------------------------------------------------------- truth and sampling


def test_pair_geometry_inverts_pair_transform():
    """Poses built from a known plane and in-plane motion give back that geometry."""
    theta, alpha, beta = math.radians(2.0), math.radians(1.5), math.radians(-1.0)
    # the plane with these angles: normal Rz(θ)·Rx(α)·Ry(β)·e_z
    normal = Rotation.from_euler("ZXY", [theta, alpha, beta]).as_matrix()[:, 2]
    plane = PlaneFit(0.4, -normal[0] / normal[2], -normal[1] / normal[2], np.eye(3), 0.0, 0)
    truth = pair_transform(InplaneMotion(0.7, -0.3, theta, np.zeros((3, 3)), 0.0, 1.0, 100), plane)
    x, y = np.meshgrid(np.linspace(5, 65, 7), np.linspace(5, 100, 6))
    x, y = x.ravel(), y.ravel()
    camera = np.array([[1.0, 0, 0, 10], [0, 0, 1, 20], [0, -1, 0, 30], [0, 0, 0, 1]])  # any first pose
    apex = (36.0, -30.0)
    distance, rotation, tilt, inplane = pair_geometry(np.stack([camera, camera @ truth]), [(0, 1)], x_mm=x,
                                                      y_mm=y, apex_mm=apex)
    np.testing.assert_allclose(distance[0], np.abs(plane.z_mm(x, y)), atol=1e-9)
    # the projected (flow) angle differs from the Euler angle by products of the out-of-plane angles
    assert rotation[0] == pytest.approx(theta, abs=math.radians(0.05))
    fitted_alpha, fitted_beta = plane.angles(rotation[0])
    phi = np.arctan2(x - apex[0], y - apex[1])
    np.testing.assert_allclose(tilt[0], fitted_alpha * np.cos(phi) - fitted_beta * np.sin(phi), atol=1e-12)
    assert fitted_alpha == pytest.approx(alpha, abs=math.radians(0.05))
    # the in-plane matrix puts the patch centres where the 3D motion projects them (to ~second order)
    projected = (truth @ np.stack([x, y, 0 * x, 1 + 0 * x]))[:2]
    mapped = (inplane[0] @ np.stack([x, y, 1 + 0 * x]))[:2]
    assert np.abs(projected - mapped).max() < 0.05


def test_sample_pairs_spread_over_distances():
    """A steady 0.1 mm/frame elevational sweep: pairs reach up to max_distance_mm, evenly."""
    n = 400
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, 2, 3] = 0.1 * np.arange(n)
    x, y = np.meshgrid(np.linspace(5, 50, 5), np.linspace(5, 50, 5))
    pairs = sample_pairs(poses, x_mm=x.ravel(), y_mm=y.ravel(), n_pairs=240, strides=(1, 2, 4, 8, 16, 32),
                         max_distance_mm=3.0, rng=np.random.default_rng(0))
    assert pairs.shape == (240, 2) and np.all(pairs[:, 1] > pairs[:, 0]) and len({tuple(p) for p in pairs}) == 240
    stride = pairs[:, 1] - pairs[:, 0]
    assert set(stride) == {1, 2, 4, 8, 16}  # 32 frames = 3.2 mm is too far
    # the 12 distance bins of 0.25 mm get about the same number: 0.1-0.2 mm (strides 1, 2) fill two bins
    counts = np.bincount(np.minimum((0.1 * stride / 0.25).astype(int), 11), minlength=12)
    assert counts[0] == counts[6] == counts[3] > 0
    assert sample_pairs(poses[:1], x_mm=x.ravel(), y_mm=y.ravel(), n_pairs=10).shape == (0, 2)


# --------------------------------------------------------------------------- on simulated scans


def test_calibrate_recovers_beam_width(calibrated):
    """σ per band matches the renderer's configured elevational NCC width at the band's depth."""
    model, report = calibrated
    beam = Beam()
    centres = model.band_centers_mm
    # the model's depth is image-mm y; the beam's is below the probe face (the contact point's y on the
    # central beam, where the bands' middle patches are)
    expected = beam.elevation_sigma_mm(centres - PROBE.contact_point_mm[1])
    assert model.sigma_mm.size >= 3 and np.all(centres > 0)
    np.testing.assert_allclose(model.sigma_mm, expected, rtol=0.15)
    assert np.all(np.isfinite(model.tilt_sigma_rad)) and np.all(model.peak > 0.9)
    # fit quality is reported per band, on the fitting data and on held-out pairs
    assert len(report["bands"]) == model.sigma_mm.size
    for band, residual, count in zip(report["bands"], model.residual_mm, model.n_samples):
        assert band["samples"] == count >= 500
        assert band["residual_mm"] == pytest.approx(residual) and 0.1 < residual < 1.0
        assert 0.1 < band["holdout_residual_mm"] < 1.0 and band["holdout_inverted"] > 50
    assert report["scans"] == ["000/LH_Per_L_DtP", "001/RH_rotation"] and report["skipped_untracked"] == []
    assert report["pairs"] > 300 and sum(report["pairs_by_stride"].values()) == report["pairs"]
    assert report["inplane_error_mm"]["median"] < 0.05  # flow and tracker agree
    assert "speckle-rec calibrate" in model.description and "measure_pairs" in model.description
    json.dumps(report)


def test_calibrated_model_json_round_trip(calibrated, tmp_path):
    model, _ = calibrated
    model.to_json(tmp_path / "m.json")
    again = DecorrelationModel.from_json(tmp_path / "m.json")
    for name in ("depth_edges_mm", "sigma_mm", "floor", "shape", "rho_noise", "peak", "rotation_sigma_rad",
                 "tilt_sigma_rad", "residual_mm", "n_samples"):
        np.testing.assert_allclose(getattr(again, name), getattr(model, name), rtol=1e-12)
    assert again.description == model.description and again.patch_mm == model.patch_mm


def test_band_residuals_of_perfect_samples():
    """Samples lying on the curves invert exactly; a wrong σ shows up as a residual."""
    model = DecorrelationModel([0.0, 50.0, 100.0], [0.8, 1.2], [0.0, 0.1], [2.0, 1.8], [0.2, 0.2])
    d = np.tile(np.linspace(0.1, 2.0, 40), 2)
    y = np.repeat([25.0, 75.0], 40)
    samples = CalibrationSamples(model.rho(d, y), d, y, np.zeros_like(d), np.zeros_like(d), np.zeros(80, np.int64),
                                 np.zeros((1, 3), np.int64), ("000/x",), np.zeros(1))
    exact = band_residuals(model, samples)
    assert np.all(exact["inverted"] > 10) and np.all(exact["rms_mm"] < 1e-9) and list(exact["samples"]) == [40, 40]
    wider = DecorrelationModel([0.0, 50.0, 100.0], [0.88, 1.2], [0.0, 0.1], [2.0, 1.8], [0.2, 0.2])
    off = band_residuals(wider, samples, edges_mm=[0.0, 50.0, 100.0])
    assert off["rms_mm"][0] > 0.03 and off["rms_mm"][1] < 1e-9


def test_calibrate_untracked_is_an_error(tmp_path, rng):
    root = write_dataset(tmp_path / "test", [make_scan(rng, "050", "LH_rotation", tracked=False)], layout="test")
    with pytest.raises(DataError, match=r"calibrate needs tracked scans \(tforms\)"):
        calibrate_model(open_dataset(root), progress=False)


# --------------------------------------------------------------------------- command line


def test_cli_calibrate_writes_model(tracked_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "models" / "calib.json"
    rc = run_cli(["calibrate", str(tracked_dir), "-o", str(out), "--quiet", "--threads", "2", "--pairs-per-scan",
                  "150", "--bands", "3", "--holdout", "0", "--seed", "2"], monkeypatch)
    assert rc == 0
    err = capsys.readouterr().err
    assert "sigma mm" in err and "residual mm" in err and f"wrote {out}" in err
    assert "first out-of-plane direction of the tracked scans" in err
    data = json.loads(out.read_text())
    assert data["calibration"]["pairs_per_scan"] == 150 and len(data["calibration"]["bands"]) == 3
    # a perpendicular sweep distal to proximal first moves towards -z (the simulator's probe holding)
    assert data["direction_prior"]["counts"]["LH_Per_L_DtP"] == [0, 1]
    assert sum(data["direction_prior"]["counts"]["RH_rotation"]) == 1
    model = DecorrelationModel.from_json(out)
    assert model.sigma_mm.size == 3 and np.all((model.sigma_mm > 0.6) & (model.sigma_mm < 1.3))
    assert [p.name for p in out.parent.iterdir()] == ["calib.json"]  # no temporary file left behind
    # explicit band edges (image-mm y) and a glob selecting one scan
    rc = run_cli(["calibrate", str(tracked_dir), "-o", str(out), "--quiet", "--scans", "000/*", "--bands",
                  "4,20,42", "--pairs-per-scan", "100", "--holdout", "0"], monkeypatch)
    assert rc == 0
    np.testing.assert_allclose(DecorrelationModel.from_json(out).depth_edges_mm, [4.0, 20.0, 42.0])
    assert json.loads(out.read_text())["calibration"]["scans"] == ["000/LH_Per_L_DtP"]


def test_cli_calibrate_errors(tracked_dir, tmp_path, monkeypatch, capsys, rng):
    out = tmp_path / "calib.json"

    def fails(argv, message):
        assert run_cli(["calibrate", *argv, "-o", str(out), "--quiet"], monkeypatch) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("speckle-rec calibrate: error: ") and message in err[0], err
        assert not out.exists()  # nothing (half-)written

    untracked = write_dataset(tmp_path / "test", [make_scan(rng, "050", "LH_rotation", tracked=False)],
                              layout="test")
    fails([str(untracked)], "calibrate needs tracked scans (tforms)")
    (tmp_path / "empty").mkdir()
    fails([str(tmp_path / "empty")], "no scans found")
    broken = tmp_path / "broken"
    (broken / "frames_transfs" / "000").mkdir(parents=True)
    (broken / "frames_transfs" / "000" / "LH_rotation.h5").write_bytes(b"not hdf5")
    (broken / "calib_matrix.csv").write_text((tracked_dir / "calib_matrix.csv").read_text())
    fails([str(broken)], "LH_rotation.h5: cannot open HDF5 file")
    fails([str(tracked_dir), "--bands", "40", "--pairs-per-scan", "20"], "usable samples, need 500")
    fails([str(tracked_dir), "--bands", "two"], "expected --bands as a count or comma-separated edges")
    fails([str(tracked_dir), "--pairs-per-scan", "0"], "expected --pairs-per-scan >= 1")
    fails([str(tracked_dir), "--scans", "999/*"], "no scan matches '999/*'")
