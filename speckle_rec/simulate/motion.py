"""Probe motion of simulated freehand scans: the TUS-REC2025 rotation protocol and the 2024 sweeps.

Poses follow the conventions of :mod:`speckle_rec.simulate.probe`: a pose is ``image_to_world``
(image-mm → world mm), world X along the forearm (elbow at X ≈ 0 → wrist at X ≈ 250 mm), Y across
it, Z into the tissue with the skin at Z = 0. Every pose puts the probe's contact point (the centre
of its face, ``probe.contact_point_mm``) on the skin with the image's depth axis (y) pointing
roughly along +Z.

A scan is built from three layers:

- the protocol: the slow, deliberate motion (fan/rock/spin about a fixed contact point, or a sweep
  along a path on the skin), timed in fractions of the scan so a shorter scan is a faster version
  of the same protocol;
- slow drifts of the hand: slip of the contact point, varying pressure, tilt wobble (also in
  fractions of the scan);
- physiological tremor at 4-12 Hz in physical time, so it is the same at any scan length.
"""

import math
import operator
import re

import numpy as np
from scipy.ndimage import distance_transform_edt
from scipy.spatial.transform import Rotation

from ..errors import DataError
from ..transforms import matrices_from_params
from .probe import Probe

PROTOCOLS = ("rotation", "linear", "c-shape", "s-shape")
PLANES = ("per", "par")
DIRECTIONS = ("DtP", "PtD")
HANDS = ("LH", "RH")

_SHAPE_CODES = {"linear": "L", "c-shape": "C", "s-shape": "S"}
_ROTATION_NAME = re.compile(r"^(LH|RH)_rotation$")
_SWEEP_NAME = re.compile(r"^(LH|RH)_(Per|Par)_([LCS])_(DtP|PtD)$")

# Image axes (columns) in world coordinates with the depth axis y along +Z.
# 'per': image x across the forearm (+Y), image normal along it (+X).
_PER_AXES = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
# 'par': image x along the forearm (+X), image normal across it (-Y).
_PAR_AXES = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])

_TREMOR_BAND_HZ = (4.0, 12.0)
_LANDMARK_MARGIN_PX = 5.0
_NORMALISATION_GRID = np.linspace(0.0, 1.0, 1025)  # where slow signals are normalised, independent of n


def probe_trajectory(n_frames, *, protocol="rotation", probe=None, plane="per", direction="DtP", seed=0,
                     fps=20.0):
    """Probe poses of one simulated freehand scan.

    Parameters
    ----------
    n_frames : int
        Number of frames, >= 2. The protocol's phases are spread over the scan's duration
        ``(n_frames - 1) / fps``; tremor keeps its physical frequencies.
    protocol : {'rotation', 'linear', 'c-shape', 's-shape'}
        'rotation' is the TUS-REC2025 protocol (fixed contact point near the elbow: fan, rock,
        spin the probe ~90 degrees about its axis, fan and rock again); the others are the
        TUS-REC2024 sweeps along a straight, C-shaped or S-shaped path (L, C, S).
    probe : Probe, optional
        Probe geometry (default ``Probe()``).
    plane : {'per', 'par'}
        Image plane perpendicular or parallel to the sweep direction (case-insensitive).
        Ignored for 'rotation'.
    direction : {'DtP', 'PtD'}
        Distal-to-proximal (wrist → elbow, decreasing X) or proximal-to-distal (case-insensitive).
        Ignored for 'rotation'.
    seed : int or None
        Seed of ``numpy.random.default_rng``; the same arguments give the same poses. Use a
        different seed for every scan of a data set.
    fps : float
        Frame rate in frames per second.

    Returns
    -------
    image_to_world : ndarray, shape (n_frames, 4, 4), float64
        Rigid image-mm → world-mm pose of every frame.

    Raises
    ------
    DataError
        On an unknown protocol, plane or direction, ``n_frames < 2`` or a non-positive ``fps``.
    """
    n_frames = _frame_count(n_frames)
    protocol = _choice(protocol, PROTOCOLS, "protocol")
    fps = float(fps)
    if not (math.isfinite(fps) and fps > 0):
        raise DataError(f"fps must be a positive number, got {fps!r}")
    probe = Probe() if probe is None else probe
    rng = np.random.default_rng(seed)
    if protocol == "rotation":
        rotations, contact = _rotation_protocol(rng, n_frames, probe)
    else:
        plane = _choice(plane, PLANES, "plane")
        direction = _choice(direction, DIRECTIONS, "direction")
        rotations, contact = _sweep_protocol(rng, n_frames, protocol, plane, direction)
    tremor_rotation, tremor_shift = _tremor(rng, n_frames, fps)
    rotations = rotations * tremor_rotation  # about the contact point, in the probe's frame
    return _poses(rotations, contact + tremor_shift, probe.contact_point_mm)


def scan_name(protocol, *, hand="LH", plane="per", direction="DtP"):
    """Challenge file stem of a scan.

    Parameters
    ----------
    protocol : {'rotation', 'linear', 'c-shape', 's-shape'}
    hand : {'LH', 'RH'}
    plane : {'per', 'par'}
        Ignored for 'rotation' (may be None).
    direction : {'DtP', 'PtD'}
        Ignored for 'rotation' (may be None).

    Returns
    -------
    str
        ``'LH_rotation'`` (2025) or ``'{LH,RH}_{Per,Par}_{L,C,S}_{DtP,PtD}'`` (2024).
    """
    protocol = _choice(protocol, PROTOCOLS, "protocol")
    hand = _choice(hand, HANDS, "hand")
    if protocol == "rotation":
        return f"{hand}_rotation"
    plane = _choice(plane, PLANES, "plane").capitalize()
    direction = _choice(direction, DIRECTIONS, "direction")
    return f"{hand}_{plane}_{_SHAPE_CODES[protocol]}_{direction}"


def parse_scan_name(name):
    """Inverse of :func:`scan_name`.

    Parameters
    ----------
    name : str
        File stem such as ``'RH_rotation'`` or ``'LH_Par_C_DtP'`` (no ``.h5``).

    Returns
    -------
    dict
        ``protocol``, ``hand``, ``plane`` and ``direction``; plane and direction are None for
        'rotation'.

    Raises
    ------
    DataError
        If ``name`` is neither form.
    """
    text = str(name)
    match = _ROTATION_NAME.match(text)
    if match:
        return dict(protocol="rotation", hand=match[1], plane=None, direction=None)
    match = _SWEEP_NAME.match(text)
    if match:
        protocol = next(p for p, code in _SHAPE_CODES.items() if code == match[3])
        return dict(protocol=protocol, hand=match[1], plane=match[2].lower(), direction=match[4])
    raise DataError(
        f"unknown scan name {text!r}; "
        "expected '{LH,RH}_rotation' or '{LH,RH}_{Per,Par}_{L,C,S}_{DtP,PtD}'"
    )


def sample_landmarks(image_to_world, *, probe=None, count=100, seed=0):
    """Landmarks of a simulated scan in the contract's format (§1.5).

    Parameters
    ----------
    image_to_world : array_like, shape (N, 4, 4)
        Poses of the scan (only N is used), N >= 2.
    probe : Probe, optional
        Probe geometry (default ``Probe()``).
    count : int
        Number of landmarks (100 in 2025, 20 in 2024).
    seed : int or None
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    ndarray, shape (count, 3), int64
        Rows (frame, x, y): 0-based frame index in 1..N-1, spread evenly over the scan and sorted;
        1-based column x and row y of a pixel inside ``probe.fan_mask()`` more than 5 pixels
        from the fan's border (and the image's edge).
    """
    poses = np.asarray(image_to_world)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4):
        raise DataError(f"expected image_to_world of shape (N, 4, 4), got {poses.shape}")
    n_frames = _frame_count(poses.shape[0])
    count = operator.index(count)
    if count < 1:
        raise DataError(f"count must be >= 1, got {count}")
    probe = Probe() if probe is None else probe
    # Distance to the nearest pixel outside the fan; the padding makes the image edge a border too.
    inside = np.pad(probe.fan_mask(), 1)
    rows, cols = np.nonzero(distance_transform_edt(inside)[1:-1, 1:-1] > _LANDMARK_MARGIN_PX)
    if rows.size == 0:
        raise DataError(f"the probe's fan has no pixel {_LANDMARK_MARGIN_PX:g} pixels inside its border")
    rng = np.random.default_rng(seed)
    # One frame per equal slice of frames 1..N-1, so the landmarks cover the whole scan.
    edges = np.linspace(1, n_frames, count + 1)
    frames = np.minimum(np.floor(edges[:-1] + rng.random(count) * np.diff(edges)), n_frames - 1)
    pick = rng.integers(rows.size, size=count)
    return np.stack([frames.astype(np.int64), cols[pick] + 1, rows[pick] + 1], axis=1).astype(np.int64)


# --- protocols ----------------------------------------------------------------------------------


def _rotation_protocol(rng, n_frames, probe):
    """TUS-REC2025: fan, rock, spin ~90 degrees, fan, rock, about a contact point near the elbow.

    The probe starts upright with its image plane across the forearm and ends (about) upright with
    it along the forearm. Returns the probe orientations (Rotation of n_frames) and contact points
    (n_frames, 3) in mm.
    """
    fan_amp = math.radians(rng.uniform(15.0, 30.0))
    rock_amp = math.radians(rng.uniform(10.0, 20.0))
    spin = math.radians(rng.uniform(80.0, 100.0)) * rng.choice([-1.0, 1.0])
    # Fewer swings when the scan is short, so a short scan stays a plausible version of the protocol.
    max_swings = max(2, n_frames // 250)
    schedule = _Schedule(rng)
    for phase in ("fan", "rock", "spin", "fan", "rock"):
        if phase == "spin":
            schedule.hold(rng.uniform(0.01, 0.03))  # people stop before turning the probe
            target = schedule.last.copy()
            target[0] = spin
            if rng.random() < 0.4:  # stop part-way through the turn
                schedule.move_to(schedule.last + rng.uniform(0.3, 0.7) * (target - schedule.last))
            schedule.move_to(target)
            continue
        axis, other, amp = (1, 2, fan_amp) if phase == "fan" else (2, 1, rock_amp)
        sign = rng.choice([-1.0, 1.0])
        for _ in range(min(int(rng.integers(2, 5)), max_swings)):
            target = schedule.last.copy()
            target[axis] = sign * amp * rng.uniform(0.75, 1.0)
            target[other] = rng.normal(0.0, math.radians(1.5))  # the other angle drifts a little
            schedule.move_to(target)
            sign = -sign
        target = schedule.last.copy()
        target[axis] = rng.normal(0.0, math.radians(1.0))  # back to (about) upright
        schedule.move_to(target)

    # Time each move by how far the fan's pixels travel, so the image speed is about uniform.
    points = _fan_points(probe) - probe.contact_point_mm
    u = np.linspace(0.0, 1.0, n_frames)
    angles = schedule.evaluate(u, lambda a, b: _image_travel(a, b, points))

    heading = Rotation.from_rotvec([0.0, 0.0, math.radians(rng.uniform(-10.0, 10.0))])
    rotations = heading * Rotation.from_matrix(_PER_AXES) * _spin_fan_rock(angles)

    start = np.array([rng.uniform(20.0, 40.0), rng.uniform(-8.0, 8.0), 0.0])
    slip = _SmoothNoise(rng, (2,), (0.3, 1.5))
    slip_xy = slip(u) - slip(0.0)
    slip_xy *= rng.uniform(1.5, 4.0) / np.linalg.norm(slip(_NORMALISATION_GRID) - slip(0.0), axis=1).max()
    contact = np.tile(start, (n_frames, 1))
    contact[:, :2] += slip_xy
    contact[:, 2] += _pressure(rng, u)
    return rotations, contact


def _sweep_protocol(rng, n_frames, protocol, plane, direction):
    """TUS-REC2024: slide along a straight, C- or S-shaped path on the skin.

    Returns the probe orientations (Rotation of n_frames) and contact points (n_frames, 3) in mm.
    """
    length = rng.uniform(85.0, 105.0)  # extent along the forearm
    if direction == "DtP":
        x_start, sign = rng.uniform(200.0, 225.0), -1.0
    else:
        x_start, sign = rng.uniform(30.0, 55.0), 1.0
    y_start = rng.uniform(-8.0, 8.0)
    # Lateral offset = drift * p + bow * sin(pi * half_waves * p) in mm at progress p along the
    # forearm: a straight line with a slight bow (L), half a sine wave (C) or a full one (S).
    if protocol == "linear":
        drift, bow, half_waves = rng.uniform(-5.0, 5.0), rng.uniform(-2.0, 2.0), 1.0
    elif protocol == "c-shape":
        drift, bow, half_waves = 0.0, rng.uniform(10.0, 18.0) * rng.choice([-1.0, 1.0]), 1.0
    else:
        drift, bow, half_waves = 0.0, rng.uniform(6.0, 12.0) * rng.choice([-1.0, 1.0]), 2.0

    u = np.linspace(0.0, 1.0, n_frames)
    p = _progress(rng, u)
    offset = drift * p + bow * np.sin(np.pi * half_waves * p)
    d_offset = drift + bow * np.pi * half_waves * np.cos(np.pi * half_waves * p)
    # Heading of the path's tangent oriented towards +X: the probe is held the same way both ways.
    heading = np.arctan(sign * d_offset / length)
    axes = _PER_AXES if plane == "per" else _PAR_AXES

    tilt = np.radians(rng.uniform(-4.0, 4.0, size=3)) * np.array([1.0, 1.0, 0.5])
    wobble = _SmoothNoise(rng, (3,), (1.0, 6.0))(u) * np.radians([1.5, 1.5, 2.0])
    yaw, fan, rock = (tilt + wobble).T
    rotations = (Rotation.from_rotvec(np.outer(heading + yaw, [0.0, 0.0, 1.0]))
                 * Rotation.from_matrix(axes)
                 * Rotation.from_euler("XZ", np.stack([fan, rock], axis=1)))

    contact = np.stack([x_start + sign * length * p, y_start + offset, _pressure(rng, u)], axis=1)
    return rotations, contact


# --- building blocks ----------------------------------------------------------------------------


class _Schedule:
    """Keyframes of (spin, fan, rock) angles joined by moves with eased speed, plus pauses.

    Every keyframe is a stop (zero velocity), as at the end of a swing; some moves stop part-way and
    back up a little (a hesitation), and some stops last a while (a pause).
    """

    def __init__(self, rng):
        self.rng = rng
        self.keys = [np.zeros(3)]
        self.pauses = [self._pause()]  # pause length at each keyframe, as a fraction of the scan

    @property
    def last(self):
        return self.keys[-1]

    def _pause(self):
        return self.rng.uniform(0.005, 0.025) if self.rng.random() < 0.3 else 0.0

    def _add(self, key):
        self.keys.append(np.asarray(key, dtype=np.float64))
        self.pauses.append(self._pause())

    def hold(self, fraction):
        """Stay at the last keyframe for at least ``fraction`` of the scan."""
        self.pauses[-1] = max(self.pauses[-1], fraction)

    def move_to(self, target):
        start = self.last
        if self.rng.random() < 0.2:
            stop = self.rng.uniform(0.4, 0.7)
            self._add(start + stop * (target - start))
            self._add(start + (stop - self.rng.uniform(0.1, 0.25)) * (target - start))
        self._add(target)

    def evaluate(self, u, travel):
        """Angles (len(u), 3) at scan fractions ``u``; ``travel(a, b)`` is the image travel a → b in mm."""
        rng = self.rng
        keys = np.array(self.keys)
        moves = np.array([max(travel(a, b), 1e-3) for a, b in zip(keys[:-1], keys[1:])])
        moves /= rng.uniform(0.75, 1.25, size=moves.size)  # some moves are quicker than others
        ramps = rng.uniform(0.2, 0.3, size=moves.size)
        pauses = np.array(self.pauses)
        pauses *= min(1.0, 0.2 / max(pauses.sum(), 1e-12))  # still for at most a fifth of the scan
        moves *= (1.0 - pauses.sum()) / moves.sum()
        # Timeline: pause at key 0, move 0, pause at key 1, move 1, ...
        durations = np.empty(2 * moves.size + 1)
        durations[0::2], durations[1::2] = pauses, moves
        ends = np.cumsum(durations)
        segment = np.minimum(np.searchsorted(ends, u, side="right"), durations.size - 1)
        out = keys[segment // 2].copy()
        moving = segment % 2 == 1
        index = segment[moving] // 2
        tau = (u[moving] - (ends[segment[moving]] - moves[index])) / moves[index]
        out[moving] += _ease(tau, ramps[index])[:, None] * (keys[index + 1] - keys[index])
        return out


def _ease(tau, ramp):
    """Progress 0 → 1 over tau in [0, 1] with a flat-topped speed and raised-cosine ramps.

    ``ramp`` is the fraction of the move spent accelerating (and again decelerating); speed and
    acceleration are continuous and zero at both ends.
    """
    tau = np.clip(tau, 0.0, 1.0)

    def ramp_area(x):
        return 0.5 * x - ramp / (2 * np.pi) * np.sin(np.pi * x / ramp)

    area = np.where(tau < ramp, ramp_area(tau),
                    np.where(tau <= 1 - ramp, 0.5 * ramp + (tau - ramp), (1 - ramp) - ramp_area(1 - tau)))
    return area / (1 - ramp)


def _progress(rng, u):
    """Fraction of the path covered at scan fractions ``u``: smooth start/stop, varying speed, pauses.

    A pause may dip the speed slightly below zero, i.e. the hand backs up a little.
    """
    grid = _NORMALISATION_GRID
    ramp = rng.uniform(0.03, 0.08)
    speed = 0.5 - 0.5 * np.cos(np.pi * np.minimum(1.0, np.minimum(grid, 1 - grid) / ramp))
    speed = speed * (1.0 + 0.3 * _SmoothNoise(rng, (), (1.0, 5.0))(grid))
    for _ in range(int(rng.integers(0, 3))):
        centre, width, depth = rng.uniform(0.2, 0.8), rng.uniform(0.01, 0.03), rng.uniform(0.9, 1.3)
        x = np.clip((grid - centre) / width, -1.0, 1.0)
        speed = speed * (1.0 - depth * (0.5 + 0.5 * np.cos(np.pi * x)))
    covered = np.concatenate([[0.0], np.cumsum(0.5 * (speed[1:] + speed[:-1]))])
    return np.interp(u, grid, covered / covered[-1])


def _pressure(rng, u):
    """Contact depth in mm (positive = pressed into the skin) at scan fractions ``u``."""
    wave = _SmoothNoise(rng, (), (0.5, 3.0))
    peak = np.abs(wave(_NORMALISATION_GRID)).max()
    return rng.uniform(0.3, 0.8) + rng.uniform(0.2, 0.5) * wave(u) / peak


def _tremor(rng, n_frames, fps):
    """Hand tremor: small rotations (Rotation of n_frames) and shifts (n_frames, 3) in mm."""
    t = np.arange(n_frames) / fps
    wave = _SmoothNoise(rng, (6,), _TREMOR_BAND_HZ)(t)
    angle_rms = math.radians(rng.uniform(0.05, 0.1))
    shift_rms = rng.uniform(0.03, 0.06)
    return Rotation.from_rotvec(wave[:, :3] * angle_rms), wave[:, 3:] * shift_rms


class _SmoothNoise:
    """Random smooth signals: a sum of sinusoids with frequencies in a band, unit RMS.

    Parameters
    ----------
    rng : numpy.random.Generator
    shape : tuple
        Shape of one sample (one independent signal per element).
    band : (float, float)
        Frequency range, in cycles per unit of the time the signal is evaluated at.
    components : int
        Number of sinusoids per signal.
    """

    def __init__(self, rng, shape, band, components=6):
        size = (components,) + tuple(shape)
        self.freqs = rng.uniform(*band, size=size)
        self.phases = rng.uniform(0.0, 2 * np.pi, size=size)
        weights = rng.uniform(0.5, 1.0, size=size)
        self.weights = weights / np.sqrt(0.5 * (weights**2).sum(axis=0))

    def __call__(self, t):
        """Signal at times ``t`` (any shape): array of shape ``t.shape + shape``."""
        t = np.asarray(t, dtype=np.float64)
        column = t.reshape(t.shape + (1,) * self.freqs.ndim)
        return (self.weights * np.sin(2 * np.pi * self.freqs * column + self.phases)).sum(axis=t.ndim)


def _spin_fan_rock(angles):
    """Probe rotation (in its own frame) from (spin, fan, rock) angles in radians, shape (..., 3).

    Spin about the image y axis (the probe's axis), then fan about the rotated image x axis (the
    line of contact), then rock about the image normal z (in-plane tilt).
    """
    return Rotation.from_euler("YXZ", angles)


def _image_travel(start, end, points, steps=8):
    """Mean path length in mm of ``points`` (m, 3) as (spin, fan, rock) go linearly ``start`` → ``end``."""
    path = _spin_fan_rock(start + np.linspace(0.0, 1.0, steps + 1)[:, None] * (end - start))
    moved = np.stack([rotation.apply(points) for rotation in path])
    return float(np.linalg.norm(np.diff(moved, axis=0), axis=2).sum(axis=0).mean())


def _fan_points(probe, target=2000):
    """Image-mm (x, y, 0) of about ``target`` pixels spread over the fan, shape (m, 3)."""
    mask = probe.fan_mask()
    stride = max(1, int(math.sqrt(mask.sum() / target)))
    rows, cols = np.nonzero(mask[::stride, ::stride])
    sx, sy = probe.spacing_mm
    return np.stack([sx * (cols * stride + 1), sy * (rows * stride + 1), np.zeros(rows.size)], axis=1)


def _poses(rotations, contact_world, contact_image):
    """image_to_world (n, 4, 4): ``rotations`` about ``contact_image``, put at ``contact_world`` (n, 3)."""
    shift = contact_world - rotations.apply(contact_image)
    return matrices_from_params(np.concatenate([rotations.as_rotvec(), shift], axis=1))


def _frame_count(n_frames):
    try:
        n = operator.index(n_frames)
    except TypeError:
        raise DataError(f"n_frames must be an integer >= 2, got {n_frames!r}") from None
    if n < 2:
        raise DataError(f"n_frames must be an integer >= 2, got {n}")
    return n


def _choice(value, allowed, name):
    """The entry of ``allowed`` equal to ``value`` ignoring case, else a DataError naming both."""
    if isinstance(value, str):
        for option in allowed:
            if value.lower() == option.lower():
                return option
    raise DataError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, allowed))}")
