"""Reference predictions that every result is reported beside.

- identity: every frame at the first frame's pose (all DDFs zero); the 2025 score's zero point;
- constant velocity: the mean frame-to-frame motion of tracked (training) scans, applied at every
  frame and chained: what a scan looks like to a method that knows the protocol but not the images.
"""

import numpy as np

from .errors import DataError
from .transforms import globals_from_locals, matrices_from_params, params_from_matrices


def identity_transforms(n_frames):
    """(N−1, 4, 4) identity transforms (the all-zero DDF prediction)."""
    if n_frames < 2:
        raise DataError(f"expected at least 2 frames, got {n_frames}")
    return np.tile(np.eye(4), (n_frames - 1, 1, 1))


def mean_local_params(frame_to_previous_list):
    """Mean frame-to-frame motion over tracked scans, as a 6-vector (rotation vector rad, mm).

    Parameters
    ----------
    frame_to_previous_list : sequence of ndarray, each (N_s − 1, 4, 4)

    Returns
    -------
    ndarray, shape (6,), float64
    """
    params = [params_from_matrices(np.asarray(t)) for t in frame_to_previous_list]
    if not params:
        raise DataError("need at least one tracked scan for the constant-velocity prediction")
    return np.concatenate(params).mean(axis=0)


def constant_velocity_transforms(n_frames, local_params):
    """Global and local transforms of a scan moving by the same local transform every frame.

    Parameters
    ----------
    n_frames : int
    local_params : array_like, shape (6,)
        Frame-to-frame motion (see :func:`mean_local_params`).

    Returns
    -------
    frame_to_first, frame_to_previous : ndarray, shape (N−1, 4, 4), float64
    """
    local = np.tile(matrices_from_params(np.asarray(local_params, dtype=np.float64)), (n_frames - 1, 1, 1))
    return globals_from_locals(local), local
