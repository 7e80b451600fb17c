"""Trajectory estimation on simulated scans of every protocol: ours against simple predictions.

Usage: python benchmarks/bench_trajectory.py [--frames 1000] [--size 240x320] [--full-size 480x640]
       [--full-frames 1600] [--seed 1] [--threads 2] [--model FILE] [--json FILE]

For each protocol (rotation, linear, c-shape, s-shape) one scan is simulated and rendered, and
:func:`speckle_rec.trajectory.estimate_trajectory` runs on its frames. Beside ours, always:

- identity: no motion (the 2025 normaliser, score 0 by definition);
- constant velocity: the mean true local transform of a *different* simulated scan of the same
  protocol, chained;
- in-plane only: our own flow chain with zero out-of-plane motion (what the images give without
  any sign decision);
- ours, oracle mirror: our result mirrored through frame 0's plane when the convention
  (``first_direction=+1``) picked the wrong global mirror. The mirror cannot be decided from
  speckle; this row shows what a correct prior on it would give, the plain row what the convention
  gives on this scan.

Columns: GPE, GLE, LPE, LLE (mm), the 2025 score against the identity prediction, the final
frame's drift as % of the sweep length (image centre; sweeps), direction accuracy (fraction of
frames whose local out-of-plane motion, at nine points over the image, has the true sign; frames
moving < 0.05 mm are skipped; "mirror-free" takes the better global mirror), and frames/s of the
estimation alone. The decorrelation model is calibrated first on tracked scans of other seeds
(rotation and linear, as ``speckle-rec calibrate`` would) unless ``--model`` is given. The rotation
protocol is also run at ``--full-size`` with ``--full-frames`` (speed as in the challenge).
"""

import argparse
import json
import time

import numpy as np

from speckle_rec.ddf import PixelGrid
from speckle_rec.decorrelation import DecorrelationModel
from speckle_rec.direction import first_direction, mirror
from speckle_rec.inplane import fan_mask_from_frames
from speckle_rec.metrics import landmark_error_from_transforms, pixel_error_from_transforms, scores_2025
from speckle_rec.outofplane import fan_apex_mm, measure_pairs
from speckle_rec.simulate.dataset import simulate_scan
from speckle_rec.simulate.probe import Probe
from speckle_rec.threads import set_threads
from speckle_rec.trajectory import estimate_trajectory
from speckle_rec.transforms import globals_from_locals, invert_rigid, locals_from_globals

PROTOCOLS = ("rotation", "linear", "c-shape", "s-shape")


def truth_of(scan):
    poses = invert_rigid(scan.image_to_world[0]) @ scan.image_to_world
    return poses[1:], locals_from_globals(poses[1:])


def calibration_samples(frames, frame_to_first, spacing, model, *, strides=(1, 2, 4, 8, 16, 32), every=5):
    """(ρ, |d|, depth, θ, tilt) of bright patches over many pairs of a tracked scan."""
    mask = fan_mask_from_frames(frames)
    apex = fan_apex_mm(mask, spacing_mm=spacing)
    poses = np.concatenate([np.eye(4)[None], frame_to_first])
    out = [[] for _ in range(5)]
    n = frames.shape[0]
    for stride in strides:
        pairs = [(i, i + stride) for i in range(0, n - stride, every)]
        for m in measure_pairs(frames, pairs, mask=mask, spacing_mm=spacing, model=model):
            if not m.inplane.ok:
                continue
            rel = np.linalg.solve(poses[m.i], poses[m.j])  # T_{i←j}
            back = invert_rigid(rel)
            z = back[2, 0] * m.x_mm + back[2, 1] * m.y_mm + back[2, 3]
            normal = rel[:3, 2]
            a, b = -normal[0] / normal[2], -normal[1] / normal[2]
            theta = np.arctan2(rel[1, 0], rel[0, 0])
            alpha = np.cos(theta) * b - np.sin(theta) * a
            beta = -np.cos(theta) * a - np.sin(theta) * b
            beam = np.arctan2(m.x_mm - apex[0], m.y_mm - apex[1]) if apex is not None else 0.0 * m.x_mm
            use = m.bright & np.isfinite(m.rho)
            for column, values in zip(out, (m.rho, np.abs(z), m.y_mm, np.full(m.rho.shape, theta),
                                            alpha * np.cos(beam) - beta * np.sin(beam))):
                column.append(values[use])
    return [np.concatenate(c) for c in out]


def calibrate(probe, frames_count, seed, threads):
    """A decorrelation model fitted on a rotation and a linear scan of ``seed`` (not the test seeds)."""
    base = DecorrelationModel.default()
    columns = [[] for _ in range(5)]
    for protocol in ("rotation", "linear"):
        scan = simulate_scan(frames_count, protocol=protocol, probe=probe, seed=seed)
        frames = scan.frames[0:frames_count]
        samples = calibration_samples(frames, truth_of(scan)[0], probe.spacing_mm, base)
        for column, values in zip(columns, samples):
            column.append(values)
    rho, dist, depth, theta, tilt = (np.concatenate(c) for c in columns)
    edges = np.quantile(depth, np.linspace(0.0, 1.0, 6))
    edges[-1] += 1e-6
    set_threads(threads)
    return DecorrelationModel.fit(rho, dist, depth, rotation_rad=theta, tilt_rad=tilt, bands=np.unique(edges),
                                  patch_mm=base.patch_mm, smooth_px=base.smooth_px,
                                  description=f"benchmark calibration, seed {seed}, "
                                              f"{probe.height}x{probe.width}")


def errors(truth, frame_to_first, landmarks, grid):
    g_true, l_true = truth
    local = locals_from_globals(frame_to_first)
    return {
        "GPE": pixel_error_from_transforms(g_true, frame_to_first, grid),
        "GLE": landmark_error_from_transforms(g_true, frame_to_first, landmarks, grid),
        "LPE": pixel_error_from_transforms(l_true, local, grid),
        "LLE": landmark_error_from_transforms(l_true, local, landmarks, grid),
    }


def anchor_points(probe):
    rows, cols = np.nonzero(probe.fan_mask())
    sx, sy = probe.spacing_mm
    xs = np.quantile(sx * (cols + 1.0), [0.2, 0.5, 0.8])
    ys = np.quantile(sy * (rows + 1.0), [0.2, 0.5, 0.8])
    return np.array([(x, y) for x in xs for y in ys])


def direction_accuracy(l_true, l_est, points, *, threshold_mm=0.05):
    """(accuracy, mirror-free accuracy, frames counted) of the local out-of-plane motion's sign."""
    def elevation(local):
        return local[:, 2, :2] @ points.T + local[:, 2, 3, None]

    true, est = elevation(l_true), elevation(l_est)
    moving = np.abs(true).mean(axis=1) > threshold_mm
    if not moving.any():
        return None, None, 0
    agree = float(np.mean(np.sum(true * est, axis=1)[moving] > 0))
    return agree, max(agree, 1.0 - agree), int(moving.sum())


def drift_percent(truth, frame_to_first, probe):
    """Final-frame error of the image centre as % of the straight distance it travelled."""
    sx, sy = probe.spacing_mm
    centre = np.array([sx * (probe.width + 1) / 2.0, sy * (probe.height + 1) / 2.0, 0.0, 1.0])
    true_end = truth[0][-1] @ centre
    error = np.linalg.norm((frame_to_first[-1] @ centre - true_end)[:3])
    length = np.linalg.norm((true_end - centre)[:3])
    return 100.0 * error / length


def constant_velocity(protocol, n_frames, probe, seed):
    other = simulate_scan(n_frames, protocol=protocol, probe=probe, seed=seed + 1000)
    mean_local = np.mean(truth_of(other)[1], axis=0)
    u, _, vt = np.linalg.svd(mean_local[:3, :3])
    step = np.eye(4)
    step[:3, :3] = u @ vt
    step[:3, 3] = mean_local[:3, 3]
    return globals_from_locals(np.broadcast_to(step, (n_frames - 1, 4, 4)))


def in_plane_only(frame_to_first):
    """Zero out-of-plane motion: keep each local transform's in-plane rotation and translation."""
    local = locals_from_globals(frame_to_first)
    flat = np.tile(np.eye(4), (local.shape[0], 1, 1))
    theta = np.arctan2(local[:, 1, 0] - local[:, 0, 1], local[:, 0, 0] + local[:, 1, 1])
    cos, sin = np.cos(theta), np.sin(theta)
    flat[:, 0, 0], flat[:, 0, 1], flat[:, 1, 0], flat[:, 1, 1] = cos, -sin, sin, cos
    flat[:, :2, 3] = local[:, :2, 3]
    return globals_from_locals(flat)


def run_protocol(protocol, probe, n_frames, seed, model, threads):
    scan = simulate_scan(n_frames, protocol=protocol, probe=probe, seed=seed)
    start = time.perf_counter()
    frames = scan.frames[0:n_frames]
    render_s = time.perf_counter() - start
    truth = truth_of(scan)
    grid = PixelGrid(probe.height, probe.width, probe.spacing_mm)
    start = time.perf_counter()
    result = estimate_trajectory(frames, spacing_mm=probe.spacing_mm, model=model, threads=threads)
    seconds = time.perf_counter() - start
    points = anchor_points(probe)
    ours = result.frame_to_first
    oracle = ours if first_direction(ours, points) == first_direction(truth[0], points) else mirror(ours)
    methods = {
        "identity": np.broadcast_to(np.eye(4), truth[0].shape),
        "constant velocity": constant_velocity(protocol, n_frames, probe, seed),
        "in-plane only": in_plane_only(ours),
        "ours": ours,
        "ours, oracle mirror": oracle,
    }
    identity = errors(truth, methods["identity"], scan.landmarks, grid)
    rows = {}
    for name, transforms in methods.items():
        row = errors(truth, transforms, scan.landmarks, grid)
        row["score"] = scores_2025(row, identity)["score"]
        if protocol != "rotation":
            row["drift_percent"] = drift_percent(truth, transforms, probe)
        if name.startswith("ours"):
            acc, free, counted = direction_accuracy(truth[1], locals_from_globals(transforms), points)
            row.update(direction_accuracy=acc, direction_accuracy_mirror_free=free, direction_frames=counted)
        rows[name] = row
    return {
        "protocol": protocol, "frames": n_frames, "size": [probe.height, probe.width], "seed": seed,
        "render_s": render_s, "estimate_s": seconds, "frames_per_s": n_frames / seconds,
        "methods": rows, "diagnostics": {k: v for k, v in result.diagnostics.items()
                                         if k not in ("key_frames", "key_signs")},
    }


def print_table(entry):
    height, width = entry["size"]
    print(f"\n{entry['protocol']} — {entry['frames']} frames {height}x{width}, seed {entry['seed']}: "
          f"estimation {entry['estimate_s']:.1f} s ({entry['frames_per_s']:.0f} frames/s), "
          f"pivot {entry['diagnostics']['pivot']}, mirrored {entry['diagnostics']['signs']['mirrored']}")
    header = ("method", "GPE", "GLE", "LPE", "LLE", "score", "drift%", "dir.acc", "mirror-free")
    print("  {:22s} {:>7s} {:>7s} {:>6s} {:>6s} {:>7s} {:>7s} {:>8s} {:>11s}".format(*header))
    for name, row in entry["methods"].items():
        drift = f"{row['drift_percent']:7.1f}" if "drift_percent" in row else f"{'':7s}"
        acc = f"{row['direction_accuracy']:8.2f}" if row.get("direction_accuracy") is not None else f"{'':8s}"
        free = row.get("direction_accuracy_mirror_free")
        free = f"{free:11.2f}" if free is not None else ""
        print(f"  {name:22s} {row['GPE']:7.2f} {row['GLE']:7.2f} {row['LPE']:6.3f} {row['LLE']:6.3f} "
              f"{row['score']:7.3f} {drift} {acc} {free}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--size", default="240x320", help="HxW for all protocols")
    parser.add_argument("--full-size", default="480x640", help="HxW of the extra rotation run ('' to skip)")
    parser.add_argument("--full-frames", type=int, default=1600)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--calibration-seed", type=int, default=2)
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", help="decorrelation model JSON (default: calibrate on other seeds)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    runs = [(p, args.size, args.frames) for p in args.protocols.split(",")]
    if args.full_size:
        runs.append(("rotation", args.full_size, args.full_frames))
    models = {}
    report = {"threads": threads, "runs": []}
    for protocol, size, n_frames in runs:
        height, width = (int(v) for v in size.lower().split("x"))
        probe = Probe.fit_image(height, width)
        if size not in models:
            start = time.perf_counter()
            models[size] = (DecorrelationModel.from_json(args.model) if args.model
                            else calibrate(probe, 1000, args.calibration_seed, threads))
            print(f"model for {size}: {time.perf_counter() - start:.0f} s ({models[size].description})")
        entry = run_protocol(protocol, probe, n_frames, args.seed, models[size], threads)
        print_table(entry)
        report["runs"].append(entry)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
