"""Numba kernels of the speckle renderer: arrays and scalars in, arrays out.

Polar grid: row i is range ``r_lo + i·dr`` from the probe's apex (mm), column j is beam angle
``t_lo + j·dt`` (radians, + towards image x); image-mm coordinates as in ``probe.py``. Complex
baseband (IQ) images are float32 arrays of shape (rows, columns, 2) (real, imaginary interleaved, so
a sample's two parts share a cache line).

Tissue arrays (float64, one row per item, built by ``render.py``):

- layers (nl, 4): top Z, bottom Z (mm), density (/mm³), rms amplitude
- vessels (nv, 7): axis point (3), unit axis direction (3), radius (mm)
- bone (0 or 1, 12): axis point (3), unit direction (3), radius, surface density (/mm²), coherent
  amplitude, diffuse rms amplitude, shadow amplitude factor, roughness depth (mm)
- regions (ng, 10): centre (3), semi-axes (3), density, rms amplitude, lattice spacing, lattice amplitude

Randomness is counter-based (splitmix64 finaliser on uint64 counters): scatterers of a cell come from
a key hashed from (cell ix, iy, iz, seed), the noise of a frame from (seed, frame index), so results
depend neither on the order of work nor on the number of threads.
"""

import math

import numba
import numpy as np
from numba import prange

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_KEY_X = np.uint64(0xD6E8FEB86659FD93)
_KEY_Y = np.uint64(0xA0761D6478BD642F)
_KEY_Z = np.uint64(0xE7037ED1A0B428DB)
_SALT_SEED = np.uint64(0x243F6A8885A308D3)
_SALT_NOISE = np.uint64(0x8BB84B93962EACC9)
_SALT_BONE = np.uint64(0x4B33A62ED433D4A3)
_SH1, _SH11, _SH22, _SH27, _SH30, _SH31, _SH32, _SH43 = (np.uint64(s) for s in (1, 11, 22, 27, 30, 31, 32, 43))
_LOW21 = np.uint64(0x1FFFFF)
_LOW32 = np.uint64(0xFFFFFFFF)
_EXP_SHIFT = np.int64(52)  # IEEE 754 double: 52 mantissa bits, exponent bias 1023
_MANTISSA = np.int64((1 << 52) - 1)
_EXP_ZERO = np.int64(1023 << 52)
_LN2 = math.log(2.0)
_UNIT21 = 1.0 / 2097152.0  # 2^-21: positions inside a cell to 1/2M of its edge (0.5 µm for 1 mm)
_UNIT32 = 1.0 / 4294967296.0  # 2^-32
_UNIT53 = 1.0 / 9007199254740992.0  # 2^-53
_SQRT3 = math.sqrt(3.0)
_TAN_PI_8 = math.tan(math.pi / 8)
# Reflectors farther than _CUT·b from the image plane are ignored: 2.6 b ≈ 3 σ of the NCC curve, where
# the amplitude weight is 3.4 % (0.1 % of the echo power lies beyond).
_CUT = 2.6
_E_CUT = -0.5 * _CUT * _CUT
_SHADOW_RAMP_MM = 0.5  # the shadow sets in over half a millimetre below the bone surface
# Fast-math flags that keep inf/NaN semantics (r_hit uses inf): reciprocal, contraction, reassociation.
# All kernels use error_model='numpy' (no ZeroDivisionError checks), which lets loops vectorise.
_FAST = {'nsz', 'arcp', 'contract', 'afn', 'reassoc'}


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def mix64(z):
    """splitmix64 finaliser: a bijective avalanche of a uint64."""
    z = (z ^ (z >> _SH30)) * _MIX1
    z = (z ^ (z >> _SH27)) * _MIX2
    return z ^ (z >> _SH31)


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def seed_key(seed):
    """uint64 key of a tissue seed (int >= 0)."""
    return mix64(np.uint64(seed) + _SALT_SEED)


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def cell_key(ix, iy, iz, key):
    """uint64 key of cell (ix, iy, iz) (any int64, negative ones wrap) under ``key``."""
    h = mix64(key + np.uint64(ix) * _KEY_X)
    h = mix64(h + np.uint64(iy) * _KEY_Y)
    return mix64(h + np.uint64(iz) * _KEY_Z)


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def stream(key, counter):
    """uint64 number ``counter`` (>= 0) of the random stream ``key``."""
    return mix64(key + np.uint64(counter + 1) * _GOLDEN)


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def uniform(key, counter):
    """Uniform float64 in [0, 1): number ``counter`` of the stream ``key`` (53 bits)."""
    return float(stream(key, counter) >> _SH11) * _UNIT53


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def unit3(h):
    """Three uniforms in [0, 1) from the top 63 bits of ``h`` (21 bits each)."""
    # via int64: a signed conversion to float is one instruction, an unsigned one is not
    return (float(np.int64(h >> _SH43)) * _UNIT21, float(np.int64((h >> _SH22) & _LOW21)) * _UNIT21,
            float(np.int64((h >> _SH1) & _LOW21)) * _UNIT21)


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def unit2(h):
    """Two uniforms in [0, 1) from the high and low 32 bits of ``h``."""
    return float(np.int64(h >> _SH32)) * _UNIT32, float(np.int64(h & _LOW32)) * _UNIT32


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def poisson(mean, u):
    """Poisson(mean) count by inversion of the uniform ``u`` (mean up to a few hundred)."""
    p = math.exp(-mean)
    cdf = p
    k = 0
    while u > cdf and k < 1000:
        k += 1
        p *= mean / k
        cdf += p
    return k


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def fast_atan2(y, x):
    """atan2(y, x) to 2e-7 rad: octant reduction, then the Taylor series on |t| <= tan(π/8)."""
    ax, ay = abs(x), abs(y)
    if ax == 0.0 and ay == 0.0:
        return 0.0
    swap = ay > ax
    t = ax / ay if swap else ay / ax
    base = 0.0
    if t > _TAN_PI_8:
        t = (t - 1.0) / (t + 1.0)
        base = 0.25 * math.pi
    s = t * t
    a = base + t * (1.0 + s * (-1.0 / 3.0 + s * (1.0 / 5.0 + s * (-1.0 / 7.0 + s * (
        1.0 / 9.0 + s * (-1.0 / 11.0 + s * (1.0 / 13.0 - s / 15.0)))))))
    if swap:
        a = 0.5 * math.pi - a
    if x < 0.0:
        a = math.pi - a
    return -a if y < 0.0 else a


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def beam_angle(dx, dy, r):
    """atan2(dx, dy) given r = hypot(dx, dy), to 3e-7 rad.

    Half-angle form 2·atan(dx / (r + dy)): within ±45° of the beam axis the series needs no branch,
    which matters in the per-scatterer loop; other angles take ``fast_atan2``.
    """
    denom = r + dy
    if denom <= 0.0 or abs(dx) > _TAN_PI_8 * denom:
        return fast_atan2(dx, dy)
    t = dx / denom
    s = t * t
    return 2.0 * t * (1.0 + s * (-1.0 / 3.0 + s * (1.0 / 5.0 + s * (-1.0 / 7.0 + s * (
        1.0 / 9.0 + s * (-1.0 / 11.0 + s * (1.0 / 13.0 - s / 15.0)))))))


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def fast_cis(phase):
    """(cos, sin) of ``phase`` (rad, any size) to 1e-9: reduce to a turn, series of the half angle."""
    turns = phase * (0.5 / math.pi)
    h = math.pi * (turns - math.floor(turns + 0.5))  # half of the reduced angle, in [-π/2, π/2)
    s = h * h
    sh = h * (1.0 + s * (-1.0 / 6.0 + s * (1.0 / 120.0 + s * (-1.0 / 5040.0 + s * (1.0 / 362880.0 + s * (
        -1.0 / 39916800.0 + s * (1.0 / 6227020800.0 - s / 1307674368000.0)))))))
    ch = 1.0 + s * (-0.5 + s * (1.0 / 24.0 + s * (-1.0 / 720.0 + s * (1.0 / 40320.0 + s * (
        -1.0 / 3628800.0 + s * (1.0 / 479001600.0 - s / 87178291200.0))))))
    return ch * ch - sh * sh, 2.0 * sh * ch


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def splat_iq(r, theta, amplitude, r_lo, dr, t_lo, dt, two_k, iq):
    """Deposit point echoes onto a polar IQ grid with bilinear (sub-sample) weights.

    Each echo is ``amplitude·exp(-i·two_k·r)``: the baseband phase of a reflector at range ``r`` (the
    carrier is demodulated, so the phase varies smoothly with the reflector's position and the pulse
    envelope left to apply is real). Echoes outside the grid's interior are dropped.

    Parameters
    ----------
    r, theta, amplitude : ndarray, shape (m,), float64
        Range from the apex (mm), beam angle (rad) and real amplitude of each echo.
    r_lo, dr, t_lo, dt : float
        Polar grid origin and steps (mm, rad).
    two_k : float
        Round-trip wavenumber 4π/λ (rad/mm).
    iq : ndarray, shape (rows, columns, 2), float32
        Accumulated in place.
    """
    for s in range(r.size):
        _splat(r[s], theta[s], amplitude[s], r_lo, dr, t_lo, dt, two_k, iq)


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def _splat(r, theta, amplitude, r_lo, dr, t_lo, dt, two_k, iq):
    c, s = fast_cis(two_k * r)
    _splat_at((r - r_lo) / dr, (theta - t_lo) / dt, amplitude * c, -amplitude * s, iq)


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def _splat_at(fr, ft, re, im, iq):
    """Bilinear deposit of the complex echo (re, im) at fractional grid position (row fr, column ft)."""
    if not (0.0 <= fr < iq.shape[0] - 1 and 0.0 <= ft < iq.shape[1] - 1):
        return
    i0 = int(fr)
    j0 = int(ft)
    fi = fr - i0
    fj = ft - j0
    w = (1.0 - fi) * (1.0 - fj)
    iq[i0, j0, 0] += w * re
    iq[i0, j0, 1] += w * im
    w = (1.0 - fi) * fj
    iq[i0, j0 + 1, 0] += w * re
    iq[i0, j0 + 1, 1] += w * im
    w = fi * (1.0 - fj)
    iq[i0 + 1, j0, 0] += w * re
    iq[i0 + 1, j0, 1] += w * im
    w = fi * fj
    iq[i0 + 1, j0 + 1, 0] += w * re
    iq[i0 + 1, j0 + 1, 1] += w * im


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def _excluded(px, py, pz, vessels, bone):
    """True inside a vessel lumen or the bone (no scatterers there)."""
    for v in range(vessels.shape[0]):
        dx = px - vessels[v, 0]
        dy = py - vessels[v, 1]
        dz = pz - vessels[v, 2]
        t = dx * vessels[v, 3] + dy * vessels[v, 4] + dz * vessels[v, 5]
        if dx * dx + dy * dy + dz * dz - t * t < vessels[v, 6] * vessels[v, 6]:
            return True
    if bone.shape[0] > 0:
        dx = px - bone[0, 0]
        dy = py - bone[0, 1]
        dz = pz - bone[0, 2]
        t = dx * bone[0, 3] + dy * bone[0, 4] + dz * bone[0, 5]
        if dx * dx + dy * dy + dz * dz - t * t < bone[0, 6] * bone[0, 6]:
            return True
    return False


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def _in_region(px, py, pz, regions, g):
    x, y, z = px - regions[g, 0], py - regions[g, 1], pz - regions[g, 2]
    if abs(x) >= regions[g, 3] or abs(y) >= regions[g, 4] or abs(z) >= regions[g, 5]:
        return False
    x /= regions[g, 3]
    y /= regions[g, 4]
    z /= regions[g, 5]
    return x * x + y * y + z * z < 1.0


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def tissue_at(px, py, pz, layers, vessels, bone, regions):
    """(density /mm³, rms amplitude) of the random scatterers at a world point (0, 0 where none)."""
    if _excluded(px, py, pz, vessels, bone):
        return 0.0, 0.0
    for g in range(regions.shape[0] - 1, -1, -1):
        if _in_region(px, py, pz, regions, g):
            return regions[g, 6], regions[g, 7]
    for m in range(layers.shape[0] - 1, -1, -1):
        if layers[m, 0] <= pz < layers[m, 1]:
            return layers[m, 2], layers[m, 3]
    return 0.0, 0.0


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def _region_cover(x0, y0, z0, c, regions, g):
    """How region g's ellipsoid meets the cell [x0, x0+c)³: 0 apart, 1 partly, 2 containing it.

    Exact for an axis-aligned ellipsoid: scaled by its semi-axes the cell stays a box and the ellipsoid
    becomes the unit ball; compare the box's nearest and farthest points with the ball.
    """
    near = 0.0
    far = 0.0
    for a, lo in ((0, x0), (1, y0), (2, z0)):
        u = (lo - regions[g, a]) / regions[g, 3 + a]
        v = (lo + c - regions[g, a]) / regions[g, 3 + a]
        if u > 0.0:
            near += u * u
        elif v < 0.0:
            near += v * v
        far += max(u * u, v * v)
    if near >= 1.0:
        return 0
    return 2 if far < 1.0 else 1


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def _density_bound(x0, y0, z0, c, layers, regions):
    """Largest scatterer density anywhere in the cell [x0, x0+c) x [y0, y0+c) x [z0, z0+c)."""
    lam = 0.0
    for m in range(layers.shape[0]):
        if layers[m, 0] < z0 + c and layers[m, 1] > z0:
            lam = max(lam, layers[m, 2])
    for g in range(regions.shape[0]):
        if _region_cover(x0, y0, z0, c, regions, g) > 0:
            lam = max(lam, regions[g, 6])
    return lam


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def _axis_distance(cx, cy, cz, axis):
    """Distance of a point from the line through axis[0:3] along the unit vector axis[3:6]."""
    dx, dy, dz = cx - axis[0], cy - axis[1], cz - axis[2]
    t = dx * axis[3] + dy * axis[4] + dz * axis[5]
    return math.sqrt(max(0.0, dx * dx + dy * dy + dz * dz - t * t))


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def _cell_tissue(x0, y0, z0, c, layers, vessels, bone, regions):
    """(density, amplitude) if the cell [x0, x0+c)³ is one tissue; (0, 0) if it lies inside a vessel
    or the bone; else (density bound, -1): classify each point.

    One tissue: no vessel or bone surface crosses the cell's circumscribed sphere, and either the
    highest-priority region meeting the cell contains it, or no region meets it and a single layer
    wins over its whole depth range.
    """
    cx, cy, cz = x0 + 0.5 * c, y0 + 0.5 * c, z0 + 0.5 * c
    reach = 0.5 * math.sqrt(3.0) * c
    mixed = False
    for v in range(vessels.shape[0]):
        d = _axis_distance(cx, cy, cz, vessels[v])
        if d + reach < vessels[v, 6]:
            return 0.0, 0.0
        mixed |= d - reach < vessels[v, 6]
    if bone.shape[0] > 0:
        d = _axis_distance(cx, cy, cz, bone[0])
        if d + reach < bone[0, 6]:
            return 0.0, 0.0
        mixed |= d - reach < bone[0, 6]
    if not mixed:
        for g in range(regions.shape[0] - 1, -1, -1):  # the last region present in the cell wins
            cover = _region_cover(x0, y0, z0, c, regions, g)
            if cover == 2:
                return regions[g, 6], regions[g, 7]
            if cover == 1:
                return _density_bound(x0, y0, z0, c, layers, regions), -1.0
        for m in range(layers.shape[0] - 1, -1, -1):  # the last layer present in the cell wins
            if layers[m, 0] < z0 + c and layers[m, 1] > z0:
                if layers[m, 0] <= z0 and layers[m, 1] >= z0 + c:
                    return layers[m, 2], layers[m, 3]
                break
    return _density_bound(x0, y0, z0, c, layers, regions), -1.0


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def shadow_ranges(image_to_world, bone, apex_x, apex_y, t_lo, dt, out):
    """Range (mm from the apex) at which each beam line first meets the bone; inf if it never does.

    Parameters
    ----------
    image_to_world : ndarray, shape (4, 4), float64
    bone : ndarray, shape (0 or 1, 12), float64
    apex_x, apex_y, t_lo, dt : float
        Apex (image-mm) and beam angles ``t_lo + j·dt`` (rad).
    out : ndarray, shape (columns,), float64
        Filled.
    """
    out[:] = np.inf
    if bone.shape[0] == 0:
        return
    m = image_to_world
    ox = m[0, 0] * apex_x + m[0, 1] * apex_y + m[0, 3] - bone[0, 0]
    oy = m[1, 0] * apex_x + m[1, 1] * apex_y + m[1, 3] - bone[0, 1]
    oz = m[2, 0] * apex_x + m[2, 1] * apex_y + m[2, 3] - bone[0, 2]
    ax, ay, az, radius = bone[0, 3], bone[0, 4], bone[0, 5], bone[0, 6]
    t = ox * ax + oy * ay + oz * az
    wx, wy, wz = ox - t * ax, oy - t * ay, oz - t * az  # apex offset across the bone axis
    for j in range(out.size):
        theta = t_lo + j * dt
        sn, cs = math.sin(theta), math.cos(theta)
        dx = m[0, 0] * sn + m[0, 1] * cs
        dy = m[1, 0] * sn + m[1, 1] * cs
        dz = m[2, 0] * sn + m[2, 1] * cs
        t = dx * ax + dy * ay + dz * az
        dx, dy, dz = dx - t * ax, dy - t * ay, dz - t * az
        qa = dx * dx + dy * dy + dz * dz
        if qa < 1e-12:
            continue
        qb = 2.0 * (wx * dx + wy * dy + wz * dz)
        qc = wx * wx + wy * wy + wz * wz - radius * radius
        disc = qb * qb - 4.0 * qa * qc
        if disc < 0.0:
            continue
        root = math.sqrt(disc)
        far = (-qb + root) / (2.0 * qa)
        if far > 0.0:
            out[j] = max(0.0, (-qb - root) / (2.0 * qa))


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def _width2(depth, focus, width2_focus, inv_growth):
    u = (depth - focus) * inv_growth
    return width2_focus * (1.0 + u * u)


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def _visible(cx, cy, cz, half_diagonal, z_reach, w2i, apex_x, apex_y, face_radius, r_lo, r_hi, sides, elev_focus,
             elev_b2_focus, elev_inv_growth):
    """Can a ball of ``half_diagonal`` about world point c hold a reflector the frame sees?

    ``z_reach`` (<= half_diagonal) bounds the ball's, or a tighter shape's, extent along the image
    normal; ``sides`` = (cos, sin) of the first and the last beam angle.
    """
    dx = w2i[0, 0] * cx + w2i[0, 1] * cy + w2i[0, 2] * cz + w2i[0, 3] - apex_x
    dy = w2i[1, 0] * cx + w2i[1, 1] * cy + w2i[1, 2] * cz + w2i[1, 3] - apex_y
    r = math.sqrt(dx * dx + dy * dy)
    if r + half_diagonal < r_lo or r - half_diagonal > r_hi:
        return False
    # outside the fan's side lines by more than the ball's radius (the lines are rays from the apex)
    if dy > -half_diagonal:
        if dx * sides[2] - dy * sides[3] > half_diagonal:
            return False
        if dy * sides[1] - dx * sides[0] > half_diagonal:
            return False
    # the beam width is convex in depth, so its largest value over the ball is at an end
    b2 = max(_width2(r - half_diagonal - face_radius, elev_focus, elev_b2_focus, elev_inv_growth),
             _width2(r + half_diagonal - face_radius, elev_focus, elev_b2_focus, elev_inv_growth))
    qz = w2i[2, 0] * cx + w2i[2, 1] * cy + w2i[2, 2] * cz + w2i[2, 3]
    return abs(qz) <= _CUT * math.sqrt(b2) + z_reach


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def _project(px, py, pz, w2i, apex_x, apex_y, face_radius, half_thickness, elev_focus, elev_b2_focus,
             elev_inv_growth):
    """(range, beam angle, elevational amplitude weight) of a world point; weight 0 beyond the cut."""
    qz = w2i[2, 0] * px + w2i[2, 1] * py + w2i[2, 2] * pz + w2i[2, 3]
    if abs(qz) > half_thickness:
        return 0.0, 0.0, 0.0
    dx = w2i[0, 0] * px + w2i[0, 1] * py + w2i[0, 2] * pz + w2i[0, 3] - apex_x
    dy = w2i[1, 0] * px + w2i[1, 1] * py + w2i[1, 2] * pz + w2i[1, 3] - apex_y
    r = math.sqrt(dx * dx + dy * dy)
    b2 = _width2(r - face_radius, elev_focus, elev_b2_focus, elev_inv_growth)
    if qz * qz > _CUT * _CUT * b2:
        return 0.0, 0.0, 0.0
    return r, beam_angle(dx, dy, r), math.exp(-0.5 * qz * qz / b2)


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def _shadow_at(r, ft, r_hit, shadow_factor):
    """Amplitude factor of the bone's shadow at range r on fractional beam ft: 1 above the bone,
    ``shadow_factor`` below (after a short ramp)."""
    j = int(ft + 0.5)
    if j < 0 or j >= r_hit.size:
        return 1.0
    excess = r - r_hit[j]
    if excess <= 0.0:
        return 1.0
    return 1.0 - (1.0 - shadow_factor) * min(1.0, excess / _SHADOW_RAMP_MM)


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def deposit_frame(world_to_image, image_to_world, key, cell_mm, layers, vessels, bone, regions, apex_x, apex_y,
                  face_radius, r_lo, dr, t_lo, dt, two_k, elev_focus, elev_b_focus, elev_growth, iq):
    """Accumulate the IQ echoes of every reflector the frame's elevational beam reaches.

    Only cells crossing the slab ``|z| <= 2.6·b_max`` about the image plane inside the polar grid's
    bounding box are visited: the world axis closest to the plane normal is the column axis, and each
    column's cell range is solved from the slab inequality. A cell's scatterers: a Poisson count of
    mean ``density bound · cell volume``, uniform positions, thinned to the local density (only in cells
    that straddle a boundary; elsewhere the bound is the density); two hashed uint64 per scatterer
    (position; thinning and amplitude). Scatterers are projected in batches (``_tissue_echoes``).

    Parameters
    ----------
    world_to_image, image_to_world : ndarray, shape (4, 4), float64
        The frame's pose and its inverse (world mm ↔ image-mm).
    key : uint64
        ``seed_key(tissue seed)``.
    cell_mm : float
    layers, vessels, bone, regions : ndarray, float64
        Tissue arrays (module docstring).
    apex_x, apex_y, face_radius : float
        Probe apex (image-mm) and face radius (mm).
    r_lo, dr, t_lo, dt : float
        Polar grid of ``iq`` (mm, rad).
    two_k : float
        4π/λ (rad/mm).
    elev_focus, elev_b_focus, elev_growth : float
        Elevational amplitude weight width ``b(depth) = b_focus·sqrt(1 + ((depth − focus)/growth)²)``.
    iq : ndarray, shape (rows, columns, 2), float32
        IQ grid, accumulated in place.
    """
    w2i = world_to_image
    i2w = image_to_world
    nrp, ntp = iq.shape[0], iq.shape[1]
    c = cell_mm
    r_hi = r_lo + (nrp - 1) * dr
    t_hi = t_lo + (ntp - 1) * dt
    b2f = elev_b_focus * elev_b_focus
    inv_g = 1.0 / elev_growth
    half = _CUT * math.sqrt(max(_width2(r_lo - face_radius, elev_focus, b2f, inv_g),
                               _width2(r_hi - face_radius, elev_focus, b2f, inv_g)))
    r_hit = np.empty(ntp)
    shadow_ranges(i2w, bone, apex_x, apex_y, t_lo, dt, r_hit)
    shadow_factor = bone[0, 10] if bone.shape[0] > 0 else 1.0

    # world corners and bounding box of the slab around the polar grid
    t_max = min(max(abs(t_lo), abs(t_hi)), 0.5 * math.pi)
    xs = (apex_x - r_hi * math.sin(t_max), apex_x + r_hi * math.sin(t_max))
    ys = (apex_y + r_lo * math.cos(t_max), apex_y + r_hi)
    corners = np.empty((8, 3))
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    m = 0
    for x in xs:
        for y in ys:
            for z in (-half, half):
                for a in range(3):
                    v = i2w[a, 0] * x + i2w[a, 1] * y + i2w[a, 2] * z + i2w[a, 3]
                    corners[m, a] = v
                    lo[a] = min(lo[a], v)
                    hi[a] = max(hi[a], v)
                m += 1
    clo = np.empty(3, np.int64)
    chi = np.empty(3, np.int64)
    for a in range(3):
        clo[a] = int(math.floor(lo[a] / c))
        chi[a] = int(math.floor(hi[a] / c))
    clo[2] = max(clo[2], 0)  # nothing above the skin

    normal = np.array((w2i[2, 0], w2i[2, 1], w2i[2, 2]))
    n0 = w2i[2, 3]
    k = int(np.argmax(np.abs(normal)))
    i = (k + 1) % 3
    j = (k + 2) % 3
    idx = np.empty(3, np.int64)
    cell_half = 0.5 * math.sqrt(3.0) * c
    cell_depth = 0.5 * c * (abs(normal[0]) + abs(normal[1]) + abs(normal[2]))  # cube's half-extent along the normal
    volume = c * c * c
    sides = np.array((math.cos(t_lo), math.sin(t_lo), math.cos(t_hi), math.sin(t_hi)))
    buf = np.empty((6, 4096))  # scatterers waiting for _tissue_echoes
    proj = np.empty((5, 4096))
    n = 0
    for ci in range(clo[i], chi[i] + 1):
        si0, si1 = normal[i] * ci * c, normal[i] * (ci + 1) * c
        for cj in range(clo[j], chi[j] + 1):
            sj0, sj1 = normal[j] * cj * c, normal[j] * (cj + 1) * c
            # |n_k p_k + s + n0| <= half for some s over the column's cross-section
            a_lo = -half - n0 - (max(si0, si1) + max(sj0, sj1))
            a_hi = half - n0 - (min(si0, si1) + min(sj0, sj1))
            if normal[k] > 0:
                p_lo, p_hi = a_lo / normal[k], a_hi / normal[k]
            else:
                p_lo, p_hi = a_hi / normal[k], a_lo / normal[k]
            k0 = max(clo[k], int(math.floor(p_lo / c)))
            k1 = min(chi[k], int(math.floor(p_hi / c)))
            for ck in range(k0, k1 + 1):
                idx[i] = ci
                idx[j] = cj
                idx[k] = ck
                ix, iy, iz = idx[0], idx[1], idx[2]
                if iz < 0:
                    continue
                x0, y0, z0 = ix * c, iy * c, iz * c
                if not _visible(x0 + 0.5 * c, y0 + 0.5 * c, z0 + 0.5 * c, cell_half, cell_depth, w2i, apex_x,
                                apex_y, face_radius, r_lo, r_hi, sides, elev_focus, b2f, inv_g):
                    continue
                lam, amplitude = _cell_tissue(x0, y0, z0, c, layers, vessels, bone, regions)
                if lam > 0.0:
                    ck_key = cell_key(ix, iy, iz, key)
                    count = poisson(lam * volume, uniform(ck_key, 0))
                    if n + count > buf.shape[1]:
                        _tissue_echoes(n, buf, proj, w2i, apex_x, apex_y, face_radius, elev_focus, b2f, inv_g, two_k,
                                       layers, vessels, bone, regions, r_lo, dr, t_lo, dt, r_hit, shadow_factor, iq)
                        n = 0
                        if count > buf.shape[1]:
                            buf = np.empty((6, count))
                            proj = np.empty((5, count))
                    for s in range(count):
                        fx, fy, fz = unit3(stream(ck_key, 2 * s + 1))
                        keep, strength = unit2(stream(ck_key, 2 * s + 2))
                        buf[0, n] = x0 + c * fx
                        buf[1, n] = y0 + c * fy
                        buf[2, n] = z0 + c * fz
                        buf[3, n] = keep * lam
                        buf[4, n] = amplitude * _SQRT3 * strength
                        buf[5, n] = _SQRT3 * strength
                        n += 1
                for g in range(regions.shape[0]):
                    if regions[g, 8] > 0.0 and _region_cover(x0, y0, z0, c, regions, g) > 0:
                        _lattice_echoes(x0, y0, z0, c, g, regions, vessels, bone, w2i, apex_x, apex_y, face_radius,
                                        r_lo, dr, t_lo, dt, two_k, half, elev_focus, b2f, inv_g, r_hit,
                                        shadow_factor, iq)
    _tissue_echoes(n, buf, proj, w2i, apex_x, apex_y, face_radius, elev_focus, b2f, inv_g, two_k, layers, vessels, bone,
                   regions, r_lo, dr, t_lo, dt, r_hit, shadow_factor, iq)
    if bone.shape[0] > 0:
        _bone_echoes(corners, key, c, bone, w2i, apex_x, apex_y, face_radius, r_lo, r_hi, dr, t_lo, sides, dt,
                     two_k, half, elev_focus, b2f, inv_g, iq)


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def _exp_neg(x):
    """exp(x) for -4.5 <= x <= 0 to 2e-7 (relative): Taylor of exp(x/8), then three squarings."""
    y = 0.125 * x
    p = 1.0 + y * (1.0 + y * (1.0 / 2.0 + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0 + y * (
        1.0 / 720.0 + y * (1.0 / 5040.0 + y / 40320.0)))))))
    p *= p
    p *= p
    return p * p


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def _tissue_echoes(n, buf, proj, w2i, apex_x, apex_y, face_radius, elev_focus, b2f, inv_g, two_k, layers, vessels,
                   bone, regions, r_lo, dr, t_lo, dt, r_hit, shadow_factor, iq):
    """Project and splat the first ``n`` random scatterers queued in ``buf``.

    ``buf`` rows: 0-2 world position, 3 thinning draw x density bound, 4 amplitude (negative: mixed
    cell, classify the point), 5 amplitude draw. ``proj`` (5 rows) is scratch. The first loop is
    branch-free (polynomial angle, exponential and phase; selects for culling) so that it vectorises;
    the survivors' indices are then packed without branches and splatted.
    """
    a00, a01, a02, a03 = w2i[0, 0], w2i[0, 1], w2i[0, 2], w2i[0, 3] - apex_x
    a10, a11, a12, a13 = w2i[1, 0], w2i[1, 1], w2i[1, 2], w2i[1, 3] - apex_y
    a20, a21, a22, a23 = w2i[2, 0], w2i[2, 1], w2i[2, 2], w2i[2, 3]
    offset = face_radius + elev_focus
    inv_dr = 1.0 / dr
    inv_dt = 1.0 / dt
    px, py, pz = buf[0], buf[1], buf[2]
    ww, fr, ft, cr, ci = proj[0], proj[1], proj[2], proj[3], proj[4]
    for q in range(n):
        x, y, z = px[q], py[q], pz[q]
        qz = a20 * x + a21 * y + a22 * z + a23
        dx = a00 * x + a01 * y + a02 * z + a03
        dy = a10 * x + a11 * y + a12 * z + a13
        r = math.sqrt(dx * dx + dy * dy)
        u = (r - offset) * inv_g
        e = -0.5 * qz * qz / (b2f * (1.0 + u * u))
        # beam angle 2·atan(t), t = dx / (r + dy); |t| <= tan(π/8) within ±45°, further out is culled
        t = dx / (r + dy)
        s = t * t
        theta = 2.0 * t * (1.0 + s * (-1.0 / 3.0 + s * (1.0 / 5.0 + s * (-1.0 / 7.0 + s * (
            1.0 / 9.0 + s * (-1.0 / 11.0 + s * (1.0 / 13.0 - s / 15.0)))))))
        w = _exp_neg(max(e, _E_CUT))
        w = w if e >= _E_CUT else 0.0
        w = w if dy > 0.0 else 0.0
        ww[q] = w if abs(t) <= _TAN_PI_8 else 0.0
        fr[q] = (r - r_lo) * inv_dr
        ft[q] = (theta - t_lo) * inv_dt
        c, sn = fast_cis(two_k * r)
        cr[q] = c
        ci[q] = -sn
    survivors = np.empty(n, np.int64)
    m = 0
    for q in range(n):
        survivors[m] = q
        m += ww[q] > 0.0
    for k in range(m):
        q = survivors[k]
        a = buf[4, q]
        if a < 0.0:  # mixed cell: classify the point, thin to its density
            density, strength = tissue_at(px[q], py[q], pz[q], layers, vessels, bone, regions)
            if buf[3, q] >= density:
                continue
            a = strength * buf[5, q]
        a *= ww[q]
        if shadow_factor < 1.0:
            a *= _shadow_at(r_lo + fr[q] * dr, ft[q], r_hit, shadow_factor)
        _splat_at(fr[q], ft[q], a * cr[q], a * ci[q], iq)


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def _lattice_echoes(x0, y0, z0, c, g, regions, vessels, bone, w2i, apex_x, apex_y, face_radius, r_lo, dr, t_lo,
                    dt, two_k, half, elev_focus, b2f, inv_g, r_hit, shadow_factor, iq):
    """Echoes of the coherent lattice points of region ``g`` inside the cell at (x0, y0, z0)."""
    step = regions[g, 8]
    amplitude = regions[g, 9]
    px = regions[g, 0] + math.ceil((x0 - regions[g, 0]) / step) * step
    while px < x0 + c:
        py = regions[g, 1] + math.ceil((y0 - regions[g, 1]) / step) * step
        while py < y0 + c:
            pz = regions[g, 2] + math.ceil((z0 - regions[g, 2]) / step) * step
            while pz < z0 + c:
                if _in_region(px, py, pz, regions, g) and not _excluded(px, py, pz, vessels, bone):
                    r, theta, weight = _project(px, py, pz, w2i, apex_x, apex_y, face_radius, half, elev_focus,
                                                b2f, inv_g)
                    if weight > 0.0:
                        weight *= amplitude * _shadow_at(r, (theta - t_lo) / dt, r_hit, shadow_factor)
                        _splat(r, theta, weight, r_lo, dr, t_lo, dt, two_k, iq)
                pz += step
            py += step
        px += step


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def _bone_echoes(corners, key, c, bone, w2i, apex_x, apex_y, face_radius, r_lo, r_hi, dr, t_lo, sides, dt, two_k,
                 half, elev_focus, b2f, inv_g, iq):
    """Echoes of the reflectors on the bone's upper half-surface, generated in (axial, angular) cells."""
    cx, cy, cz = bone[0, 0], bone[0, 1], bone[0, 2]
    ax, ay, az = bone[0, 3], bone[0, 4], bone[0, 5]
    radius = bone[0, 6]
    # u: towards the skin across the axis (-Z made orthogonal to the axis), v = axis × u
    ux, uy, uz = az * ax, az * ay, az * az - 1.0
    norm = math.sqrt(ux * ux + uy * uy + uz * uz)
    if norm < 1e-9:  # vertical bone: any direction across it will do
        ux, uy, uz, norm = 1.0, 0.0, 0.0, 1.0
    ux, uy, uz = ux / norm, uy / norm, uz / norm
    vx, vy, vz = ay * uz - az * uy, az * ux - ax * uz, ax * uy - ay * ux
    n_phi = max(1, int(math.ceil(math.pi * radius / c)))
    dphi = math.pi / n_phi
    arc = radius * dphi
    rough = bone[0, 11]
    cell_half = 0.5 * math.sqrt(c * c + arc * arc) + radius * (1.0 - math.cos(0.5 * dphi)) + rough
    s_lo, s_hi = np.inf, -np.inf
    for m in range(8):
        s = (corners[m, 0] - cx) * ax + (corners[m, 1] - cy) * ay + (corners[m, 2] - cz) * az
        s_lo = min(s_lo, s)
        s_hi = max(s_hi, s)
    bone_key = mix64(key ^ _SALT_BONE)
    mean = bone[0, 7] * c * arc
    coherent, diffuse = bone[0, 8], bone[0, 9] * _SQRT3
    for i_s in range(int(math.floor(s_lo / c)), int(math.floor(s_hi / c)) + 1):
        for i_p in range(n_phi):
            s = (i_s + 0.5) * c
            phi = -0.5 * math.pi + (i_p + 0.5) * dphi
            cp, sp = radius * math.cos(phi), radius * math.sin(phi)
            if not _visible(cx + s * ax + cp * ux + sp * vx, cy + s * ay + cp * uy + sp * vy,
                            cz + s * az + cp * uz + sp * vz, cell_half, cell_half, w2i, apex_x, apex_y,
                            face_radius, r_lo, r_hi, sides, elev_focus, b2f, inv_g):
                continue
            ck_key = cell_key(i_s, i_p, 0, bone_key)
            for q in range(poisson(mean, uniform(ck_key, 0))):
                fs, fp, fd = unit3(stream(ck_key, 2 * q + 1))
                fa, _ = unit2(stream(ck_key, 2 * q + 2))
                s = (i_s + fs) * c
                phi = -0.5 * math.pi + (i_p + fp) * dphi
                depth = radius - rough * fd  # a rough cortex: reflectors spread just under the surface
                cp, sp = depth * math.cos(phi), depth * math.sin(phi)
                pz = cz + s * az + cp * uz + sp * vz
                if pz < 0.0:
                    continue
                r, theta, weight = _project(cx + s * ax + cp * ux + sp * vx, cy + s * ay + cp * uy + sp * vy, pz,
                                            w2i, apex_x, apex_y, face_radius, half, elev_focus, b2f, inv_g)
                if weight > 0.0:
                    _splat(r, theta, weight * (coherent + diffuse * (2.0 * fa - 1.0)), r_lo, dr, t_lo, dt, two_k,
                           iq)


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def convolve_psf(iq, axial_w, lateral_w, lateral_half, out):
    """Apply the in-plane PSF: 'valid' separable convolution, axial then lateral (per-row kernel).

    Parameters
    ----------
    iq : ndarray, shape (rows + 2·ka, cols + 2·kt, 2), float32
        Splatted IQ on the padded polar grid.
    axial_w : ndarray, shape (2·ka + 1,), float32
        Real pulse envelope over range offsets -ka..ka (baseband, so no carrier term).
    lateral_w : ndarray, shape (rows, 2·kt + 1), float32
        Beam profile of each output row over beam offsets -kt..kt (its width in beams varies with
        range: the lateral σ in mm changes with depth and the beam spacing grows with range).
    lateral_half : ndarray, shape (rows,), int64
        Taps used per row (<= kt); weights beyond are ignored.
    out : ndarray, shape (rows, cols, 2), float32
        Filled: ``out[i, j] = Σ_a Σ_l axial_w[a]·lateral_w[i, l]·iq[i + a, j + l]``.
    """
    ka = (axial_w.size - 1) // 2
    kt = (lateral_w.shape[1] - 1) // 2
    rows = out.shape[0]
    width = 2 * iq.shape[1]
    out_width = 2 * out.shape[1]
    src = iq.reshape(iq.shape[0], width)  # real and imaginary parts filter alike: work on flat rows
    dst = out.reshape(rows, out_width)
    row = np.empty(width, np.float32)
    for i in range(rows):
        row[:] = 0.0
        for a in range(2 * ka + 1):
            w = axial_w[a]
            above = src[i + a]
            for j in range(width):
                row[j] += w * above[j]
        line = dst[i]
        line[:] = 0.0
        h = lateral_half[i]
        for b in range(kt - h, kt + h + 1):
            w = lateral_w[i, b]
            shifted = row[2 * b:2 * b + out_width]
            for j in range(out_width):
                line[j] += w * shifted[j]


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def noise_key(key, frame):
    """uint64 key of the electronic noise of frame number ``frame`` (int >= 0)."""
    return mix64((key ^ _SALT_NOISE) + np.uint64(frame) * _GOLDEN)


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def detect(iq, row_gain, noise_rms, key, level_db, dynamic_range_db, out):
    """Envelope detection with gain, electronic noise and log compression to the 0..255 gray scale.

    ``out = clip(255/DR·(10·log10|g·IQ + n|² + level_db + DR), 0, 255)`` with ``g = row_gain[i]`` and
    complex noise ``n`` of rms ``noise_rms[i]`` (uniform real and imaginary parts, hashed from ``key``
    and the sample index).

    Parameters
    ----------
    iq : ndarray, shape (rows, cols, 2), float32
    row_gain, noise_rms : ndarray, shape (rows,), float32
    key : uint64
        ``noise_key(...)`` of the frame.
    level_db, dynamic_range_db : float
    out : ndarray, shape (rows, cols), float32
        Filled with gray levels in [0, 255].
    """
    rows, cols = iq.shape[0], iq.shape[1]
    scale = 2550.0 / (dynamic_range_db * math.log(10.0))  # gray levels per neper of power
    offset = 255.0 * (level_db + dynamic_range_db) / dynamic_range_db
    power = np.empty(cols)
    bits = power.view(np.int64)
    mantissa_bits = np.empty(cols, np.int64)
    mantissa = mantissa_bits.view(np.float64)
    exponent = np.empty(cols)
    for i in range(rows):
        g = row_gain[i]
        spread = 2.0 * _SQRT3 * noise_rms[i] / math.sqrt(2.0)  # width of a uniform of rms noise_rms/√2
        first = np.uint64(i * cols + 1)
        for j in range(cols):
            h = mix64(key + (first + np.uint64(j)) * _GOLDEN)
            x = g * iq[i, j, 0] + spread * (float(np.int64(h >> _SH32)) * _UNIT32 - 0.5)
            y = g * iq[i, j, 1] + spread * (float(np.int64(h & _LOW32)) * _UNIT32 - 0.5)
            power[j] = x * x + y * y + 1e-30
        # natural log by hand (exponent bits + series of the mantissa) so that the loops vectorise
        for j in range(cols):
            exponent[j] = float((bits[j] >> _EXP_SHIFT) - 1023)
            mantissa_bits[j] = (bits[j] & _MANTISSA) | _EXP_ZERO
        for j in range(cols):
            m = mantissa[j]  # in [1, 2)
            t = (m - 1.0) / (m + 1.0)  # ln m = 2·atanh(t), 0 <= t < 1/3
            t2 = t * t
            ln_m = 2.0 * t * (1.0 + t2 * (1.0 / 3.0 + t2 * (1.0 / 5.0 + t2 * (1.0 / 7.0 + t2 * (
                1.0 / 9.0 + t2 * (1.0 / 11.0 + t2 / 13.0))))))
            v = scale * (exponent[j] * _LN2 + ln_m) + offset
            out[i, j] = min(255.0, max(0.0, v))


@numba.njit(parallel=True, cache=True, fastmath=_FAST, error_model='numpy')
def render_polar(world_to_image, image_to_world, frame_ids, seed, cell_mm, layers, vessels, bone, regions, apex_x,
                 apex_y, face_radius, r_lo, dr, t_lo, dt, two_k, elev_focus, elev_b_focus, elev_growth, axial_w,
                 lateral_w, lateral_half, row_gain, noise_rms, level_db, dynamic_range_db, out):
    """Log-compressed polar B-mode images of a batch of frames, in parallel over frames.

    Parameters
    ----------
    world_to_image, image_to_world : ndarray, shape (n, 4, 4), float64
    frame_ids : ndarray, shape (n,), int64
        Seeds each frame's noise (with ``seed``).
    seed : int
        Tissue seed.
    cell_mm, layers, vessels, bone, regions, apex_x, apex_y, face_radius, two_k, elev_* :
        As in ``deposit_frame``.
    r_lo, dr, t_lo, dt : float
        Padded polar grid: ``rows + 2·ka`` ranges from ``r_lo``, ``cols + 2·kt`` angles from ``t_lo``.
    axial_w, lateral_w, lateral_half : ndarray
        In-plane PSF (``convolve_psf``).
    row_gain, noise_rms, level_db, dynamic_range_db :
        As in ``detect``.
    out : ndarray, shape (n, rows, cols), float32
        Gray levels of the unpadded polar grid (ranges ``r_lo + ka·dr`` ..., angles ``t_lo + kt·dt`` ...).
    """
    n, rows, cols = out.shape
    padded_rows = rows + axial_w.size - 1
    padded_cols = cols + lateral_w.shape[1] - 1
    key = seed_key(seed)
    for f in prange(n):
        iq = np.zeros((padded_rows, padded_cols, 2), np.float32)
        deposit_frame(world_to_image[f], image_to_world[f], key, cell_mm, layers, vessels, bone, regions, apex_x,
                      apex_y, face_radius, r_lo, dr, t_lo, dt, two_k, elev_focus, elev_b_focus, elev_growth, iq)
        filtered = np.empty((rows, cols, 2), np.float32)
        convolve_psf(iq, axial_w, lateral_w, lateral_half, filtered)
        detect(filtered, row_gain, noise_rms, noise_key(key, frame_ids[f]), level_db, dynamic_range_db, out[f])


@numba.njit(cache=True, fastmath=_FAST, error_model='numpy')
def scan_conversion_maps(spacing_x, spacing_y, apex_x, apex_y, r0, dr, t0, dt, map_x, map_y):
    """Source coordinates in a polar image of every pixel of a Cartesian image (for cv2.remap).

    Pixel (row i, column j) sits at image-mm ((j+1)·sx, (i+1)·sy) (1-based contract pixels); its polar
    column is ``(θ − t0)/dt`` and row ``(r − r0)/dr`` with r, θ about the apex (θ + towards x).

    Parameters
    ----------
    spacing_x, spacing_y, apex_x, apex_y : float
        Pixel spacing (mm) and apex (image-mm).
    r0, dr, t0, dt : float
        Polar image: row i at range ``r0 + i·dr``, column j at angle ``t0 + j·dt``.
    map_x, map_y : ndarray, shape (height, width), float32
        Filled with the polar column and row coordinates.
    """
    height, width = map_x.shape
    for i in range(height):
        dy = spacing_y * (i + 1) - apex_y
        for j in range(width):
            dx = spacing_x * (j + 1) - apex_x
            map_x[i, j] = (math.atan2(dx, dy) - t0) / dt
            map_y[i, j] = (math.sqrt(dx * dx + dy * dy) - r0) / dr
