"""Speed and peak memory of every stage of speckle_rec, each measured in a fresh process.

Usage:
    python benchmarks/speed.py [--threads 2] [--json FILE] [--quick] [--stages simulate,pairs,...]
        [--frames 1600 --height 480 --width 640] [--sim-frames 48] [--pair-frames 120] [--ddf-frames 400]
        [--repeats 3] [--work DIR]

The defaults are the full run of ``benchmarks/README.md`` (a few minutes on 2 cores; the predict_ddfs
stage holds GP and LP of a 1600-frame 480x640 scan, ~5.9 GB each, in memory). ``--quick`` runs
every stage on small sizes in well under a minute (explicit size options still apply).

Setup (not timed): a tracked rotation-protocol scan of ``--frames`` frames at ``--height`` x
``--width`` is simulated into a data folder in the challenge's test layout
(:func:`speckle_rec.simulate.dataset.simulate_dataset`, as ``speckle-rec simulate --layout test``),
reused from ``--work DIR`` when it is already there. Then each stage runs in its own spawned child
process (nothing it allocates or compiles carries over), restricted to ``--threads`` cores, and
reports wall time, CPU time of all its threads and the child's peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``: includes the interpreter, the libraries and the
stage's inputs, e.g. the frames):

- ``simulate``: the speckle renderer, ``--sim-frames`` frames of a freehand-like sweep at 480x640
  (``bench_simulate.sweep`` / ``time_render``; the first call, which loads the compiled kernels, is
  not timed). Target >= 20 frames/s on 2 cores.
- ``pairs``: flow + decorrelation, :func:`speckle_rec.outofplane.measure_pairs` on every pair at
  strides 1, 2, 4 of ``--pair-frames`` frames of the scan (``bench_motion.time_measure_pairs``, best
  of 2). Target >= 150 pairs/s on 2 cores.
- ``trajectory``: :func:`speckle_rec.trajectory.estimate_trajectory` on the whole scan with the
  packaged model, one row per stage it times (``TrajectoryResult.diagnostics["seconds"]``: measure =
  flow and patch correlations, signs, level (sweeps only), initialise, adjust = bundle adjustment) and
  the total.
- ``ddf_naive``, ``ddf``: the dense field of ``--ddf-frames`` random transforms at 480x640, naive
  NumPy (``bench_ddf.naive``: float64 matmul, cast to float32) against
  :func:`speckle_rec.ddf.pixel_ddfs` allocating its output (``bench_ddf.measure``, best of
  ``--repeats``). Target >= 5x naive including allocation.
- ``ddfs_scan``: :func:`speckle_rec.ddf.ddfs_from_transforms` (GP, GL, LP, LL in memory) of the whole
  scan's true transforms: the DDF part of ``predict_ddfs`` alone, fresh output memory included
  (GP + LP of 1600 frames at 480x640: 11.7 GB; the system CPU time of first touching it is shown).
- ``evaluate``: :func:`speckle_rec.evaluate.evaluate` of one transforms-only prediction folder on
  the scan (the identity row is always added).
- ``predict_ddfs``: :func:`speckle_rec.predict_ddfs` end to end on the scan (frames already in
  memory, as the challenge's ``test.py`` times it; after a warm-up call on 24 frames that loads the
  compiled kernels), GP, GL, LP, LL included: less than the ``trajectory`` total plus
  ``ddfs_scan``, because GP and LP are faulted in on a low-priority thread during the estimation
  (:class:`speckle_rec.ddf.PrefaultedOutputs`).
  Called twice in a row in one process, as ``test.py`` calls it scan after scan: the first call's
  output is fresh memory, the second's is memory the process had already used.
  Target <= 30 s for a 1600-frame 480x640 scan on 2 cores.

Prints the machine (cores, load average at start and end, versions) and one table; ``--json FILE``
writes every number. Rates are lower bounds when the load average exceeds the cores.
"""

import argparse
import multiprocessing
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from cli.output import format_table, write_json
from speckle_rec.errors import DataError
from speckle_rec.io import open_dataset
from speckle_rec.simulate.dataset import simulate_dataset
from speckle_rec.simulate.probe import Probe
from speckle_rec.threads import available_cores, set_threads

from _machine import describe, load_average, machine_info, stderr_log, work_folder

STAGES = ("simulate", "pairs", "trajectory", "ddf_naive", "ddf", "ddfs_scan", "evaluate", "predict_ddfs")
FULL = {"frames": 1600, "height": 480, "width": 640, "sim_frames": 48, "pair_frames": 120, "ddf_frames": 400,
        "repeats": 3}
QUICK = {"frames": 100, "height": 120, "width": 160, "sim_frames": 4, "pair_frames": 16, "ddf_frames": 16,
         "repeats": 1}
SCAN_KEY = "000/LH_rotation"


def _row(stage, what, *, items, unit, seconds, cpu_seconds=None, **extra):
    return dict(stage=stage, what=what, items=int(items), unit=unit, seconds=float(seconds),
                cpu_seconds=None if cpu_seconds is None else float(cpu_seconds), **extra)


def _clock():
    """(wall, user CPU, system CPU) seconds so far; CPU of all threads of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime, usage.ru_stime


def _since(start):
    """(wall s, CPU s, system CPU s) since ``start = _clock()``."""
    now = _clock()
    return now[0] - start[0], (now[1] - start[1]) + (now[2] - start[2]), now[2] - start[2]


def _read_scan(params, stop=None, start=0):
    scan = open_dataset(params["data"]).scan(SCAN_KEY)
    return scan, scan.read_frames(start, stop)


# ---------------------------------------------------------------------------------------- stages


def stage_simulate(params):
    from bench_simulate import sweep, time_render
    from speckle_rec.simulate.render import render_frames
    from speckle_rec.simulate.tissue import Tissue

    probe, tissue = Probe(), Tissue.forearm()
    poses = sweep(probe, params["sim_frames"])
    render_frames(poses[:2], probe=probe, tissue=tissue, threads=params["threads"])  # load the kernels
    wall, cpu = time_render(poses, probe=probe, tissue=tissue, threads=params["threads"])
    return [_row("simulate", f"render {probe.height}x{probe.width}", items=len(poses), unit="frame", seconds=wall,
                 cpu_seconds=cpu, target=("frames_per_s", ">=", 20.0) if len(poses) >= 24 else None)]


def stage_pairs(params):
    from bench_motion import Geometry, speed_pairs, time_measure_pairs
    from speckle_rec.decorrelation import DecorrelationModel
    from speckle_rec.outofplane import measure_pairs

    n_scan = params["frames"]
    count = min(params["pair_frames"], n_scan)
    start = 200 if n_scan >= 200 + count else 0
    _, frames = _read_scan(params, start + count, start)
    model = DecorrelationModel.default()
    geometry = Geometry(frames)
    pairs = speed_pairs(frames.shape[0])
    measure_pairs(frames, pairs[:4], mask=geometry.mask, spacing_mm=Probe().spacing_mm, model=model,
                  grid=geometry.grid, apex_mm=geometry.apex, threads=params["threads"])  # warm up
    wall, cpu, _ = time_measure_pairs(frames, pairs, geometry, model, params["threads"])
    full = frames.shape[1:] == (480, 640) and frames.shape[0] >= 60 and params["threads"] >= 2
    return [_row("pairs", f"measure_pairs, strides 1,2,4, {frames.shape[1]}x{frames.shape[2]}", items=len(pairs),
                 unit="pair", seconds=wall, cpu_seconds=cpu, patches=len(geometry.grid),
                 target=("pairs_per_s", ">=", 150.0) if full else None)]


def stage_trajectory(params):
    from speckle_rec.decorrelation import DecorrelationModel
    from speckle_rec.trajectory import estimate_trajectory

    scan, frames = _read_scan(params)
    spacing = open_dataset(params["data"]).calibration().spacing_mm
    model = DecorrelationModel.default()
    start = _clock()
    result = estimate_trajectory(frames, spacing_mm=spacing, model=model, threads=params["threads"])
    wall, cpu, system = _since(start)
    n = frames.shape[0]
    size = f"{frames.shape[1]}x{frames.shape[2]}"
    rows = [_row("trajectory", f"{name} ({size})", items=n, unit="frame", seconds=seconds)
            for name, seconds in result.diagnostics.get("seconds", {}).items()]
    rows.append(_row("trajectory", f"estimate_trajectory total ({size})", items=n, unit="frame", seconds=wall,
                     cpu_seconds=cpu, cpu_system_seconds=system, pairs=result.diagnostics.get("pairs")))
    return rows


def _ddf_inputs(params):
    from bench_ddf import random_transforms
    from speckle_rec.calibration import Calibration
    from speckle_rec.ddf import PixelGrid

    grid = PixelGrid.from_calibration(Calibration.default(), params["ddf_height"], params["ddf_width"])
    return random_transforms(params["ddf_frames"]), grid


def stage_ddf_naive(params):
    from bench_ddf import measure, naive

    transforms, grid = _ddf_inputs(params)
    timing = measure(lambda: naive(transforms, grid), params["repeats"])
    return [_row("ddf_naive", f"naive NumPy DDF ({grid.height}x{grid.width})", items=len(transforms), unit="frame",
                 seconds=timing["seconds"], cpu_seconds=timing["cpu_seconds"],
                 traced_peak_mib=timing["peak_bytes"] / 2**20)]


def stage_ddf(params):
    from bench_ddf import measure
    from speckle_rec.ddf import pixel_ddfs

    transforms, grid = _ddf_inputs(params)
    timing = measure(lambda: pixel_ddfs(transforms, grid), params["repeats"])
    output_mib = len(transforms) * 3 * grid.n_pixels * 4 / 2**20
    return [_row("ddf", f"pixel_ddfs, allocating ({grid.height}x{grid.width})", items=len(transforms), unit="frame",
                 seconds=timing["seconds"], cpu_seconds=timing["cpu_seconds"],
                 traced_peak_mib=timing["peak_bytes"] / 2**20, output_mib=output_mib)]


def stage_ddfs_scan(params):
    from speckle_rec.ddf import PixelGrid, ddfs_from_transforms
    from speckle_rec.transforms import transforms_from_tforms

    dataset = open_dataset(params["data"])
    scan, calibration = dataset.scan(SCAN_KEY), dataset.calibration()
    n, h, w = scan.shape()
    frame_to_first, frame_to_previous = transforms_from_tforms(scan.read_tforms(), calibration.image_to_tool)
    landmarks, grid = scan.read_landmarks(), PixelGrid.from_calibration(calibration, h, w)
    ddfs_from_transforms(frame_to_first[:2], frame_to_previous[:2], np.array([[1, 1, 1]]), grid)  # load kernels
    start = _clock()
    outputs = ddfs_from_transforms(frame_to_first, frame_to_previous, landmarks, grid)
    wall, cpu, system = _since(start)
    return [_row("ddfs_scan", f"ddfs_from_transforms, GP+GL+LP+LL ({n} frames {h}x{w})", items=1, unit="scan",
                 seconds=wall, cpu_seconds=cpu, cpu_system_seconds=system, frames=n,
                 output_mib=sum(o.nbytes for o in outputs) / 2**20)]


def stage_evaluate(params):
    from speckle_rec.evaluate import evaluate

    dataset = open_dataset(params["data"])
    start = _clock()
    evaluate(dataset, [params["prediction"]], progress=False)
    wall, cpu, system = _since(start)
    n, h, w = dataset.scan(SCAN_KEY).shape()
    return [_row("evaluate", f"evaluate, transforms ({n} frames {h}x{w})", items=1, unit="scan", seconds=wall,
                 cpu_seconds=cpu, cpu_system_seconds=system, frames=n)]


def stage_predict_ddfs(params):
    import speckle_rec

    scan, frames = _read_scan(params)
    landmarks = scan.read_landmarks()
    calib = open_dataset(params["data"]).calibration_path
    # one warm-up call on a few frames loads the compiled kernels (the challenge times many scans in a row)
    speckle_rec.predict_ddfs(frames[:24], np.array([[1, 1, 1]]), str(calib))
    n, h, w = frames.shape
    full = (n, h, w) == (1600, 480, 640) and params["threads"] <= 2
    rows = []
    # the challenge's test.py calls predict_ddfs scan after scan in one process: the first call's 11.7 GB
    # of output is fresh memory (slow to hand out on this VM), the next call's is not
    for label in ("first scan", "next scan"):
        start = _clock()
        outputs = speckle_rec.predict_ddfs(frames, landmarks, str(calib))
        wall, cpu, system = _since(start)
        rows.append(_row("predict_ddfs", f"predict_ddfs end to end, {label} ({n} frames {h}x{w})", items=1,
                         unit="scan", seconds=wall, cpu_seconds=cpu, cpu_system_seconds=system, frames=n,
                         output_mib=sum(o.nbytes for o in outputs) / 2**20,
                         target=("seconds", "<=", 30.0) if full else None))
        del outputs
    return rows


STAGE_FUNCTIONS = {name: globals()[f"stage_{name}"] for name in STAGES}


def run_stage(name, params):
    """Body of a stage's child process: pin to ``threads`` cores, run, add CPU and peak memory."""
    if params.get("pin", True) and hasattr(os, "sched_setaffinity") and params["threads"] < available_cores():
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: params["threads"]])
    set_threads(params["threads"])
    rows = STAGE_FUNCTIONS[name](params)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    for row in rows:
        row["peak_rss_mib"] = peak_mib
    return rows


def run_in_child(name, params):
    """Run one stage in a fresh spawned process; returns (rows, error message or None)."""
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            return pool.submit(run_stage, name, params).result(), None
    except Exception as exc:  # noqa: BLE001 - a failing stage (or a killed child) must not hide the others
        return [], f"{exc.__class__.__name__}: {exc}"


def run_here(name, params):
    """Run one stage in this process (``--in-process``); returns (rows, error message or None)."""
    try:
        return run_stage(name, dict(params, pin=False)), None
    except Exception as exc:  # noqa: BLE001 - same reporting as run_in_child
        return [], f"{exc.__class__.__name__}: {exc}"


# ------------------------------------------------------------------------------------------ setup


def prepare_scan(root, *, n_frames, height, width, log):
    """A tracked rotation scan in the test layout under ``root`` (reused when it is already there)."""
    try:
        if open_dataset(root).scan(SCAN_KEY).shape() == (n_frames, height, width):
            log(f"reusing {root}")
            return 0.0
    except DataError:
        pass
    start = time.perf_counter()
    simulate_dataset(root, protocol="rotation", subjects=("000",), n_frames=n_frames, layout="test",
                     probe=Probe.fit_image(height, width), seed=0, hands=("LH",))
    seconds = time.perf_counter() - start
    log(f"simulated {root}: {n_frames} frames at {height}x{width} ({seconds:.0f} s)")
    return seconds


def write_identity_prediction(folder, n_frames):
    from speckle_rec.baselines import identity_transforms
    from speckle_rec.prediction import prediction_path, write_prediction

    subject, name = SCAN_KEY.split("/")
    write_prediction(prediction_path(folder, subject, name), global_transforms=identity_transforms(n_frames))


# ------------------------------------------------------------------------------------------ table


def derived(row):
    """Rates, wall and CPU ms per item (per frame for whole-scan stages), and whether a target is met."""
    per = row.get("frames") or row["items"]
    out = {"items_per_s": row["items"] / row["seconds"] if row["seconds"] > 0 else None,
           "per": "frame" if row.get("frames") else row["unit"],
           "wall_ms_per": 1e3 * row["seconds"] / per,
           "cpu_ms_per": None if row["cpu_seconds"] is None else 1e3 * row["cpu_seconds"] / per}
    target = row.get("target")
    if target:
        key, op, bound = target
        value = {"frames_per_s": out["items_per_s"], "pairs_per_s": out["items_per_s"], "seconds": row["seconds"],
                 "speedup": row.get("speedup")}[key]
        out["target_met"] = bool(value >= bound if op == ">=" else value <= bound)
    return out


def table_rows(rows):
    out = []
    for row in rows:
        unit = row["unit"]
        if unit == "scan":
            rate = f"{row['seconds']:.2f} s/scan"
        else:
            rate = "-" if row["items_per_s"] is None else f"{row['items_per_s']:.1f} {unit}s/s"
        note = f"{row['speedup']:.1f}x naive" if row.get("speedup") else ""
        if row.get("cpu_system_seconds") is not None and row["cpu_system_seconds"] >= 1.0:
            note = f"system CPU {row['cpu_system_seconds']:.1f} s"
        if row.get("target"):
            key, op, bound = row["target"]
            shown = {"frames_per_s": f"{bound:g} frames/s", "pairs_per_s": f"{bound:g} pairs/s",
                     "seconds": f"{bound:g} s", "speedup": f"{bound:g}x naive"}[key]
            note = (note + "; " if note else "") + f"target {op} {shown}: " + ("met" if row["target_met"] else "MISSED")
        items = f"{row['items']} {unit}" + ("s" if row["items"] != 1 else "")
        cpu = "-" if row["cpu_ms_per"] is None else f"{row['cpu_ms_per']:.2f}"
        out.append([row["stage"], row["what"], items, f"{row['seconds']:.2f}", rate, row["per"],
                    f"{row['wall_ms_per']:.2f}", cpu, f"{row['peak_rss_mib']:.0f}", note])
    return out


HEADERS = ["stage", "what", "items", "wall s", "rate", "per", "wall ms/per", "CPU ms/per", "peak RSS MiB", "note"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="cores / threads per stage (default 2)")
    parser.add_argument("--quick", action="store_true", help=f"small sizes: {QUICK}")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--frames", type=int, help=f"frames of the scan (default {FULL['frames']})")
    parser.add_argument("--height", type=int, help=f"image rows of the scan (default {FULL['height']})")
    parser.add_argument("--width", type=int, help=f"image columns of the scan (default {FULL['width']})")
    parser.add_argument("--sim-frames", type=int, help=f"frames rendered at 480x640 (default {FULL['sim_frames']})")
    parser.add_argument("--pair-frames", type=int, help=f"frames for measure_pairs (default {FULL['pair_frames']})")
    parser.add_argument("--ddf-frames", type=int, help=f"transforms for the DDF stages (default {FULL['ddf_frames']})")
    parser.add_argument("--repeats", type=int, help=f"DDF timings: best of (default {FULL['repeats']})")
    parser.add_argument("--work", metavar="DIR", help="keep / reuse the simulated scan here (default: temporary)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the stages in this process, not in fresh children (faster for a smoke test; peak "
                             "memory is then cumulative and compiled code carries over)")
    parser.add_argument("--json", metavar="FILE", help="write every number as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)} (known: {', '.join(STAGES)})")
    sizes = dict(QUICK if args.quick else FULL)
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    if sizes["frames"] < 20 or sizes["height"] < 64 or sizes["width"] < 64:
        parser.error("the scan needs at least 20 frames of 64x64")

    log = stderr_log(args.quiet)

    threads = set_threads(args.threads)
    machine = machine_info()
    started = time.perf_counter()
    with work_folder(args.work, "speckle_rec_speed_") as work:
        data = work / f"rotation_{sizes['height']}x{sizes['width']}_{sizes['frames']}"
        setup_s = prepare_scan(data, n_frames=sizes["frames"], height=sizes["height"], width=sizes["width"], log=log)
        prediction = work / "prediction_identity"
        write_identity_prediction(prediction, sizes["frames"])
        params = dict(sizes, threads=threads, data=str(data), prediction=str(prediction),
                      ddf_height=480 if not args.quick else sizes["height"],
                      ddf_width=640 if not args.quick else sizes["width"])
        rows, errors = [], {}
        for name in stages:
            log(f"stage {name} ...")
            start = time.perf_counter()
            stage_rows, error = (run_here if args.in_process else run_in_child)(name, params)
            if error:
                errors[name] = error
                log(f"stage {name} failed: {error}")
            rows += stage_rows
            log(f"stage {name}: {time.perf_counter() - start:.1f} s")
    naive = next((r for r in rows if r["stage"] == "ddf_naive"), None)
    for row in rows:
        if row["stage"] == "ddf" and naive is not None:
            row["speedup"] = naive["seconds"] / row["seconds"]
            full = (params["ddf_height"], params["ddf_width"]) == (480, 640) and params["ddf_frames"] >= 100
            row["target"] = ("speedup", ">=", 5.0) if full else None
        row.update(derived(row))
    load_end = load_average()
    where = "all in this process (--in-process)" if args.in_process else "each in a fresh process"
    print(describe(machine, load_end=load_end) + f"; {threads} thread(s) per stage, {where}")
    print(format_table(HEADERS, table_rows(rows)))
    for name, error in errors.items():
        print(f"stage {name} FAILED: {error}")
    print(f"scan: rotation protocol, {sizes['frames']} frames at {sizes['height']}x{sizes['width']} (setup "
          f"{setup_s:.0f} s, not timed); {time.perf_counter() - started:.0f} s in all")
    if args.json:
        write_json(args.json, {
            "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine, "load_average_end": load_end, "threads": threads, "sizes": sizes,
            "stages": stages, "in_process": args.in_process, "setup_s": setup_s, "rows": rows, "errors": errors,
            "seconds": time.perf_counter() - started})
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
