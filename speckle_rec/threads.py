"""One place to set how many threads Numba and OpenCV use, so parallel work never oversubscribes."""

import os


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
