"""In-plane rigid motion from speckle: accuracy against exact synthetic ground truth, conventions, bad input.

Frames come from one continuous field of point scatterers seen through different probe poses (the
moving frame is rendered, not interpolated from the fixed one), so sub-pixel motion is exact.
"""

import math

import numba
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from speckle_rec.calibration import Calibration
from speckle_rec.errors import DataError
from speckle_rec.inplane import InplaneMotion, estimate_inplane, fan_mask_from_frames, fit_rigid
from speckle_rec.simulate.probe import Probe
from speckle_rec.transforms import transforms_from_tforms

SPACING = Calibration.default().spacing_mm
WAVELENGTH_MM = 0.257  # 6 MHz in soft tissue


@numba.njit(cache=True)
def _accumulate(points, amplitude, two_k, sx, sy, psf, height, width, re, im):
    """Complex echo of every scatterer (image-mm x, y, z) splatted with a separable Gaussian PSF."""
    sxp, syp, szp = psf[0], psf[1], psf[2]
    rx = int(math.ceil(3.0 * sxp / sx))
    ry = int(math.ceil(3.0 * syp / sy))
    gx = np.empty(2 * rx + 2)
    for k in range(points.shape[0]):
        x, y, z = points[k, 0], points[k, 1], points[k, 2]
        wz = math.exp(-0.5 * (z / szp) ** 2)
        if wz < 1e-3:
            continue
        ci, ri = int(round(x / sx - 1.0)), int(round(y / sy - 1.0))
        a_re = amplitude[k] * wz * math.cos(two_k * y)
        a_im = amplitude[k] * wz * math.sin(two_k * y)
        c_lo, c_hi = max(0, ci - rx), min(width, ci + rx + 1)
        for c in range(c_lo, c_hi):
            gx[c - c_lo] = math.exp(-0.5 * (((c + 1) * sx - x) / sxp) ** 2)
        for r in range(max(0, ri - ry), min(height, ri + ry + 1)):
            gy = math.exp(-0.5 * (((r + 1) * sy - y) / syp) ** 2)
            for c in range(c_lo, c_hi):
                re[r, c] += gx[c - c_lo] * gy * a_re
                im[r, c] += gx[c - c_lo] * gy * a_im


def speckle_frames(image_to_world, *, shape=(480, 640), spacing=SPACING, psf_mm=(0.4, 0.2, 1.0), density=20.0,
                   thin=True, seed=0):
    """uint8 B-mode frames (n, H, W) of one fixed random scatterer field seen from poses image-mm → world.

    ``thin``: scatterers only in the world plane Z = 0 (for in-plane motion of the image plane
    within it); otherwise a slab thick enough for every pose, ``density`` per mm³.
    """
    rng = np.random.default_rng(seed)
    poses = np.asarray(image_to_world, dtype=np.float64)
    h, w = shape
    sx, sy = spacing
    corners = np.array([[0, 0, 0, 1], [sx * (w + 1), 0, 0, 1], [0, sy * (h + 1), 0, 1],
                        [sx * (w + 1), sy * (h + 1), 0, 1]], float).T
    world = np.concatenate([(p @ corners)[:3].T for p in poses])
    margin = np.array([2.0, 2.0, 0.0 if thin else 3.5 * psf_mm[2]])
    lo, hi = world.min(0) - margin, world.max(0) + margin
    extent = (hi - lo)[:2].prod() if thin else (hi - lo).prod()
    n = int(density * extent)
    points = lo + rng.random((n, 3)) * (hi - lo)
    amplitude = rng.standard_normal(n)
    reference = math.sqrt(density * math.pi * psf_mm[0] * psf_mm[1] * (1.0 if thin else math.sqrt(math.pi) * psf_mm[2]))
    fan = Probe.fit_image(h, w, spacing).fan_mask()
    frames = np.zeros((len(poses), h, w), np.uint8)
    for f, pose in enumerate(poses):
        inverse = np.linalg.inv(pose)
        local = points @ inverse[:3, :3].T + inverse[:3, 3]
        re, im = np.zeros((h, w)), np.zeros((h, w))
        _accumulate(local, amplitude, 4 * math.pi / WAVELENGTH_MM, sx, sy, np.asarray(psf_mm, float), h, w, re, im)
        db = 20 * np.log10(np.maximum(np.hypot(re, im) / reference, 1e-6))
        frames[f] = np.where(fan, np.clip(np.rint((db + 28.0) / 50.0 * 255), 0, 255), 0)
    return frames


def rigid(*, t=(0.0, 0.0, 0.0), rotvec=(0.0, 0.0, 0.0), about=None):
    """4x4 rigid transform: rotation (rotation vector, rad) about point ``about`` then translation ``t``."""
    m = np.eye(4)
    m[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
    if about is not None:
        m[:3, 3] = np.asarray(about) - m[:3, :3] @ np.asarray(about)
    m[:3, 3] += t
    return m


def inplane_params(transform):
    """(tx, ty, θ) of the in-plane part of a 4x4 image-mm transform."""
    return np.array([transform[0, 3], transform[1, 3], math.atan2(transform[1, 0], transform[0, 0])])


@pytest.fixture(scope="module")
def moving_scan():
    """Frame 0 and three frames moved in-plane by known sub-pixel rigid motions (T_{0←k})."""
    rng = np.random.default_rng(7)
    motions = [np.eye(4)]
    for _ in range(3):
        about = (rng.uniform(20, 130), rng.uniform(-40, 60), 0.0)
        motions.append(rigid(t=(*rng.uniform(-1.2, 1.2, 2), 0.0),
                             rotvec=(0.0, 0.0, math.radians(rng.uniform(-1.5, 1.5))), about=about))
    motions = np.array(motions)
    return speckle_frames(motions, seed=3), motions


def test_accuracy_pure_inplane(moving_scan):
    frames, motions = moving_scan
    mask = fan_mask_from_frames(frames)
    for k in range(1, len(frames)):
        result = estimate_inplane(frames[0], frames[k], mask=mask, spacing_mm=SPACING, threads=2)
        error = result.params - inplane_params(motions[k])
        assert result.ok and result.inlier_fraction > 0.5
        assert np.hypot(error[0], error[1]) <= 0.02  # mm; target 0.05
        assert abs(math.degrees(error[2])) <= 0.02  # degrees; target 0.05
        assert np.all(np.abs(error) <= 5 * result.sigma + [0.005, 0.005, 1e-4])
        assert result.residual_rms_mm < 0.1


def test_convention_is_frame_to_previous(moving_scan):
    """estimate_inplane(frames[i-1], frames[i]) is the in-plane part of the contract's L_i."""
    frames, motions = moving_scan
    calibration = Calibration.default()
    world = rigid(t=(40.0, -12.0, 5.0), rotvec=(0.3, -0.2, 1.1))
    tforms = world @ motions @ np.linalg.inv(calibration.image_to_tool)  # tool → camera
    _, frame_to_previous = transforms_from_tforms(tforms, calibration.image_to_tool)
    mask = fan_mask_from_frames(frames)
    for i in (1, 2):
        result = estimate_inplane(frames[i - 1], frames[i], mask=mask, spacing_mm=SPACING)
        error = result.params - inplane_params(frame_to_previous[i - 1])
        assert np.all(np.abs(error) <= [0.02, 0.02, math.radians(0.02)])
        np.testing.assert_allclose(result.matrix4[:2], frame_to_previous[i - 1][:2], atol=0.03)
        # a point of frame i lands where L_i puts it in frame i-1
        q = np.array([[70.0, 60.0]])
        np.testing.assert_allclose(result.apply(q)[0], (frame_to_previous[i - 1] @ [70.0, 60.0, 0.0, 1.0])[:2],
                                   atol=0.03)


def test_render_frames_inplane():
    render = pytest.importorskip("speckle_rec.simulate.render")
    if not hasattr(render, "render_frames"):
        pytest.skip("speckle_rec.simulate.render.render_frames not available")
    probe = Probe.fit_image(240, 320)  # a quarter of the pixels keeps the test fast
    base = rigid(t=(60.0, 0.0, 0.0)) @ np.array(
        [[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float) @ rigid(t=-probe.contact_point_mm)
    motions = np.array([np.eye(4),
                        rigid(t=(0.31, -0.12, 0.0), rotvec=(0, 0, math.radians(0.6)), about=probe.contact_point_mm),
                        rigid(t=(-0.8, 0.45, 0.0), rotvec=(0, 0, math.radians(-1.2)), about=(37.0, 25.0, 0.0))])
    frames = render.render_frames(base @ motions, probe=probe, threads=2)
    mask = fan_mask_from_frames(frames)
    for k in (1, 2):
        result = estimate_inplane(frames[0], frames[k], mask=mask, spacing_mm=probe.spacing_mm, threads=2)
        error = result.params - inplane_params(motions[k])
        assert np.hypot(error[0], error[1]) <= 0.05
        assert abs(math.degrees(error[2])) <= 0.05


def test_fan_mask_from_frames(rng):
    probe = Probe.fit_image(120, 200)
    fan = probe.fan_mask()
    frames = np.where(fan, rng.integers(1, 256, size=(30, 120, 200)), 0).astype(np.uint8)
    frames[:, fan] *= rng.random((30, fan.sum())) > 0.1  # speckle has dark pixels too
    frames[:, 2:8, 3:40] = 200  # an annotation outside the fan, on every frame
    mask = fan_mask_from_frames(frames, erode_px=2)
    assert mask.shape == (120, 200) and mask.dtype == bool
    assert not mask[2:8, 3:40].any()
    assert np.all(fan[mask])  # eroded: strictly inside the fan
    assert mask.sum() > 0.85 * fan.sum()


@pytest.mark.parametrize("retry", [None, 21])
def test_uncorrelated_frames_are_not_trusted(rng, retry):
    fan = Probe.fit_image(240, 320).fan_mask()
    a, b = (np.where(fan, rng.integers(0, 256, size=fan.shape), 0).astype(np.uint8) for _ in range(2))
    result = estimate_inplane(a, b, mask=fan, spacing_mm=SPACING, retry_window_px=retry)
    assert not result.ok or result.inlier_fraction < 0.3


def test_retry_with_larger_window_where_most_is_decorrelated(moving_scan):
    """Only the top fifth of the fan still correlates: the 13-pixel fit keeps few points, the retry
    with 21-pixel windows is used, and it is as accurate on the speckle that is left."""
    frames, motions = moving_scan
    mask = fan_mask_from_frames(frames)
    rows = np.nonzero(mask.any(axis=1))[0]
    cut = rows[0] + (rows[-1] - rows[0]) // 5
    other = speckle_frames(motions[:1], seed=99)[0]  # independent speckle: decorrelated below the cut
    moving = frames[1].copy()
    moving[cut:] = other[cut:]
    plain = estimate_inplane(frames[0], moving, mask=mask, spacing_mm=SPACING)
    retried = estimate_inplane(frames[0], moving, mask=mask, spacing_mm=SPACING, retry_window_px=21)
    assert not plain.ok or plain.inlier_fraction < 0.5  # the retry is made
    error = retried.params - inplane_params(motions[1])
    assert retried.ok and np.hypot(error[0], error[1]) <= 0.05 and abs(math.degrees(error[2])) <= 0.05
    # a well-correlated pair is not retried: identical results with and without the option
    full = estimate_inplane(frames[0], frames[1], mask=mask, spacing_mm=SPACING, retry_window_px=21)
    assert full.params.tolist() == estimate_inplane(frames[0], frames[1], mask=mask, spacing_mm=SPACING).params.tolist()
    with pytest.raises(DataError, match="retry_window_px"):
        estimate_inplane(frames[0], frames[1], mask=mask, spacing_mm=SPACING, retry_window_px=1)


def test_fit_rigid_exact_and_outliers(rng):
    src = rng.uniform(0, 100, size=(200, 2))
    theta, t = math.radians(2.0), np.array([1.5, -0.7])
    c, s = math.cos(theta), math.sin(theta)
    dst = src @ np.array([[c, -s], [s, c]]).T + t + rng.normal(0, 0.01, size=src.shape)
    dst[:20] += rng.uniform(2, 5, size=(20, 2))  # outliers
    result = fit_rigid(src, dst)
    assert np.all(np.abs(result.params - [1.5, -0.7, theta]) <= [0.01, 0.01, 1e-4])
    assert 0.8 <= result.inlier_fraction <= 0.92
    assert result.n_points <= 180
    assert not fit_rigid(src[:5], dst[:5]).ok


def test_failed_result():
    failed = InplaneMotion.failed()
    assert not failed.ok and failed.n_points == 0 and np.isinf(failed.sigma).all()


@pytest.mark.parametrize(
    "fixed, moving, mask, spacing, message",
    [
        (np.zeros((2, 8, 8), np.uint8), np.zeros((8, 8), np.uint8), np.ones((8, 8), bool), (1, 1), r"shape \(H, W\)"),
        (np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8), np.ones((8, 8), bool), (1, 1), "uint8"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8), np.ones((8, 8), bool), (1, 1), "equal shape"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), np.ones((8, 9), bool), (1, 1), "mask of shape"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), np.ones((8, 8)), (1, 1), "bool mask"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), np.zeros((8, 8), bool), (1, 1), "mask is empty"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), np.ones((8, 8), bool), (1, -1), "spacing_mm"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), np.ones((8, 8), bool), 3.0, "spacing_mm"),
    ],
)
def test_estimate_inplane_bad_input(fixed, moving, mask, spacing, message):
    with pytest.raises(DataError, match=message):
        estimate_inplane(fixed, moving, mask=mask, spacing_mm=spacing)


def test_fan_mask_bad_input():
    with pytest.raises(DataError, match=r"expected frames of shape \(n, H, W\), got \(480, 640\)"):
        fan_mask_from_frames(np.zeros((480, 640), np.uint8))
    with pytest.raises(DataError, match="no imaged region"):
        fan_mask_from_frames(np.zeros((3, 20, 20), np.uint8))
    with pytest.raises(DataError, match="uint8"):
        fan_mask_from_frames(np.zeros((3, 20, 20), np.int16))
