"""Frames per second of the speckle renderer at 480 x 640 with 1 and 2 threads, and a sample frame.

Usage: python benchmarks/bench_simulate.py [PNG] [--frames N]

Renders a short freehand-like sweep over the default forearm (the first call compiles or loads the
Numba kernels and is not timed), prints a table, and writes one frame (transverse view: vessels, bone
with shadow) to PNG (default benchmarks/simulated_frame.png).
"""

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from speckle_rec.simulate.probe import Probe
from speckle_rec.simulate.render import render_frames
from speckle_rec.simulate.tissue import Tissue


def sweep(probe, n):
    """Transverse probe on the skin near the origin, sliding along the arm and tilting slowly."""
    poses = np.empty((n, 4, 4))
    contact = probe.contact_point_mm
    for k in range(n):
        tilt = np.radians(3.0) * np.sin(k / 10.0)
        c, s = np.cos(tilt), np.sin(tilt)
        # image x → world Y, image y → world Z (beam down), image normal → world X; tilt about image x
        rotation = np.column_stack([[0.0, 1.0, 0.0], [s, 0.0, c], [c, 0.0, -s]])
        poses[k] = np.eye(4)
        poses[k, :3, :3] = rotation
        poses[k, :3, 3] = np.array([0.3 * k, 0.0, 0.0]) - rotation @ contact
    return poses


def time_render(poses, *, probe, tissue, threads):
    """Wall and CPU seconds (all threads) to render ``poses``; CPU time shows the cost on shared cores."""
    start, cpu = time.perf_counter(), time.process_time()
    render_frames(poses, probe=probe, tissue=tissue, threads=threads)
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("png", nargs="?", default=str(Path(__file__).with_name("simulated_frame.png")))
    parser.add_argument("--frames", type=int, default=24, help="frames per timed run (default 24)")
    args = parser.parse_args(argv)

    probe = Probe()
    tissue = Tissue.forearm()
    poses = sweep(probe, args.frames)
    frames = render_frames(poses[:2], probe=probe, tissue=tissue)  # compile / load the kernels
    print(f"{'threads':>7}  {'frames':>6}  {'seconds':>8}  {'frames/s':>8}  {'CPU ms/frame':>12}")
    for threads in (1, 2):
        elapsed, cpu = time_render(poses, probe=probe, tissue=tissue, threads=threads)
        print(f"{threads:>7}  {args.frames:>6}  {elapsed:>8.2f}  {args.frames / elapsed:>8.1f}  "
              f"{1000 * cpu / args.frames:>12.1f}")
    if not cv2.imwrite(args.png, frames[0]):
        print(f"bench_simulate: error: cannot write {args.png}", file=sys.stderr)
        return 1
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
