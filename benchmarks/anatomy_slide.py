"""Does anatomy sliding in the image carry the sign of out-of-plane motion, across quiet stretches too?

Usage:
    python benchmarks/anatomy_slide.py DATA_DIR [DATA_DIR ...] --model CALIB.json [--threads 2]
        [--json FILE]

    # e.g. on the rotation folder benchmarks/accuracy.py --out acc keeps:
    python benchmarks/anatomy_slide.py acc/data/rotation_240x320_1000 \\
        --model acc/calibration/240x320_1000_seed2.json

Why: speckle decorrelation measures only |elevation|. A structure that crosses the image plane
obliquely (a vessel, a tendon) slides in the image when the plane moves out of plane, by
``z(p)·g(p)`` at image point ``p``: ``z`` is the signed elevation of the move there and ``g`` the
structure's in-plane run per mm of elevation. ``g`` belongs to the anatomy and the plane's pose,
not to the motion, so two key steps taken from about the same view slide alike when they move the
same way and oppositely when they do not, however far apart in time. The rotation protocol comes
back to its upright view between phases, so such pairs can straddle the quiet stretches (the
in-plane rock) that decorrelation cannot carry the sign across.

Per scan: the key steps, their |plane| fits and the sign DP's signs are computed as
:func:`speckle_rec.trajectory.estimate_trajectory` does, and each step's true sign (agreement with
the true step at the anchors) is taken from the tracker. A key step's slide field
(:func:`slide_fields`) is the dense Farneback flow between its two frames, blurred by ``BLUR_MM``
so that the anatomy leads, not the speckle, minus the least-squares rigid in-plane motion of that
flow over the fan, averaged in blocks of ``BLOCK_MM`` deeper than ``MIN_DEPTH_MM``, each block
weighted by the step's fitted |elevation| there (sign unknown), scaled to unit length. Two steps'
cue is the cosine of their fields, whose sign should be the product of their true signs. Only steps
whose fitted elevation reaches ``MIN_STEP_MM`` RMS at the anchors count, and only pairs with
``|cosine| > MIN_COSINE``.

- ``DP adjacent``: the share of consecutive moving steps the DP relates as the truth does;
- ``adjacent``: consecutive moving steps (cue right: the share the cosine relates as the truth);
- ``same view``: :func:`same_view_pairs`, at least ``MIN_GAP`` key steps apart, their middle
  frames' blurred 40×30 thumbnails correlated above ``SAME_VIEW``;
- ``stretches``: each run of quiet key steps with moving steps on both sides. ``cue right``
  counts those where the same-view pairs straddling the run, with the true signs, sum to a
  positive agreement (the cue gives the true relation of the two sides); ``DP right`` those where
  the DP's signs relate the steps just before and after the run as the truth does.
"""

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from cli.output import format_table, write_json
from speckle_rec import trajectory
from speckle_rec.decorrelation import DecorrelationModel
from speckle_rec.evaluate import ScanTruth

from _machine import cell, machine_line, scan_results, start_script
from trajectory_options import measure_scan, true_step_planes

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


def pair_accuracy(cosine, relation, use):
    """(pairs used, share whose cosine has the sign of the true relation)."""
    count = int(use.sum())
    return count, (float(np.mean(np.sign(cosine[use]) == relation[use])) if count else None)


def run_scan(scan, calibration, model, threads):
    truth = ScanTruth.load(scan, calibration)
    meas = measure_scan(scan, calibration, model, threads)
    opts = trajectory._check_options({})
    keys, step_rho, step_theta = trajectory._key_steps(meas, opts["key_rho"])
    free = trajectory.fit_planes(step_rho, step_theta, meas, f_scale=opts["f_scale"],
                                 rho_sigma_floor=opts["rho_sigma_floor"])
    _, planes, covariance, _ = trajectory._decide_pivot(meas, step_rho, step_theta, free, opts)
    dp_signs, _ = trajectory._resolve_key_signs(meas, keys, planes, covariance, opts)
    anchors = trajectory._anchor_design(meas)
    fitted = planes @ anchors.T
    true_signs = np.where(np.sum((true_step_planes(truth, keys) @ anchors.T) * fitted, axis=1) < 0, -1, 1)
    moving = np.sqrt(np.mean(fitted**2, axis=1)) >= MIN_STEP_MM

    fields = slide_fields(meas.stack, meas.mask, meas.spacing, keys, planes)
    cosine = fields @ fields.T
    relation = true_signs[:, None] * true_signs[None, :]
    similarity = view_similarity(meas.stack, (keys[:-1] + keys[1:]) // 2, meas.spacing)
    first, second, _ = same_view_pairs(fields, similarity, moving)
    same_view = np.zeros(cosine.shape, bool)
    same_view[first, second] = True
    adjacent = np.zeros(cosine.shape, bool)
    steps = np.arange(keys.size - 2)
    adjacent[steps, steps + 1] = moving[:-1] & moving[1:] & (np.abs(cosine[steps, steps + 1]) > MIN_COSINE)

    stretches = []
    for first, last in quiet_stretches(moving):
        straddling = same_view[:first, last + 1:]
        before, after = np.nonzero(straddling)
        after = after + last + 1
        agreement = float(np.sum(true_signs[before] * true_signs[after] * cosine[before, after]))
        truth_across = true_signs[first - 1] * true_signs[last + 1]
        stretches.append({"steps": [int(first), int(last)], "pairs": int(before.size),
                          "cue_right": bool(before.size and agreement > 0),
                          "dp_right": bool(dp_signs[first - 1] * dp_signs[last + 1] == truth_across)})
    out = {"key_steps": int(keys.size - 1), "moving": int(moving.sum()), "stretches": stretches}
    for name, use in (("adjacent", adjacent), ("same_view", same_view)):
        out[f"{name}_pairs"], out[f"{name}_accuracy"] = pair_accuracy(cosine, relation, use)
    dp_relation = dp_signs[1:] * dp_signs[:-1]
    true_relation = true_signs[1:] * true_signs[:-1]
    both = moving[1:] & moving[:-1]
    agree = dp_relation[both] == true_relation[both]
    out["dp_adjacent_accuracy"] = float(np.mean(agree)) if both.any() else None
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="+", help="tracked data folders (e.g. acc/data/<run>)")
    parser.add_argument("--model", required=True, help="calibration or model JSON")
    parser.add_argument("--threads", type=int, default=2, help="Numba / OpenCV threads (default 2)")
    parser.add_argument("--json", metavar="FILE", help="write every scan's numbers as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    model = DecorrelationModel.from_json(args.model)
    log, threads, machine, started = start_script(args.quiet, args.threads)

    def measure(scan, calibration):
        return run_scan(scan, calibration, model, threads)

    def summary(numbers):
        return f"{numbers['key_steps']} key steps, {len(numbers['stretches'])} quiet stretches"

    results, rows = {}, []
    for folder, per_scan in scan_results(args.data, measure, summary, log):
        results[str(folder)] = per_scan
        for key, numbers in per_scan.items():
            stretches = [s for s in numbers["stretches"] if s["pairs"]]
            rows.append([Path(folder).name, key, numbers["key_steps"],
                         cell(numbers["dp_adjacent_accuracy"], 3),
                         numbers["adjacent_pairs"], cell(numbers["adjacent_accuracy"], 3),
                         numbers["same_view_pairs"], cell(numbers["same_view_accuracy"], 3),
                         f"{len(stretches)} of {len(numbers['stretches'])}",
                         sum(s["cue_right"] for s in stretches), sum(s["dp_right"] for s in stretches)])
    print(machine_line(machine, threads))
    header = ["data", "scan", "key steps", "DP adjacent", "adjacent pairs", "cue right", "same-view pairs",
              "cue right", "stretches with pairs", "cue right", "DP right"]
    print(format_table(header, rows))
    print(f"model {args.model}; {time.perf_counter() - started:.0f} s in all")
    if args.json:
        write_json(args.json, {"command": " ".join(sys.argv), "machine": machine, "model": args.model,
                               "folders": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
