"""Whole-scan accuracy per scanning protocol: reference predictions, speckle_rec and any prediction folder.

Usage:
    python benchmarks/accuracy.py [--protocols rotation,linear,c-shape,s-shape] [--frames 1000]
        [--height 240 --width 320] [--full-frames 1600 --full-height 480 --full-width 640]
        [--seeds 1 3 4 5 6] [--calibration-seed 2] [--calibration-frames 1000] [--threads 2]
        [--out DIR] [--pred NAME=DIR ...] [--json FILE]
    python benchmarks/accuracy.py --data DATA_DIR [--calibration-data TRACKED_DIR | --model CALIB.json]
        [--pred NAME=DIR ...] [--json FILE]

The defaults are the full run of ``benchmarks/README.md``. A quick run (a few minutes on 2 cores):
    python benchmarks/accuracy.py --protocols rotation,linear --seeds 1 --frames 300 \
        --calibration-frames 300 --full-frames 0

Everything goes through the public path, so any method's prediction folder is scored like ours:

1. **Data.** Per protocol, a tracked data folder in the challenge's train layout written by
   :func:`speckle_rec.simulate.dataset.simulate_dataset` (what ``speckle-rec simulate`` runs): one scan
   per seed (subject ``<seed:03d>``, left hand, probe perpendicular, distal to proximal) of
   ``--frames`` frames at ``--height`` x ``--width``; and the rotation protocol again at
   ``--full-height`` x ``--full-width`` with ``--full-frames`` frames (the challenge's size and
   length; ``--full-frames 0`` skips it). Each such "run" is named like its folder,
   ``OUT/data/<protocol>_<H>x<W>_<N>``; a folder already holding exactly those scans is reused. Or
   ``--data DIR``: one run on an existing tracked folder with landmarks.
2. **Calibration** on separate tracked scans (seeds ``--calibration-seed`` + 0, 100, 200; three
   scans per protocol of the runs at that image size, subjects 900-902, 910-912, 920-922, 930-932;
   ``--calibration-frames`` frames): the decorrelation model
   (:func:`speckle_rec.calibrate.calibrate_model`, 100 pairs per scan), the first-direction prior
   (:func:`speckle_rec.calibrate.learn_direction_prior`; together what ``speckle-rec calibrate``
   writes) and the constant-velocity motion; ``--calibrate-per-protocol`` fits each run's model and
   prior on its own protocol's three scans only. With ``--data``, ``--calibration-data`` plays this role;
   without it the packaged model (or ``--model``) and the +1 direction convention are used and there
   is no constant-velocity row.
3. **Methods**, each a prediction folder ``OUT/predictions/<run>/<method>/<subject>/<scan>.h5``:

   - ``identity``: no motion; added by evaluate (the TUS-REC2025 score's zero);
   - ``constant_velocity``: the mean frame-to-frame motion of the calibration scans with the same
     scan name (protocol variant; all of them if none matches), chained (:mod:`speckle_rec.baselines`);
   - ``in_plane_only``: speckle_rec's frame-to-previous transforms with their out-of-plane part
     removed (in-plane rotation and translation kept), chained: what the images give without
     decorrelation and sign decisions;
   - ``speckle_rec``: the full pipeline, :func:`speckle_rec.reconstruct.reconstruct_dataset` with the
     calibrated model (``speckle-rec reconstruct --calibration``);
   - ``speckle_rec_true_mirror``: speckle_rec mirrored through frame 0's plane where its first clear
     out-of-plane move (:func:`speckle_rec.direction.first_direction` at the nine pixels below) has
     the opposite sign of the ground truth's: what ``estimate_trajectory`` gives with
     ``first_direction`` set right instead of its +1 convention. Speckle cannot decide this global
     mirror; the row shows what a correct prior on it would give. It reads the ground truth (an
     oracle, not a method), and it can score below speckle_rec where later phases got the wrong sign;
   - ``truth_mirrored``: the ground truth mirrored through frame 0's plane: what a method with every
     relative sign right scores when the global mirror is wrong (the cost of that mirror alone);
   - ``--pred NAME=DIR`` (repeatable): any prediction folder, e.g. written by ``speckle-rec predict
     DATA --function submission/predict_ddfs.py:predict_ddfs -o DIR`` from a learned model. For run
     ``<run>``, ``DIR/<run>/`` is used when it exists, else ``DIR`` itself; scans it lacks are listed.

4. **Scores**: :func:`speckle_rec.evaluate.evaluate` (``speckle-rec evaluate``) gives GPE, GLE, LPE, LLE
   (mm, means over the run's scans) and the TUS-REC2025 score. From each prediction's transforms (or,
   for a file holding only DDFs, its LP / GP fields at the same pixels) also:

   - sign: fraction of the moving frames (true frame-to-previous out-of-plane motion > 0.05 mm on
     average over nine pixels spread over the fan) whose predicted out-of-plane motion at those
     pixels has the true sign (positive inner product); none for a method without out-of-plane motion;
   - drift: the last frame's error at the image centre as % of the straight distance the centre
     travelled, on scans where it travelled at least 20 mm (the sweeps; not the rotation protocol);
   - s/scan and frames/s: the wall time stored in the prediction files (speckle_rec's estimation,
     frames read included, for the two rows derived from it; ``speckle-rec predict`` times each call).

Prints one table (rows = run x method) and with ``--json FILE`` writes every number: the machine,
the options, per run the calibration, evaluate's full output (per-scan rows) and the per-scan
sign / drift values. Without ``--out`` everything is written to a temporary folder and removed.
Under ``--out`` a data or prediction folder is replaced only if this script wrote it; any other
folder in the way stops the run, untouched.
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from cli.output import format_table, write_json
from speckle_rec.baselines import constant_velocity_transforms, mean_local_params
from speckle_rec.calibrate import calibrate_model, learn_direction_prior, save_calibration
from speckle_rec.decorrelation import DecorrelationModel
from speckle_rec.direction import first_direction, mirror
from speckle_rec.errors import DataError
from speckle_rec.evaluate import IDENTITY, ScanTruth, evaluate
from speckle_rec.inplane import fan_mask_from_frames
from speckle_rec.io import open_dataset
from speckle_rec.metrics import METRICS
from speckle_rec.prediction import open_prediction, prediction_path, write_prediction
from speckle_rec.reconstruct import reconstruct_dataset
from speckle_rec.simulate.dataset import simulate_dataset
from speckle_rec.simulate.probe import Probe
from speckle_rec.transforms import globals_from_locals, locals_from_globals, transforms_from_tforms

from _machine import cell, load_average, machine_line, mean_known, start_script, work_folder

PROTOCOLS = ("rotation", "linear", "c-shape", "s-shape")
CALIBRATION_SUBJECTS = {"rotation": 900, "linear": 910, "c-shape": 920, "s-shape": 930}
SCAN_GLOBS = {"rotation": "*_rotation", "linear": "*_L_*", "c-shape": "*_C_*", "s-shape": "*_S_*"}
CALIBRATION_SCANS = 3  # per protocol: DirectionPrior needs >= 3 scans of a name to be decisive
OURS = "speckle_rec"
CONSTANT_VELOCITY = "constant_velocity"
IN_PLANE_ONLY = "in_plane_only"
TRUE_MIRROR = "speckle_rec_true_mirror"
TRUTH_MIRRORED = "truth_mirrored"
BUILT_IN = (IDENTITY, CONSTANT_VELOCITY, IN_PLANE_ONLY, OURS, TRUE_MIRROR, TRUTH_MIRRORED)
MOVING_MM = 0.05  # frames whose true out-of-plane motion is smaller do not count for the sign
SWEEP_MM = 20.0  # drift is reported when the image centre travelled at least this far


# ------------------------------------------------------------------------------------------ data


WRITTEN_BY = ".written_by_accuracy_py"  # marks the folders this script may delete and write again


def fresh_folder(root, *, known=()):
    """Empty ``root`` for this run, deleting it first only if this script wrote it.

    A folder counts as ours if it holds the marker file :data:`WRITTEN_BY`, or nothing but entries
    named in ``known`` (folders written before the marker existed). ``--out`` may point anywhere, so
    any other folder is left alone and the run stops with one line naming it.
    """
    if root.exists():
        entries = {entry.name for entry in root.iterdir()}
        if WRITTEN_BY not in entries and not entries <= set(known):
            raise SystemExit(f"accuracy.py: {root} exists and was not written by this script; "
                             "remove it or choose another --out")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / WRITTEN_BY).touch()


def scan_shapes(root):
    """{SUBJECT/SCAN: (N, H, W)} of a data folder, or None when it cannot be opened."""
    try:
        return {scan.key: scan.shape() for scan in open_dataset(root).scans}
    except (DataError, OSError):
        return None


def simulate_folder(root, scans, *, probe, n_frames, log):
    """A tracked train-layout folder holding exactly ``scans`` [(protocol, subject, seed)] (reused if it does).

    Written by :func:`speckle_rec.simulate.dataset.simulate_dataset` (one call per scan, one subject
    each, left hand, probe perpendicular, distal to proximal).
    """
    from speckle_rec.simulate.dataset import protocol_scans
    from speckle_rec.simulate.motion import scan_name

    expected = {}
    for protocol, subject, _ in scans:
        (hand, plane, direction), = protocol_scans(protocol, hands=("LH",), planes=("per",), directions=("DtP",))
        name = scan_name(protocol, hand=hand, plane=plane, direction=direction)
        expected[f"{subject}/{name}"] = (n_frames, probe.height, probe.width)
    found = scan_shapes(root)
    if found == expected:
        log(f"reusing {root} ({len(expected)} scan(s))")
        return 0.0
    fresh_folder(root)  # no stale scan of a run with other settings may be left
    start = time.perf_counter()
    for protocol, subject, seed in scans:
        simulate_dataset(root, protocol=protocol, subjects=(subject,), n_frames=n_frames, layout="train",
                         probe=probe, seed=seed, hands=("LH",), planes=("per",), directions=("DtP",))
    seconds = time.perf_counter() - start
    log(f"simulated {root}: {len(scans)} scan(s) of {n_frames} frames at {probe.height}x{probe.width} "
        f"({seconds:.0f} s)")
    return seconds


def tracked_locals(dataset):
    """{scan name: [frame_to_previous (N−1, 4, 4), ...]} of a tracked folder's scans."""
    calibration = dataset.calibration()
    out = {}
    for scan in dataset.scans:
        if scan.tracked:
            frame_to_previous = transforms_from_tforms(scan.read_tforms(), calibration.image_to_tool)[1]
            out.setdefault(scan.name, []).append(frame_to_previous)
    return out


# --------------------------------------------------------------------------------------- methods


def in_plane_only(frame_to_first):
    """Zero out-of-plane motion: each local transform keeps its in-plane rotation and translation.

    Returns frame_to_first, frame_to_previous (N−1, 4, 4) of the flattened trajectory.
    """
    local = locals_from_globals(frame_to_first)
    flat = np.tile(np.eye(4), (local.shape[0], 1, 1))
    theta = np.arctan2(local[:, 1, 0] - local[:, 0, 1], local[:, 0, 0] + local[:, 1, 1])
    cos, sin = np.cos(theta), np.sin(theta)
    flat[:, 0, 0], flat[:, 0, 1], flat[:, 1, 0], flat[:, 1, 1] = cos, -sin, sin, cos
    flat[:, :2, 3] = local[:, :2, 3]
    return globals_from_locals(flat), flat


class ScanGeometry:
    """Nine anchor pixels spread over a scan's fan and its centre pixel (1-based x, y; flat index k)."""

    def __init__(self, scan, grid):
        n = scan.shape()[0]
        with scan.frames() as frames:
            spread = np.stack([frames[int(k)] for k in np.unique(np.linspace(0, n - 1, min(n, 100)).round())])
        rows, cols = np.nonzero(fan_mask_from_frames(spread))
        xs = np.round(np.quantile(cols + 1.0, [0.2, 0.5, 0.8])).astype(np.int64)
        ys = np.round(np.quantile(rows + 1.0, [0.2, 0.5, 0.8])).astype(np.int64)
        self.anchor_xy = np.array([(x, y) for x in xs for y in ys])
        self.centre_xy = np.array([(grid.width + 1) // 2, (grid.height + 1) // 2])
        self.grid = grid
        sx, sy = grid.spacing_mm
        self.anchor_mm = self.anchor_xy * np.array([sx, sy])
        self.anchor_k = (self.anchor_xy[:, 1] - 1) * grid.width + (self.anchor_xy[:, 0] - 1)
        self.centre_k = int((self.centre_xy[1] - 1) * grid.width + (self.centre_xy[0] - 1))
        self.centre_h = np.array([sx * self.centre_xy[0], sy * self.centre_xy[1], 0.0, 1.0])

    def elevation(self, frame_to_previous):
        """(N−1, 9) out-of-plane displacement (mm) of the anchors from each frame to the previous."""
        return frame_to_previous[:, 2, :2] @ self.anchor_mm.T + frame_to_previous[:, 2, 3, None]

    def centre_end(self, frame_to_first):
        """(3,) displacement (mm) of the image centre from frame 0 to the last frame's position."""
        return (frame_to_first[-1] @ self.centre_h)[:3] - self.centre_h[:3]


def prediction_motion(prediction, geometry, chunk_frames=32):
    """(anchor elevations (N−1, 9), centre end displacement (3,)) of an opened prediction.

    From its transforms when it has them, else from its dense fields (z of LP at the anchors, GP of
    the last frame at the centre: a DDF is the displacement of each pixel in mm).
    """
    if prediction.has_transforms:
        return (geometry.elevation(prediction.local_transforms),
                geometry.centre_end(prediction.global_transforms))
    lp = prediction.LP
    rows = []
    for start in range(0, lp.shape[0], chunk_frames):
        rows.append(np.asarray(lp[start:start + chunk_frames, 2, :], dtype=np.float64)[:, geometry.anchor_k])
    end = np.asarray(prediction.GP[lp.shape[0] - 1, :, geometry.centre_k], dtype=np.float64)
    return np.concatenate(rows), end


def sign_and_drift(true_motion, predicted_motion):
    """Sign accuracy over moving frames and final drift (% of the centre's travel), each None if undefined."""
    true_z, true_end = true_motion
    est_z, est_end = predicted_motion
    moving = np.abs(true_z).mean(axis=1) > MOVING_MM
    sign = None
    if moving.any() and np.any(est_z[moving] != 0.0):
        sign = float(np.mean(np.sum(true_z * est_z, axis=1)[moving] > 0.0))
    travel = float(np.linalg.norm(true_end))
    drift = 100.0 * float(np.linalg.norm(est_end - true_end)) / travel if travel >= SWEEP_MM else None
    return {"sign_accuracy": sign, "moving_frames": int(moving.sum()), "drift_percent": drift,
            "centre_travel_mm": travel}


def write_derived(dataset, ours_dir, out_root, truths, geometries):
    """in_plane_only and speckle_rec_true_mirror folders from speckle_rec's predictions; truth_mirrored."""
    mirrored = {}
    for scan in dataset.scans:
        truth = truths[scan.key]
        write_prediction(prediction_path(out_root / TRUTH_MIRRORED, scan.subject, scan.name),
                         global_transforms=mirror(truth.frame_to_first))
        path = prediction_path(ours_dir, scan.subject, scan.name)
        if not path.is_file():
            continue
        with open_prediction(path, n_frames=truth.n_frames, n_pixels=truth.grid.n_pixels,
                             n_landmarks=len(truth.landmarks)) as prediction:
            ours, wall = prediction.global_transforms, prediction.wall_time_s
        flat_first, flat_previous = in_plane_only(ours)
        write_prediction(prediction_path(out_root / IN_PLANE_ONLY, scan.subject, scan.name),
                         global_transforms=flat_first, local_transforms=flat_previous, wall_time_s=wall)
        points = geometries[scan.key].anchor_mm
        found, true = first_direction(ours, points), first_direction(truth.frame_to_first, points)
        wrong = found != 0 and true != 0 and found != true  # 0: no clear move, nothing to decide
        mirrored[scan.key] = bool(wrong)
        oracle = mirror(ours) if wrong else ours
        write_prediction(prediction_path(out_root / TRUE_MIRROR, scan.subject, scan.name),
                         global_transforms=oracle, wall_time_s=wall)
    return mirrored


def write_constant_velocity(dataset, out_dir, calibration_locals):
    """constant_velocity folder: per scan, the mean local motion of calibration scans of the same name."""
    used = {}
    everything = [t for group in calibration_locals.values() for t in group]
    for scan in dataset.scans:
        group = calibration_locals.get(scan.name, everything)
        used[scan.key] = scan.name if scan.name in calibration_locals else "all"
        frame_to_first, frame_to_previous = constant_velocity_transforms(scan.shape()[0], mean_local_params(group))
        write_prediction(prediction_path(out_dir, scan.subject, scan.name), global_transforms=frame_to_first,
                         local_transforms=frame_to_previous)
    return used


def link_prediction(dataset, source, target):
    """Symlink ``source``'s files of ``dataset``'s scans into the folder ``target`` (named as the method)."""
    found = 0
    for scan in dataset.scans:
        src = prediction_path(source, scan.subject, scan.name)
        dst = prediction_path(target, scan.subject, scan.name)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src.resolve())
            found += 1
    target.mkdir(parents=True, exist_ok=True)
    return found


# ------------------------------------------------------------------------------------------- runs


def run_one(run, *, dataset, model, prior, calibration_locals, extra, pred_root, threads, log):
    """Reconstruct, write the reference predictions and score one data folder; returns its JSON entry."""
    calibration = dataset.calibration()
    truths, geometries = {}, {}
    for scan in dataset.scans:
        truth = ScanTruth.load(scan, calibration)
        if truth.landmarks is None:
            raise DataError(f"no landmarks for {scan.key}: evaluate needs them", dataset.root)
        truths[scan.key] = truth
        geometries[scan.key] = ScanGeometry(scan, truth.grid)

    fresh_folder(pred_root, known=BUILT_IN)  # no file of an earlier run may pass for this run's
    start = time.perf_counter()
    summary = reconstruct_dataset(dataset, pred_root / OURS, model=model, direction_prior=prior, threads=threads,
                                  overwrite=True, progress=False)
    log(f"  speckle_rec: {len(summary.done)} scan(s) in {time.perf_counter() - start:.1f} s"
        + (f", {len(summary.failed)} failed" if summary.failed else ""))
    for key, error in summary.failed.items():
        log(f"  failed: {key}: {error}")
    cv_source = None
    if calibration_locals:
        cv_source = write_constant_velocity(dataset, pred_root / CONSTANT_VELOCITY, calibration_locals)
    mirrored = write_derived(dataset, pred_root / OURS, pred_root, truths, geometries)
    methods = (([CONSTANT_VELOCITY] if calibration_locals else [])
               + [IN_PLANE_ONLY, OURS, TRUE_MIRROR, TRUTH_MIRRORED])
    folders = [pred_root / name for name in methods]
    for folder in folders:  # a method whose every scan failed is still listed (with all scans missing)
        folder.mkdir(parents=True, exist_ok=True)
    for name, source in extra.items():
        per_run = Path(source) / run["name"]
        source = per_run if per_run.is_dir() else Path(source)
        found = link_prediction(dataset, source, pred_root / name)
        log(f"  {name}: {found} of {len(dataset.scans)} scan(s) from {source}")
        folders.append(pred_root / name)

    start = time.perf_counter()
    results = evaluate(dataset, folders, progress=False)
    log(f"  evaluate: {time.perf_counter() - start:.1f} s")

    motion = {}
    for name, entry in results["methods"].items():
        per_scan = {}
        for key in entry["scans"]:
            truth, geometry = truths[key], geometries[key]
            true_motion = (geometry.elevation(truth.frame_to_previous), geometry.centre_end(truth.frame_to_first))
            if name == IDENTITY:
                eye = np.tile(np.eye(4), (truth.n_frames - 1, 1, 1))
                predicted = (geometry.elevation(eye), geometry.centre_end(eye))
            else:
                subject, scan_name = key.split("/", 1)
                with open_prediction(prediction_path(entry["folder"], subject, scan_name), n_frames=truth.n_frames,
                                     n_pixels=truth.grid.n_pixels, n_landmarks=len(truth.landmarks)) as prediction:
                    predicted = prediction_motion(prediction, geometry)
            per_scan[key] = sign_and_drift(true_motion, predicted)
        motion[name] = per_scan
    return dict(run, data=str(dataset.root), scans=[s.key for s in dataset.scans],
                constant_velocity_from=cv_source, ours_mirrored_by_oracle=mirrored,
                failed={k: v for k, v in summary.failed.items()}, evaluate=results, motion=motion)


def table_rows(entry, order):
    """Rows (run x method) with means over the run's scans."""
    rows, records = [], []
    methods = entry["evaluate"]["methods"]
    for name in order:
        if name not in methods:
            continue
        scored = methods[name]
        mean = scored["mean"]
        motion = entry["motion"].get(name, {})
        sign = mean_known([m["sign_accuracy"] for m in motion.values()])
        drift = mean_known([m["drift_percent"] for m in motion.values()])
        timed = {k: r["wall_time_s"] for k, r in scored["scans"].items() if r.get("wall_time_s")}
        seconds = mean_known(list(timed.values()))
        fps = mean_known([entry["frames_per_scan"][k] / t for k, t in timed.items()])
        record = {"run": entry["name"], "method": name, "scans": len(scored["scans"]),
                  "missing": len(scored["missing"]), **{m: mean.get(m) for m in METRICS},
                  "score": mean.get("score"), "score_std": scored["std"].get("score"),
                  "sign_accuracy": sign, "drift_percent": drift, "seconds_per_scan": seconds,
                  "frames_per_s": fps}
        records.append(record)
        count = f"{len(scored['scans'])}" + (f" (-{len(scored['missing'])})" if scored["missing"] else "")
        rows.append([entry["label"], name] + [cell(mean.get(m), 3 if m[0] == "L" else 2) for m in METRICS]
                    + [cell(mean.get("score"), 3), cell(sign, 2), cell(drift, 1), cell(seconds, 1),
                       cell(fps, 0), count])
    return rows, records


HEADERS = ["run", "method", "GPE mm", "GLE mm", "LPE mm", "LLE mm", "score", "sign", "drift %", "s/scan",
           "frames/s", "scans"]


def parse_pred(values, parser):
    extra = {}
    for value in values or ():
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            parser.error(f"expected --pred NAME=DIR, got '{value}'")
        if name in BUILT_IN or name in extra or "/" in name or name.startswith("."):
            parser.error(f"--pred name '{name}' is taken or invalid (built in: {', '.join(BUILT_IN)})")
        if not Path(folder).is_dir():
            parser.error(f"--pred {name}: folder not found: {folder}")
        extra[name] = folder
    return extra


def plan_runs(args):
    """[(run dict, probe)] of the simulated runs."""
    runs = []
    sizes = [(p, args.frames, args.height, args.width) for p in args.protocols]
    if args.full_frames:
        sizes.append(("rotation", args.full_frames, args.full_height, args.full_width))
    for protocol, n_frames, height, width in sizes:
        name = f"{protocol}_{height}x{width}_{n_frames}"
        label = f"{protocol}, {n_frames} @ {height}x{width}"
        runs.append(({"name": name, "label": label, "protocol": protocol, "frames": n_frames,
                      "height": height, "width": width, "seeds": list(args.seeds)},
                     Probe.fit_image(height, width)))
    return runs


def calibration_job(tracked, given_model, threads, log, *, save=None):
    """(model, direction prior, constant-velocity locals, JSON info) from a tracked folder (``given_model`` wins)."""
    start = time.perf_counter()
    bands = None
    prior = learn_direction_prior(tracked)
    if given_model is None:
        # about 300 pairs per protocol, as with one scan each
        model, report = calibrate_model(tracked, pairs_per_scan=max(1, 300 // CALIBRATION_SCANS), threads=threads,
                                        progress=False, description="benchmarks/accuracy.py:")
        bands = report["bands"]
        log(f"calibrated on {tracked.root} ({time.perf_counter() - start:.0f} s)")
        if save is not None:
            save_calibration(save, model, report=report, prior=prior)
    else:
        model = given_model
    info = {"folder": str(tracked.root), "scans": [s.key for s in tracked.scans],
            "calibrate_s": time.perf_counter() - start, "model": model.description, "bands": bands,
            "direction_prior": prior.to_dict()}
    return model, prior, tracked_locals(tracked), info


def data_job(args, given_model, threads, log):
    """(run, dataset, model, calibration locals) of ``--data`` (with ``--calibration-data``)."""
    dataset = open_dataset(args.data)
    if args.calibration_data:
        model, prior, calibration_locals, info = calibration_job(open_dataset(args.calibration_data), given_model,
                                                                 threads, log)
    else:
        model = DecorrelationModel.default() if given_model is None else given_model
        prior, calibration_locals, info = None, {}, {"folder": None, "model": model.description}
    name = Path(args.data).resolve().name
    shapes = [scan.shape() for scan in dataset.scans]
    run = {"name": name, "label": name, "protocol": None, "seeds": None,
           "frames": sorted({s[0] for s in shapes}), "height": sorted({s[1] for s in shapes}),
           "width": sorted({s[2] for s in shapes}), "calibration": info}
    return run, dataset, model, prior, calibration_locals


def simulated_jobs(args, out, given_model, threads, log):
    """[(run, dataset, model, prior, calibration locals)] of the simulated runs.

    One calibration folder per image size; the model and prior come from all its scans, or with
    ``--calibrate-per-protocol`` from the scans of the run's protocol only.
    """
    runs = plan_runs(args)
    folders, calibrations, jobs = {}, {}, []
    for run, probe in runs:
        size = (probe.height, probe.width)
        if size not in folders:
            protocols = [p for p in PROTOCOLS
                         if any(r["protocol"] == p and (q.height, q.width) == size for r, q in runs)]
            root = out / "calibration" / (f"{probe.height}x{probe.width}_{args.calibration_frames}"
                                          f"_seed{args.calibration_seed}")
            scans = [(p, f"{CALIBRATION_SUBJECTS[p] + k:03d}", args.calibration_seed + 100 * k)
                     for p in protocols for k in range(CALIBRATION_SCANS)]
            simulate_s = simulate_folder(root, scans, probe=probe, n_frames=args.calibration_frames, log=log)
            folders[size] = (root, protocols, simulate_s)
        root, protocols, simulate_s = folders[size]
        used = [run["protocol"]] if args.calibrate_per_protocol else protocols
        key = (size, tuple(used))
        if key not in calibrations:
            tracked = open_dataset(root, scans=None if used == protocols else f"*/{SCAN_GLOBS[used[0]]}")
            save = root.parent / f"{root.name}{'_' + used[0] if used != protocols else ''}.json"
            model, prior, calibration_locals, info = calibration_job(tracked, given_model, threads, log, save=save)
            info.update(protocols=used, frames=args.calibration_frames, seed=args.calibration_seed,
                        simulate_s=simulate_s)
            calibrations[key] = (model, prior, calibration_locals, info)
        model, prior, calibration_locals, info = calibrations[key]
        data = out / "data" / run["name"]
        simulate_folder(data, [(run["protocol"], f"{seed:03d}", seed) for seed in args.seeds], probe=probe,
                        n_frames=run["frames"], log=log)
        jobs.append((dict(run, calibration=info), open_dataset(data), model, prior, calibration_locals))
    return jobs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_argument_group("simulated runs (ignored with --data)")
    size.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated (default all four)")
    size.add_argument("--frames", type=int, default=1000, help="frames per scan (default 1000)")
    size.add_argument("--height", type=int, default=240, help="image rows (default 240)")
    size.add_argument("--width", type=int, default=320, help="image columns (default 320)")
    size.add_argument("--full-frames", type=int, default=1600,
                      help="frames of the extra rotation run at the full size (default 1600; 0 skips it)")
    size.add_argument("--full-height", type=int, default=480)
    size.add_argument("--full-width", type=int, default=640)
    size.add_argument("--seeds", type=int, nargs="+", default=[1, 3, 4, 5, 6],
                      help="one test scan per seed (default 1 3 4 5 6; seed 2 is the calibration's)")
    size.add_argument("--calibration-seed", type=int, default=2, help="seed of the calibration scans (default 2)")
    size.add_argument("--calibration-frames", type=int, default=1000, help="frames per calibration scan")
    size.add_argument("--calibrate-per-protocol", action="store_true",
                      help="calibrate each run on the calibration scans of its own protocol (default: all of them)")
    parser.add_argument("--data", metavar="DIR", help="an existing tracked data folder instead of simulating")
    parser.add_argument("--calibration-data", metavar="DIR",
                        help="with --data: tracked scans for the decorrelation model and constant velocity")
    parser.add_argument("--model", metavar="CALIB.json",
                        help="decorrelation model (default: calibrated on the calibration scans, else packaged)")
    parser.add_argument("--pred", action="append", metavar="NAME=DIR", help="extra prediction folder (repeatable)")
    parser.add_argument("--out", metavar="DIR", help="keep data, models and predictions here (default: temporary)")
    parser.add_argument("--threads", type=int, default=2, help="Numba / OpenCV threads (default 2)")
    parser.add_argument("--json", metavar="FILE", help="write every number as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    args.protocols = [p for p in args.protocols.split(",") if p]
    unknown = sorted(set(args.protocols) - set(PROTOCOLS))
    if unknown:
        parser.error(f"unknown protocol(s) {', '.join(unknown)} (known: {', '.join(PROTOCOLS)})")
    if args.calibration_data and not args.data:
        parser.error("--calibration-data goes with --data")
    extra = parse_pred(args.pred, parser)

    log, threads, machine, started = start_script(args.quiet, args.threads)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": f"python benchmarks/accuracy.py {command}", "machine": machine, "threads": threads,
              "options": vars(args), "runs": []}
    with work_folder(args.out, "speckle_rec_accuracy_") as out:
        given_model = DecorrelationModel.from_json(args.model) if args.model else None
        if args.data:
            jobs = [data_job(args, given_model, threads, log)]
        else:
            jobs = simulated_jobs(args, out, given_model, threads, log)
        all_rows, records = [], []
        for run, dataset, model, prior, calibration_locals in jobs:
            log(f"{run['label']}: {len(dataset.scans)} scan(s)")
            run["frames_per_scan"] = {scan.key: scan.shape()[0] for scan in dataset.scans}
            entry = run_one(run, dataset=dataset, model=model, prior=prior, calibration_locals=calibration_locals,
                            extra=extra, pred_root=out / "predictions" / run["name"], threads=threads, log=log)
            entry["model"] = model.description
            order = list(BUILT_IN) + list(extra)
            rows, table = table_rows(entry, order)
            entry["table"] = table
            all_rows += rows
            records += table
            report["runs"].append(entry)
    load_end = load_average()
    report.update(table=records, load_average_end=load_end, seconds=time.perf_counter() - started)
    print(machine_line(machine, threads, load_end))
    print(format_table(HEADERS, all_rows))
    print("score: TUS-REC2025 (1 - M/M_identity averaged over GPE, GLE, LPE, LLE); sign: fraction of moving "
          "frames with the right out-of-plane sign; drift: last frame's centre error / distance travelled "
          f"(sweeps); {TRUE_MIRROR}: oracle global mirror; {TRUTH_MIRRORED}: the truth with the wrong global "
          f"mirror. {time.perf_counter() - started:.0f} s in all.")
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
