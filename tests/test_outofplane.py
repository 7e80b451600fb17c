"""Out-of-plane motion: patch grid, fan apex, decorrelation model, |plane| fits, pair measurements."""

import json
import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from speckle_rec.calibration import Calibration
from speckle_rec.decorrelation import DecorrelationModel
from speckle_rec.errors import DataError
from speckle_rec.inplane import InplaneMotion, estimate_inplane, fan_mask_from_frames
from speckle_rec.outofplane import (
    PlaneFit,
    choose_strides,
    fan_apex_mm,
    fan_contact_mm,
    fit_plane_abs,
    fit_plane_rho,
    measure_pair,
    measure_pairs,
    pair_transform,
    patch_correlation,
    patch_grid,
)
from speckle_rec.simulate.probe import Probe

from .test_inplane import rigid, speckle_frames

SPACING = Calibration.default().spacing_mm


def plane_of(transform):
    """(tz, a, b) of frame j's plane z = tz + a·x + b·y in frame i coordinates, for T_{i←j}."""
    n = transform[:3, 2]
    return n @ transform[:3, 3] / n[2], -n[0] / n[2], -n[1] / n[2]


def toy_model(**changes):
    options = dict(peak=[0.98, 0.99], rotation_sigma_rad=[0.09, 0.1], tilt_sigma_rad=[0.02, 0.025],
                   usable_rho=(0.2, 0.9), patch_mm=(4.0, 4.0), smooth_px=1.0, description="toy")
    options.update(changes)
    return DecorrelationModel([0.0, 50.0, 100.0], [0.8, 1.2], [0.05, 0.1], [1.8, 2.0], [0.2, 0.25], **options)


# --------------------------------------------------------------------------- grid and fan


def test_patch_grid_inside_mask():
    mask = Probe().fan_mask()
    grid = patch_grid(mask, spacing_mm=SPACING, patch_mm=(4.0, 4.0), margin_mm=1.0)
    assert (grid.width_px, grid.height_px) == (round(4 / SPACING[0]), round(4 / SPACING[1])) == (17, 18)
    assert 300 < len(grid) < 600
    mx, my = math.ceil(1.0 / SPACING[0]), math.ceil(1.0 / SPACING[1])
    for r, c in zip(grid.rows, grid.cols):
        assert mask[r - my:r + grid.height_px + my, c - mx:c + grid.width_px + mx].all()
    np.testing.assert_allclose(grid.x_mm, SPACING[0] * (grid.cols + 8 + 1))
    np.testing.assert_allclose(grid.y_mm, SPACING[1] * (grid.rows + 8.5 + 1))
    # tiles do not overlap
    occupied = np.zeros(mask.shape, int)
    for r, c in zip(grid.rows, grid.cols):
        occupied[r:r + grid.height_px, c:c + grid.width_px] += 1
    assert occupied.max() == 1


def test_patch_grid_bad_input():
    with pytest.raises(DataError, match="no 4 x 4 mm patch fits"):
        patch_grid(np.ones((10, 10), bool), spacing_mm=SPACING)
    with pytest.raises(DataError, match="positive patch_mm"):
        patch_grid(np.ones((100, 100), bool), spacing_mm=SPACING, patch_mm=(0, 4))
    with pytest.raises(DataError, match=r"shape \(H, W\)"):
        patch_grid(np.ones((2, 100, 100), bool), spacing_mm=SPACING)


@pytest.mark.parametrize("shape", [(480, 640), (240, 320), (300, 500)])
def test_fan_apex(shape):
    probe = Probe.fit_image(*shape)
    apex = fan_apex_mm(probe.fan_mask(), spacing_mm=probe.spacing_mm)
    np.testing.assert_allclose(apex, probe.apex_mm, atol=0.5)


def test_fan_apex_linear_probe():
    mask = np.zeros((200, 300), bool)
    mask[10:190, 40:260] = True
    assert fan_apex_mm(mask, spacing_mm=SPACING) is None


# --------------------------------------------------------------------------- patch correlation


def test_patch_correlation_compensates_inplane_motion():
    shape = (240, 320)
    motion = rigid(t=(0.6, -0.35, 0.0), rotvec=(0.0, 0.0, math.radians(0.4)), about=(37.0, 10.0, 0.0))
    frames = speckle_frames([np.eye(4), motion], shape=shape, seed=5)
    mask = fan_mask_from_frames(frames)
    grid = patch_grid(mask, spacing_mm=SPACING)
    same = patch_correlation(frames[0], frames[0], grid, mask=mask)
    assert np.allclose(same[np.isfinite(same)], 1.0) and np.isfinite(same).all()
    estimated = estimate_inplane(frames[0], frames[1], mask=mask, spacing_mm=SPACING)
    compensated = patch_correlation(frames[0], frames[1], grid, mask=mask, motion=estimated, smooth_px=1.0)
    raw = patch_correlation(frames[0], frames[1], grid, mask=mask, smooth_px=1.0)
    assert np.nanmedian(compensated) > 0.9
    assert np.nanmedian(raw) < 0.5
    failed = patch_correlation(frames[0], frames[1], grid, mask=mask, motion=InplaneMotion.failed())
    assert np.isnan(failed).all()


# --------------------------------------------------------------------------- decorrelation model


def test_model_json_round_trip(tmp_path):
    model = toy_model(rotation_sigma_rad=[np.inf, 0.1])
    path = tmp_path / "curves.json"
    model.to_json(path)
    data = json.loads(path.read_text())
    assert data["format"] == "speckle_rec.decorrelation" and data["rotation_sigma_rad"][0] is None
    loaded = DecorrelationModel.from_json(path)
    for name in ("depth_edges_mm", "sigma_mm", "floor", "shape", "rho_noise", "peak", "rotation_sigma_rad",
                 "tilt_sigma_rad"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(model, name))
    assert loaded.patch_mm == model.patch_mm and loaded.usable_rho == model.usable_rho


def test_model_files_bad_input(tmp_path):
    with pytest.raises(DataError, match="not found"):
        DecorrelationModel.from_json(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DataError, match="not a speckle_rec.decorrelation file"):
        DecorrelationModel.from_json(tmp_path / "other.json")
    data = toy_model().to_dict()
    data["sigma_mm"] = [0.8]
    (tmp_path / "short.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="expected 2 values in sigma_mm"):
        DecorrelationModel.from_json(tmp_path / "short.json")
    with pytest.raises(DataError, match="floor in"):
        toy_model().__class__([0, 1], [1.0], [1.5], [2.0], [0.2])
    with pytest.raises(DataError, match="usable_rho"):
        toy_model(usable_rho=(0.9, 0.2))


def test_default_model():
    model = DecorrelationModel.default()
    assert "renderer" in model.description
    assert model.patch_mm == (4.0, 4.0) and model.smooth_px == 1.0
    assert np.all((model.sigma_mm > 0.5) & (model.sigma_mm < 2.0))
    assert np.all(np.isfinite(model.tilt_sigma_rad)) and np.all(model.n_samples > 1000)


def test_distance_inverts_rho():
    model = toy_model()
    depth = np.array([10.0, 40.0, 75.0, 90.0])
    for rotation, tilt in ((0.0, 0.0), (0.03, 0.01)):
        for d in (0.3, 0.7, 1.1):
            rho = model.rho(d, depth, rotation, tilt)
            dist, sigma = model.distance(rho, depth, rotation, tilt)
            normalised = rho / model.scale(depth, rotation, tilt)
            usable = (normalised >= 0.2) & (normalised <= 0.9)
            np.testing.assert_allclose(dist[usable], d, rtol=1e-9)
            assert np.isnan(dist[~usable]).all() and np.isnan(sigma[~usable]).all()
            # σ_d = s·(1 − ρ²) / |∂ρ/∂d|, the slope checked by finite differences
            slope = (model.rho(d + 1e-6, depth, rotation, tilt) - model.rho(d - 1e-6, depth, rotation, tilt)) / 2e-6
            np.testing.assert_allclose(model.rho_slope(d, depth, rotation, tilt), slope, rtol=1e-5)
            noise = model.parameters(depth).noise
            np.testing.assert_allclose(sigma[usable], (noise * (1 - rho**2) / -slope)[usable], rtol=1e-5)
    dist, _ = model.distance([0.95, 0.1, np.nan], [40.0, 40.0, 40.0])
    assert np.isnan(dist).all()


def test_fit_recovers_curves(rng):
    truth = toy_model()
    n = 40000
    # near the band centres, where the (interpolated) truth is one curve per band
    depth = rng.uniform(22, 28, n) + 50 * rng.integers(0, 2, n)
    distance = rng.uniform(0, 3.0, n)
    rotation = rng.uniform(-0.05, 0.05, n)
    tilt = rng.uniform(-0.02, 0.02, n)
    expected = truth.rho(distance, depth, rotation, tilt)
    rho = expected + truth.rho_sigma(expected, depth) * rng.standard_normal(n)
    model = DecorrelationModel.fit(rho, distance, depth, rotation_rad=rotation, tilt_rad=tilt, bands=[0, 50, 100])
    for d in (0.3, 0.6, 1.0):
        np.testing.assert_allclose(model.rho(d, [25.0, 75.0]), truth.rho(d, [25.0, 75.0]), atol=0.01)
        np.testing.assert_allclose(model.rho(d, 25.0, 0.04, 0.015), truth.rho(d, 25.0, 0.04, 0.015), atol=0.01)
    assert np.all(model.n_samples > 15000)
    assert np.all((model.residual_mm > 0.1) & (model.residual_mm < 1.0))  # per patch: ρ noise s ≈ 0.2
    np.testing.assert_allclose(model.rho_noise, truth.rho_noise, rtol=0.25)
    np.testing.assert_allclose(model.tilt_sigma_rad, truth.tilt_sigma_rad, rtol=0.3)


def test_fit_bad_input():
    with pytest.raises(DataError, match="equal length"):
        DecorrelationModel.fit([0.5] * 30, [1.0] * 29, [10.0] * 30)
    with pytest.raises(DataError, match="at least 20 finite samples"):
        DecorrelationModel.fit([0.5] * 10, [1.0] * 10, [10.0] * 10)
    with pytest.raises(DataError, match=r"depth band 1 \(50.0-100.0 mm\) has 0 samples"):
        DecorrelationModel.fit(np.full(30, 0.5), np.linspace(0, 2, 30), np.full(30, 10.0), bands=[0, 50, 100])


# --------------------------------------------------------------------------- plane fits


def test_fit_plane_abs_v_shape(rng):
    """A plane crossing the image (|d| has a V) is found from the sign starts, up to the global sign."""
    x, y = np.meshgrid(np.linspace(20, 130, 20), np.linspace(10, 90, 15))
    x, y = x.ravel(), y.ravel()
    tz, a, b = 1.5, -0.02, 0.004  # zero line crosses the image at x ≈ 75 + 0.2·y
    sigma = 0.03
    dist = np.abs(tz + a * x + b * y) + sigma * rng.standard_normal(x.size)
    dist[:5] += 1.0  # outliers
    fit = fit_plane_abs(x, y, np.abs(dist), np.full(x.size, 1 / sigma**2))
    centroid = np.array([1.0, x.mean(), y.mean()])
    sign = 1.0 if tz + a * x.mean() + b * y.mean() >= 0 else -1.0
    assert np.all(np.abs(fit.params - sign * np.array([tz, a, b])) <= 4 * fit.sigma + 1e-4)
    assert fit.z_mm(x.mean(), y.mean()) >= 0  # sign convention
    assert fit.sigma[1] < 5e-4 and fit.residual_rms_mm < 0.3
    assert centroid @ fit.covariance @ centroid < 1e-4


def test_fit_plane_abs_bad_input():
    with pytest.raises(DataError, match="at least 3 patches"):
        fit_plane_abs([1, 2], [1, 2], [0.1, 0.2])
    with pytest.raises(DataError, match="equal length"):
        fit_plane_abs([1, 2, 3], [1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="non-negative weights"):
        fit_plane_abs([1, 2, 3], [1, 2, 3], [0.1, 0.2, 0.3], [1, -1, 1])


@pytest.mark.parametrize("tz, a, b", [(0.7, 0.0, 0.0), (-0.2, 0.004, 0.012), (1.4, -0.015, 0.0)])
def test_fit_plane_rho_recovers_plane(rng, tz, a, b):
    model = toy_model()
    apex = (73.5, -37.8)
    x, y = np.meshgrid(np.linspace(25, 125, 22), np.linspace(8, 90, 20))
    x, y = x.ravel(), y.ravel()
    truth = PlaneFit(tz, a, b, np.zeros((3, 3)), 0.0, 0)
    alpha, beta = truth.angles(0.01)
    beam = np.arctan2(x - apex[0], y - apex[1])
    expected = model.rho(truth.z_mm(x, y), y, 0.01, alpha * np.cos(beam) - beta * np.sin(beam))
    rho = expected + model.rho_sigma(expected, y) * rng.standard_normal(x.size)
    fit = fit_plane_rho(x, y, rho, model=model, rotation_rad=0.01, apex_mm=apex)
    sign = 1.0 if truth.z_mm(x.mean(), y.mean()) >= 0 else -1.0
    np.testing.assert_allclose(fit.z_mm(x.mean(), y.mean()), abs(truth.z_mm(x.mean(), y.mean())), atol=0.05)
    np.testing.assert_allclose([fit.a, fit.b], sign * np.array([a, b]), atol=1.5e-3)
    assert np.all(np.abs(fit.params - sign * np.array([tz, a, b])) <= 5 * fit.sigma + 1e-3)


def test_pair_transform_and_angles():
    """pair_transform rebuilds T_{i←j} exactly from its in-plane part and frame j's plane."""
    theta, alpha, beta = 0.02, -0.03, 0.015
    truth = np.eye(4)
    truth[:3, :3] = Rotation.from_euler("ZXY", [theta, alpha, beta]).as_matrix()
    truth[:3, 3] = [0.8, -0.4, 0.6]
    tz, a, b = plane_of(truth)
    plane = PlaneFit(tz, a, b, np.zeros((3, 3)), 0.0, 0)
    np.testing.assert_allclose(plane.angles(theta), (alpha, beta), atol=1e-12)
    inplane = InplaneMotion(0.8, -0.4, theta, np.zeros((3, 3)), 0.0, 1.0, 100)
    np.testing.assert_allclose(pair_transform(inplane, plane), truth, atol=1e-12)
    # frame j's points land on the fitted plane
    q = truth @ np.array([[10.0, 30.0, 0.0, 1.0], [120.0, 80.0, 0.0, 1.0]]).T
    np.testing.assert_allclose(q[2], plane.z_mm(q[0], q[1]), atol=1e-12)
    # small-angle signs: tilt about x (α > 0) raises +y towards +z; about y (β > 0) lowers +x
    assert PlaneFit(0, 0, math.tan(0.01), np.eye(3), 0, 0).angles()[0] == pytest.approx(0.01)
    assert PlaneFit(0, -math.tan(0.01), 0, np.eye(3), 0, 0).angles()[1] == pytest.approx(0.01)


# --------------------------------------------------------------------------- on the renderer


@pytest.fixture(scope="module")
def rendered():
    """Frames of the default renderer at a skin position not used to fit the default model.

    Index k in 0, 1, 2, 4, 8 is an elevational step of 0.12·k mm (other indices stay black and are
    never used); 9 is a 1° fan (about image x through the contact point), 10 a 2° rotation about
    the image y axis through the contact point. Returns (frames, T_{0←k} per index).
    """
    render = pytest.importorskip("speckle_rec.simulate.render")
    if not hasattr(render, "render_frames"):
        pytest.skip("speckle_rec.simulate.render.render_frames not available")
    probe = Probe()
    contact = probe.contact_point_mm
    base = rigid(t=(120.0, 3.0, 0.0)) @ np.array(
        [[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float) @ rigid(t=-contact)
    motions = {k: rigid(t=(0.03 * k, -0.02 * k, 0.12 * k)) for k in (0, 1, 2, 4, 8)}
    motions[9] = rigid(rotvec=(math.radians(1.0), 0, 0), about=contact)
    motions[10] = rigid(rotvec=(0, math.radians(2.0), 0), about=contact)
    index = sorted(motions)
    frames = np.zeros((11, probe.height, probe.width), np.uint8)
    frames[index] = render.render_frames(base @ np.array([motions[k] for k in index]), probe=probe, threads=2)
    return frames, motions


def test_rendered_pairs_accuracy(rendered):
    frames, motions = rendered
    mask = fan_mask_from_frames(frames[[0, 1, 2, 4, 8, 9, 10]])
    pairs = [(0, 4), (0, 8), (0, 9), (0, 10)]
    measured = measure_pairs(frames, pairs, mask=mask, spacing_mm=SPACING, threads=2)
    for m in measured:
        truth = motions[m.j]
        assert m.inplane.ok
        error = m.inplane.params - [truth[0, 3], truth[1, 3], math.atan2(truth[1, 0], truth[0, 0])]
        assert np.all(np.abs(error) <= 4 * m.inplane.sigma + [0.01, 0.01, 1e-4])
        if m.j in (4, 8):  # tilted frames decorrelate: LK is less accurate there
            assert np.hypot(error[0], error[1]) < 0.05 and abs(error[2]) < math.radians(0.05)
        fit = m.fit_plane()
        tz, a, b = plane_of(truth)
        xc, yc = m.x_mm[m.bright].mean(), m.y_mm[m.bright].mean()
        z_true = abs(tz + a * xc + b * yc)
        if m.j in (4, 8):  # pure elevational translation of 0.48 and 0.96 mm
            assert abs(fit.z_mm(xc, yc) - z_true) <= 0.10 * z_true
            assert abs(fit.a) < 2e-3 and abs(fit.b) < 2e-3
        elif m.j == 9:  # fan: slope b
            assert abs(abs(fit.b) - abs(b)) <= 0.2 * abs(b)
        else:  # rotation about y: slope a
            assert abs(abs(fit.a) - abs(a)) <= 0.2 * abs(a)
        assert np.all(fit.sigma < 0.1)


def test_choose_strides_on_rendered(rendered):
    frames, _ = rendered
    mask = fan_mask_from_frames(frames[[0, 1, 2, 4, 8]])
    plan = choose_strides(frames, [0], mask=mask, spacing_mm=SPACING, strides=(1, 2, 4, 8), threads=2)
    assert set(plan.measurements) <= {(0, 1), (0, 2), (0, 4), (0, 8)} and (0, 1) in plan.measurements
    assert plan.median_rho.shape == (1, 4, len(plan.region_edges_mm) - 1)
    measured = plan.median_rho[0][:, np.isfinite(plan.median_rho[0]).all(axis=0)]
    assert np.all(np.diff(measured, axis=0) < 0.02)  # decorrelates with stride
    # 0.12 mm per frame: single steps are too correlated, the middle of the band needs ~8 frames
    middle = (plan.region_edges_mm[:-1] >= 25) & (plan.region_edges_mm[1:] <= 75)
    assert np.all(np.isin(plan.chosen[0][middle], (4, 8)))


def test_measure_pairs_bad_input(rendered):
    frames, _ = rendered
    mask = fan_mask_from_frames(frames[[0, 1]])
    with pytest.raises(DataError, match="frame index 11 out of range for 11 frames"):
        measure_pairs(frames, [(0, 11)], mask=mask, spacing_mm=SPACING)
    with pytest.raises(DataError, match="unknown inplane option 'window'"):
        measure_pairs(frames, [(0, 1)], mask=mask, spacing_mm=SPACING, inplane_options={"window": 9})
    with pytest.raises(DataError, match="expected a DecorrelationModel"):
        measure_pairs(frames, [(0, 1)], mask=mask, spacing_mm=SPACING, model="default")
    with pytest.raises(DataError, match="positive increasing strides"):
        choose_strides(frames, [0], mask=mask, spacing_mm=SPACING, strides=(2, 1))
    with pytest.raises(DataError, match=r"expected frames of shape \(n, H, W\)"):
        measure_pairs(frames[0], [(0, 1)], mask=mask, spacing_mm=SPACING)
    single = measure_pair(frames, 0, 1, mask=mask, spacing_mm=SPACING)
    assert (single.i, single.j) == (0, 1) and single.rho.shape == single.x_mm.shape
    with pytest.raises(DataError, match="method 'rho' or 'distance'"):
        single.fit_plane(method="median")


# --------------------------------------------------------------------------- pivot, strides, decorrelated pairs


@pytest.mark.parametrize("shape", [(480, 640), (240, 320)])
def test_fan_contact(shape):
    probe = Probe.fit_image(*shape)
    mask = probe.fan_mask()
    apex = fan_apex_mm(mask, spacing_mm=probe.spacing_mm)
    contact = fan_contact_mm(mask, spacing_mm=probe.spacing_mm, apex_mm=apex)
    np.testing.assert_allclose(contact, probe.contact_point_mm[:2], atol=1.0)  # within 1 mm of the face centre
    linear = np.zeros((200, 300), bool)
    linear[10:190, 40:260] = True
    np.testing.assert_allclose(fan_contact_mm(linear, spacing_mm=(0.2, 0.25)), (0.2 * 150, 0.25 * 11), atol=0.2)


def test_fit_plane_rho_pivot_start(rng):
    """A 2.5° fan about the contact leaves the deep image decorrelated; the pivot start finds it."""
    model = DecorrelationModel.default()
    probe = Probe()
    apex, contact = probe.apex_mm, probe.contact_point_mm[:2]
    x, y = np.meshgrid(np.linspace(30, 117, 22), np.linspace(8, 100, 24))
    x, y = x.ravel(), y.ravel()
    keep = np.hypot(x - apex[0], y - apex[1]) < probe.radius_mm + probe.depth_mm - 3
    x, y = x[keep], y[keep]
    b = math.tan(math.radians(2.5))
    truth = PlaneFit(-b * contact[1], 0.0, b, np.zeros((3, 3)), 0.0, 0)
    alpha, beta = truth.angles()
    beam = np.arctan2(x - apex[0], y - apex[1])
    expected = model.rho(truth.z_mm(x, y), y, 0.0, alpha * np.cos(beam) - beta * np.sin(beam))
    rho = expected + model.rho_sigma(expected, y) * rng.standard_normal(x.size) + 0.02 * rng.standard_normal(x.size)
    fit = fit_plane_rho(x, y, rho, model=model, apex_mm=apex, pivot_mm=contact)
    tilt = math.degrees(math.atan(math.hypot(fit.a, fit.b)))
    assert abs(tilt - 2.5) <= 0.25 * 2.5
    # a translation (no pivot in the data) is found as before: the pivot start only adds a candidate
    flat = PlaneFit(0.8, 0.0, 0.0, np.zeros((3, 3)), 0.0, 0)
    expected = model.rho(flat.z_mm(x, y), y)
    rho = expected + model.rho_sigma(expected, y) * rng.standard_normal(x.size)
    with_pivot = fit_plane_rho(x, y, rho, model=model, apex_mm=apex, pivot_mm=contact)
    without = fit_plane_rho(x, y, rho, model=model, apex_mm=apex)
    assert abs(with_pivot.z_mm(x.mean(), y.mean()) - 0.8) <= 0.1
    assert with_pivot.z_mm(x.mean(), y.mean()) == pytest.approx(without.z_mm(x.mean(), y.mean()), abs=0.02)


def _tissue_frames(tissue, motions, position=(110.0, 4.0)):
    """Rendered 480x640 frames of ``tissue`` for probe motions about a skin position (image-mm)."""
    render = pytest.importorskip("speckle_rec.simulate.render")
    probe = Probe()
    base = rigid(t=(position[0], position[1], 0.0)) @ np.array(
        [[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float) @ rigid(t=-probe.contact_point_mm)
    return render.render_frames(base @ np.asarray(motions), probe=probe, tissue=tissue, threads=2)


@pytest.fixture(scope="module")
def uniform_scan():
    """Fully developed speckle: frame k at an elevational step of 0.1·k mm for k in 0, 1, 2, 4, 8, 16
    (other frames up to 16 black, never read), frame 17 fanned by 2° about the skin contact."""
    tissue = pytest.importorskip("speckle_rec.simulate.tissue")
    probe = Probe()
    index = [0, 1, 2, 4, 8, 16]
    motions = [rigid(t=(0.0, 0.0, 0.1 * k)) for k in index]
    motions.append(rigid(rotvec=(math.radians(2.0), 0.0, 0.0), about=probe.contact_point_mm))
    rendered = _tissue_frames(tissue.Tissue.uniform(seed=11), motions)
    frames = np.zeros((18, probe.height, probe.width), np.uint8)
    frames[index + [17]] = rendered
    mask = fan_mask_from_frames(rendered)
    return frames, mask


def test_step_distances_small_steps(uniform_scan):
    """0.1 mm per frame leaves ρ ≈ 1 at stride 1: the stride is chosen per region and |d| = distance / stride."""
    frames, mask = uniform_scan
    plan = choose_strides(frames[:17], [0], mask=mask, spacing_mm=SPACING, strides=(1, 2, 4, 8, 16), threads=2)
    steps = plan.step_distances()
    assert steps.step_mm.shape == steps.stride.shape == (1, len(plan.region_edges_mm) - 1)
    assert np.all(steps.stride >= 4)  # never the stride-1 pair, whose ρ is above the usable band
    assert set(steps.planes) <= set(plan.measurements)
    error = steps.step_mm[0] / 0.1 - 1.0
    assert np.isfinite(error).all()
    # measured: mean +6 %, per region -13 to +25 % (shallowest); benchmark, 3 positions: +8 %, p95 16 %.
    # The bias is the packaged model's (calibrated on the forearm, whose partially developed regions
    # decorrelate more slowly), not the stride logic's.
    assert abs(np.mean(error)) <= 0.15
    assert np.max(np.abs(error)) <= 0.35
    with pytest.raises(DataError, match="patches 'all' or 'in_band'"):
        plan.step_distances(patches="bright")
    single = plan.measurements[(0, 1)].fit_plane()
    assert single.z_mm(75.0, 50.0) < 0.05  # the stride-1 pair alone says "no motion" (diagnostic)


def test_decorrelated_fan_pair(uniform_scan):
    """A 2° fan decorrelates all but the top of the image: the flow retried with a larger window is
    accurate, and the plane fit starts through the skin contact."""
    frames, mask = uniform_scan
    measured = measure_pair(frames, 0, 17, mask=mask, spacing_mm=SPACING, threads=2,
                            inplane_options={"retry_window_px": 21})
    assert measured.inplane.ok
    assert math.hypot(measured.inplane.tx_mm, measured.inplane.ty_mm) <= 0.1  # 0.34 mm without the retry
    fit = measured.fit_plane()
    assert abs(math.degrees(math.atan(math.hypot(fit.a, fit.b))) - 2.0) <= 0.2 * 2.0
    np.testing.assert_allclose(measured.pivot_mm, Probe().contact_point_mm[:2], atol=1.0)


def test_forearm_fan_pivot_start():
    """On the forearm at this position the distance-based starts end in a 5.8° local minimum for a 2° fan."""
    tissue = pytest.importorskip("speckle_rec.simulate.tissue")
    probe = Probe()
    frames = _tissue_frames(tissue.Tissue.forearm(seed=13),
                            [np.eye(4), rigid(rotvec=(math.radians(2.0), 0.0, 0.0), about=probe.contact_point_mm)])
    mask = fan_mask_from_frames(frames)
    measured = measure_pair(frames, 0, 1, mask=mask, spacing_mm=SPACING, threads=2)
    fit = measured.fit_plane()
    assert abs(math.degrees(math.atan(math.hypot(fit.a, fit.b))) - 2.0) <= 0.25 * 2.0


def test_fit_plane_rho_bad_pivot():
    with pytest.raises(DataError, match="pivot_mm"):
        fit_plane_rho([10, 20, 30, 40], [10, 30, 50, 70], [0.5, 0.5, 0.5, 0.5], model=toy_model(), pivot_mm=(1.0,))
