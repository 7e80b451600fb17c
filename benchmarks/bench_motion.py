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
2. out-of-plane, on fully developed speckle (Tissue.uniform, 9 /mm³), partially developed speckle
   (Tissue.uniform at 1 /mm³: 1-4 scatterers per resolution cell), the default forearm (layers, vessels,
   bone, partially developed regions), and the forearm again with random in-plane motion of every frame
   (±0.3 mm, ±0.3°: pure motion needs no resampling, so ρ at d → 0 is higher than in any real scan,
   which the calibrated peak ρ₀ < 1 reflects); three skin positions each:
   a. pure elevational translation at a constant step of 0.1-1.0 mm per frame: choose_strides from
      frame 0 (strides 1-16) picks per depth region the stride whose ρ lands in the usable band, and
      StridePlan.step_distances gives the per-step |d| (chosen-stride distance / stride) per region;
      error (%) per step and per region, target ≤ 10 %;
   b. diagnostic: the same at stride 1 only (all pairs of 11 frames 0.1 mm apart; ρ ≈ 1 for small d);
   c. single tilted pairs (fanning about image x / rocking about image y through the skin contact,
      0.5-3°): error of the angle between the planes (%), target ≤ 20 %, and how many depth regions
      still have their median ρ in the usable band (none: the pair carries no distance information);
   d. tilt at a constant step of 0.1-0.3° per frame: per-step angle at the stride most regions chose.
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

from _machine import cell

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


def true_plane(poses, i, j):
    """(tz, a, b) of frame j's plane z = tz + a·x + b·y in frame i's image-mm, from poses in a common frame."""
    relative = np.linalg.solve(poses[i], poses[j])
    normal = relative[:3, 2]
    return normal @ relative[:3, 3] / normal[2], -normal[0] / normal[2], -normal[1] / normal[2]


def _pct(est, true):
    return 100.0 * (est - true) / true


def _stats(values):
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0, "mean": None, "median": None, "p95": None, "max": None}
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)),
            "p95": float(np.percentile(v, 95)), "max": float(v.max())}


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
        rows.append([name, len(pairs), failed, cell(t["median"], 3), cell(t["p95"], 3), cell(t["max"], 3),
                     cell(r["median"], 3), cell(r["p95"], 3), cell(r["max"], 3),
                     "yes" if t["p95"] <= TARGETS["translation_mm"] and r["p95"] <= TARGETS["rotation_deg"]
                     else "NO"])
    print("\n1. In-plane motion (forearm, pure in-plane pairs), error per frame pair")
    print(format_table(["pairs", "n", "failed", "t med mm", "t p95", "t max", "rot med deg", "rot p95", "rot max",
                        "p95 <= 0.05 mm, 0.05 deg"], rows))
    return table, geometry


# --------------------------------------------------------------------------- 2. out-of-plane


STEPS_MM = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)  # elevational step per frame of the translation sequences
TILT_STEPS_DEG = (0.1, 0.2, 0.3)  # fan / rock step per frame of the tilt sequences
SEQUENCE_STRIDES = (1, 2, 4, 8, 16)
RETRY_WINDOW_PX = 21  # LK window of the flow's retry on decorrelated pairs (reported beside the default)


class PoseRenderer:
    """Frames of one tissue at one skin position, rendered once per distinct probe motion.

    With ``jitter``, every distinct motion gets its own random in-plane offset (±0.3 mm, ±0.3° about
    the image centre), applied after it: resampling as in real scans.
    """

    def __init__(self, tissue, position, threads, rng, jitter):
        self.tissue, self.position, self.threads, self.rng, self.jitter = tissue, position, threads, rng, jitter
        self.centre = np.array([SPACING[0] * PROBE.width / 2, SPACING[1] * PROBE.height / 2, 0.0])
        self.cache = {}

    def __call__(self, keys, motions):
        """(n, H, W) frames and the (n, 4, 4) motions actually rendered, for hashable ``keys``."""
        todo = [(k, m) for k, m in zip(keys, motions) if k not in self.cache]
        todo = list(dict(todo).items())
        if todo:
            applied = []
            for _, m in todo:
                if self.jitter:
                    m = m @ rigid(t=(*self.rng.uniform(-0.3, 0.3, 2), 0.0),
                                  rotvec=(0, 0, math.radians(self.rng.uniform(-0.3, 0.3))), about=self.centre)
                applied.append(m)
            frames = render_frames(base_pose(*self.position) @ np.array(applied), probe=PROBE, tissue=self.tissue,
                                   threads=self.threads)
            for (k, _), f, m in zip(todo, frames, applied):
                self.cache[k] = (f, m)
        return (np.stack([self.cache[k][0] for k in keys]), np.stack([self.cache[k][1] for k in keys]))

    def sequence(self, keys, motions, length):
        """A ``length``-frame sequence holding frames at strides 0, 1, 2, 4, ... from frame 0 only.

        choose_strides from start 0 reads no other frame, so the others stay black (never rendered).
        """
        index = [0] + list(SEQUENCE_STRIDES)
        frames, applied = self(keys, motions)
        out = np.zeros((length,) + frames.shape[1:], np.uint8)
        poses = np.tile(np.eye(4), (length, 1, 1))
        out[index], poses[index] = frames, applied
        return out, poses


def _regions_in_band(measurement, model, edges):
    """Number of depth regions whose median rotation-corrected ρ (bright patches) is in the usable band."""
    m = measurement
    if not m.inplane.ok:
        return 0
    region = np.clip(np.searchsorted(edges, m.y_mm, side="right") - 1, 0, edges.size - 2)
    corrected = m.rho / model.scale(m.y_mm, m.inplane.theta_rad)
    lo, hi = model.usable_rho
    count = 0
    for r in range(edges.size - 1):
        values = corrected[(region == r) & m.bright & np.isfinite(corrected)]
        if values.size and lo <= np.median(values) <= hi:
            count += 1
    return count


def bench_outofplane(model, threads, geometry, rng):
    """Elevational translation and tilt on three tissues (and the forearm with in-plane jitter).

    a. translation sequences at a constant step, per-step |d| per depth region at the chosen strides
       (what the method does: StridePlan.step_distances);
    b. single pairs at stride 1 (diagnostic: ρ ≈ 1 for small steps);
    c. single tilted pairs (fan / rock about the skin contact), with the number of depth regions whose
       ρ is still in the usable band;
    d. tilt sequences at a constant angular step, per-step tilt at the chosen stride.
    """
    contact = PROBE.contact_point_mm
    tilts = (0.5, 1.0, 1.5, 2.0, 3.0)
    axes = {"fan": lambda a: rigid(rotvec=(math.radians(a), 0, 0), about=contact),
            "rock": lambda a: rigid(rotvec=(0, math.radians(a), 0), about=contact)}
    pair_steps = np.round(0.1 * np.arange(11), 3)
    translation_pairs = [(i, j) for i in range(11) for j in range(i + 1, 11)]
    tilt_keys = [("tilt", "fan", 0.0)] + [("tilt", axis, a) for axis in axes for a in tilts]
    tilt_motions = [np.eye(4)] + [axes[axis](a) for axis in axes for a in tilts]
    tilt_pairs = [(0, k) for k in range(1, len(tilt_motions))]
    edges = model.depth_edges_mm
    n_regions = edges.size - 1
    length = SEQUENCE_STRIDES[-1] + 1
    kw = dict(mask=geometry.mask, spacing_mm=SPACING, model=model, grid=geometry.grid, apex_mm=geometry.apex,
              threads=threads)

    rows = [(name, tissue, False) for name, tissue in TISSUES.items()] + \
        [("forearm + in-plane jitter", TISSUES["forearm"], True)]
    table = {}
    rows_seq, rows_region, rows_d, rows_t, rows_band, rows_flow, rows_tseq = [], [], [], [], [], [], []
    for row_name, tissue, jittered in rows:
        per_step = {s: [] for s in STEPS_MM}
        per_region = [[] for _ in range(n_regions)]
        strides_used = {s: [] for s in STEPS_MM}
        distance = {round(0.1 * s, 1): [] for s in range(1, 11)}
        tilt = {(axis, a): [] for axis in axes for a in tilts}
        in_band = {(axis, a): [] for axis in axes for a in tilts}
        tilt_retry = {(axis, a): [] for axis in axes for a in tilts}
        flow = {(axis, a): [] for axis in axes for a in tilts}
        flow_retry = {(axis, a): [] for axis in axes for a in tilts}
        tilt_seq = {(axis, d): [] for axis in axes for d in TILT_STEPS_DEG}
        tilt_seq_strides = {(axis, d): [] for axis in axes for d in TILT_STEPS_DEG}
        for position in POSITIONS_MM:
            render = PoseRenderer(tissue, position, threads, rng, jittered)
            # a. translation sequences: frame k at k·step
            for step in STEPS_MM:
                zs = [round(step * k, 4) for k in [0] + list(SEQUENCE_STRIDES)]
                frames, _ = render.sequence([("z", z) for z in zs], [rigid(t=(0.0, 0.0, z)) for z in zs], length)
                plan = choose_strides(frames, [0], strides=SEQUENCE_STRIDES, **kw)
                result = plan.step_distances()
                errors = _pct(result.step_mm[0], step)
                per_step[step] += errors.tolist()
                strides_used[step] += result.stride[0][result.stride[0] > 0].tolist()
                for r in range(n_regions):
                    per_region[r].append(errors[r])
            # b. single pairs at stride 1 (diagnostic)
            frames, motions = render([("z", round(z, 4)) for z in pair_steps], [rigid(t=(0.0, 0.0, z)) for z in pair_steps])
            e = evaluate_pairs(frames, motions, translation_pairs, geometry, model, threads)
            for (i, j), est in zip(translation_pairs, e["d_est"]):
                distance[round(pair_steps[j] - pair_steps[i], 1)].append(_pct(est, pair_steps[j] - pair_steps[i]))
            # c. tilted pairs
            frames, motions = render(tilt_keys, tilt_motions)
            measured = measure_pairs(frames, tilt_pairs, **kw)
            e = evaluate_pairs(frames, motions, tilt_pairs, geometry, model, threads, measurements=measured)
            retried = measure_pairs(frames, tilt_pairs, inplane_options={"retry_window_px": RETRY_WINDOW_PX}, **kw)
            e_retry = evaluate_pairs(frames, motions, tilt_pairs, geometry, model, threads, measurements=retried)
            for k, (true, est, m) in enumerate(zip(e["tilt_true"], e["tilt_est"], measured)):
                key = ("fan" if k < len(tilts) else "rock", tilts[k % len(tilts)])
                tilt[key].append(_pct(est, true))
                tilt_retry[key].append(_pct(e_retry["tilt_est"][k], true))
                in_band[key].append(_regions_in_band(m, model, edges))
                flow[key].append(e["t_err"][k])
                flow_retry[key].append(e_retry["t_err"][k])
            # d. tilt sequences: frame k tilted by k·step about the contact
            for axis, make in axes.items():
                for step in TILT_STEPS_DEG:
                    angles = [round(step * k, 4) for k in [0] + list(SEQUENCE_STRIDES)]
                    keys = [("tilt", axis if a else "fan", a) for a in angles]
                    frames, _ = render.sequence(keys, [make(a) for a in angles], length)
                    plan = choose_strides(frames, [0], strides=SEQUENCE_STRIDES, **kw)
                    chosen = plan.chosen[0][plan.chosen[0] > 0]
                    if chosen.size == 0:
                        tilt_seq[(axis, step)].append(np.nan)
                        continue
                    values, counts = np.unique(chosen, return_counts=True)
                    stride = int(values[np.argmax(counts)])  # the stride most depth regions chose
                    tilt_seq_strides[(axis, step)].append(stride)
                    try:
                        fit = plan.measurements[(0, stride)].fit_plane()
                    except DataError:
                        tilt_seq[(axis, step)].append(np.nan)
                        continue
                    estimate = math.degrees(math.atan(math.hypot(fit.a, fit.b))) / stride
                    tilt_seq[(axis, step)].append(_pct(estimate, step))

        def summary(errors):
            errors = np.asarray(errors, float)
            return dict(_stats(errors), mean_abs=_stats(np.abs(errors))["mean"])

        entry = {"step_pct": {str(s): dict(summary(v), strides=_counts(strides_used[s])) for s, v in per_step.items()},
                 "step_pct_by_region": {f"{edges[r]:g}-{edges[r + 1]:g}": summary(v) for r, v in enumerate(per_region)},
                 "distance_pct_stride1": {str(d): summary(v) for d, v in distance.items()},
                 "tilt_pct": {f"{axis} {a}": summary(v) for (axis, a), v in tilt.items()},
                 "tilt_regions_in_band": {f"{axis} {a}": float(np.mean(v)) for (axis, a), v in in_band.items()},
                 "tilt_pct_flow_retry": {f"{axis} {a}": summary(v) for (axis, a), v in tilt_retry.items()},
                 "tilt_pairs_translation_error_mm": {f"{axis} {a}": _stats(v) for (axis, a), v in flow.items()},
                 "tilt_pairs_translation_error_mm_flow_retry": {f"{axis} {a}": _stats(v)
                                                                for (axis, a), v in flow_retry.items()},
                 "tilt_sequence_pct": {f"{axis} {d}": dict(summary(v), strides=_counts(tilt_seq_strides[(axis, d)]))
                                       for (axis, d), v in tilt_seq.items()}}
        all_steps = np.concatenate([np.asarray(v, float) for v in per_step.values()])
        all_d = np.concatenate([np.asarray(v, float) for v in distance.values()])
        all_t = np.concatenate([np.asarray(v, float) for v in tilt.values()])
        all_ts = np.concatenate([np.asarray(v, float) for v in tilt_seq.values()])
        entry["step_mean_abs_pct"] = float(np.nanmean(np.abs(all_steps)))
        entry["step_missing"] = int(np.sum(~np.isfinite(all_steps)))
        entry["distance_mean_abs_pct_stride1"] = float(np.nanmean(np.abs(all_d)))
        entry["tilt_mean_abs_pct"] = float(np.nanmean(np.abs(all_t)))
        entry["tilt_failed"] = int(np.sum(~np.isfinite(all_t)))
        entry["tilt_sequence_mean_abs_pct"] = float(np.nanmean(np.abs(all_ts)))
        table[row_name] = entry
        worst = max(abs(entry["step_pct"][str(s)]["mean"]) for s in STEPS_MM)
        rows_seq.append([row_name] + [cell(entry["step_pct"][str(s)]["mean"], 1) for s in STEPS_MM] +
                        [cell(entry["step_mean_abs_pct"], 1), cell(_stats(np.abs(all_steps))["p95"], 1),
                         entry["step_missing"],
                         "yes" if entry["step_mean_abs_pct"] <= TARGETS["distance_pct"] and worst <= 10 else "NO"])
        rows_region.append([row_name] + [cell(v["mean"], 1) for v in entry["step_pct_by_region"].values()])
        rows_d.append([row_name] + [cell(entry["distance_pct_stride1"][str(d)]["mean"], 1) for d in distance]
                      + [cell(entry["distance_mean_abs_pct_stride1"], 1)])
        rows_t.append([row_name]
                      + [cell(entry["tilt_pct"][f"{axis} {a}"]["mean"], 1) for axis in axes for a in tilts]
                      + [cell(entry["tilt_mean_abs_pct"], 1), entry["tilt_failed"],
                       "yes" if entry["tilt_mean_abs_pct"] <= TARGETS["tilt_pct"] else "NO"])
        rows_band.append([row_name] + [cell(entry["tilt_regions_in_band"][f"{axis} {a}"], 1)
                                       for axis in axes for a in tilts])
        rows_flow.append([row_name] + [
            f"{cell(entry['tilt_pairs_translation_error_mm'][f'{axis} {a}']['max'], 2)} / "
            f"{cell(entry['tilt_pairs_translation_error_mm_flow_retry'][f'{axis} {a}']['max'], 2)}"
            for axis in axes for a in tilts] +
            [cell(float(np.nanmean(np.abs(np.concatenate([np.asarray(v, float)
                                                          for v in tilt_retry.values()])))), 1)])
        rows_tseq.append([row_name] + [cell(entry["tilt_sequence_pct"][f"{axis} {d}"]["mean"], 1)
                                       for axis in axes for d in TILT_STEPS_DEG] +
                         [cell(entry["tilt_sequence_mean_abs_pct"], 1),
                          "yes" if entry["tilt_sequence_mean_abs_pct"] <= TARGETS["tilt_pct"] else "NO"])
    print("\n2a. Elevational translation at a constant step per frame (mm): per-step |d| measured at the stride "
          "chosen per depth region (StridePlan.step_distances), mean signed error (%); 3 positions x "
          f"{n_regions} regions")
    print(format_table(["tissue"] + [f"{s:g}" for s in STEPS_MM] +
                       ["mean |err| %", "p95 |err| %", "missing", "<= 10 %"], rows_seq))
    print("   strides chosen (fully developed): " + "; ".join(
        f"{s:g} mm: " + ", ".join(f"{k}x{c}" for k, c in table["fully developed"]["step_pct"][str(s)]["strides"].items())
        for s in STEPS_MM))
    print("\n2a'. The same per depth region (image-mm y), mean signed error (%) over steps and positions")
    print(format_table(["tissue"] + list(table["fully developed"]["step_pct_by_region"]), rows_region))
    print("\n2b. Diagnostic: single pairs at stride 1 (all pairs of 11 frames 0.1 mm apart), mean signed error of "
          "|d| (%) per true d (mm); small d leave ρ ≈ 1, which the method does not use")
    print(format_table(["tissue"] + [f"{d:.1f}" for d in distance] + ["mean |err| %"], rows_d))
    print("\n2c. Single tilted pairs about the skin contact (fan: image x, rock: image y): mean signed error of the "
          "angle between the planes (%); '-': every fit failed")
    print(format_table(["tissue"] + [f"{axis} {a:g}" for axis in axes for a in tilts] +
                       ["mean |err| %", "failed", "<= 20 %"], rows_t))
    print(f"    depth regions (of {n_regions}) whose median ρ is in the usable band, mean over positions")
    print(format_table(["tissue"] + [f"{axis} {a:g}" for axis in axes for a in tilts], rows_band))
    print(f"    in-plane translation error at the fan centre, max over positions (mm): default flow / flow retried with "
          f"{RETRY_WINDOW_PX}-pixel windows where < half the points agree (inplane_options retry_window_px); last "
          "column: tilt mean |err| % with the retry")
    print(format_table(["tissue"] + [f"{axis} {a:g}" for axis in axes for a in tilts] + ["tilt %, retry"],
                       rows_flow))
    print("\n2d. Tilt at a constant step per frame (deg): per-step angle between the planes at the stride most depth "
          "regions chose, mean signed error (%)")
    print(format_table(["tissue"] + [f"{axis} {d:g}" for axis in axes for d in TILT_STEPS_DEG] +
                       ["mean |err| %", "<= 20 %"], rows_tseq))
    return table


def _counts(values):
    values, counts = np.unique(np.asarray(values, dtype=np.int64), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}


# --------------------------------------------------------------------------- 3. rotation protocol


def bench_rotation_protocol(model, threads, segments=((200, 320), (700, 820), (1200, 1320))):
    """Consecutive and chosen-stride pairs on segments of a simulated rotation-protocol scan."""
    scan = simulate_scan(1500, protocol="rotation", subject="300", probe=PROBE, tissue=TISSUES["forearm"], seed=7)
    chunks = [(scan.frames[a:b], scan.image_to_world[a:b]) for a, b in segments]
    geometry = Geometry(np.concatenate([c[0][::10] for c in chunks]))
    kinds = {"consecutive": [], "chosen stride": []}
    strides_used = []
    per_step = {"true": [], "est": [], "stride": []}
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
        # per-step |d| per depth region at the stride that region chose (StridePlan.step_distances)
        steps = plan.step_distances()
        for a, start in enumerate(steps.starts):
            for r in np.nonzero(np.isfinite(steps.step_mm[a]))[0]:
                k = int(steps.stride[a, r])
                tz, slope_x, slope_y = true_plane(poses, int(start), int(start) + k)
                per_step["true"].append(abs(tz + slope_x * steps.x_mm[a, r] + slope_y * steps.y_mm[a, r]) / k)
                per_step["est"].append(steps.step_mm[a, r])
                per_step["stride"].append(k)
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
        rows.append([kind, entry["pairs"], entry["failed"], cell(entry["true_d_median_mm"], 3),
                     cell(entry["d_abs_error_mm"]["median"], 3),
                     cell(entry["d_error_pct_where_d_ge_0.2"]["median"], 1),
                     cell(entry["d_error_pct_where_d_ge_0.2"]["mean"], 1), cell(entry["true_tilt_median_deg"], 2),
                     cell(entry["tilt_abs_error_deg"]["median"], 2),
                     cell(entry["tilt_error_pct_where_tilt_ge_0.5"]["median"], 1),
                     cell(entry["tilt_signed_pct_where_tilt_ge_0.5"]["mean"], 1),
                     cell(entry["translation_error_mm"]["p95"], 3),
                     cell(entry["rotation_error_deg"]["p95"], 3)])
    true, est, stride = (np.asarray(per_step[k], float) for k in ("true", "est", "stride"))
    far = true * stride >= 0.2  # the chosen-stride distance, as for the pairs above
    entry = {"values": int(true.size), "failed": int(np.sum(~np.isfinite(est))),
             "true_step_median_mm": _stats(true)["median"], "step_abs_error_mm": _stats(np.abs(est - true)),
             "step_error_pct_where_stride_distance_ge_0.2": _stats(np.abs(_pct(est[far], true[far]))),
             "step_signed_pct_where_stride_distance_ge_0.2": _stats(_pct(est[far], true[far])),
             "strides": _counts(stride)}
    table["per-step, stride per region"] = entry
    rows.append(["per-step, stride per region", entry["values"], entry["failed"],
                 cell(entry["true_step_median_mm"], 3), cell(entry["step_abs_error_mm"]["median"], 3),
                 cell(entry["step_error_pct_where_stride_distance_ge_0.2"]["median"], 1),
                 cell(entry["step_error_pct_where_stride_distance_ge_0.2"]["mean"], 1),
                 "-", "-", "-", "-", "-", "-"])
    print("\n3. Rotation protocol (forearm; 3 segments of 120 frames): |d| at the patch centre, angle between "
          "planes, in-plane motion; last row: per-step |d| per depth region (chosen-stride distance / stride, "
          "StridePlan.step_distances) against the true distance over those frames / stride (% where that distance "
          ">= 0.2 mm)")
    print(format_table(["pairs", "n", "failed", "true d med mm", "|d| err med mm", "|d| err med % (d>=0.2)",
                        "mean %", "true tilt med deg", "tilt err med deg", "tilt err med % (>=0.5)",
                        "signed mean %", "t err p95 mm", "rot err p95 deg"], rows))
    if strides_used:
        print("   chosen strides: " + ", ".join(f"{s}: {c}" for s, c in table["chosen stride"]["strides"].items()))
    print("   strides per region (per-step row): " + ", ".join(f"{s}: {c}" for s, c in entry["strides"].items()) +
          f"; signed mean {cell(entry['step_signed_pct_where_stride_distance_ge_0.2']['mean'], 1)} %")
    return table, chunks


# --------------------------------------------------------------------------- 4. speed


def speed_pairs(n_frames, strides=(1, 2, 4)):
    """Every pair (i, i + s) of ``n_frames`` frames for s in ``strides`` (the speed test's workload)."""
    return [(i, i + s) for s in strides for i in range(n_frames - s)]


def time_measure_pairs(frames, pairs, geometry, model, threads, *, repeats=2):
    """(wall s, CPU s of all threads, measurements) of measure_pairs, the best of ``repeats`` runs."""
    best = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        measured = measure_pairs(frames, pairs, mask=geometry.mask, spacing_mm=SPACING, model=model,
                                 grid=geometry.grid, apex_mm=geometry.apex, threads=threads)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        best = (wall, cpu, measured) if best is None or wall < best[0] else best
    return best


def bench_speed(model, max_threads, frames=None):
    """measure_pairs throughput (flow + decorrelation) and plane-fit time at 480x640.

    ``frames`` default: frames 200-319 of the rotation-protocol scan of table 3.
    """
    if frames is None:
        scan = simulate_scan(1500, protocol="rotation", subject="300", probe=PROBE, tissue=TISSUES["forearm"], seed=7)
        frames = scan.frames[200:320]
    geometry = Geometry(frames)
    pairs = speed_pairs(frames.shape[0])
    measure_pairs(frames, pairs[:8], mask=geometry.mask, spacing_mm=SPACING, model=model, grid=geometry.grid,
                  apex_mm=geometry.apex, threads=1)  # warm up
    rows, table = [], {}
    for threads in sorted({1, max_threads}):
        wall, cpu, measured = time_measure_pairs(frames, pairs, geometry, model, threads)
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
    rows = [[f"{edges[b]:.0f}-{edges[b + 1]:.0f}", int(r["samples"][b]), int(r["inverted"][b]),
             cell(r["rms_mm"][b], 3), cell(r["median_abs_mm"][b], 3)]
            for b in range(edges.size - 1) if r["samples"][b]]
    estimate, _ = model.distance(samples.rho, samples.depth_mm, samples.rotation_rad, samples.tilt_rad)
    ok = np.isfinite(estimate)
    overall = {"samples": len(samples), "inverted": int(ok.sum()),
               "rms_mm": float(np.sqrt(np.mean((estimate[ok] - samples.distance_mm[ok]) ** 2))),
               "median_abs_mm": float(np.median(np.abs(estimate[ok] - samples.distance_mm[ok])))}
    rows.append(["all", overall["samples"], overall["inverted"], cell(overall["rms_mm"], 3),
                 cell(overall["median_abs_mm"], 3)])
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
