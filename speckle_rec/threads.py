"""One place to set how many threads Numba and OpenCV use, so parallel work never oversubscribes."""

import os
from contextlib import contextmanager


def available_cores():
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def set_threads(threads=None):
    """Use ``threads`` threads in Numba kernels and OpenCV (default: all cores of this process).

    Returns the number set.
    """
    import cv2
    import numba

    available = numba.config.NUMBA_NUM_THREADS
    if threads is None:
        threads = available_cores()
    threads = max(1, min(int(threads), available))
    numba.set_num_threads(threads)
    cv2.setNumThreads(threads)
    return threads


@contextmanager
def opencv_threads(threads):
    """Run OpenCV on ``threads`` threads inside the ``with`` block, then restore the previous count.

    The count is process-wide. A pool of Python workers that each call Lucas-Kanade on a few
    hundred points wants 1: OpenCV splitting every call as well puts workers × threads on the cores.
    """
    import cv2

    previous = cv2.getNumThreads()
    cv2.setNumThreads(int(threads))
    try:
        yield
    finally:
        cv2.setNumThreads(previous)
