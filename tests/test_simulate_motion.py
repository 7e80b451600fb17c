"""Probe-motion protocols of the simulator: poses, magnitudes, protocol semantics, names, landmarks."""

import math

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt, uniform_filter1d
from scipy.spatial.transform import Rotation

from speckle_rec.errors import DataError
from speckle_rec.simulate.motion import (
    PROTOCOLS,
    parse_scan_name,
    probe_trajectory,
    sample_landmarks,
    scan_name,
)
from speckle_rec.simulate.probe import Probe
from speckle_rec.transforms import invert_rigid, params_from_matrices, rigid_error

SWEEPS = [(p, plane, d) for p in PROTOCOLS[1:] for plane in ("per", "par") for d in ("DtP", "PtD")]
ALL_SCANS = [("rotation", "per", "DtP")] + SWEEPS
N_FRAMES = 1500
SMALL_PROBE = Probe.fit_image(240, 320)


def fan_points(probe, stride=8):
    """Image-mm points (3, m) of every ``stride``-th fan pixel: the mean displacement to 1 %."""
    rows, cols = np.nonzero(probe.fan_mask()[::stride, ::stride])
    sx, sy = probe.spacing_mm
    return np.stack([sx * (cols * stride + 1), sy * (rows * stride + 1), np.zeros(rows.size)])


def mean_displacement(transforms, points, chunk=250):
    """Mean over points (3, m) of |T q − q| in mm for each transform (k, 4, 4) → (k,)."""
    out = []
    for t in np.array_split(transforms, max(1, len(transforms) // chunk)):
        moved = t[:, :3, :3] @ points + t[:, :3, 3:]
        out.append(np.linalg.norm(moved - points, axis=1).mean(axis=1))
    return np.concatenate(out)


def contact_points(poses, probe=None):
    probe = Probe() if probe is None else probe
    return (poses @ np.append(probe.contact_point_mm, 1.0))[:, :3]


def fan_rock_degrees(poses):
    """Fan (about image x) and rock (about image z) angles of the probe relative to upright (+Z)."""
    r = poses[:, :3, :3]
    fan = -np.arcsin(r[:, 2, 2])  # image normal's Z component = −sin(fan), whatever the spin
    rock = np.arcsin(np.clip(r[:, 2, 0] / np.cos(fan), -1.0, 1.0))
    return np.degrees(fan), np.degrees(rock)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("probe", [None, SMALL_PROBE], ids=["default", "240x320"])
@pytest.mark.parametrize("n_frames", [2, 3, 200])
def test_poses_are_rigid_for_any_length_and_probe(protocol, probe, n_frames):
    poses = probe_trajectory(n_frames, protocol=protocol, probe=probe, plane="par", direction="PtD", seed=4)
    assert poses.shape == (n_frames, 4, 4) and poses.dtype == np.float64
    assert np.isfinite(poses).all()
    assert rigid_error(poses) < 1e-9


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_same_arguments_same_poses(protocol):
    a = probe_trajectory(300, protocol=protocol, seed=11)
    np.testing.assert_array_equal(a, probe_trajectory(300, protocol=protocol, seed=11))
    assert not np.allclose(a, probe_trajectory(300, protocol=protocol, seed=12))


@pytest.mark.parametrize("protocol,plane,direction", ALL_SCANS)
def test_displacement_magnitudes_like_real_scans(protocol, plane, direction):
    poses = probe_trajectory(N_FRAMES, protocol=protocol, plane=plane, direction=direction, seed=0)
    inverse = invert_rigid(poses)
    points = fan_points(Probe())
    local = mean_displacement(inverse[:-1] @ poses[1:], points)
    global_ = mean_displacement(inverse[0] @ poses[1:], points)
    assert 0.1 < local.mean() < 0.8  # real data ~0.36 mm
    assert 10.0 < global_.mean() < 60.0  # real 2025 data ~24-27 mm
    # Smooth, no jumps. The sweeps' frame-to-frame motion is mostly tremor, whose peaks over 1500
    # frames reach ~3x its mean, hence the margin.
    assert local.max() < 3.5 * local.mean()
    assert np.percentile(local, 99) < 2.5 * local.mean()


@pytest.mark.parametrize("protocol,plane,direction", ALL_SCANS)
@pytest.mark.parametrize("probe", [None, SMALL_PROBE], ids=["default", "240x320"])
def test_probe_stays_on_skin_pointing_in(protocol, plane, direction, probe):
    poses = probe_trajectory(N_FRAMES, protocol=protocol, probe=probe, plane=plane, direction=direction,
                             seed=1)
    z = contact_points(poses, probe)[:, 2]
    assert z.min() > -1.0 and z.max() < 2.0  # never lifted more than 1 mm, pressed a little
    depth_axis_z = poses[:, 2, 1]
    assert depth_axis_z.min() > math.cos(math.radians(40.0))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_rotation_protocol_fans_rocks_spins_about_fixed_contact(seed):
    poses = probe_trajectory(N_FRAMES, protocol="rotation", seed=seed)
    fan, rock = fan_rock_degrees(poses)
    # Side-to-side fanning of 15-30 degrees and rocking of 10-20 degrees (extremes of several swings).
    assert 12.0 < fan.max() < 31.0 and -31.0 < fan.min() < -12.0
    assert 8.0 < np.abs(rock).max() < 21.0
    # Reversals: the (tremor-free) fan angle turns back several times.
    velocity = np.diff(uniform_filter1d(fan, 11))
    turns = np.sign(velocity[np.abs(velocity) > 0.05])
    assert np.count_nonzero(np.diff(turns)) >= 3
    # Pauses: >= 10 frames in a row turning < 0.02 degree per frame (the median is ~0.3), measured
    # on the orientation relative to the first frame averaged over ~1 s to remove the tremor.
    orientation = params_from_matrices(invert_rigid(poses[0]) @ poses)[:, :3]
    speed = np.degrees(np.linalg.norm(np.diff(uniform_filter1d(orientation, 21, axis=0), axis=0), axis=1))
    still_runs = np.diff(np.flatnonzero(np.diff(np.r_[0, (speed < 0.02).astype(int), 0])))[::2]
    assert still_runs.max() >= 10
    # ~90 degree turn about the probe's axis (image y) between the first and the last frame.
    turn = Rotation.from_matrix((invert_rigid(poses[0]) @ poses[-1])[:3, :3]).as_rotvec()
    assert 70.0 < np.degrees(np.linalg.norm(turn)) < 110.0
    assert abs(turn[1]) / np.linalg.norm(turn) > 0.95
    # Fixed contact point near the elbow, slipping a few mm at most.
    contact = contact_points(poses)
    assert 15.0 < contact[0, 0] < 45.0
    assert np.linalg.norm(contact[:, :2] - contact[0, :2], axis=1).max() < 6.0


def test_short_rotation_scan_keeps_every_phase():
    poses = probe_trajectory(200, protocol="rotation", seed=2)
    fan, rock = fan_rock_degrees(poses)
    turn = Rotation.from_matrix((invert_rigid(poses[0]) @ poses[-1])[:3, :3]).magnitude()
    assert fan.max() > 10.0 and fan.min() < -10.0 and np.abs(rock).max() > 7.0
    assert 70.0 < np.degrees(turn) < 110.0


@pytest.mark.parametrize("protocol,plane,direction", SWEEPS)
def test_sweep_direction_plane_and_shape(protocol, plane, direction):
    poses = probe_trajectory(N_FRAMES, protocol=protocol, plane=plane, direction=direction, seed=3)
    contact = contact_points(poses)
    x, y = contact[:, 0], contact[:, 1]
    # DtP = wrist (large X) → elbow (small X); PtD the reverse; 100-ish mm along the forearm.
    travel = x[-1] - x[0]
    assert (travel < -80.0) if direction == "DtP" else (travel > 80.0)
    assert abs(travel) < 200.0 and 0.0 < x.min() and x.max() < 250.0

    # Plane semantics against the local path direction (smoothed over 2 s to remove tremor).
    velocity = np.gradient(uniform_filter1d(contact[:, :2], 41, axis=0), axis=0)
    moving = np.linalg.norm(velocity, axis=1) > 0.02
    heading = velocity[moving] / np.linalg.norm(velocity[moving], axis=1, keepdims=True)
    normal_along = np.abs(np.einsum("ki,ki->k", poses[moving, :2, 2], heading))
    x_along = np.abs(np.einsum("ki,ki->k", poses[moving, :2, 0], heading))
    if plane == "per":
        assert normal_along.mean() > 0.95 and x_along.mean() < 0.15
    else:
        assert x_along.mean() > 0.95 and normal_along.mean() < 0.15

    # Path shape: lateral offset from the straight line joining the ends.
    chord = y[0] + (y[-1] - y[0]) * (x - x[0]) / (x[-1] - x[0])
    offset = y - chord
    if protocol == "linear":
        assert np.abs(offset).max() < 5.0
    elif protocol == "c-shape":
        assert np.abs(offset).max() > 8.0 and min(offset.max(), -offset.min()) < 1.0
    else:
        assert min(offset.max(), -offset.min()) > 4.0


@pytest.mark.parametrize("protocol,plane,direction", ALL_SCANS)
@pytest.mark.parametrize("hand", ["LH", "RH"])
def test_scan_name_round_trip(protocol, plane, direction, hand):
    name = scan_name(protocol, hand=hand, plane=plane, direction=direction)
    parsed = parse_scan_name(name)
    assert parsed["protocol"] == protocol and parsed["hand"] == hand
    if protocol == "rotation":
        assert name == f"{hand}_rotation" and parsed["plane"] is None and parsed["direction"] is None
    else:
        assert (parsed["plane"], parsed["direction"]) == (plane, direction)
    assert scan_name(**parsed) == name


def test_scan_names_match_the_challenge_files():
    assert scan_name("rotation", hand="RH") == "RH_rotation"
    assert scan_name("c-shape", hand="LH", plane="par", direction="DtP") == "LH_Par_C_DtP"
    assert scan_name("s-shape", hand="RH", plane="Per", direction="ptd") == "RH_Per_S_PtD"
    assert parse_scan_name("LH_Per_L_PtD") == dict(protocol="linear", hand="LH", plane="per", direction="PtD")


@pytest.mark.parametrize("name", ["LH_rotating", "XH_rotation", "LH_Per_X_DtP", "LH_per_L_DtP",
                                  "LH_Per_L_DtP.h5", "RH_Per_L", "", "sub050__LH_rotation"])
def test_parse_scan_name_rejects_other_names(name):
    with pytest.raises(DataError, match="scan name"):
        parse_scan_name(name)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("probe,count", [(None, 100), (None, 20), (SMALL_PROBE, 100)],
                         ids=["default-100", "default-20", "240x320-100"])
def test_landmarks_lie_inside_the_fan_on_later_frames(seed, probe, count):
    n_frames = 300
    poses = probe_trajectory(n_frames, probe=probe, seed=seed)
    landmarks = sample_landmarks(poses, probe=probe, count=count, seed=seed)
    assert landmarks.shape == (count, 3) and landmarks.dtype == np.int64
    frame, x, y = landmarks.T
    assert frame.min() >= 1 and frame.max() <= n_frames - 1
    assert frame.min() < n_frames * 0.1 and frame.max() > n_frames * 0.9  # spread over the scan
    mask = (Probe() if probe is None else probe).fan_mask()
    assert (x >= 1).all() and (y >= 1).all() and (x <= mask.shape[1]).all() and (y <= mask.shape[0]).all()
    inside = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    assert (inside[y - 1, x - 1] > 3.0).all()  # in the fan, a few pixels from its border


def test_landmarks_deterministic_and_for_two_frames():
    poses = probe_trajectory(50, seed=0)
    np.testing.assert_array_equal(sample_landmarks(poses, seed=5), sample_landmarks(poses, seed=5))
    assert (sample_landmarks(poses[:2], count=10)[:, 0] == 1).all()


@pytest.mark.parametrize(
    "kwargs,bad",
    [
        (dict(n_frames=100, protocol="spiral"), "spiral"),
        (dict(n_frames=1), "1"),
        (dict(n_frames=2.5), "2.5"),
        (dict(n_frames=100, protocol="linear", plane="oblique"), "oblique"),
        (dict(n_frames=100, protocol="c-shape", direction="up"), "up"),
        (dict(n_frames=100, fps=0.0), "0.0"),
    ],
)
def test_bad_trajectory_arguments_raise_data_error(kwargs, bad):
    n_frames = kwargs.pop("n_frames")
    with pytest.raises(DataError, match=bad) as info:
        probe_trajectory(n_frames, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_name_and_landmark_arguments_raise_data_error():
    with pytest.raises(DataError, match="'XH'.*'LH', 'RH'"):
        scan_name("rotation", hand="XH")
    with pytest.raises(DataError, match="'spiral'.*'rotation'"):
        scan_name("spiral")
    with pytest.raises(DataError, match="plane"):
        scan_name("linear", plane="diag")
    with pytest.raises(DataError, match="shape"):
        sample_landmarks(np.eye(4))
    with pytest.raises(DataError, match="count"):
        sample_landmarks(probe_trajectory(10), count=0)
