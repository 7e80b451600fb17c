"""Rigid transforms in the challenge's conventions (contract §3).

Column vectors, left multiplication. ``tforms[k]`` maps tool_k → camera, C (``image_to_tool``) maps
image-mm → tool. The image-mm transform taking frame ``i`` coordinates to frame ``j`` coordinates is
``C⁻¹ · F_j⁻¹ · F_i · C``. Arrays of N−1 transforms hold frame 1 in row 0.

- global transform of frame i: ``frame_to_first`` G_i = T_{0←i}
- local transform of frame i: ``frame_to_previous`` L_i = T_{i−1←i}; G_i = L_1 · … · L_i
"""

import numpy as np
from scipy.spatial.transform import Rotation

from .errors import DataError

RIGID_TOLERANCE = 1e-3  # tracker matrices stored as float32 are orthonormal to ~1e-6


def _as_matrices(matrices, *, name, source=None):
    try:
        array = np.asarray(matrices, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"expected numeric {name}", source) from None
    if array.ndim < 2 or array.shape[-2:] != (4, 4):
        raise DataError(f"expected {name} of shape (..., 4, 4), got {array.shape}", source)
    return array


def rigid_error(matrices):
    """Largest deviation of ``matrices`` (..., 4, 4) from rigid: ‖RᵀR − I‖∞, |det R − 1|, bottom row."""
    m = np.asarray(matrices, dtype=np.float64)
    if m.size == 0:
        return 0.0
    r = m[..., :3, :3]
    orth = np.abs(np.swapaxes(r, -1, -2) @ r - np.eye(3)).max()
    det = np.abs(np.linalg.det(r) - 1.0).max()
    bottom = np.abs(m[..., 3, :] - np.array([0.0, 0.0, 0.0, 1.0])).max()
    return float(max(orth, det, bottom))


def check_rigid(matrices, *, name="transforms", source=None, tolerance=RIGID_TOLERANCE):
    """Validate an array of rigid 4x4 matrices and return it as float64.

    Parameters
    ----------
    matrices : array_like, shape (..., 4, 4)
    name : str
        What the array is, for the error message (e.g. ``"tforms"``).
    source : str or Path, optional
        The file it came from, for the error message.
    tolerance : float
        Largest allowed deviation from orthonormality, unit determinant and a (0, 0, 0, 1) bottom row.

    Returns
    -------
    ndarray, shape (..., 4, 4), float64

    Raises
    ------
    DataError
        On a wrong shape, NaN/inf, or a matrix that is not rigid (the first bad index is named).
    """
    m = _as_matrices(matrices, name=name, source=source)
    finite = np.isfinite(m).all(axis=(-2, -1))
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        raise DataError(f"{name}[{', '.join(map(str, bad))}] contains NaN or inf", source)
    if m.size:
        r = m[..., :3, :3]
        dev = np.maximum(
            np.abs(np.swapaxes(r, -1, -2) @ r - np.eye(3)).max(axis=(-2, -1)),
            np.abs(np.linalg.det(r) - 1.0),
        )
        dev = np.maximum(dev, np.abs(m[..., 3, :] - np.array([0.0, 0.0, 0.0, 1.0])).max(axis=-1))
        if dev.max() > tolerance:
            bad = np.unravel_index(int(np.argmax(dev)), dev.shape)
            raise DataError(
                f"{name}[{', '.join(map(str, bad))}] is not a rigid transform "
                f"(deviation {dev.max():.2e} > {tolerance:g})",
                source,
            )
    return m


def invert_rigid(matrices):
    """Inverse of rigid 4x4 matrices (..., 4, 4) as [Rᵀ, −Rᵀt], float64."""
    m = np.asarray(matrices, dtype=np.float64)
    out = np.zeros_like(m)
    rt = np.swapaxes(m[..., :3, :3], -1, -2)
    out[..., :3, :3] = rt
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", rt, m[..., :3, 3])
    out[..., 3, 3] = 1.0
    return out


def transforms_from_tforms(tforms, image_to_tool, *, source=None):
    """Ground-truth image-mm transforms from tracker poses.

    Parameters
    ----------
    tforms : array_like, shape (N, 4, 4)
        Tool → camera pose of every frame (any float dtype; validated as rigid).
    image_to_tool : array_like, shape (4, 4)
        Calibration C, image-mm → tool.
    source : str or Path, optional
        File the poses came from, for error messages.

    Returns
    -------
    frame_to_first : ndarray, shape (N-1, 4, 4), float64
        G_i = C⁻¹ F_0⁻¹ F_i C for i = 1..N−1 (row i−1).
    frame_to_previous : ndarray, shape (N-1, 4, 4), float64
        L_i = C⁻¹ F_{i−1}⁻¹ F_i C for i = 1..N−1 (row i−1).
    """
    f = check_rigid(tforms, name="tforms", source=source)
    if f.ndim != 3:
        raise DataError(f"expected tforms of shape (N, 4, 4), got {f.shape}", source)
    if f.shape[0] < 2:
        raise DataError(f"expected at least 2 frames of tforms, got {f.shape[0]}", source)
    c = check_rigid(image_to_tool, name="image_to_tool")
    image_to_camera = f @ c  # frame-k image-mm → camera
    # A generic inverse, as the official code does: float32 tracker matrices are not exactly orthonormal.
    camera_to_image = np.linalg.inv(image_to_camera)
    frame_to_first = camera_to_image[0] @ image_to_camera[1:]
    frame_to_previous = camera_to_image[:-1] @ image_to_camera[1:]
    return frame_to_first, frame_to_previous


def globals_from_locals(frame_to_previous):
    """Chain local transforms: G_i = G_{i−1} · L_i with G_0 = I.

    Parameters
    ----------
    frame_to_previous : array_like, shape (N-1, 4, 4)

    Returns
    -------
    ndarray, shape (N-1, 4, 4), float64
    """
    local = _as_matrices(frame_to_previous, name="frame_to_previous")
    out = np.empty_like(local)
    current = np.eye(4)
    for i in range(local.shape[0]):
        current = current @ local[i]
        out[i] = current
    return out


def locals_from_globals(frame_to_first):
    """Local transforms that agree exactly with ``frame_to_first``: L_i = G_{i−1}⁻¹ · G_i.

    Parameters
    ----------
    frame_to_first : array_like, shape (N-1, 4, 4)

    Returns
    -------
    ndarray, shape (N-1, 4, 4), float64
    """
    g = _as_matrices(frame_to_first, name="frame_to_first")
    previous = np.concatenate([np.eye(4)[None], g[:-1]], axis=0)
    return invert_rigid(previous) @ g


def matrices_from_params(params):
    """Rigid matrices from 6-vectors (rotation vector in radians, translation in mm).

    Parameters
    ----------
    params : array_like, shape (..., 6)
        ``[rx, ry, rz, tx, ty, tz]``.

    Returns
    -------
    ndarray, shape (..., 4, 4), float64
    """
    p = np.asarray(params, dtype=np.float64)
    if p.shape[-1:] != (6,):
        raise DataError(f"expected params of shape (..., 6), got {p.shape}")
    flat = p.reshape(-1, 6)
    out = np.zeros((flat.shape[0], 4, 4))
    out[:, :3, :3] = Rotation.from_rotvec(flat[:, :3]).as_matrix()
    out[:, :3, 3] = flat[:, 3:]
    out[:, 3, 3] = 1.0
    return out.reshape(p.shape[:-1] + (4, 4))


def params_from_matrices(matrices):
    """Inverse of :func:`matrices_from_params`: (..., 4, 4) rigid → (..., 6) rotation vector + mm."""
    m = _as_matrices(matrices, name="matrices")
    flat = m.reshape(-1, 4, 4)
    out = np.empty((flat.shape[0], 6))
    out[:, :3] = Rotation.from_matrix(flat[:, :3, :3]).as_rotvec()
    out[:, 3:] = flat[:, :3, 3]
    return out.reshape(m.shape[:-2] + (6,))


__all__ = [
    "check_rigid",
    "globals_from_locals",
    "invert_rigid",
    "locals_from_globals",
    "matrices_from_params",
    "params_from_matrices",
    "rigid_error",
    "transforms_from_tforms",
]
