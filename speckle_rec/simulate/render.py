"""Render B-mode frames of the procedural tissue seen from given probe poses (speckle physics).

Pipeline per frame (kernels in ``_render_kernels.py``, parallel over frames):

1. Reflectors: the point scatterers of every world cell within 2.6 b (≈ 3 σ) of the image plane (plus
   coherent lattices and the bone's surface), each weighted by the elevational amplitude profile
   ``exp(-z²/2b(depth)²)`` and, below the bone, by its acoustic shadow.
2. Complex baseband (IQ) accumulation on the probe's polar (range, beam angle) grid with bilinear
   splatting and phase ``exp(-i·2k·r)``.
3. In-plane PSF: real Gaussian pulse envelope in range, Gaussian beam profile across beams whose width
   follows ``Beam.lateral_sigma_mm(depth)``.
4. Envelope with time-gain compensation (normalised so the reference tissue has the same mean echo at
   every depth, then ``Beam.depth_gain_db_per_cm``), electronic noise amplified by the compensation,
   log compression of ``Beam.dynamic_range_db`` onto 0..255.
5. Scan conversion to the probe's Cartesian pixel grid (``cv2.remap``, linear) and the fan mask.

Sign of in-plane motion: with ``image_to_world' = image_to_world · T(dx, dy, 0)`` (the probe moved by
+dx along its image x axis and +dy along y) a fixed tissue point's image-mm coordinates drop by
(dx, dy), so the content moves by (−dx/sx, −dy/sy) pixels (columns, rows).
"""

import math
from functools import lru_cache

import cv2
import numba
import numpy as np

from ..errors import DataError
from ..transforms import check_rigid, invert_rigid
from . import _render_kernels as kernels
from .probe import Probe
from .tissue import Beam, Tissue


@lru_cache(maxsize=8)
def _tissue_arrays(tissue):
    layers = np.array([[l.top_mm, l.bottom_mm, l.density_per_mm3, l.amplitude] for l in tissue.layers],
                      dtype=np.float64).reshape(-1, 4)
    vessels = np.array([[*v.point_mm, *v.direction, v.radius_mm] for v in tissue.vessels],
                       dtype=np.float64).reshape(-1, 7)
    bone = np.zeros((0, 12))
    if tissue.bone is not None:
        b = tissue.bone
        bone = np.array([[*b.point_mm, *b.direction, b.radius_mm, b.surface_density_per_mm2, b.amplitude,
                          b.diffuse_amplitude, 10.0 ** (b.shadow_db / 20.0), b.roughness_mm]], dtype=np.float64)
    regions = np.array([[*g.center_mm, *g.radii_mm, g.density_per_mm3, g.amplitude, g.lattice_mm,
                         g.lattice_amplitude] for g in tissue.regions], dtype=np.float64).reshape(-1, 10)
    for a in (layers, vessels, bone, regions):
        a.setflags(write=False)
    return layers, vessels, bone, regions


class _Setup:
    """Per (probe, beam): polar grid, PSF kernels, gains, noise levels and scan-conversion maps."""

    def __init__(self, probe, beam):
        radius, depth, half = probe.radius_mm, probe.depth_mm, probe.half_angle_rad
        self.rows = int(round(depth / beam.range_step_mm)) + 1
        self.cols = int(math.ceil(2 * half * (radius + depth) / beam.line_spacing_mm)) + 1
        self.dr = depth / (self.rows - 1)
        self.dt = 2 * half / (self.cols - 1)
        ka = int(math.ceil(3 * beam.axial_sigma_mm / self.dr))
        self.axial_w = np.exp(-0.5 * (np.arange(-ka, ka + 1) * self.dr / beam.axial_sigma_mm) ** 2).astype(np.float32)

        ranges = radius + self.dr * np.arange(self.rows)
        depths = ranges - radius
        lateral = beam.lateral_sigma_mm(depths)
        self.lateral_half = np.ceil(3 * lateral / (ranges * self.dt)).astype(np.int64)
        kt = int(self.lateral_half.max())
        offsets = (np.arange(-kt, kt + 1)[None, :] * self.dt) * ranges[:, None]
        self.lateral_w = np.exp(-0.5 * (offsets / lateral[:, None]) ** 2).astype(np.float32)
        self.r_lo = radius - ka * self.dr
        self.t_lo = -half - kt * self.dt
        if -self.t_lo > math.pi / 4:  # the vectorised beam-angle series covers ±45°
            raise DataError(
                f"the fan (half-angle {math.degrees(half):.1f}°) plus the lateral beam blur near a "
                f"{radius:.1f} mm face spans {math.degrees(-self.t_lo):.1f}° > 45°: use a larger image or a "
                "smaller half-angle"
            )

        # The mean echo intensity of unit-density, unit-amplitude tissue (∫w² ∫h_axial² ∫h_lateral²
        # = π^1.5 b σa σl) is divided out: the reference tissue looks the same at every depth (ideal
        # time-gain compensation).
        b = beam.elevation_weight_width_mm(depths)
        depth_gain_db = beam.depth_gain_db_per_cm * depths / 10.0
        self.row_gain = 10.0 ** (depth_gain_db / 20.0) / np.sqrt(math.pi**1.5 * b * beam.axial_sigma_mm * lateral)
        attenuation_db = 2.0 * beam.attenuation_db_cm_mhz * probe.center_frequency_mhz * depths / 10.0
        self.noise_rms = (10.0 ** ((beam.noise_db + attenuation_db + depth_gain_db) / 20.0)).astype(np.float32)
        self.elevation = (beam.focus_depth_mm, beam.elevation_weight_width_mm(beam.focus_depth_mm),
                          beam.sigma_growth_mm)
        self.two_k = 4 * math.pi / probe.wavelength_mm

        sx, sy = probe.spacing_mm
        self.apex = probe.apex_mm
        self.map_x = np.empty((probe.height, probe.width), np.float32)
        self.map_y = np.empty((probe.height, probe.width), np.float32)
        kernels.scan_conversion_maps(sx, sy, self.apex[0], self.apex[1], radius, self.dr, -half, self.dt,
                                     self.map_x, self.map_y)
        self.mask_u8 = np.where(probe.fan_mask(), np.uint8(255), np.uint8(0))
        for a in (self.axial_w, self.lateral_w, self.lateral_half, self.noise_rms, self.map_x, self.map_y,
                  self.mask_u8):
            a.setflags(write=False)


@lru_cache(maxsize=8)
def _setup(probe, beam):
    return _Setup(probe, beam)


def _check_type(name, value, kind):
    if not isinstance(value, kind):
        raise DataError(f"expected {name} as a {kind.__name__}, got {type(value).__name__}")
    return value


def render_frames(image_to_world, *, probe=None, tissue=None, beam=None, first_frame=0, out=None, threads=None):
    """Simulate B-mode frames of ``tissue`` from probe poses.

    Parameters
    ----------
    image_to_world : array_like, shape (n, 4, 4)
        Rigid probe poses: image-mm → world mm (see ``probe.py``).
    probe : Probe, optional
        Default ``Probe()`` (480 x 640).
    tissue : Tissue, optional
        Default ``Tissue.forearm()``.
    beam : Beam, optional
        Default ``Beam()``.
    first_frame : int
        Index in the scan of the first pose; frame k's noise is seeded from
        (``tissue.seed``, ``first_frame + k``), so rendering a scan in chunks gives the same bytes as
        rendering it whole.
    out : array-like of uint8, shape (n, probe.height, probe.width), optional
        Filled and returned (a NumPy array, np.memmap, or h5py dataset slice target); allocated if
        omitted.
    threads : int, optional
        Numba and OpenCV threads for this call (default: Numba's current setting); both settings are
        restored afterwards. Results do not depend on it.

    Returns
    -------
    ndarray or ``out``, shape (n, probe.height, probe.width), uint8
        B-mode frames, 0 outside ``probe.fan_mask()``.

    Raises
    ------
    DataError
        On a bad pose array, option or ``out``.
    """
    probe = _check_type("probe", Probe() if probe is None else probe, Probe)
    tissue = _check_type("tissue", Tissue.forearm() if tissue is None else tissue, Tissue)
    beam = _check_type("beam", Beam() if beam is None else beam, Beam)
    try:
        poses = np.asarray(image_to_world, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError("expected numeric image_to_world") from None
    if poses.ndim != 3 or poses.shape[1:] != (4, 4):
        raise DataError(f"expected image_to_world of shape (n, 4, 4), got {poses.shape}")
    poses = np.ascontiguousarray(check_rigid(poses, name="image_to_world"))
    if isinstance(first_frame, bool) or not isinstance(first_frame, (int, np.integer)) or first_frame < 0:
        raise DataError(f"expected first_frame as an integer >= 0, got {first_frame!r}")
    n = poses.shape[0]
    shape = (n, probe.height, probe.width)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif tuple(getattr(out, "shape", ())) != shape or np.dtype(getattr(out, "dtype", None)) != np.uint8:
        raise DataError(f"expected out as uint8 of shape {shape}, got {getattr(out, 'dtype', None)} "
                        f"of shape {tuple(getattr(out, 'shape', ()))}")
    available = numba.config.NUMBA_NUM_THREADS
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or not 1 <= threads <= available):
        raise DataError(f"expected threads as an integer in 1..{available}, got {threads!r}")
    if n == 0:
        return out

    setup = _setup(probe, beam)
    layers, vessels, bone, regions = _tissue_arrays(tissue)
    world_to_image = np.ascontiguousarray(invert_rigid(poses))
    row_gain = (setup.row_gain / math.sqrt(tissue.reference_intensity)).astype(np.float32)
    frame_ids = np.arange(first_frame, first_frame + n, dtype=np.int64)
    previous = numba.get_num_threads(), cv2.getNumThreads()
    threads = previous[0] if threads is None else int(threads)
    batch = min(n, 2 * threads)  # a few frames per thread bounds the polar buffers (~2 MB per frame)
    polar = np.empty((batch, setup.rows, setup.cols), np.float32)
    frames = np.empty((batch, probe.height, probe.width), np.uint8)
    try:
        numba.set_num_threads(threads)
        cv2.setNumThreads(threads)
        for start in range(0, n, batch):
            m = min(batch, n - start)
            kernels.render_polar(
                world_to_image[start:start + m], poses[start:start + m], frame_ids[start:start + m], tissue.seed,
                tissue.cell_mm, layers, vessels, bone, regions, setup.apex[0], setup.apex[1], probe.radius_mm,
                setup.r_lo, setup.dr, setup.t_lo, setup.dt, setup.two_k, *setup.elevation, setup.axial_w,
                setup.lateral_w, setup.lateral_half, row_gain, setup.noise_rms, beam.tissue_level_db,
                beam.dynamic_range_db, polar[:m])
            for k in range(m):
                image = cv2.remap(polar[k], setup.map_x, setup.map_y, cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REPLICATE)
                cv2.bitwise_and(cv2.convertScaleAbs(image), setup.mask_u8, dst=frames[k])  # round, fan only
            out[start:start + m] = frames[:m]
    finally:
        numba.set_num_threads(previous[0])
        cv2.setNumThreads(previous[1])
    return out
