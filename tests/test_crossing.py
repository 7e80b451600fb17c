"""Crossing planes (speckle_rec.crossing): band-pass, line correlation, flipped poses, flip gain."""

import cv2
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.spatial.transform import Rotation

from speckle_rec import crossing
from speckle_rec.direction import MIRROR

SPACING = (0.4, 0.4)  # mm per pixel (x, y)
SHAPE = (64, 80)  # rows (depth 25.6 mm), columns (width 32 mm)
VOXEL_MM = 0.5
ORIGIN_MM = np.array([-8.0, -8.0, -24.0])  # volume mm of voxel (0, 0, 0), as (x, y, z)


@pytest.fixture(scope="module")
def volume():
    """Smooth random anatomy (structures of a few mm) over 48 × 48 × 48 mm, indexed (x, y, z)."""
    noise = np.random.default_rng(11).normal(size=(96, 96, 96))
    return gaussian_filter(noise, 1.5 / VOXEL_MM).astype(np.float32)


def _render(volume, pose):
    """(H, W) float32 frame: the volume sampled at the image points mapped by ``pose`` (image-mm → volume
    mm); pixel (c, r) at image-mm ((c + 1)·sx, (r + 1)·sy) as in the challenge contract."""
    rows, cols = np.mgrid[0:SHAPE[0], 0:SHAPE[1]].astype(np.float64)
    points = np.stack([(cols.ravel() + 1) * SPACING[0], (rows.ravel() + 1) * SPACING[1],
                       np.zeros(rows.size), np.ones(rows.size)])
    where = (pose @ points)[:3] - ORIGIN_MM[:, None]
    return map_coordinates(volume, where / VOXEL_MM, order=1).reshape(SHAPE).astype(np.float32)


def _about(axis, degrees, pivot):
    """(4, 4) rotation by ``degrees`` about ``axis`` through the image-mm point ``pivot``."""
    out = np.eye(4)
    out[:3, :3] = Rotation.from_rotvec(np.radians(degrees) * np.asarray(axis, float)).as_matrix()
    out[:3, 3] = np.asarray(pivot) - out[:3, :3] @ np.asarray(pivot)
    return out


def _fan_then_spin():
    """(10, 4, 4) poses: a fan about the skin line (image x axis) to frame 4, then a spin about the
    depth axis through the image centre."""
    centre = (SPACING[0] * (SHAPE[1] + 1) / 2, 0.0, 0.0)
    fan = [_about((1, 0, 0), angle, centre) for angle in (-24, -18, -12, -6, 0)]
    spin = [_about((0, 1, 0), angle, centre) for angle in (12, 24, 36, 48, 60)]
    return np.stack(fan + spin)


def test_band_pass_keeps_structures_of_a_few_mm_and_drops_speckle_and_brightness():
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    blob = 50.0 * np.exp(-((cols * SPACING[0] - 16) ** 2 + (rows * SPACING[1] - 12) ** 2) / (2 * 2.0**2))
    speckle = rng.normal(scale=20.0, size=SHAPE)
    frames = np.stack([np.full(SHAPE, 120.0), 100.0 + blob, 100.0 + blob + speckle])
    out = crossing.band_pass(frames, SPACING)
    assert out.dtype == np.float32 and out.shape == frames.shape
    assert np.abs(out[0]).max() < 1e-3  # flat brightness is gone
    # a plain SciPy version of the same formula (4σ kernels, replicated borders)
    reference = [gaussian_filter(frames[1], [s / SPACING[1], s / SPACING[0]], mode="nearest", truncate=4.0)
                 for s in crossing.BAND_MM]
    np.testing.assert_allclose(out[1], reference[0] - reference[1], atol=0.05)
    assert out[1].max() > 10.0  # the 2 mm blob survives
    raw = np.corrcoef(frames[1].ravel(), frames[2].ravel())[0, 1]
    kept = np.corrcoef(out[1].ravel(), out[2].ravel())[0, 1]
    assert raw < 0.5 and kept > 0.8  # the speckle (one pixel) hides the blob, and is gone
    with pytest.raises(ValueError):
        crossing.band_pass(frames[0], SPACING)  # one frame, not a stack


def test_line_correlation_of_crossing_frames_high_on_true_poses_and_low_on_mirrored(volume):
    poses = _fan_then_spin()
    mask = np.ones(SHAPE, bool)
    images = crossing.band_pass(np.stack([_render(volume, p) for p in poses]), SPACING)
    i, j = 1, 8
    true = crossing.line_correlation(images[i], images[j], mask, SPACING, np.linalg.solve(poses[i], poses[j]))
    assert true > 0.9
    wrong = crossing.flipped_after(poses, 4)
    moved = crossing.line_correlation(images[i], images[j], mask, SPACING,
                                      np.linalg.solve(wrong[i], wrong[j]))
    assert moved < 0.5
    # parallel planes share no line; a fan outside the mask leaves too few samples
    assert np.isnan(crossing.line_correlation(images[0], images[1], mask, SPACING, np.eye(4)))
    assert np.isnan(crossing.line_correlation(images[i], images[j], np.zeros(SHAPE, bool), SPACING,
                                              np.linalg.solve(poses[i], poses[j])))


def test_line_correlation_samples_the_shared_line():
    """Frame j turned 40° about the depth axis through image-mm x = 20 (pixel column 49) shares that
    column with frame i and nothing else: the correlation is that column's, ±1."""
    rng = np.random.default_rng(4)
    image_i, image_j = rng.normal(size=(2,) + SHAPE).astype(np.float32)
    mask = np.ones(SHAPE, bool)
    j_to_i = _about((0, 1, 0), 40.0, (20.0, 0.0, 0.0))
    column = round(20.0 / SPACING[0]) - 1
    assert abs(crossing.line_correlation(image_i, image_j, mask, SPACING, j_to_i)) < 0.5  # unrelated
    image_j[:, column] = image_i[:, column]
    assert crossing.line_correlation(image_i, image_j, mask, SPACING, j_to_i) == pytest.approx(1.0, abs=1e-4)
    image_j[:, column] = 3.0 - 2.0 * image_i[:, column]
    assert crossing.line_correlation(image_i, image_j, mask, SPACING, j_to_i) == pytest.approx(-1.0, abs=1e-4)
    mask[:, column:] = False  # the line leaves the fan
    assert np.isnan(crossing.line_correlation(image_i, image_j, mask, SPACING, j_to_i))


def test_line_correlation_follows_the_transform():
    rng = np.random.default_rng(11)
    spacing = (0.2, 0.2)
    texture = cv2.GaussianBlur(rng.normal(size=(200, 240)).astype(np.float32), (0, 0), 1.0)
    shift_px = 10
    image_j = texture
    image_i = np.roll(texture, shift_px, axis=1)  # frame i sees column c of frame j at c + 10
    mask = np.zeros((200, 240), bool)
    mask[5:195, 20:220] = True
    x0 = (100 + 1) * spacing[0]  # column 100 in mm

    def turn_about_column(angle_deg, shift_mm):
        # frame j's plane turned about its vertical line x = x0, then moved along frame i's x
        out = _about((0, 1, 0), angle_deg, (x0, 0.0, 0.0))
        out[0, 3] += shift_mm
        return out

    shared = crossing.line_correlation(image_i, image_j, mask, spacing,
                                       turn_about_column(60.0, shift_px * spacing[0]))
    assert shared > 0.99
    # the same crossing without the shift samples frame i 2 mm away from the shared tissue
    elsewhere = crossing.line_correlation(image_i, image_j, mask, spacing, turn_about_column(60.0, 0.0))
    assert abs(elsewhere) < 0.3
    # planes within ~11 degrees of parallel have no well-defined line
    assert np.isnan(crossing.line_correlation(image_i, image_j, mask, spacing,
                                              turn_about_column(5.0, shift_px * spacing[0])))


def test_flipped_after_mirrors_the_later_motion_through_frame_k():
    poses = _fan_then_spin()
    flipped = crossing.flipped_after(poses, 4)
    np.testing.assert_array_equal(flipped[:5], poses[:5])
    for j in range(5, 10):
        step = np.linalg.solve(poses[4], poses[j])
        np.testing.assert_allclose(np.linalg.solve(flipped[4], flipped[j]), MIRROR @ step @ MIRROR,
                                   atol=1e-12)
        assert np.linalg.det(flipped[j][:3, :3]) == pytest.approx(1.0)
    np.testing.assert_allclose(crossing.flipped_after(flipped, 4), poses, atol=1e-12)  # an involution


def test_flip_gain_says_keep_on_true_poses_and_flip_on_mirrored_ones(volume):
    poses = _fan_then_spin()
    mask = np.ones(SHAPE, bool)
    images = dict(enumerate(crossing.band_pass(np.stack([_render(volume, p) for p in poses]), SPACING)))
    before, after = np.arange(0, 5), np.arange(5, 10)
    gain, pairs = crossing.flip_gain(images, mask, SPACING, poses, 4, before, after)
    assert pairs >= 16 and gain < -0.3
    wrong = crossing.flipped_after(poses, 4)
    gain_wrong, pairs_wrong = crossing.flip_gain(images, mask, SPACING, wrong, 4, before, after)
    assert pairs_wrong == pairs and gain_wrong == pytest.approx(-gain)
    assert np.isnan(crossing.flip_gain(images, mask, SPACING, poses, 4, before[:0], after)[0])
    with pytest.raises(ValueError, match="frames before <= 4 < frames after"):
        crossing.flip_gain(images, mask, SPACING, poses, 4, np.arange(0, 6), after)


def test_spread_frames():
    np.testing.assert_array_equal(crossing.spread_frames(10, 40, 4), [10, 20, 30, 40])
    np.testing.assert_array_equal(crossing.spread_frames(3, 5, 16), [3, 4, 5])
    assert crossing.spread_frames(0, 999).size == crossing.FRAMES_PER_SIDE
