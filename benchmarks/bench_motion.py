"""Frame-pair motion on simulated 480x640 data: accuracy of flow + decorrelation, and speed.

Usage: python benchmarks/bench_motion.py [--model CALIB.json] [--heldout DATA_DIR] [--threads 2]
                                        [--sections inplane,outofplane,rotation,speed] [--json FILE]

A held-out tracked folder for table 5 (rotation + linear protocols, seeds not used for the packaged model):
    speckle-rec simulate heldout --protocol rotation --subjects 200 --frames 1500 --seed 22
    speckle-rec simulate heldout --protocol linear --subjects 201 --frames 600 --hands RH --seed 22

Every case is rendered by speckle_rec.simulate (default Probe(), Beam()) with exact ground truth and
measured with speckle_rec.outofplane.measure_pairs (LK in-plane motion, patch NCC after in-plane
compensation) and PairMeasurement.fit_plane (robust |plane| fit in ρ space) using the model given
(default: the packaged one). Truth comes from speckle_rec.calibrate.pair_geometry. Tables:

1. in-plane: pure in-plane motion (small ≈ consecutive freehand frames, large up to 2 mm / 3°):
   translation error at the fan centre (mm) and rotation error (deg) per pair; target ≤ 0.05 mm, 0.05°.
2. out-of-plane, pure elevational translation 0.1-1.0 mm (all pairs of 11 frames 0.1 mm apart, three
   skin positions): error of |d| at the centre of the bright patches (%), target ≤ 10 %; and tilt
   (fanning about image x / rocking about image y through the skin contact, 0.5-3°): error of the
   angle between the planes (%), target ≤ 20 %. On fully developed speckle (Tissue.uniform, 9 /mm³),
   partially developed speckle (Tissue.uniform at 1 /mm³: 1-4 scatterers per resolution cell) and
   the default forearm (layers, vessels, bone, partially developed regions); and the forearm again
   with random in-plane motion of every frame (±0.3 mm, ±0.3°): pure motion needs no resampling,
   so ρ at d → 0 is higher than in any real scan, which the calibrated peak ρ₀ < 1 reflects.
3. rotation protocol (TUS-REC2025, forearm, 1500-frame trajectory, three 120-frame segments):
   consecutive pairs and pairs at the stride choose_strides picks (the one most depth regions chose).
4. speed: frame pairs per second of measure_pairs (flow + decorrelation) at 480x640 with 1 and 2
   threads, wall and CPU time per pair (the machine may be shared: CPU time is the steadier number).
5. with --heldout (a tracked folder, e.g. from ``speckle-rec simulate``): RMS error of the model's
   inverted per-patch distances on pairs sampled as ``speckle-rec calibrate`` does, per 10 mm band.
"""

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from cli.output import format_table
from speckle_rec.calibrate import band_residuals, collect_samples, pair_geometry
from speckle_rec.decorrelation import DecorrelationModel
from speckle_rec.errors import DataError
from speckle_rec.inplane import fan_mask_from_frames
from speckle_rec.io import open_dataset
from speckle_rec.outofplane import choose_strides, fan_apex_mm, measure_pairs, patch_grid
from speckle_rec.simulate.dataset import simulate_scan
from speckle_rec.simulate.probe import Probe
from speckle_rec.simulate.render import render_frames
from speckle_rec.simulate.tissue import Tissue
from speckle_rec.threads import set_threads

PROBE = Probe()
SPACING = PROBE.spacing_mm
PER_AXES = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # image x → world Y, y → depth Z
POSITIONS_MM = ((60.0, 0.0), (110.0, 4.0), (160.0, -3.0))  # skin positions (world X along the arm, Y across)
TISSUES = {
    "fully developed": Tissue.uniform(seed=11),
    "partially developed": Tissue.uniform(seed=12, density_per_mm3=1.0),
    "forearm": Tissue.forearm(seed=13),
}
SECTIONS = ("inplane", "outofplane", "rotation", "speed")
TARGETS = {"translation_mm": 0.05, "rotation_deg": 0.05, "distance_pct": 10.0, "tilt_pct": 20.0}


def rigid(t=(0.0, 0.0, 0.0), rotvec=(0.0, 0.0, 0.0), about=None):
    """(4, 4) rotation ``rotvec`` (about the point ``about``) then translation ``t``, image-mm."""
    out = np.eye(4)
    out[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
    if about is not None:
        about = np.asarray(about, dtype=np.float64)
        out[:3, 3] = about - out[:3, :3] @ about
    out[:3, 3] += t
    return out


def base_pose(x_mm, y_mm):
    """Probe pose with its contact point on the skin at world (x, y, 0), image normal along the arm."""
    out = np.eye(4)
    out[:3, :3] = PER_AXES
    out[:3, 3] = np.array([x_mm, y_mm, 0.0]) - PER_AXES @ PROBE.contact_point_mm
    return out


class Geometry:
    """Fan mask, patch grid and apex of the default probe (shared by every case)."""

    def __init__(self, frames):
        self.mask = fan_mask_from_frames(frames)
        self.grid = patch_grid(self.mask, spacing_mm=SPACING)
        self.apex = fan_apex_mm(self.mask, spacing_mm=SPACING)
        self.centre = np.array([self.grid.x_mm.mean(), self.grid.y_mm.mean(), 1.0])


def evaluate_pairs(frames, motions, pairs, geometry, model, threads, *, measurements=None):
    """Per-pair errors of measured against true motion.

    ``motions`` (n, 4, 4) are the frames' poses in any common frame. Returns a dict of (M,) arrays:
    true and estimated |d| at the bright patches' centre (mm), angle between the planes (deg),
    in-plane translation error at the fan centre (mm) and rotation error (deg).
    """
    if measurements is None:
        measurements = measure_pairs(frames, pairs, mask=geometry.mask, spacing_mm=SPACING, model=model,
                                     grid=geometry.grid, apex_mm=geometry.apex, threads=threads)
    _, theta, _, inplane = pair_geometry(motions, pairs, x_mm=geometry.grid.x_mm, y_mm=geometry.grid.y_mm,
                                         apex_mm=geometry.apex)
    out = {k: np.full(len(pairs), np.nan) for k in ("d_true", "d_est", "tilt_true", "tilt_est", "t_err", "r_err")}
    for k, ((i, j), m) in enumerate(zip(pairs, measurements)):
        relative = np.linalg.solve(motions[i], motions[j])
        normal = relative[:3, 2]
        a, b = -normal[0] / normal[2], -normal[1] / normal[2]
        tz = normal @ relative[:3, 3] / normal[2]
        out["tilt_true"][k] = math.degrees(math.acos(min(1.0, abs(normal[2]))))
        if not m.inplane.ok:
            continue
        shift = (m.inplane.matrix - inplane[k]) @ geometry.centre
        out["t_err"][k] = math.hypot(shift[0], shift[1])
        out["r_err"][k] = math.degrees(abs(m.inplane.theta_rad - theta[k]))
        xc, yc = m.x_mm[m.bright].mean(), m.y_mm[m.bright].mean()
        out["d_true"][k] = abs(tz + a * xc + b * yc)
        try:
            fit = m.fit_plane()
        except DataError:
            continue
        out["d_est"][k] = abs(fit.z_mm(xc, yc))
        out["tilt_est"][k] = math.degrees(math.atan(math.hypot(fit.a, fit.b)))
    return out


def _pct(est, true):
    return 100.0 * (est - true) / true


def _stats(values):
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0, "mean": None, "median": None, "p95": None, "max": None}
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)),
            "p95": float(np.percentile(v, 95)), "max": float(v.max())}


def _f(value, digits=3):
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


# --------------------------------------------------------------------------- 1. in-plane


def bench_inplane(model, threads, rng):
    """Pure in-plane motion on the forearm: every pair of 10 frames per set."""
    geometry_frames, results = [], {}
    centre = np.array([PROBE.spacing_mm[0] * PROBE.width / 2, PROBE.spacing_mm[1] * PROBE.height / 2, 0.0])
    sets = {"small (frames within 0.3 mm, 0.3 deg)": (0.3, 0.3), "large (frames within 2 mm, 3 deg)": (2.0, 3.0)}
    for name, (shift, angle) in sets.items():
        motions = np.array([rigid(t=(*rng.uniform(-shift, shift, 2), 0.0),
                                  rotvec=(0.0, 0.0, math.radians(rng.uniform(-angle, angle))), about=centre)
                            for _ in range(10)])
        frames = render_frames(base_pose(*POSITIONS_MM[1]) @ motions, probe=PROBE, tissue=TISSUES["forearm"],
                               threads=threads)
        geometry_frames.append(frames)
        results[name] = (frames, motions)
    geometry = Geometry(np.concatenate(geometry_frames))
    rows, table = [], {}
    for name, (frames, motions) in results.items():
        pairs = [(i, j) for i in range(10) for j in range(i + 1, 10)]
        e = evaluate_pairs(frames, motions, pairs, geometry, model, threads)
        t, r = _stats(e["t_err"]), _stats(e["r_err"])
        failed = int(np.sum(~np.isfinite(e["t_err"])))
        table[name] = {"translation_error_mm": t, "rotation_error_deg": r, "failed": failed}
        rows.append([name, len(pairs), failed, _f(t["median"]), _f(t["p95"]), _f(t["max"]), _f(r["median"]),
                     _f(r["p95"]), _f(r["max"]),
                     "yes" if t["p95"] <= TARGETS["translation_mm"] and r["p95"] <= TARGETS["rotation_deg"]
                     else "NO"])
    print("\n1. In-plane motion (forearm, pure in-plane pairs), error per frame pair")
    print(format_table(["pairs", "n", "failed", "t med mm", "t p95", "t max", "rot med deg", "rot p95", "rot max",
                        "p95 <= 0.05 mm, 0.05 deg"], rows))
    return table, geometry


# --------------------------------------------------------------------------- 2. out-of-plane


def bench_outofplane(model, threads, geometry, rng):
    """Pure elevational translation and pure tilt on three tissues (and the forearm with in-plane jitter)."""
    steps = np.round(0.1 * np.arange(11), 3)
    contact = PROBE.contact_point_mm
    centre = np.array([PROBE.spacing_mm[0] * PROBE.width / 2, PROBE.spacing_mm[1] * PROBE.height / 2, 0.0])
    tilts = (0.5, 1.0, 1.5, 2.0, 3.0)
    tilt_motions = [np.eye(4)] + [rigid(rotvec=(math.radians(a), 0, 0), about=contact) for a in tilts] + \
        [rigid(rotvec=(0, math.radians(a), 0), about=contact) for a in tilts]
    translation_pairs = [(i, j) for i in range(11) for j in range(i + 1, 11)]
    tilt_pairs = [(0, k) for k in range(1, len(tilt_motions))]

    def jitter(n, on):
        """In-plane motion per frame: none, or up to ±0.3 mm and ±0.3° (sub-pixel resampling as in real scans)."""
        if not on:
            return np.tile(np.eye(4), (n, 1, 1))
        return np.array([rigid(t=(*rng.uniform(-0.3, 0.3, 2), 0.0),
                               rotvec=(0, 0, math.radians(rng.uniform(-0.3, 0.3))), about=centre) for _ in range(n)])

    rows = [(name, tissue, False) for name, tissue in TISSUES.items()] + \
        [("forearm + in-plane jitter", TISSUES["forearm"], True)]
    table, rows_d, rows_t = {}, [], []
    for row_name, tissue, jittered in rows:
        distance = {round(0.1 * s, 1): [] for s in range(1, 11)}
        tilt = {(axis, a): [] for axis in ("fan", "rock") for a in tilts}
        for position in POSITIONS_MM:
            motions = np.array([rigid(t=(0.0, 0.0, z)) for z in steps]) @ jitter(steps.size, jittered)
            frames = render_frames(base_pose(*position) @ motions, probe=PROBE, tissue=tissue, threads=threads)
            e = evaluate_pairs(frames, motions, translation_pairs, geometry, model, threads)
            for (i, j), est in zip(translation_pairs, e["d_est"]):
                d = round(steps[j] - steps[i], 1)
                distance[d].append(_pct(est, d))
            motions = np.array(tilt_motions) @ jitter(len(tilt_motions), jittered)
            frames = render_frames(base_pose(*position) @ motions, probe=PROBE, tissue=tissue, threads=threads)
            e = evaluate_pairs(frames, motions, tilt_pairs, geometry, model, threads)
            for k, (true, est) in enumerate(zip(e["tilt_true"], e["tilt_est"])):
                axis = "fan" if k < len(tilts) else "rock"
                tilt[(axis, tilts[k % len(tilts)])].append(_pct(est, true))
        entry = {"distance_pct": {}, "tilt_pct": {}}
        for d, errors in distance.items():
            entry["distance_pct"][str(d)] = dict(_stats(errors), mean_abs=_stats(np.abs(errors))["mean"])
        for (axis, a), errors in tilt.items():
            entry["tilt_pct"][f"{axis} {a}"] = dict(_stats(errors), mean_abs=_stats(np.abs(errors))["mean"])
        all_d = np.concatenate([np.asarray(v, float) for v in distance.values()])
        far_d = np.concatenate([np.asarray(v, float) for d, v in distance.items() if d >= 0.3])
        all_t = np.concatenate([np.asarray(v, float) for v in tilt.values()])
        entry["distance_mean_abs_pct"] = float(np.nanmean(np.abs(all_d)))
        entry["distance_mean_abs_pct_d_ge_0.3"] = float(np.nanmean(np.abs(far_d)))
        entry["tilt_mean_abs_pct"] = float(np.nanmean(np.abs(all_t)))
        entry["tilt_failed"] = int(np.sum(~np.isfinite(all_t)))
        table[row_name] = entry
        rows_d.append([row_name] + [_f(entry["distance_pct"][str(d)]["mean"], 1) for d in distance] +
                      [_f(entry["distance_mean_abs_pct"], 1), _f(entry["distance_mean_abs_pct_d_ge_0.3"], 1),
                       "yes" if entry["distance_mean_abs_pct"] <= TARGETS["distance_pct"] else "NO"])
        rows_t.append([row_name] + [_f(entry["tilt_pct"][f"{axis} {a}"]["mean"], 1)
                                    for axis in ("fan", "rock") for a in tilts] +
                      [_f(entry["tilt_mean_abs_pct"], 1), entry["tilt_failed"],
                       "yes" if entry["tilt_mean_abs_pct"] <= TARGETS["tilt_pct"] else "NO"])
    print("\n2a. Pure elevational translation: mean signed error of |d| (%) per true d (mm); 3 positions, "
          "all pairs of 11 frames 0.1 mm apart")
    print(format_table(["tissue"] + [f"{d:.1f}" for d in distance] +
                       ["mean |err| %", "d>=0.3: mean |err| %", "all <= 10 %"], rows_d))
    print("\n2b. Pure tilt about the skin contact (fan: image x, rock: image y): mean signed error of the angle "
          "between the planes (%); '-': every fit failed")
    print(format_table(["tissue"] + [f"{axis} {a:g}" for axis in ("fan", "rock") for a in tilts] +
                       ["mean |err| %", "failed", "<= 20 %"], rows_t))
    return table


# --------------------------------------------------------------------------- 3. rotation protocol


def bench_rotation_protocol(model, threads, segments=((200, 320), (700, 820), (1200, 1320))):
    """Consecutive and chosen-stride pairs on segments of a simulated rotation-protocol scan."""
    scan = simulate_scan(1500, protocol="rotation", subject="300", probe=PROBE, tissue=TISSUES["forearm"], seed=7)
    chunks = [(scan.frames[a:b], scan.image_to_world[a:b]) for a, b in segments]
    geometry = Geometry(np.concatenate([c[0][::10] for c in chunks]))
    kinds = {"consecutive": [], "chosen stride": []}
    strides_used = []
    for frames, poses in chunks:
        n = frames.shape[0]
        pairs = [(i, i + 1) for i in range(n - 1)]
        kinds["consecutive"].append(evaluate_pairs(frames, poses, pairs, geometry, model, threads))
        plan = choose_strides(frames, np.arange(0, n - 16, 4), mask=geometry.mask, spacing_mm=SPACING, model=model,
                              grid=geometry.grid, apex_mm=geometry.apex, strides=(1, 2, 4, 8, 16), threads=threads)
        chosen = []
        for start, per_region in zip(plan.starts, plan.chosen):
            usable = per_region[per_region > 0]
            if usable.size:  # the stride most depth regions chose (measured on the way)
                values, counts = np.unique(usable, return_counts=True)
                chosen.append((int(start), int(start + values[np.argmax(counts)])))
        measured = [plan.measurements[p] for p in chosen]
        strides_used += [j - i for i, j in chosen]
        kinds["chosen stride"].append(evaluate_pairs(frames, poses, chosen, geometry, model, threads,
                                                     measurements=measured))
    table, rows = {}, []
    for kind, parts in kinds.items():
        e = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        far = e["d_true"] >= 0.2
        tilted = e["tilt_true"] >= 0.5
        entry = {
            "pairs": int(e["d_true"].size),
            "failed": int(np.sum(~np.isfinite(e["d_est"]))),
            "true_d_median_mm": _stats(e["d_true"])["median"],
            "true_tilt_median_deg": _stats(e["tilt_true"])["median"],
            "d_abs_error_mm": _stats(np.abs(e["d_est"] - e["d_true"])),
            "d_error_pct_where_d_ge_0.2": _stats(np.abs(_pct(e["d_est"][far], e["d_true"][far]))),
            "tilt_abs_error_deg": _stats(np.abs(e["tilt_est"] - e["tilt_true"])),
            "tilt_error_pct_where_tilt_ge_0.5": _stats(np.abs(_pct(e["tilt_est"][tilted], e["tilt_true"][tilted]))),
            "tilt_signed_pct_where_tilt_ge_0.5": _stats(_pct(e["tilt_est"][tilted], e["tilt_true"][tilted])),
            "translation_error_mm": _stats(e["t_err"]),
            "rotation_error_deg": _stats(e["r_err"]),
        }
        if kind == "chosen stride":
            entry["strides"] = {str(s): int(c) for s, c in zip(*np.unique(strides_used, return_counts=True))}
        table[kind] = entry
        rows.append([kind, entry["pairs"], entry["failed"], _f(entry["true_d_median_mm"]),
                     _f(entry["d_abs_error_mm"]["median"]), _f(entry["d_error_pct_where_d_ge_0.2"]["median"], 1),
                     _f(entry["d_error_pct_where_d_ge_0.2"]["mean"], 1), _f(entry["true_tilt_median_deg"], 2),
                     _f(entry["tilt_abs_error_deg"]["median"], 2),
                     _f(entry["tilt_error_pct_where_tilt_ge_0.5"]["median"], 1),
                     _f(entry["tilt_signed_pct_where_tilt_ge_0.5"]["mean"], 1),
                     _f(entry["translation_error_mm"]["p95"]), _f(entry["rotation_error_deg"]["p95"])])
    print("\n3. Rotation protocol (forearm; 3 segments of 120 frames): |d| at the patch centre, angle between "
          "planes, in-plane motion")
    print(format_table(["pairs", "n", "failed", "true d med mm", "|d| err med mm", "|d| err med % (d>=0.2)",
                        "mean %", "true tilt med deg", "tilt err med deg", "tilt err med % (>=0.5)",
                        "signed mean %", "t err p95 mm", "rot err p95 deg"], rows))
    if strides_used:
        print("   chosen strides: " + ", ".join(f"{s}: {c}" for s, c in table["chosen stride"]["strides"].items()))
    return table, chunks


# --------------------------------------------------------------------------- 4. speed


def bench_speed(model, max_threads, frames=None):
    """measure_pairs throughput (flow + decorrelation) and plane-fit time at 480x640.

    ``frames`` default: frames 200-319 of the rotation-protocol scan of table 3.
    """
    if frames is None:
        scan = simulate_scan(1500, protocol="rotation", subject="300", probe=PROBE, tissue=TISSUES["forearm"], seed=7)
        frames = scan.frames[200:320]
    geometry = Geometry(frames)
    n = frames.shape[0]
    pairs = [(i, i + s) for s in (1, 2, 4) for i in range(n - s)]
    measure_pairs(frames, pairs[:8], mask=geometry.mask, spacing_mm=SPACING, model=model, grid=geometry.grid,
                  apex_mm=geometry.apex, threads=1)  # warm up
    rows, table = [], {}
    for threads in sorted({1, max_threads}):
        best = None
        for _ in range(2):
            wall, cpu = time.perf_counter(), time.process_time()
            measured = measure_pairs(frames, pairs, mask=geometry.mask, spacing_mm=SPACING, model=model,
                                     grid=geometry.grid, apex_mm=geometry.apex, threads=threads)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best = (wall, cpu) if best is None or wall < best[0] else best
        wall, cpu = best
        rate = len(pairs) / wall
        table[f"{threads} thread(s)"] = {"pairs": len(pairs), "pairs_per_s": rate,
                                         "wall_ms_per_pair": 1e3 * wall / len(pairs),
                                         "cpu_ms_per_pair": 1e3 * cpu / len(pairs)}
        rows.append([f"{threads}", len(pairs), f"{rate:.0f}", f"{1e3 * wall / len(pairs):.2f}",
                     f"{1e3 * cpu / len(pairs):.2f}", "yes" if threads < 2 or rate >= 150 else "NO"])
    start = time.process_time()
    for m in measured[:60]:
        m.fit_plane()
    fit_ms = 1e3 * (time.process_time() - start) / 60
    table["plane_fit_cpu_ms_per_pair"] = fit_ms
    print(f"\n4. Speed: measure_pairs (LK flow + patch NCC, {len(geometry.grid)} patches of 4 mm) at 480x640, "
          "strides 1, 2, 4; best of 2 runs")
    print(format_table(["threads", "pairs", "pairs/s", "wall ms/pair", "CPU ms/pair", ">= 150 pairs/s on 2"], rows))
    print(f"   plane fit in rho space (PairMeasurement.fit_plane): {fit_ms:.1f} ms CPU per pair, one thread; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPU(s)")
    return table


# --------------------------------------------------------------------------- 5. held-out residuals


def bench_heldout(model, data_dir, threads):
    samples = collect_samples(open_dataset(data_dir), model=model, pairs_per_scan=300, seed=123, threads=threads,
                              progress=False)
    edges = np.arange(0.0, 110.0, 10.0)
    r = band_residuals(model, samples, edges_mm=edges)
    rows = [[f"{edges[b]:.0f}-{edges[b + 1]:.0f}", int(r["samples"][b]), int(r["inverted"][b]), _f(r["rms_mm"][b]),
             _f(r["median_abs_mm"][b])] for b in range(edges.size - 1) if r["samples"][b]]
    estimate, _ = model.distance(samples.rho, samples.depth_mm, samples.rotation_rad, samples.tilt_rad)
    ok = np.isfinite(estimate)
    overall = {"samples": len(samples), "inverted": int(ok.sum()),
               "rms_mm": float(np.sqrt(np.mean((estimate[ok] - samples.distance_mm[ok]) ** 2))),
               "median_abs_mm": float(np.median(np.abs(estimate[ok] - samples.distance_mm[ok])))}
    rows.append(["all", overall["samples"], overall["inverted"], _f(overall["rms_mm"]), _f(overall["median_abs_mm"])])
    print(f"\n5. Held-out per-patch distances ({data_dir}: {', '.join(samples.scans)}; {len(samples.pairs)} pairs)")
    print(format_table(["depth mm", "samples", "inverted", "RMS err mm", "median |err| mm"], rows))
    return {"data": str(data_dir), "scans": list(samples.scans), "pairs": int(len(samples.pairs)),
            "bands": {k: np.asarray(v).tolist() for k, v in r.items()}, "overall": overall}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", metavar="CALIB.json", help="decorrelation model (default: the packaged one)")
    parser.add_argument("--heldout", metavar="DATA_DIR", help="tracked folder for the held-out residual table")
    parser.add_argument("--threads", type=int, default=2, help="threads for the accuracy runs and the speed maximum")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated tables to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--json", metavar="FILE", default="bench_motion.json",
                        help="results (default ./bench_motion.json)")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    model = DecorrelationModel.from_json(args.model) if args.model else DecorrelationModel.default()
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    print(f"model: {args.model or 'packaged default'} ({model.description[:100]}...)")
    results = {"command": "python benchmarks/bench_motion.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "model": args.model or "packaged", "model_description": model.description, "threads": threads,
               "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(),
                           "python": platform.python_version()},
               "targets": TARGETS}
    sections = set(args.sections.split(","))
    unknown = sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))} (known: {', '.join(SECTIONS)})")
    geometry, frames = None, None
    if "inplane" in sections:
        results["inplane"], geometry = bench_inplane(model, threads, rng)
    if "outofplane" in sections:
        if geometry is None:
            geometry = Geometry(render_frames(base_pose(*POSITIONS_MM[1])[None], probe=PROBE, threads=threads))
        results["outofplane"] = bench_outofplane(model, threads, geometry, rng)
    if "rotation" in sections:
        results["rotation_protocol"], chunks = bench_rotation_protocol(model, threads)
        frames = chunks[0][0]
    if "speed" in sections:
        results["speed"] = bench_speed(model, threads, frames)
    if args.heldout:
        results["heldout"] = bench_heldout(model, args.heldout, threads)
    results["seconds"] = time.perf_counter() - started
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
