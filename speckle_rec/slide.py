"""Anatomy slide: the sign of out-of-plane motion from structures sliding through the image.

Speckle decorrelation measures only |elevation|. A structure that crosses the image plane obliquely
(a vessel, a tendon) slides in the image when the plane moves out of plane, by ``z(p)·g(p)`` at
image point ``p``: ``z`` is the signed elevation of the move there and ``g`` the structure's
in-plane run per mm of elevation. ``g`` belongs to the anatomy and the plane's pose, not to the
motion, so two key steps taken from about the same view slide alike when they move the same way
and oppositely when they do not, however far apart in time.

A key step's *slide field* (:func:`slide_fields`) is the pyramidal Lucas-Kanade flow between its
two frames, blurred by ``BLUR_MM``, of points ``BLOCK_MM`` apart tracked with a ``WINDOW_MM``
window, minus the least-squares rigid in-plane motion of those points, each point weighted by the
step's fitted elevation there (sign unknown), scaled to unit length. Only points deeper than
``MIN_DEPTH_MM`` where the step keeps the expected correlation (by the decorrelation model) at
``MIN_RHO`` or more are tracked: where the plane moves farther, the flow no longer follows the
slide. On the simulated 480×640 rotation scans of seeds 1 and 3, 59-94 % of the same-view pairs
had the right sign with those points, whether weighted by their elevation or with the weight
clipped at 0.4 mm, and 95-99 % without them. The cosine of two steps' fields has the sign of the
product of their signs (:func:`same_view_pairs` keeps the clear ones between steps far apart that
see the same view). Lucas-Kanade replaced a dense Farneback flow averaged in blocks: 5-10 times
faster, as accurate at 240×320 and more accurate at 480×640 (``benchmarks/README.md``).

:func:`speckle_rec.trajectory.estimate_trajectory` uses these pairs (unless ``slide=False``), on
scans that fan about a fixed skin contact (they come back to their views), to decide the relation
across each quiet stretch (:func:`quiet_stretches`), which decorrelation cannot carry a sign
across: first the pairs near each stretch (:func:`vote_across_stretches`), then the pairs between
any two runs of steps the stretches separate, for all relations at once
(:func:`vote_between_segments`). Blurred thumbnails alone can pass planes 90° apart as the same
view (their correlation is dominated by what every frame shares), so a pair between runs votes
only if its frames, chained from the key steps, come within ``MAX_VIEW_MM`` under some relation
(:func:`view_distances`). ``benchmarks/anatomy_slide.py`` measures the cue and
``benchmarks/README.md`` what it does to the rotation scores.
"""

import itertools
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from .direction import MIRROR
from .threads import opencv_threads

BLUR_MM = 0.2  # Gaussian blur before the flow (σ)
WINDOW_MM = 5.6  # Lucas-Kanade window side: a structure's slide, not one speckle's
BLOCK_MM = 1.8  # spacing of the tracked points
MIN_RHO = 0.9  # points whose step decorrelates them below this (by the model) are not tracked
THUMBNAIL_BLUR_MM = 0.9
THUMBNAIL = (40, 30)
MIN_DEPTH_MM = 4.0  # the skin and the fat under it move with the probe, not with the anatomy
MIN_COSINE = 0.15  # same-view pairs right: <= 91 % below it, >= 94.7 % above (benchmarks/README.md)
MIN_GAP = 21  # key steps; nearer pairs are the sign DP's
SAME_VIEW = 0.99  # thumbnail correlation above which two frames show about the same view
MIN_STEP_MM = 0.1  # key steps whose RMS anchor elevation is below this hardly slide
MAX_STRETCHES = 12  # relations chosen by brute force over 2^stretches
MAX_VIEW_MM = 4.0  # same-view pairs whose frames stay farther apart under every relation: other views
_LK_CRITERIA = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.01)
_CHUNK_STEPS = 64


def slide_points(mask, spacing):
    """Tracked points: centres of the ``BLOCK_MM`` blocks inside the fan deeper than ``MIN_DEPTH_MM``.

    Returns
    -------
    (P, 2) float32 ndarray
        0-based (column, row) pixel positions.
    """
    sx, sy = spacing
    h, w = mask.shape
    block = max(1, int(round(BLOCK_MM / np.sqrt(sx * sy))))
    inside = mask.copy()
    inside[:int(np.ceil(MIN_DEPTH_MM / sy))] = False
    hb, wb = h // block, w // block
    kept = inside[:hb * block, :wb * block].reshape(hb, block, wb, block).mean(axis=(1, 3)) > 0.99
    rows, cols = np.nonzero(kept)
    return np.stack([cols, rows], axis=1).astype(np.float32) * block + (block - 1) / 2


def slide_fields(stack, mask, spacing, keys, planes, *, model, steps=None, threads=1):
    """Unit slide fields of the key steps, each weighted by the step's fitted elevation.

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
    model : DecorrelationModel
        The curves the planes were fitted with: a point is tracked where the step's expected
        correlation there is at least ``MIN_RHO``.
    steps : (S,) int ndarray, optional
        The key steps to compute (default: all); the others' rows stay zero.
    threads : int
        Key steps tracked at once.

    Returns
    -------
    (K − 1, 2·P) float64 ndarray
        Row m: key step m's field, (x, y) flow (pixels) times elevation (mm) at each of the P
        points of :func:`slide_points`, zero at the points it does not track; of unit length
        unless fewer than 3 points are tracked or the residual flow vanishes (zero then). A step
        without slide gives a field of flow noise, whose cosines with others are small.
    """
    sx, sy = spacing
    h, w = mask.shape
    points = slide_points(mask, spacing)
    x_mm, y_mm = (points[:, 0] + 1) * sx, (points[:, 1] + 1) * sy
    centred = points - np.float32([w / 2, h / 2])
    blur = BLUR_MM / np.sqrt(sx * sy)
    window = 2 * int(round(WINDOW_MM / np.sqrt(sx * sy) / 2)) + 1

    def blurred(k):
        return np.clip(cv2.GaussianBlur(stack[k].astype(np.float32), (0, 0), blur), 0, 255).astype(np.uint8)

    def field(m, before, after):
        out = np.zeros((points.shape[0], 2))
        elevation = planes[m, 0] + planes[m, 1] * x_mm + planes[m, 2] * y_mm
        near = np.flatnonzero(model.rho(np.abs(elevation), y_mm) >= MIN_RHO)
        if near.size < 3:
            return out.ravel()
        start = points[near, None, :]
        end, status, _ = cv2.calcOpticalFlowPyrLK(before, after, start, None,
                                                  winSize=(window, window), maxLevel=2, criteria=_LK_CRITERIA)
        tracked = near[status[:, 0] == 1]
        if tracked.size < 3:
            return out.ravel()
        flow = (end - start)[status[:, 0] == 1, 0, :].astype(np.float64)
        # least-squares rigid motion (tx, ty, small turn) of the tracked points, removed
        x, y = centred[tracked, 0].astype(np.float64), centred[tracked, 1].astype(np.float64)
        ones, zeros = np.ones_like(x), np.zeros_like(x)
        design = np.concatenate([np.stack([ones, zeros, -y], axis=1), np.stack([zeros, ones, x], axis=1)])
        tx, ty, turn = np.linalg.lstsq(design, flow.T.ravel(), rcond=None)[0]
        out[tracked, 0] = (flow[:, 0] - tx + turn * y) * elevation[tracked]
        out[tracked, 1] = (flow[:, 1] - ty - turn * x) * elevation[tracked]
        norm = float(np.linalg.norm(out))
        return (out / norm if norm > 0 else out).ravel()

    steps = np.arange(keys.size - 1) if steps is None else np.asarray(steps, dtype=np.int64)
    fields = np.zeros((keys.size - 1, 2 * points.shape[0]))
    threads = max(1, int(threads))
    # one OpenCV thread per worker when several track at once (OpenCV's LK releases the GIL);
    # chunks of steps bound the blurred key frames kept; in a chunk each is blurred once for the two
    # steps it ends and starts
    with opencv_threads(1 if threads > 1 else cv2.getNumThreads()), ThreadPoolExecutor(threads) as pool:
        for chunk in np.array_split(steps, max(1, -(-steps.size // _CHUNK_STEPS))):
            ends = np.unique(np.concatenate([chunk, chunk + 1]))
            frame = dict(zip(ends, pool.map(blurred, keys[ends])))
            for m, row in zip(chunk, pool.map(lambda m: field(m, frame[m], frame[m + 1]), chunk)):
                fields[m] = row
    return fields


def view_similarity(stack, frames, spacing):
    """(F, F) correlation of blurred 40×30 thumbnails of ``frames`` (near 1: about the same view)."""
    blur = THUMBNAIL_BLUR_MM / np.sqrt(spacing[0] * spacing[1])
    thumbs = np.array([cv2.resize(cv2.GaussianBlur(stack[k].astype(np.float32), (0, 0), blur), THUMBNAIL,
                                  interpolation=cv2.INTER_AREA).ravel() for k in frames])
    thumbs -= thumbs.mean(axis=1, keepdims=True)
    thumbs /= np.maximum(np.linalg.norm(thumbs, axis=1, keepdims=True), 1e-12)
    return thumbs @ thumbs.T


def same_view_pairs(fields, similarity, moving, *, min_cosine=MIN_COSINE):
    """Key-step pairs far apart that see about the same view and slide clearly.

    Parameters
    ----------
    fields : (M, F) ndarray
        :func:`slide_fields`.
    similarity : (M, M) ndarray
        :func:`view_similarity` of the steps' middle frames.
    moving : (M,) bool ndarray
        Steps that move out of plane enough to slide.
    min_cosine : float
        Pairs whose |cosine| is not above this carry too little sign (0 keeps every nonzero one).

    Returns
    -------
    first, second : (P,) int ndarrays
        Step indices, ``second − first ≥ MIN_GAP``.
    cosine : (P,) ndarray
        Their fields' cosine: > 0 when the steps move the same way.
    """
    cosine = fields @ fields.T
    first, second = np.nonzero(_view_partners(similarity, moving) & (np.abs(cosine) > min_cosine))
    return first, second, cosine[first, second]


def _view_partners(similarity, moving):
    """(M, M) bool: moving steps i < j at least ``MIN_GAP`` apart whose views look alike."""
    steps = np.arange(moving.size)
    far = steps[None, :] - steps[:, None] >= MIN_GAP
    return far & (similarity > SAME_VIEW) & moving[:, None] & moving[None, :]


def paired_steps(similarity, moving):
    """(S,) int: the moving key steps with a far partner of about the same view, the only ones whose
    fields :func:`same_view_pairs` can use (the others need no flow)."""
    partners = _view_partners(similarity, moving)
    return np.flatnonzero(partners.any(axis=0) | partners.any(axis=1))


def step_travel(elevation):
    """(M,) float: each key step's RMS elevation at the anchors (mm), how far it moves out of plane.

    ``elevation`` is (M, A): each step's fitted elevation (mm) at A anchor points, sign unknown.
    """
    return np.sqrt(np.mean(np.square(elevation), axis=1))


def moving_steps(elevation):
    """(M,) bool: key steps whose :func:`step_travel` reaches ``MIN_STEP_MM`` (they slide)."""
    return step_travel(elevation) >= MIN_STEP_MM


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


def vote_across_stretches(signs, moving, first, second, cosine, *, window, min_pairs, margins=None):
    """Signs with the relation across each quiet stretch decided by the slide pairs that straddle it.

    For each quiet stretch in turn (:func:`quiet_stretches`), the pairs with one step among the
    ``window`` key steps before it and the other among the ``window`` after vote with
    ``signs[first]·signs[second]·cosine``. A negative sum says the two sides disagree, but the
    sign error may lie at another junction inside the windows (a DP error near the stretch): every
    step after the junction that the region's pairs (both steps within ``window`` of the stretch)
    straddle with the most negative sum is flipped. Among equals (pairs cannot place a junction finer
    than their ends), the stretch's last junction, else the one of smallest ``margins``.

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
    margins : (M − 1,) ndarray, optional
        How sure the signs are of each junction (e.g. the sign DP's flip margins); default: equal.

    Returns
    -------
    signs : (M,) int ndarray
        A new array.
    counts : dict
        ``quiet_stretches``, ``decided`` (with enough votes), ``flipped`` and ``moved`` (flips
        made at a junction outside the stretch).
    """
    signs = np.array(signs, dtype=np.int64)
    stretches, decided, flipped, moved = quiet_stretches(np.asarray(moving, bool)), 0, 0, 0
    for start, end in stretches:
        use = (start - window <= first) & (first < start) & (end < second) & (second <= end + window)
        if use.sum() < min_pairs:
            continue
        decided += 1
        if np.sum(signs[first[use]] * signs[second[use]] * cosine[use]) >= 0:
            continue
        region = (start - window <= first) & (second <= end + window)
        a, b = first[region], second[region]
        # junction j (between steps j and j + 1) is straddled by the pairs with a <= j < b
        change = np.zeros(signs.size + 1)
        np.add.at(change, a, signs[a] * signs[b] * cosine[region])
        np.add.at(change, b, -signs[a] * signs[b] * cosine[region])
        straddle = np.cumsum(change)[:signs.size - 1]
        lo, hi = max(start - window, 0), min(end + window, signs.size - 1)
        candidates = np.arange(lo, hi)
        best = candidates[straddle[lo:hi] <= straddle[lo:hi].min() + 1e-12]
        own = best[(best >= start - 1) & (best <= end)]
        if own.size:
            junction = own[-1]  # the stretch keeps the sign before it
        else:
            junction = best[np.argmin(margins[best])] if margins is not None else best[0]
        signs[junction + 1:] *= -1
        flipped += 1
        moved += int(not own.size)
    return signs, {"quiet_stretches": len(stretches), "decided": decided, "flipped": flipped, "moved": moved}


def segments(moving):
    """(M,) int: the run of each key step, runs split after each quiet stretch (:func:`quiet_stretches`).

    Run ``r`` ends with the ``r``-th stretch, so flipping the relation at stretch ``(start, end)``
    flips the signs of the steps after ``end``: every later run.
    """
    moving = np.asarray(moving, bool)
    ends = np.array([end for _, end in quiet_stretches(moving)], dtype=np.int64)
    return np.searchsorted(ends, np.arange(moving.size), side="left")


def view_distances(poses, first, second, segment, points):
    """How near two key steps' start frames come, over the relations at the stretches between them.

    Flipping the relation at a quiet stretch whose last step is ``end`` reflects every later frame
    through the plane of key frame ``end + 1``. For each pair the frames' RMS distance over
    ``points`` is taken under every choice of flips at the stretches between their runs (frames
    of different views stay far apart under all of them: same-looking thumbnails are not enough,
    see ``MAX_VIEW_MM``).

    Parameters
    ----------
    poses : (K, 4, 4) ndarray
        Key frame → frame 0 (image-mm), chained with the current signs.
    first, second : (P,) int ndarrays
        Key steps (their start frames' poses are compared), ``segment[first] <= segment[second]``.
    segment : (K − 1,) int ndarray
        :func:`segments`.
    points : (Q, 2) ndarray
        Image points (x, y) in mm.

    Returns
    -------
    (P,) ndarray
        The least RMS distance (mm).
    """
    ends = np.flatnonzero(np.diff(segment))  # last step of each run but the final one
    reflect = poses[ends + 1] @ MIRROR @ np.linalg.inv(poses[ends + 1])
    homogeneous = np.concatenate([points.T, np.zeros((1, len(points))), np.ones((1, len(points)))])
    a, b = poses[first] @ homogeneous, poses[second] @ homogeneous
    out = np.full(len(first), np.inf)
    for i, j in sorted(set(zip(segment[first].tolist(), segment[second].tolist()))):
        use = (segment[first] == i) & (segment[second] == j)
        for flips in itertools.product((False, True), repeat=j - i):
            w = np.eye(4)
            for k in np.flatnonzero(flips):
                w = w @ reflect[i + k]
            gap = a[use, :3] - np.einsum("ij,pjq->piq", w[:3], b[use])
            out[use] = np.minimum(out[use], np.sqrt(np.mean(np.sum(gap**2, axis=1), axis=1)))
    return out


def vote_between_segments(signs, segment, first, second, cosine, *, min_pairs, margins=None):
    """Signs with the relation at every quiet stretch chosen to agree with the pairs of all runs.

    The pairs between runs ``i < j`` sum to a vote ``V_ij = Σ signs[first]·signs[second]·cosine``
    (zero with fewer than ``min_pairs``). Flipping the relations ``g`` at the stretches (±1 each)
    multiplies run ``r``'s signs by ``f_r = g_1·…·g_r``; the flips taken maximise ``Σ f_i·f_j·V_ij``,
    by brute force over all ``2^S`` choices (``S <= MAX_STRETCHES``); among equals, the fewest
    flips, then those at the stretches of the smallest ``margins``.

    Parameters
    ----------
    signs : (M,) int ndarray
    segment : (M,) int ndarray
        :func:`segments`.
    first, second, cosine : (P,) ndarrays
        Same-view pairs (:func:`same_view_pairs`).
    min_pairs : int
    margins : (S,) ndarray, optional
        How sure the signs are of each stretch's relation (default: equal).

    Returns
    -------
    signs : (M,) int ndarray
        A new array.
    counts : dict
        ``runs``, ``run_pairs_voting`` (pairs of runs with enough pairs), ``flipped`` and
        ``unlinked``: the stretches (indices into :func:`quiet_stretches`) that no voting pair of
        runs spans, whose relation the pairs left as it was.
    """
    signs = np.array(signs, dtype=np.int64)
    runs = int(segment.max()) + 1 if segment.size else 1
    if runs - 1 > MAX_STRETCHES:
        raise ValueError(f"expected at most {MAX_STRETCHES} quiet stretches, got {runs - 1}")
    votes = np.zeros((runs, runs))
    count = np.zeros((runs, runs), np.int64)
    across = segment[first] != segment[second]  # a pair within a run says nothing of the stretches
    at = (segment[first[across]], segment[second[across]])
    np.add.at(votes, at, signs[first[across]] * signs[second[across]] * cosine[across])
    np.add.at(count, at, 1)
    voting = count >= min_pairs
    votes[~voting] = 0.0
    margins = np.zeros(runs - 1) if margins is None else np.asarray(margins, dtype=np.float64)
    choices = np.array(list(itertools.product((1, -1), repeat=runs - 1)), np.int64)
    choices = choices.reshape(2 ** (runs - 1), runs - 1)
    factors = np.concatenate([np.ones((len(choices), 1), np.int64), np.cumprod(choices, axis=1)], axis=1)
    agreement = np.einsum("ci,ij,cj->c", factors, votes, factors)
    flipped = choices < 0
    # the best agreement (up to rounding), then the fewest flips, then the least sure stretches
    best = np.lexsort((flipped @ margins, flipped.sum(axis=1), -np.round(agreement, 9)))[0]
    signs *= factors[best][segment]
    # stretch s lies between runs s and s + 1: pairs of runs i <= s < j span it
    unlinked = [s for s in range(runs - 1) if not voting[:s + 1, s + 1:].any()]
    return signs, {"runs": runs, "run_pairs_voting": int(voting.sum()),
                   "flipped": int(flipped[best].sum()), "unlinked": unlinked}


__all__ = ["moving_steps", "paired_steps", "quiet_stretches", "same_view_pairs", "segments", "slide_fields",
           "slide_points", "step_travel", "view_distances", "view_similarity", "vote_across_stretches",
           "vote_between_segments"]
