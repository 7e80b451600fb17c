"""Thread settings (speckle_rec.threads)."""

import cv2
import pytest

from speckle_rec.threads import opencv_threads


def test_opencv_threads_sets_the_count_inside_and_restores_it_after_an_error():
    before = cv2.getNumThreads()
    inner = 1 if before != 1 else 2
    with opencv_threads(inner):
        assert cv2.getNumThreads() == inner
    assert cv2.getNumThreads() == before
    with pytest.raises(RuntimeError), opencv_threads(inner):
        raise RuntimeError("tracking failed")
    assert cv2.getNumThreads() == before
