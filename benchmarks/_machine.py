"""The machine a benchmark ran on: cores, memory, load average and library versions (shared by the scripts).

Benchmarks on the project's shared machines are only comparable with the load they ran under, so every
script prints :func:`describe` with its table and stores :func:`machine_info` in its JSON. The scripts'
other shared plumbing (progress lines, the work folder, the walk over data folders' scans, table
cells) lives here too.
"""

import argparse
import contextlib
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from speckle_rec.io import open_dataset
from speckle_rec.threads import set_threads


def machine_info():
    """Cores, memory (GiB), load average and the versions of Python, NumPy, SciPy, Numba, OpenCV."""
    import cv2
    import numba
    import numpy
    import scipy

    from speckle_rec.threads import available_cores

    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    return {
        "cores": available_cores(),
        "cpu_count": os.cpu_count(),
        "memory_gib": None if memory_gib is None else round(memory_gib, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "numba": numba.__version__,
        "opencv": cv2.__version__,
    }


def load_average():
    """1, 5 and 15 minute load averages, rounded."""
    return [round(v, 2) for v in os.getloadavg()]


def describe(info, *, load_end=None):
    """One line: cores, memory, load average (at start, and at the end when given), versions."""
    memory = f", {info['memory_gib']:.0f} GiB" if info.get("memory_gib") else ""
    load = "/".join(f"{v:.2f}" for v in info["load_average"])
    end = "" if load_end is None else f" (start), {'/'.join(f'{v:.2f}' for v in load_end)} (end)"
    return (f"machine: {info['cores']} core(s){memory}, load average {load}{end}; Python {info['python']}, "
            f"NumPy {info['numpy']}, SciPy {info['scipy']}, Numba {info['numba']}, OpenCV {info['opencv']}")


def stderr_log(quiet):
    """A ``log(line)`` printing progress lines on stderr, or nothing when ``quiet``."""

    def log(line):
        if not quiet:
            print(line, file=sys.stderr, flush=True)

    return log


def folder_parser(doc, *, model=True, json_help="write every per-scan number as JSON"):
    """The argument parser of a script run over tracked data folders (the script adds its own options).

    Positional ``data`` (one or more folders), ``--model`` (a calibration or model JSON, required;
    left out with ``model=False``), ``--threads`` (default 2), ``--json FILE`` and ``--quiet``. The
    description is the first line of ``doc``.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("data", nargs="+", help="tracked data folders (e.g. acc/data/<run>)")
    if model:
        parser.add_argument("--model", required=True, help="calibration or model JSON")
    parser.add_argument("--threads", type=int, default=2, help="Numba / OpenCV threads (default 2)")
    parser.add_argument("--json", metavar="FILE", help=json_help)
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def start_script(quiet, threads):
    """What a script's ``main()`` sets up first: ``(log, threads, machine, started)``.

    The :func:`stderr_log`, the thread count :func:`speckle_rec.threads.set_threads` applied, the
    :func:`machine_info` at the start and the ``time.perf_counter()`` clock.
    """
    return stderr_log(quiet), set_threads(threads), machine_info(), time.perf_counter()


def machine_line(machine, threads, load_end=None):
    """The line printed above a script's table: :func:`describe` with the load at the end (now, unless
    ``load_end`` is given) and the thread count."""
    load_end = load_average() if load_end is None else load_end
    return describe(machine, load_end=load_end) + f"; {threads} thread(s)"


@contextlib.contextmanager
def work_folder(path, prefix):
    """``Path(path)`` (kept), or with ``path`` None a temporary folder named ``prefix…``, removed on exit."""
    if path is not None:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        yield Path(name)


def scan_results(folders, measure, summary, log):
    """Yield ``(folder, {scan key: measure(scan, calibration)})`` for each tracked data folder in turn.

    ``log`` gets one progress line per scan, ``"<folder name> <scan key>: " + summary(numbers)``.
    A generator, so a caller's per-folder table rows follow that folder's progress lines.
    """
    for folder in folders:
        dataset = open_dataset(folder)
        calibration = dataset.calibration()
        per_scan = {}
        for scan in dataset.scans:
            numbers = per_scan[scan.key] = measure(scan, calibration)
            log(f"{Path(folder).name} {scan.key}: {summary(numbers)}")
        yield folder, per_scan


def mean_known(values):
    """Mean of the values that are not None (None if there are none)."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def cell(value, digits):
    """A table cell: ``value`` with ``digits`` decimals, or '-' if it is None or not finite."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"
