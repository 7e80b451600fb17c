"""Speckle-physics renderer: output contract, determinism, elevational decorrelation, in-plane motion,
and the Numba kernels against plain NumPy versions of the same formulas."""

import math

import numpy as np
import pytest
from scipy.optimize import curve_fit
from skimage.registration import phase_cross_correlation

from speckle_rec.errors import DataError
from speckle_rec.simulate import _render_kernels as kernels
from speckle_rec.simulate.probe import Probe
from speckle_rec.simulate.render import render_frames
from speckle_rec.simulate.tissue import Beam, Layer, Tissue

PROBE = Probe()
SMALL = Probe.fit_image(240, 320)
BEAM = Beam()


def _pose(probe, *, x_mm=0.0, y_mm=0.0, across=False):
    """Probe face centre on the skin at world (x, y, 0), beam down +Z; image x along world X (or Y)."""
    if across:  # the first pose turned 90° about the beam axis
        rotation = np.column_stack([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    else:
        rotation = np.column_stack([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    pose = np.eye(4)
    pose[:3, :3] = rotation
    pose[:3, 3] = np.array([x_mm, y_mm, 0.0]) - rotation @ probe.contact_point_mm
    return pose


def _translate(pose, dx=0.0, dy=0.0, dz=0.0):
    """The probe moved by (dx, dy, dz) mm along its own image axes."""
    step = np.eye(4)
    step[:3, 3] = dx, dy, dz
    return pose @ step


def _sweep(probe, n, step_mm=0.3):
    return np.stack([_translate(_pose(probe), dx=0.05 * k, dz=step_mm * k) for k in range(n)])


def _ncc(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


# ------------------------------------------------------------------------------------------------ output


def test_frames_are_uint8_fans_with_plausible_bmode_statistics():
    frames = render_frames(np.stack([_pose(PROBE), _pose(PROBE, across=True)]))
    assert frames.dtype == np.uint8 and frames.shape == (2, 480, 640)
    mask = PROBE.fan_mask()
    assert not frames[:, ~mask].any()
    for frame in frames:
        inside = frame[mask].astype(float)
        assert 50 < inside.mean() < 130 and 15 < inside.std() < 60
        assert (inside == 0).mean() < 0.2  # dark only in vessels and the bone's shadow


def test_non_default_probe_size_and_caller_provided_out():
    out = np.full((2, 240, 320), 7, np.uint8)
    result = render_frames(_sweep(SMALL, 2), probe=SMALL, tissue=Tissue.uniform(1), out=out)
    assert result is out
    mask = SMALL.fan_mask()
    assert not out[:, ~mask].any()
    assert 60 < out[0][mask].mean() < 120 and out[0][mask].std() > 10


def test_bad_inputs_raise_one_line_data_errors():
    with pytest.raises(DataError, match=r"expected image_to_world of shape \(n, 4, 4\), got \(3, 4\)"):
        render_frames(np.eye(4)[:3])
    skewed = _pose(SMALL)[None].copy()
    skewed[0, 0, 1] = 0.5
    with pytest.raises(DataError, match="not a rigid transform"):
        render_frames(skewed, probe=SMALL)
    with pytest.raises(DataError, match="expected out as uint8"):
        render_frames(_sweep(SMALL, 1), probe=SMALL, out=np.zeros((1, 240, 320), np.float32))
    with pytest.raises(DataError, match="expected threads"):
        render_frames(_sweep(SMALL, 1), probe=SMALL, threads=0)
    with pytest.raises(DataError, match="expected first_frame"):
        render_frames(_sweep(SMALL, 1), probe=SMALL, first_frame=-1)


# ------------------------------------------------------------------------------------------- determinism


def test_chunks_threads_and_seeds():
    poses = _sweep(SMALL, 8)
    tissue = Tissue.forearm(seed=3)
    whole = render_frames(poses, probe=SMALL, tissue=tissue, threads=2)
    assert np.array_equal(whole, render_frames(poses, probe=SMALL, tissue=tissue, threads=2))
    parts = np.concatenate([
        render_frames(poses[:4], probe=SMALL, tissue=tissue, first_frame=0, threads=1),
        render_frames(poses[4:], probe=SMALL, tissue=tissue, first_frame=4, threads=1),
    ])
    assert np.array_equal(parts, whole)
    other = render_frames(poses[:1], probe=SMALL, tissue=Tissue.forearm(seed=4))
    mask = SMALL.fan_mask()
    assert _ncc(other[0][mask].astype(float), whole[0][mask].astype(float)) < 0.5  # shared anatomy only


def test_any_pose_sees_the_same_tissue_mirror():
    """Turning the probe 180° about its beam axis images the same plane mirrored left-right."""
    pose = _pose(PROBE)
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])  # about the vertical line through the apex column
    flip[0, 3] = 2 * PROBE.apex_mm[0]
    frames = render_frames(np.stack([pose, pose @ flip]), tissue=Tissue.uniform(2)).astype(float)
    r, theta = PROBE.polar_of_pixels()
    band = (r - PROBE.radius_mm > 5) & (r - PROBE.radius_mm < 60) & (np.abs(theta) < 0.5)
    mirrored = frames[1][:, ::-1]
    assert np.abs(mirrored - frames[0])[band].mean() < 0.5  # only the noise differs
    assert _ncc(mirrored[band], frames[0][band]) > 0.999


# ------------------------------------------------------------------------------------------------ physics


@pytest.mark.parametrize("across", [False, True])
def test_elevational_decorrelation_matches_beam_sigma(across):
    depth_lo, depth_hi = 40.0, 50.0
    sigma = BEAM.elevation_sigma_mm(0.5 * (depth_lo + depth_hi))
    steps = np.linspace(0.0, 3.0 * sigma, 10)
    pose = _pose(PROBE, across=across)
    frames = render_frames(np.stack([_translate(pose, dz=d) for d in steps]), tissue=Tissue.uniform(5))
    r, theta = PROBE.polar_of_pixels()
    depth = r - PROBE.radius_mm
    band = (depth >= depth_lo) & (depth < depth_hi) & (np.abs(theta) < math.radians(20))
    rho = np.array([_ncc(frame[band].astype(float), frames[0][band].astype(float)) for frame in frames])
    (fitted,), _ = curve_fit(lambda d, s: np.exp(-d**2 / (2 * s * s)), steps, rho, p0=[sigma])
    assert abs(fitted - sigma) < 0.15 * sigma, (fitted, sigma)


def test_elevation_sigma_profile():
    depths = np.array([0.0, BEAM.focus_depth_mm, 90.0])
    sigma = BEAM.elevation_sigma_mm(depths)
    assert sigma.shape == (3,) and sigma[1] == pytest.approx(BEAM.sigma_focus_mm)
    assert sigma[0] > sigma[1] < sigma[2]  # narrowest at the focus
    assert isinstance(BEAM.elevation_sigma_mm(10.0), float)


def test_inplane_translation_moves_content_by_minus_d_over_spacing():
    """Probe moved by (dx, dy) mm along its image axes: content moves by (−dx/sx, −dy/sy) pixels."""
    sx, sy = PROBE.spacing_mm
    pose = _pose(PROBE)
    moves = [(1.37, 0.61), (-0.83, 1.9), (2.5, -1.2)]
    frames = render_frames(np.stack([pose] + [_translate(pose, dx, dy) for dx, dy in moves]),
                           tissue=Tissue.uniform(3)).astype(float)
    window = np.s_[250 - 64:250 + 64, 320 - 64:320 + 64]  # on the beam axis, 40 mm deep
    for frame, (dx, dy) in zip(frames[1:], moves):
        # plain cross-correlation: phase normalisation whitens aliased speckle and locks to pixels
        shift, _, _ = phase_cross_correlation(frames[0][window], frame[window], upsample_factor=20,
                                              normalization=None)
        content = -shift  # the returned shift registers the moved frame back onto the first
        np.testing.assert_allclose(content, [-dy / sy, -dx / sx], atol=0.1)


def test_layers_vessels_and_bone_shadow_show():
    """Transverse view of the forearm: a hypoechoic fat layer, anechoic vessels, a dark bone shadow."""
    frame = render_frames(_pose(PROBE, across=True)[None])[0].astype(float)
    tissue = Tissue.forearm()
    r, theta = PROBE.polar_of_pixels()
    depth = r - PROBE.radius_mm
    centre = np.abs(theta) < 0.1
    fat = frame[centre & (depth > 2.5) & (depth < 4.0)].mean()
    muscle = frame[centre & (depth > 8) & (depth < 20)].mean()
    assert fat < muscle - 10
    # the bone (axis Y = 13 mm at X = 0) is under image x ≈ apex + 13 mm; its shadow is dark
    ax, ay = PROBE.apex_mm
    sx, sy = PROBE.spacing_mm
    bone = tissue.bone
    col = int(round((ax + bone.point_mm[1]) / sx)) - 1
    top_row = int(round((ay + PROBE.radius_mm + bone.point_mm[2] - bone.radius_mm) / sy)) - 1
    shadow = frame[top_row + 40:top_row + 120, col - 5:col + 5].mean()
    assert shadow < 0.3 * muscle
    surface = frame[top_row - 8:top_row + 8, col - 3:col + 3].max()
    assert surface > muscle + 30  # a bright echo on top
    vessel = tissue.vessels[1]  # crosses X = 0 at (Y, Z) = (4, 14)
    v_col = int(round((ax + vessel.point_mm[1]) / sx)) - 1
    v_row = int(round((ay + PROBE.radius_mm + vessel.point_mm[2]) / sy)) - 1
    assert frame[v_row - 2:v_row + 3, v_col - 2:v_col + 3].mean() < 0.4 * muscle


# ------------------------------------------------------------------------------------------------ kernels


def test_hash_matches_numpy_splitmix64():
    def mix(z):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    with np.errstate(over="ignore"):
        key = mix(np.array([7], np.uint64) + kernels._SALT_SEED)[0]
        assert kernels.seed_key(7) == key
        for ix, iy, iz in [(0, 0, 0), (-3, 5, 12), (-(2**40), 17, 2**33)]:
            h = mix(key + np.array([ix], np.int64).astype(np.uint64) * kernels._KEY_X)
            h = mix(h + np.array([iy], np.int64).astype(np.uint64) * kernels._KEY_Y)
            h = mix(h + np.array([iz], np.int64).astype(np.uint64) * kernels._KEY_Z)
            assert kernels.cell_key(ix, iy, iz, key) == h[0]
        value = mix(h + np.uint64(4) * kernels._GOLDEN)[0]
    assert kernels.uniform(h[0], 3) == float(value >> np.uint64(11)) * 2.0**-53
    counts = [kernels.poisson(9.0, kernels.uniform(key, k)) for k in range(4000)]
    assert abs(np.mean(counts) - 9.0) < 0.2 and abs(np.var(counts) - 9.0) < 0.8


def test_fast_trigonometry_matches_numpy():
    rng = np.random.default_rng(0)
    y, x = rng.normal(size=(2, 2000))
    got = np.array([kernels.fast_atan2(a, b) for a, b in zip(y, x)])
    np.testing.assert_allclose(got, np.arctan2(y, x), atol=3e-7)
    r = np.hypot(y, x)
    got = np.array([kernels.beam_angle(a, b, c) for a, b, c in zip(y, x, r)])
    np.testing.assert_allclose(got, np.arctan2(y, x), atol=3e-7)
    phase = rng.uniform(0, 7000, 2000)
    got = np.array([kernels.fast_cis(p) for p in phase])
    np.testing.assert_allclose(got[:, 0], np.cos(phase), atol=1e-8)
    np.testing.assert_allclose(got[:, 1], np.sin(phase), atol=1e-8)


def test_splat_matches_numpy_bilinear_deposit():
    rng = np.random.default_rng(1)
    r_lo, dr, t_lo, dt, two_k = 40.0, 0.1, -0.3, 0.01, 4 * math.pi / 0.2567
    r = rng.uniform(39.9, 41.0, 200)  # some fall off the grid
    theta = rng.uniform(-0.31, -0.22, 200)
    amplitude = rng.normal(size=200)
    iq = np.zeros((9, 8, 2), np.float32)
    kernels.splat_iq(r, theta, amplitude, r_lo, dr, t_lo, dt, two_k, iq)
    expected = np.zeros((9, 8), complex)
    fr, ft = (r - r_lo) / dr, (theta - t_lo) / dt
    i0, j0 = np.floor(fr).astype(int), np.floor(ft).astype(int)
    inside = (fr >= 0) & (ft >= 0) & (i0 < 8) & (j0 < 7)
    echo = amplitude * np.exp(-1j * two_k * r)
    for di in (0, 1):
        for dj in (0, 1):
            w = (fr - i0 if di else 1 - (fr - i0)) * (ft - j0 if dj else 1 - (ft - j0))
            np.add.at(expected, (i0[inside] + di, j0[inside] + dj), (w * echo)[inside])
    np.testing.assert_allclose(iq[..., 0] + 1j * iq[..., 1], expected, atol=1e-5)


def test_psf_convolution_matches_numpy():
    rng = np.random.default_rng(2)
    ka, kt, rows, cols = 2, 3, 5, 6
    iq = rng.normal(size=(rows + 2 * ka, cols + 2 * kt, 2)).astype(np.float32)
    axial = rng.uniform(size=2 * ka + 1).astype(np.float32)
    lateral = rng.uniform(size=(rows, 2 * kt + 1)).astype(np.float32)
    half = np.array([3, 2, 1, 0, 3], np.int64)
    out = np.empty((rows, cols, 2), np.float32)
    kernels.convolve_psf(iq, axial, lateral, half, out)
    expected = np.zeros((rows, cols, 2))
    for i in range(rows):
        for j in range(cols):
            for a in range(2 * ka + 1):
                for b in range(kt - half[i], kt + half[i] + 1):
                    expected[i, j] += axial[a] * lateral[i, b] * iq[i + a, j + b]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_detection_matches_numpy_log_compression():
    rng = np.random.default_rng(3)
    iq = rng.normal(size=(4, 5, 2)).astype(np.float32) * np.float32(0.5)
    gain = np.array([1.0, 2.0, 0.5, 1e-6], np.float32)
    out = np.empty((4, 5), np.float32)
    kernels.detect(iq, gain, np.zeros(4, np.float32), kernels.noise_key(np.uint64(1), 0), -50.0, 83.0, out)
    power = (gain[:, None] ** 2) * (iq[..., 0].astype(float) ** 2 + iq[..., 1].astype(float) ** 2)
    expected = np.clip(255 / 83 * (10 * np.log10(power) - 50 + 83), 0, 255)
    np.testing.assert_allclose(out, expected, atol=1e-3)
    # noise: rms as asked, seeded by the frame
    noisy = np.empty((200, 300), np.float32)
    level = 10 ** (-20 / 20)
    kernels.detect(np.zeros((200, 300, 2), np.float32), np.ones(200, np.float32),
                   np.full(200, level, np.float32), kernels.noise_key(np.uint64(1), 5), 0.0, 83.0, noisy)
    power_db = 10 * np.log10(np.mean(10 ** ((noisy / (255 / 83) - 83) / 10)))
    assert power_db == pytest.approx(-20, abs=0.2)


def test_scan_conversion_maps_match_probe_geometry():
    radius, half = SMALL.radius_mm, SMALL.half_angle_rad
    dr, dt = 0.1, 0.003
    map_x = np.empty((SMALL.height, SMALL.width), np.float32)
    map_y = np.empty_like(map_x)
    sx, sy = SMALL.spacing_mm
    kernels.scan_conversion_maps(sx, sy, *SMALL.apex_mm, radius, dr, -half, dt, map_x, map_y)
    r, theta = SMALL.polar_of_pixels()
    np.testing.assert_allclose(map_y, (r - radius) / dr, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(map_x, (theta + half) / dt, rtol=1e-6, atol=1e-3)


def test_shadow_ranges_match_ray_cylinder_intersection():
    pose = _pose(PROBE, across=True)
    bone = np.array([[0.0, 13.0, 38.0, 1.0, 0.0, 0.0, 9.0, 10.0, 1.0, 1.0, 0.1, 0.0]])
    angles = np.linspace(-0.5, 0.5, 101)
    ax, ay = PROBE.apex_mm
    out = np.empty(101)
    kernels.shadow_ranges(pose, bone, ax, ay, angles[0], angles[1] - angles[0], out)
    # in this pose image x = world Y and image y = world Z + const: circle of radius 9 at (Y, Z) = (13, 38)
    apex_world = pose[:3, :3] @ [ax, ay, 0.0] + pose[:3, 3]
    oy, oz = apex_world[1] - 13.0, apex_world[2] - 38.0
    for t, got in zip(angles, out):
        dy, dz = math.sin(t), math.cos(t)
        b, c = oy * dy + oz * dz, oy * oy + oz * oz - 81.0
        disc = b * b - c
        expected = -b - math.sqrt(disc) if disc >= 0 else math.inf
        assert got == pytest.approx(expected, abs=1e-9)
    assert np.isfinite(out).sum() > 5 and np.isinf(out).sum() > 5


def test_tissue_classification():
    tissue = Tissue(layers=(Layer(0, 2, 5.0, 2.0), Layer(2, math.inf, 9.0, 1.0)), vessels=(), bone=None, regions=())
    from speckle_rec.simulate.render import _tissue_arrays

    arrays = _tissue_arrays(tissue)
    assert kernels.tissue_at(0.0, 0.0, 1.0, *arrays) == (5.0, 2.0)
    assert kernels.tissue_at(0.0, 0.0, 30.0, *arrays) == (9.0, 1.0)
    forearm = _tissue_arrays(Tissue.forearm())
    vessel = Tissue.forearm().vessels[1]
    assert kernels.tissue_at(*vessel.point_mm, *forearm) == (0.0, 0.0)
    bone = Tissue.forearm().bone
    assert kernels.tissue_at(*bone.point_mm, *forearm) == (0.0, 0.0)
