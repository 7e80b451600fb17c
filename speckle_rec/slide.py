"""Anatomy slide: the sign of out-of-plane motion from structures sliding through the image.

Speckle decorrelation measures only |elevation|. A structure that crosses the image plane obliquely
(a vessel, a tendon) slides in the image when the plane moves out of plane, by ``z(p)·g(p)`` at
image point ``p``: ``z`` is the signed elevation of the move there and ``g`` the structure's
in-plane run per mm of elevation. ``g`` belongs to the anatomy and the plane's pose, not to the
motion, so two key steps taken from about the same view slide alike when they move the same way
and oppositely when they do not, however far apart in time.

A key step's *slide field* (:func:`slide_fields`) is the dense Farneback flow between its two
frames, blurred by ``BLUR_MM`` so that the anatomy leads, not the speckle, minus the least-squares
rigid in-plane motion of that flow over the fan, averaged in blocks of ``BLOCK_MM`` deeper than
``MIN_DEPTH_MM``, each block weighted by the step's fitted |elevation| there (sign unknown), scaled
to unit length. The cosine of two steps' fields has the sign of the product of their signs
(:func:`same_view_pairs` keeps the clear ones between steps far apart that see the same view).
With ``slide=True``, :func:`speckle_rec.trajectory.estimate_trajectory` uses these pairs to decide
the relation across each quiet stretch (:func:`quiet_stretches`), which decorrelation cannot carry
a sign across; ``benchmarks/anatomy_slide.py`` measures the cue and ``benchmarks/README.md`` what
it does to the rotation scores.
"""

import cv2
import numpy as np

BLUR_MM = 0.45  # Gaussian blur before the flow: the anatomy leads, not the speckle
BLOCK_MM = 1.8  # slide fields are block means
THUMBNAIL_BLUR_MM = 0.9
THUMBNAIL = (40, 30)
MIN_DEPTH_MM = 4.0  # the skin and the fat under it move with the probe, not with the anatomy
MIN_COSINE = 0.2  # smaller cosines carry little sign
MIN_GAP = 21  # key steps; nearer pairs are the sign DP's
SAME_VIEW = 0.99  # thumbnail correlation above which two frames show about the same view
MIN_STEP_MM = 0.1  # key steps whose RMS anchor elevation is below this hardly slide


def slide_fields(stack, mask, spacing, keys, planes):
    """Unit slide fields of the key steps, each weighted by the step's fitted |elevation|.

    Parameters
    ----------
    stack : (N, H, W) uint8 ndarray
        Frames.
    mask : (H, W) bool ndarray
        The fan.
    spacing : (float, float)
        (sx, sy) mm per pixel; pixel (column c, row r) is at image-mm ((c + 1)·sx, (r + 1)·sy).
    keys : (K,) int ndarray
        Increasing key frames.
    planes : (K − 1, 3) ndarray
        Each key step's fitted plane (tz, a, b): elevation ``tz + a·x + b·y`` in mm, sign unknown.

    Returns
    -------
    (K − 1, F) float64 ndarray
        Row m: key step m's field (F = 2 × blocks inside the fan deeper than ``MIN_DEPTH_MM``), of
        unit length unless the weighted residual flow vanishes (zero then). A step without slide
        gives a field of flow noise, whose cosines with others are small.
    """
    sx, sy = spacing
    h, w = mask.shape
    block = max(1, int(round(BLOCK_MM / np.sqrt(sx * sy))))
    blur = BLUR_MM / np.sqrt(sx * sy)
    inside = mask.copy()
    inside[:int(np.ceil(MIN_DEPTH_MM / sy))] = False
    rows, cols = np.mgrid[0:h, 0:w]
    hb, wb = h // block, w // block

    def blocks(a):
        a = a[:hb * block, :wb * block]
        return a.reshape(hb, block, wb, block, *a.shape[2:]).mean(axis=(1, 3))

    kept = blocks(inside.astype(np.float64)) > 0.99
    x, y = cols[inside] - w / 2, rows[inside] - h / 2
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    rigid_pinv = np.linalg.pinv(np.concatenate([np.stack([ones, zeros, -y], axis=1),
                                                np.stack([zeros, ones, x], axis=1)]))
    block_x, block_y = blocks((cols + 1) * sx)[kept], blocks((rows + 1) * sy)[kept]
    cache = {}

    def frame(k):
        if k not in cache:
            smooth = cv2.GaussianBlur(stack[k].astype(np.float32), (0, 0), blur)
            cache[k] = np.clip(smooth, 0, 255).astype(np.uint8)
        return cache[k]

    fields = np.zeros((keys.size - 1, 2 * int(kept.sum())))
    for m in range(keys.size - 1):
        flow = cv2.calcOpticalFlowFarneback(frame(keys[m]), frame(keys[m + 1]), None,
                                            0.5, 3, 21, 3, 7, 1.5, 0)
        tx, ty, turn = rigid_pinv @ np.concatenate([flow[..., 0][inside], flow[..., 1][inside]])
        flow[..., 0] -= tx - turn * (rows - h / 2)
        flow[..., 1] -= ty + turn * (cols - w / 2)
        cache.pop(keys[m], None)  # a frame serves the two steps it joins
        elevation = planes[m, 0] + planes[m, 1] * block_x + planes[m, 2] * block_y
        field = (elevation[:, None] * blocks(flow)[kept]).ravel()
        norm = float(np.linalg.norm(field))
        if norm > 0:
            fields[m] = field / norm
    return fields


def view_similarity(stack, frames, spacing):
    """(F, F) correlation of blurred 40×30 thumbnails of ``frames`` (near 1: about the same view)."""
    blur = THUMBNAIL_BLUR_MM / np.sqrt(spacing[0] * spacing[1])
    thumbs = np.array([cv2.resize(cv2.GaussianBlur(stack[k].astype(np.float32), (0, 0), blur), THUMBNAIL,
                                  interpolation=cv2.INTER_AREA).ravel() for k in frames])
    thumbs -= thumbs.mean(axis=1, keepdims=True)
    thumbs /= np.maximum(np.linalg.norm(thumbs, axis=1, keepdims=True), 1e-12)
    return thumbs @ thumbs.T


def same_view_pairs(fields, similarity, moving):
    """Key-step pairs far apart that see about the same view and slide clearly.

    Parameters
    ----------
    fields : (M, F) ndarray
        :func:`slide_fields`.
    similarity : (M, M) ndarray
        :func:`view_similarity` of the steps' middle frames.
    moving : (M,) bool ndarray
        Steps that move out of plane enough to slide.

    Returns
    -------
    first, second : (P,) int ndarrays
        Step indices, ``second − first ≥ MIN_GAP``.
    cosine : (P,) ndarray
        Their fields' cosine: > 0 when the steps move the same way.
    """
    cosine = fields @ fields.T
    steps = np.arange(fields.shape[0])
    far = steps[None, :] - steps[:, None] >= MIN_GAP
    use = far & (similarity > SAME_VIEW) & (np.abs(cosine) > MIN_COSINE) & moving[:, None] & moving[None, :]
    first, second = np.nonzero(use)
    return first, second, cosine[first, second]


def moving_steps(elevation):
    """(M,) bool: key steps whose RMS elevation at the anchors reaches ``MIN_STEP_MM`` (they slide).

    ``elevation`` is (M, A): each step's fitted elevation (mm) at A anchor points, sign unknown.
    """
    return np.sqrt(np.mean(np.square(elevation), axis=1)) >= MIN_STEP_MM


def quiet_stretches(moving):
    """Runs of key steps that do not move, with moving steps on both sides.

    Parameters
    ----------
    moving : (M,) bool ndarray

    Returns
    -------
    list of (int, int)
        (first, last) step index of each run, in order.
    """
    runs, m = [], 0
    while m < moving.size:
        if moving[m]:
            m += 1
            continue
        last = m
        while last + 1 < moving.size and not moving[last + 1]:
            last += 1
        if m > 0 and last < moving.size - 1:
            runs.append((m, last))
        m = last + 1
    return runs


def vote_across_stretches(signs, moving, first, second, cosine, *, window, min_pairs):
    """Signs with the relation across each quiet stretch decided by the slide pairs that straddle it.

    For each quiet stretch in turn (:func:`quiet_stretches`), the pairs with one step among the
    ``window`` key steps before it and the other among the ``window`` after vote with
    ``signs[first]·signs[second]·cosine``; a negative sum flips every step after the stretch.

    Parameters
    ----------
    signs : (M,) int ndarray
        ±1 per key step (e.g. the sign DP's).
    moving : (M,) bool ndarray
    first, second, cosine : (P,) ndarrays
        :func:`same_view_pairs`.
    window : int
        Key steps on each side of a stretch whose pairs vote.
    min_pairs : int
        With fewer votes a stretch keeps its relation.

    Returns
    -------
    signs : (M,) int ndarray
        A new array.
    counts : dict
        ``quiet_stretches``, ``decided`` (with enough votes) and ``flipped``.
    """
    signs = np.array(signs, dtype=np.int64)
    stretches, decided, flipped = quiet_stretches(np.asarray(moving, bool)), 0, 0
    for start, end in stretches:
        use = (start - window <= first) & (first < start) & (end < second) & (second <= end + window)
        if use.sum() < min_pairs:
            continue
        decided += 1
        if np.sum(signs[first[use]] * signs[second[use]] * cosine[use]) < 0:
            signs[end + 1:] *= -1
            flipped += 1
    return signs, {"quiet_stretches": len(stretches), "decided": decided, "flipped": flipped}


__all__ = ["moving_steps", "quiet_stretches", "same_view_pairs", "slide_fields", "view_similarity",
           "vote_across_stretches"]
