"""Direction (sign) resolution on synthetic velocity profiles with exact ground truth (no rendering)."""

import itertools
import json

import numpy as np
import pytest

from speckle_rec.decorrelation import DecorrelationModel
from speckle_rec.direction import (
    MIRROR,
    DirectionPrior,
    first_direction,
    mirror,
    resolve_signs,
    reversal_gain,
    triplet_costs,
)
from speckle_rec.errors import DataError
from speckle_rec.transforms import matrices_from_params


def eased_positions(keys, moves, pauses):
    """1D position per frame: eased moves between keyframes (zero speed at each), pauses in between."""
    x = []
    for k in range(len(keys) - 1):
        x += [keys[k]] * pauses[k]
        u = np.linspace(0.0, 1.0, moves[k], endpoint=False)
        x += list(keys[k] + (keys[k + 1] - keys[k]) * (u - np.sin(2 * np.pi * u) / (2 * np.pi)))
    x += [keys[-1]] * 5
    return np.array(x)


def adaptive_steps(x, target, strides=(1, 2, 4, 8, 16, 32)):
    """Key frames: from each, the longest stride moving at most ``target`` (as the trajectory stage does)."""
    keys = [0]
    while keys[-1] < len(x) - 1:
        k, best = keys[-1], 1
        for s in strides:
            if k + s > len(x) - 1 or abs(x[k + s] - x[k]) > target:
                break
            best = s
        keys.append(min(k + best, len(x) - 1))
    return np.array(keys)


def accuracy(signs, truth, weight):
    agree = signs == truth
    return max(np.sum(weight * agree), np.sum(weight * ~agree)) / np.sum(weight)


def test_smoothness_alone_resolves_linear_reversals():
    # velocity passing through zero linearly: |v| has a kink that only a sign change removes
    t = np.arange(200, dtype=float)
    v = 0.3 * np.sin(2 * np.pi * t / 80.0)
    rng = np.random.default_rng(0)
    measured = np.abs(v + rng.normal(0.0, 0.005, v.size))
    result = resolve_signs(measured, noise=0.005)
    truth = np.where(v >= 0, 1, -1)
    assert accuracy(result.signs, truth, np.abs(v)) > 0.99


def test_smoothness_cannot_tell_eased_stops_but_triplets_can():
    # eased stops: reversals and pause-and-continue look alike in |v|; spans over the stop decide
    x = eased_positions([0, 10, -10, 10, 15, 25, 0, 3, -5], [60, 80, 80, 30, 40, 90, 20, 30],
                        [0, 0, 5, 0, 20, 0, 10, 0])
    keys = adaptive_steps(x, target=0.8)
    steps = np.diff(x[keys])
    lengths = np.diff(keys).astype(float)
    truth = np.where(steps >= 0, 1, -1)
    rng = np.random.default_rng(1)
    sd = 0.02
    magnitude = np.abs(np.abs(steps) + rng.normal(0.0, sd, steps.size))
    span2 = np.abs(np.abs(x[keys[2:]] - x[keys[:-2]]) + rng.normal(0.0, sd, steps.size - 1))
    span3 = np.abs(np.abs(x[keys[3:]] - x[keys[:-3]]) + rng.normal(0.0, sd, steps.size - 2))
    pair_costs = np.stack([(span2 - (magnitude[:-1] + magnitude[1:])) ** 2,
                           (span2 - np.abs(magnitude[:-1] - magnitude[1:])) ** 2], axis=1) / (2 * sd**2)
    triple_costs = np.zeros((steps.size - 2, 4))
    for b, c in itertools.product(range(2), range(2)):
        predicted = magnitude[:-2] + (1 - 2 * b) * magnitude[1:-1] + (1 - 2 * c) * magnitude[2:]
        triple_costs[:, 2 * b + c] = (span3 - np.abs(predicted)) ** 2 / (2 * sd**2)
    times = 0.5 * (keys[1:] + keys[:-1])
    velocity = magnitude / lengths
    smooth = resolve_signs(velocity, noise=sd / lengths, times=times)
    both = resolve_signs(velocity, noise=sd / lengths, times=times, pair_costs=pair_costs,
                         triple_costs=triple_costs)
    weight = np.abs(steps)
    assert accuracy(both.signs, truth, weight) == pytest.approx(1.0)
    assert accuracy(smooth.signs, truth, weight) < 0.99  # smoothness alone flips at an eased stop


def _across_stop(x, frame, target=0.8, side=6, sigma=0.5):
    """ρ (Gaussian in distance, σ = ``sigma``) between the key frames before the stop (key steps of
    4+ frames) at ``frame`` of positions ``x`` and those after it, as the trajectory stage arranges
    them."""
    keys = adaptive_steps(x, target)
    slow = np.diff(keys) >= 4
    a = b = int(np.searchsorted(keys, frame, side="right")) - 1
    assert slow[a]
    while slow[a - 1]:
        a -= 1
    while slow[b + 1]:
        b += 1
    before, after = keys[max(a - side, 0):a + 1][::-1], keys[b + 1:b + 2 + side]
    distance = x[before][:, None] - x[after][None, :]
    return np.exp(-0.5 * (distance / sigma) ** 2)


def test_reversal_gain_tells_a_turn_from_a_pause():
    # eased moves of 10 mm with a 12-frame stop between them: back the same way, or on
    turn = _across_stop(eased_positions([0, 10, 0], [60, 60], [0, 12]), 65)
    pause = _across_stop(eased_positions([0, 10, 20], [60, 60], [0, 12]), 65)
    assert turn.shape == pause.shape == (7, 7)
    assert reversal_gain(turn) > 0.6 and abs(reversal_gain(pause)) < 1e-6
    # the twin of each frame falls between key frames on the way back: still well above a pause
    uneven = _across_stop(eased_positions([0, 10, 0.5], [60, 37], [0, 12]), 65)
    assert reversal_gain(uneven) > 0.4
    rng = np.random.default_rng(3)
    noisy = [reversal_gain(m + rng.normal(0.0, 0.05, m.shape)) for m in (turn, pause)]
    assert noisy[0] > 0.5 and noisy[1] < 0.15  # the threshold in trajectory is 0.25
    holes = turn.copy()
    holes[2, :] = np.nan  # a row without bright patches, and one entry missing
    holes[0, 3] = np.nan
    assert reversal_gain(holes) > 0.6
    # by hand: each frame out meets its twin (0.9) instead of the stop's other end (0.2)
    assert reversal_gain([[1.0, 0.2], [0.2, 0.9]]) == pytest.approx(0.7)
    assert reversal_gain([[1.0, 0.2], [0.3, 0.1]]) == pytest.approx(0.0)  # rows and columns fall away
    assert reversal_gain(turn[:1]) == reversal_gain(turn[:, :1]) == reversal_gain([[np.nan]]) == 0.0
    for bad in ([1.0, 0.5], np.zeros((0, 3)), np.zeros((2, 2, 2))):
        with pytest.raises(DataError, match="expected rho of shape"):
            reversal_gain(bad)


def test_vector_velocities_keep_direction_through_a_pause():
    # 3 anchor elevations; the motion slows to a near stop and continues the same way
    t = np.arange(120, dtype=float)
    speed = 0.2 + 0.18 * np.cos(2 * np.pi * t / 120.0)  # dips to 0.02, never reverses
    direction = np.array([1.0, 0.5, -0.2])
    rng = np.random.default_rng(2)
    measured = np.abs(speed)[:, None] * direction + rng.normal(0.0, 0.003, (t.size, 3))
    canonical = measured * np.where(rng.random(t.size) < 0.5, -1.0, 1.0)[:, None]  # unknown per-step signs
    result = resolve_signs(canonical, noise=0.003)
    signed = result.signs[:, None] * canonical
    cosine = signed @ direction / np.linalg.norm(signed, axis=1) / np.linalg.norm(direction)
    assert np.all(cosine > 0) or np.all(cosine < 0)


def test_dynamic_programming_is_exact():
    rng = np.random.default_rng(3)
    n = 8
    velocity = rng.normal(size=(n, 2))
    noise = rng.uniform(0.5, 1.5, n)
    times = np.cumsum(rng.uniform(0.5, 2.0, n))
    pair_costs = rng.uniform(0, 3, (n - 1, 2))
    triple_costs = rng.uniform(0, 3, (n - 2, 4))
    result = resolve_signs(velocity, noise=noise, times=times, acceleration=0.3, pair_costs=pair_costs,
                           triple_costs=triple_costs)

    def cost(signs):
        total = sum(pair_costs[m, int(signs[m] != signs[m + 1])] for m in range(n - 1))
        for m in range(n - 2):
            h0, h1 = times[m + 1] - times[m], times[m + 2] - times[m + 1]
            w = np.array([2 / (h0 * (h0 + h1)), -2 / (h0 * h1), 2 / (h1 * (h0 + h1))])
            second = sum(w[q] * signs[m + q] * velocity[m + q] for q in range(3))
            variance = np.sum((w * noise[m:m + 3]) ** 2) + 0.3**2
            total += np.sum(second**2) / variance
            total += triple_costs[m, 2 * (signs[m + 1] != signs[m]) + (signs[m + 2] != signs[m])]
        return total

    best = min((np.array((1,) + bits) for bits in itertools.product([1, -1], repeat=n - 1)), key=cost)
    assert result.cost == pytest.approx(cost(best))
    assert cost(result.signs) == pytest.approx(cost(best))
    assert result.signs[0] == 1
    assert result.flip_margin.shape == (n - 1,) and np.all(result.flip_margin >= 0)


def test_resolve_signs_edge_cases_and_bad_input():
    assert resolve_signs([0.5]).signs.tolist() == [1]
    assert resolve_signs([0.5, 0.4]).signs.shape == (2,)
    with pytest.raises(DataError, match="NaN"):
        resolve_signs([0.1, np.nan, 0.2])
    with pytest.raises(DataError, match="pair_costs"):
        resolve_signs([0.1, 0.2, 0.3], pair_costs=np.zeros((3, 2)))
    with pytest.raises(DataError, match="times"):
        resolve_signs([0.1, 0.2, 0.3], times=[0, 2, 1])
    with pytest.raises(DataError, match="noise"):
        resolve_signs([0.1, 0.2, 0.3], noise=[1.0, -1.0, 1.0])


def test_triplet_costs_prefer_the_true_hypothesis():
    model = DecorrelationModel([0.0, 20.0, 40.0], [0.8, 1.0], [0.0, 0.0], [2.0, 2.0], [0.2, 0.2])
    rng = np.random.default_rng(4)
    depth = rng.uniform(2.0, 38.0, 80)
    same = 0.02 * depth  # elevations of the far frame if both steps go the same way (mm)
    opposite = 0.002 * depth
    rho = model.rho(same, depth) + rng.normal(0.0, 0.02, depth.size)
    costs = triplet_costs(np.stack([same, opposite]), rho, depth_mm=depth, model=model)
    assert costs[0] < costs[1]
    with pytest.raises(DataError):
        triplet_costs(np.zeros((2, 5)), np.zeros(4), depth_mm=np.zeros(4), model=model)


def test_first_direction_and_mirror():
    points = np.array([[20.0, 10.0], [60.0, 10.0], [40.0, 50.0]])
    tilt = np.linspace(0.0, 0.1, 30)  # fanning about the image x axis through the origin
    forward = matrices_from_params(np.stack([tilt, 0 * tilt, 0 * tilt, 0 * tilt, 0 * tilt, 0 * tilt], axis=1))
    sign = first_direction(forward, points)
    assert sign in (1, -1)
    assert first_direction(mirror(forward), points) == -sign
    assert np.allclose(mirror(mirror(forward)), forward)
    assert np.allclose(mirror(forward)[..., :2, :2], forward[..., :2, :2])  # in-plane part unchanged
    assert first_direction(np.broadcast_to(np.eye(4), (5, 4, 4)), points) == 0
    assert np.allclose(MIRROR @ MIRROR, np.eye(4))
    with pytest.raises(DataError):
        first_direction(np.eye(4), points)
    with pytest.raises(DataError):
        first_direction(forward, np.zeros((3, 3)))
    json.dumps({"sign": sign})


# --------------------------------------------------------------------------- the global-mirror prior


def test_prior_picks_the_most_specific_decisive_counts():
    prior = DirectionPrior({"LH_Per_L_DtP": [0, 4], "RH_Per_L_DtP": [0, 1], "LH_Per_L_PtD": [3, 0],
                            "LH_rotation": [2, 2], "RH_rotation": [1, 2]})
    assert prior.choose("LH_Per_L_DtP") == (-1, "name")
    assert prior.choose("RH_Per_L_DtP") == (-1, "name, either hand")  # 1 scan alone is not enough
    assert prior.choose("RH_Per_L_PtD") == (1, "name, either hand")  # never seen with this hand
    # rotation scans are split (3 vs 4): the convention stays
    assert prior.choose("LH_rotation") == (1, "convention")
    assert DirectionPrior().choose("LH_rotation") == (1, "convention")
    # other protocols never decide, however decisive they are
    assert DirectionPrior({"LH_Per_L_DtP": [0, 9]}).choose("LH_rotation") == (1, "convention")


def test_prior_learn_counts_and_ignores_scans_that_never_move():
    prior = DirectionPrior.learn({"LH_rotation": [1, -1, 0, 1], "RH_rotation": []})
    assert prior.counts == {"LH_rotation": [2, 1], "RH_rotation": [0, 0]}


def test_prior_round_trip_and_bad_input(tmp_path):
    prior = DirectionPrior({"LH_Per_L_DtP": [0, 4]}, min_scans=2, min_agreement=0.9)
    assert DirectionPrior.from_dict(json.loads(json.dumps(prior.to_dict()))) == prior
    path = tmp_path / "calib.json"
    path.write_text(json.dumps({"format": "x", "direction_prior": prior.to_dict()}))
    assert DirectionPrior.from_json(path) == prior
    path.write_text(json.dumps({"format": "x"}))
    assert DirectionPrior.from_json(path) is None  # a model file without a prior: the convention
    with pytest.raises(DataError, match="missing.json: calibration file not found"):
        DirectionPrior.from_json(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(DataError, match="calib.json: cannot read calibration file"):
        DirectionPrior.from_json(path)
    for bad, message in [({"counts": {"a": [1]}}, r"counts\['a'\] = \[plus, minus\]"),
                         ({"counts": {"a": [1, -2]}}, "non-negative integers"),
                         ({"counts": [1, 2]}, "'counts' mapping"),
                         ({"counts": {}, "min_agreement": 0.5}, "0.5 < min_agreement <= 1"),
                         ({"counts": {}, "min_scans": 0}, "min_scans >= 1")]:
        with pytest.raises(DataError, match=message):
            DirectionPrior.from_dict(bad, source="calib.json")
