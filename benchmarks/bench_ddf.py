"""DDF generation and transform-based metrics: speckle_rec's Numba kernels vs naive NumPy.

Usage: python benchmarks/bench_ddf.py [--frames 400] [--metric-frames 1600] [--repeats 3] [--json FILE]

Prints a table of ms per frame and peak traced memory (tracemalloc sees NumPy's allocations) for:
- naive NumPy: the contract formula vectorised over the scan, (T @ P)[:, :3] − P[:3] with P the
  (4, H·W) homogeneous pixel grid, in float64 (NumPy's default) then cast to the float32 DDF;
- the same in float32 throughout (as the official torch code computes it; BLAS sgemm);
- speckle_rec into a reused buffer (``pixel_ddfs(..., out=buf)``);
- speckle_rec allocating its output (``pixel_ddfs(...)``);
and the time of GPE from transforms (no dense field) for a full-length scan. Ratios are from one run.
"""

import argparse
import json
import time
import tracemalloc

import numpy as np

from speckle_rec.calibration import Calibration
from speckle_rec.ddf import PixelGrid, pixel_ddfs
from speckle_rec.metrics import pixel_error_from_transforms
from speckle_rec.threads import set_threads
from speckle_rec.transforms import matrices_from_params


def naive(transforms, grid):
    points = grid.points_mm()
    return ((transforms @ points)[:, :3, :] - points[:3]).astype(np.float32)


def naive_float32(transforms, grid):
    points = grid.points_mm().astype(np.float32)
    return (transforms.astype(np.float32) @ points)[:, :3, :] - points[:3]


def measure(fn, repeats):
    """Best wall time over ``repeats``, the CPU time (all threads) of that call, and the peak traced memory
    of one call, as ``{"seconds", "cpu_seconds", "peak_bytes"}``."""
    fn()  # warm up (Numba compilation is cached, page-in of code)
    best, best_cpu = np.inf, np.inf
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        if wall < best:
            best, best_cpu = wall, cpu
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"seconds": best, "cpu_seconds": best_cpu, "peak_bytes": peak}


def random_transforms(n_frames, seed=0):
    """(n, 4, 4) rigid transforms of a few degrees and millimetres (the inputs of every method)."""
    rng = np.random.default_rng(seed)
    return matrices_from_params(rng.normal(scale=[0.1, 0.1, 0.1, 5, 5, 5], size=(n_frames, 6)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--metric-frames", type=int, default=1600)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    rng = np.random.default_rng(1)
    grid = PixelGrid.from_calibration(Calibration.default(), args.height, args.width)
    transforms = random_transforms(args.frames)
    output_bytes = args.frames * 3 * grid.n_pixels * 4
    buffer = np.empty((args.frames, 3, grid.n_pixels), np.float32)

    rows = {}
    rows["naive NumPy (float64 -> float32)"] = measure(lambda: naive(transforms, grid), args.repeats)
    rows["NumPy float32 (official style)"] = measure(lambda: naive_float32(transforms, grid), args.repeats)
    rows["speckle_rec, reused buffer"] = measure(lambda: pixel_ddfs(transforms, grid, out=buffer), args.repeats)
    rows["speckle_rec, allocating"] = measure(lambda: pixel_ddfs(transforms, grid), args.repeats)
    np.testing.assert_allclose(pixel_ddfs(transforms, grid), naive(transforms, grid), atol=2e-3)

    truth = matrices_from_params(rng.normal(scale=[0.1, 0.1, 0.1, 5, 5, 5], size=(args.metric_frames, 6)))
    pred = truth @ matrices_from_params(rng.normal(scale=0.01, size=(args.metric_frames, 6)))
    metric_time = measure(lambda: pixel_error_from_transforms(truth, pred, grid), args.repeats)["seconds"]

    base = rows["naive NumPy (float64 -> float32)"]["seconds"]
    print(f"DDF generation: {args.frames} frames at {args.height}x{args.width}, {threads} thread(s); "
          f"output {output_bytes / 2**20:.0f} MiB")
    print(f"{'method':36s} {'ms/frame':>9s} {'vs naive':>9s} {'peak MiB':>9s} {'peak/output':>12s}")
    result = {"frames": args.frames, "height": args.height, "width": args.width, "threads": threads,
              "output_mib": output_bytes / 2**20, "methods": {}}
    for name, row in rows.items():
        seconds, peak = row["seconds"], row["peak_bytes"]
        print(f"{name:36s} {1e3 * seconds / args.frames:9.3f} {base / seconds:8.1f}x {peak / 2**20:9.0f} "
              f"{peak / output_bytes:12.3f}")
        result["methods"][name] = {"ms_per_frame": 1e3 * seconds / args.frames, "speedup": base / seconds,
                                   "peak_mib": peak / 2**20}
    print(f"GPE from transforms, {args.metric_frames} frames: {metric_time:.3f} s "
          f"({1e3 * metric_time / args.metric_frames:.3f} ms/frame, no dense field)")
    result["metric_from_transforms_s"] = metric_time
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
