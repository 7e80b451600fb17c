"""Numba kernels for displacement fields and their errors (arrays and scalars only).

Pixel order (contract §3.1): flat index k = (y − 1)·W + (x − 1) with 1-based column x and row y; the
image-mm point is q = (sx·x, sy·y, 0). For a rigid T = [R t], the displacement is
(R − I)·q + t = x·sx·(R − I)[:, 0] + y·sy·(R − I)[:, 1] + t, affine in (x, y).
The Python layer (ddf.py, metrics.py) validates and converts before calling these.
"""

import math

import numba
import numpy as np
from numba import prange


@numba.njit(cache=True, parallel=True)
def pixel_ddf_kernel(transforms, sx, sy, height, width, out):
    """out[i, :, (y−1)·W + (x−1)] = (T_i·q − q)[:3]; transforms (n,4,4) f64, out (n,3,H·W) f32."""
    for i in prange(transforms.shape[0]):
        t = transforms[i]
        ax0, ax1, ax2 = (t[0, 0] - 1.0) * sx, t[1, 0] * sx, t[2, 0] * sx
        ay0, ay1, ay2 = t[0, 1] * sy, (t[1, 1] - 1.0) * sy, t[2, 1] * sy
        ox, oy, oz = out[i, 0], out[i, 1], out[i, 2]
        for y in range(1, height + 1):
            c0, c1, c2 = ay0 * y + t[0, 3], ay1 * y + t[1, 3], ay2 * y + t[2, 3]
            base = (y - 1) * width
            for x in range(1, width + 1):
                ox[base + x - 1] = ax0 * x + c0
                oy[base + x - 1] = ax1 * x + c1
                oz[base + x - 1] = ax2 * x + c2


@numba.njit(cache=True)
def landmark_ddf_kernel(transforms, landmarks, sx, sy, out):
    """out[:, m] = (T_f·q_m − q_m)[:3], f = landmarks[m, 0], transforms row f − 1; out (3, K) f32."""
    for m in range(landmarks.shape[0]):
        t = transforms[landmarks[m, 0] - 1]
        qx, qy = sx * landmarks[m, 1], sy * landmarks[m, 2]
        for a in range(3):
            value = t[a, 0] * qx + t[a, 1] * qy + t[a, 3]
            if a == 0:
                value -= qx
            elif a == 1:
                value -= qy
            out[a, m] = value


@numba.njit(cache=True, parallel=True, fastmath=True)
def transform_pixel_error_kernel(true_transforms, pred_transforms, sx, sy, height, width, out):
    """out[i] = mean over pixels of ‖(T_true,i − T_pred,i)·q‖ (the DDF difference), float64.

    No dense field is materialised: the difference of two displacements is affine in (x, y).
    """
    for i in prange(true_transforms.shape[0]):
        d = true_transforms[i] - pred_transforms[i]
        ax0, ax1, ax2 = d[0, 0] * sx, d[1, 0] * sx, d[2, 0] * sx
        ay0, ay1, ay2 = d[0, 1] * sy, d[1, 1] * sy, d[2, 1] * sy
        total = 0.0
        for y in range(1, height + 1):
            c0, c1, c2 = ay0 * y + d[0, 3], ay1 * y + d[1, 3], ay2 * y + d[2, 3]
            row = 0.0
            for x in range(1, width + 1):
                e0, e1, e2 = ax0 * x + c0, ax1 * x + c1, ax2 * x + c2
                row += math.sqrt(e0 * e0 + e1 * e1 + e2 * e2)
            total += row
        out[i] = total / (height * width)


@numba.njit(cache=True, parallel=True, fastmath=True)
def ddf_error_kernel(true_ddf, pred_ddf, out):
    """out[i] = mean over k of ‖true_ddf[i, :, k] − pred_ddf[i, :, k]‖; inputs (n, 3, P) f32."""
    n_points = true_ddf.shape[2]
    for i in prange(true_ddf.shape[0]):
        total = 0.0
        for k in range(n_points):
            e0 = np.float64(true_ddf[i, 0, k]) - np.float64(pred_ddf[i, 0, k])
            e1 = np.float64(true_ddf[i, 1, k]) - np.float64(pred_ddf[i, 1, k])
            e2 = np.float64(true_ddf[i, 2, k]) - np.float64(pred_ddf[i, 2, k])
            total += math.sqrt(e0 * e0 + e1 * e1 + e2 * e2)
        out[i] = total / n_points
