"""Run a per-scan task over a data folder into a prediction folder.

Shared by ``reconstruct`` (our method) and ``predict`` (any challenge ``predict_ddfs``): finished
scans are skipped on a rerun (prediction files are written atomically, so a file that exists is
complete), a failing scan is reported without stopping the others, optional worker processes.
"""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import h5py

from .errors import DataError, SpeckleRecError
from .prediction import DDF_KEYS, prediction_path
from .progress import progress_bar
from .threads import available_cores, set_threads


@dataclass
class BatchSummary:
    """Scan keys done (with wall time in s), skipped as already finished, and failed (with the message)."""

    done: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)


def is_finished(path, *, keys):
    """Whether ``path`` is a readable prediction file holding every dataset in ``keys``."""
    try:
        with h5py.File(path, "r") as handle:
            return set(keys) <= set(handle.keys())
    except OSError:
        return False


def _attempt(task, scan, path):
    try:
        return task(scan, path), None
    except SpeckleRecError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - one failing scan must not stop the others
        return None, f"{exc.__class__.__name__}: {exc}"


def run_scans(dataset, out_dir, task, *, finished_keys, jobs=1, threads=None, overwrite=False, progress=True,
              desc="scans"):
    """Apply ``task(scan, out_path) -> wall_time_s`` to every scan not finished yet.

    Parameters
    ----------
    dataset : speckle_rec.io.Dataset
    out_dir : str or Path
        Prediction folder; scan files are ``out_dir/<subject>/<scan>.h5``.
    task : callable
        Writes one scan's prediction file; must be picklable when ``jobs > 1``.
    finished_keys : sequence of str
        Datasets a file must hold to count as finished.
    jobs : int
        Scans at once, each in its own (spawned) process.
    threads : int, optional
        Numba / OpenCV threads per job (default: the cores divided among the jobs).
    overwrite : bool
        Redo finished scans.
    progress : bool
    desc : str
        Progress bar label.

    Returns
    -------
    BatchSummary
    """
    if jobs < 1:
        raise DataError(f"expected jobs >= 1, got {jobs}")
    threads = max(1, available_cores() // jobs) if threads is None else threads
    summary = BatchSummary()
    todo = []
    for scan in dataset.scans:
        path = prediction_path(out_dir, scan.subject, scan.name)
        if not overwrite and is_finished(path, keys=finished_keys):
            summary.skipped.append(scan.key)
        else:
            todo.append((scan, path))

    def record(key, wall, error):
        if error is None:
            summary.done[key] = wall
        else:
            summary.failed[key] = error
            bar.write(f"failed: {key}: {error}")
        bar.update(1)

    with progress_bar(total=len(todo), desc=desc, unit="scan", enabled=progress) as bar:
        if jobs == 1 or len(todo) <= 1:
            set_threads(threads)
            for scan, path in todo:
                record(scan.key, *_attempt(task, scan, path))
        else:
            context = multiprocessing.get_context("spawn")  # no fork once Numba's threads have started
            with ProcessPoolExecutor(jobs, mp_context=context, initializer=set_threads, initargs=(threads,)) as pool:
                futures = {pool.submit(_attempt, task, scan, path): scan.key for scan, path in todo}
                for future in as_completed(futures):
                    record(futures[future], *future.result())
    return summary


TRANSFORM_KEYS = ("global_transforms", "local_transforms")
ALL_KEYS = TRANSFORM_KEYS + DDF_KEYS
