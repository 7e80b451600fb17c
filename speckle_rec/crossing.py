"""Crossing planes: the relation across a quiet stretch from the anatomy two planes share.

Two frames whose planes cross at a clear angle image the same tissue along their line of
intersection, so their pixels along that line correlate. Mirroring the out-of-plane motion after a
key frame ``k`` (the other relation across a junction) moves every later plane, and with it the
line each later frame shares with the earlier ones. Pairs that straddle ``k`` thus test the
relation there, however far apart in time: the rotation protocol's rock phase, a quiet stretch
that decorrelation carries no sign across, lies between the fan before it and the spin after.

The speckle along the line does not survive the chained poses' errors (its correlation length is a
fraction of a mm); the anatomy does. So the frames are band-passed first (:func:`band_pass`: a
Gaussian of ``BAND_MM[0]`` minus one of ``BAND_MM[1]``), which keeps the structures of a few mm
and drops the speckle and the slow brightness every frame shares. ``benchmarks/crossing_lines.py``
measures the cue and ``benchmarks/README.md`` what it does to the rotation scores.

:func:`speckle_rec.trajectory.estimate_trajectory` uses it (step 3 of the slide stage) only where
no same-view pairs span the quiet stretches between two runs of key steps that travel out of plane
(:func:`speckle_rec.slide.vote_between_segments`), with pairs drawn from those two runs
(:func:`flip_gain`).
"""

import cv2
import numpy as np
from scipy.ndimage import map_coordinates

from .direction import MIRROR

BAND_MM = (1.1, 5.6)  # band-pass: Gaussian σ of the kept detail and of the removed background (mm)
STEP_MM = 0.1  # sample spacing along the line of intersection
MIN_DEPTH_MM = 4.0  # the skin and the fat under it move with the probe
MIN_POINTS = 50  # line samples inside both fans, else no correlation
MIN_SINE = 0.2  # planes nearer parallel share no well-placed line
FRAMES_PER_SIDE = 16  # frames of each run in the pairs of a flip gain (up to 16² pairs)


def band_pass(frames, spacing):
    """Frames with the speckle and the slow brightness removed, keeping structures of a few mm.

    Parameters
    ----------
    frames : (N, H, W) ndarray
    spacing : (float, float)
        (sx, sy) mm per pixel.

    Returns
    -------
    (N, H, W) float32 ndarray
        Each frame blurred by ``BAND_MM[0]`` minus the frame blurred by ``BAND_MM[1]`` (Gaussians
        in mm, replicated borders).
    """
    if np.ndim(frames) != 3:
        raise ValueError(f"expected frames of shape (N, H, W), got {np.shape(frames)}")
    sx, sy = spacing
    out = np.empty(frames.shape, np.float32)
    for k, frame in enumerate(frames):
        frame = frame.astype(np.float32)
        fine, coarse = (cv2.GaussianBlur(frame, (0, 0), sigma / sx, sigmaY=sigma / sy,
                                         borderType=cv2.BORDER_REPLICATE) for sigma in BAND_MM)
        out[k] = fine - coarse
    return out


def line_correlation(image_i, image_j, mask, spacing, j_to_i):
    """Pearson correlation of two frames along the line where frame j's plane crosses frame i's.

    Parameters
    ----------
    image_i, image_j : (H, W) float32 ndarray
        Band-passed frames (:func:`band_pass`).
    mask : (H, W) bool ndarray
        Imaged region (the fan), shared by both frames.
    spacing : (float, float)
        (sx, sy) mm per pixel; pixel (column c, row r) is at image-mm ((c + 1)·sx, (r + 1)·sy).
    j_to_i : (4, 4) ndarray
        Rigid transform from frame j's image-mm coordinates to frame i's.

    Returns
    -------
    float
        NaN when the planes cross at a sine below ``MIN_SINE`` or fewer than ``MIN_POINTS`` line
        samples lie inside both fans deeper than ``MIN_DEPTH_MM``.
    """
    sx, sy = spacing
    h, w = mask.shape
    a, b, c = j_to_i[2, 0], j_to_i[2, 1], j_to_i[2, 3]  # frame i's elevation of j's point (x, y)
    sine = np.hypot(a, b)
    if sine < MIN_SINE:
        return np.nan
    direction = np.array([-b, a]) / sine
    foot = -c * np.array([a, b]) / sine**2
    reach = np.hypot(sx * w, sy * h)
    t = np.arange(-reach, reach, STEP_MM)
    xj, yj = foot[0] + t * direction[0], foot[1] + t * direction[1]
    xi = j_to_i[0, 0] * xj + j_to_i[0, 1] * yj + j_to_i[0, 3]
    yi = j_to_i[1, 0] * xj + j_to_i[1, 1] * yj + j_to_i[1, 3]

    def pixels(x, y):
        return [y / sy - 1.0, x / sx - 1.0]

    fan = mask.astype(np.float32)
    inside = ((map_coordinates(fan, pixels(xi, yi), order=1, cval=0.0) > 0.99)
              & (map_coordinates(fan, pixels(xj, yj), order=1, cval=0.0) > 0.99)
              & (yi > MIN_DEPTH_MM) & (yj > MIN_DEPTH_MM))
    if inside.sum() < MIN_POINTS:
        return np.nan
    vi = map_coordinates(image_i, pixels(xi[inside], yi[inside]), order=1)
    vj = map_coordinates(image_j, pixels(xj[inside], yj[inside]), order=1)
    vi, vj = vi - vi.mean(), vj - vj.mean()
    norm = np.sqrt(np.sum(vi * vi) * np.sum(vj * vj))
    return float(np.sum(vi * vj) / norm) if norm > 0 else np.nan


def flipped_after(poses, k):
    """Poses with the out-of-plane motion after frame ``k`` mirrored (the other relation at ``k``).

    Parameters
    ----------
    poses : (N, 4, 4) ndarray
        Frame → frame 0, image-mm.
    k : int

    Returns
    -------
    (N, 4, 4) ndarray
        Frames after ``k`` reflected through frame k's plane (and mirrored in their own elevation,
        so they stay proper rigid transforms); the others as given.
    """
    out = poses.copy()
    out[k + 1:] = poses[k] @ MIRROR @ np.linalg.solve(poses[k], poses[k + 1:]) @ MIRROR
    return out


def flip_gain(images, mask, spacing, poses, k, before, after):
    """How much mirroring the motion after frame ``k`` raises the crossing frames' line correlation.

    Parameters
    ----------
    images : mapping of int to (H, W) float32 ndarray
        Band-passed frames, at least those of ``before`` and ``after``.
    mask : (H, W) bool ndarray
    spacing : (float, float)
        (sx, sy) mm per pixel.
    poses : (N, 4, 4) ndarray
        Frame → frame 0, image-mm.
    k : int
        The junction: frames after ``k`` move under the flip.
    before, after : (P,), (Q,) int ndarrays
        Frames ``<= k`` and ``> k``; every pair of one of each whose planes cross under both
        relations is used.

    Returns
    -------
    gain : float
        Mean over those pairs of the line correlation with the motion after ``k`` mirrored minus
        that with the poses as given (NaN without pairs); positive says the flip fits the anatomy.
    pairs : int
    """
    before, after = np.asarray(before, np.int64), np.asarray(after, np.int64)
    if before.size and (before.max() > k or after.min() <= k):
        raise ValueError(f"expected frames before <= {k} < frames after")
    flipped = flipped_after(poses, k)
    gains = []
    for i in before:
        for j in after:
            kept = line_correlation(images[i], images[j], mask, spacing, np.linalg.solve(poses[i], poses[j]))
            if not np.isfinite(kept):
                continue
            moved = line_correlation(images[i], images[j], mask, spacing,
                                     np.linalg.solve(flipped[i], flipped[j]))
            if np.isfinite(moved):
                gains.append(moved - kept)
    return (float(np.mean(gains)) if gains else np.nan), len(gains)


def spread_frames(first, last, count=FRAMES_PER_SIDE):
    """(≤ count,) int: frames ``first … last`` (inclusive) evenly spread, without repeats."""
    return np.unique(np.round(np.linspace(first, last, count)).astype(np.int64))


__all__ = ["band_pass", "flip_gain", "flipped_after", "line_correlation", "spread_frames"]
