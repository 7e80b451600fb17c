"""Out-of-plane direction (sign) resolution.

Speckle decorrelation measures only ``|z|``, the distance of one frame's plane from another's at
each patch: the |plane| fit of a frame pair returns the out-of-plane part of the motion (elevation
``tz + a·x + b·y``) up to a sign of its own. This module decides those signs.

The rule (what :func:`speckle_rec.trajectory.estimate_trajectory` does)
-----------------------------------------------------------------------
1. **Key steps.** The scan is cut into key steps ``k_m → k_{m+1}``, each as long as possible (from
   the stride set) while the pair's deep patches still correlate at ρ ≥ a target (mid-band), so
   that every key step moves a measurable, similar distance whatever the speed; a pause becomes
   one long step. Each key step gets a |plane| fit (ρ space) and its canonical elevation vector
   ``v_m`` (elevations at a few anchor points, divided by the step length: a velocity up to sign).
2. **Velocity smoothness (dynamic programming).** Signs ``s_m`` are chosen by exact Viterbi over
   the states ``(s_{m-1}, s_m)`` to make the signed velocity ``s_m·v_m`` smooth: the cost is the
   squared second divided difference, scaled by its noise. A reversal makes the measured |v| dip
   to ~0 in a V (the signed velocity passes smoothly through zero: flipping costs nothing there,
   keeping the sign costs a kink); a pause-and-continue makes a smooth, non-zero minimum that a
   flip would turn into a jump.
3. **Triplet consistency.** For non-adjacent key frames ``i < j < k`` the decorrelation of the
   pair ``(i, k)`` is measured too. Same direction predicts ``z_ik ≈ z_ij + z_jk`` (far apart:
   decorrelated), opposite directions ``|z_ij − z_jk|`` (close again: correlated). Each
   hypothesis' predicted per-patch elevations are scored against the measured ρ with the
   decorrelation model and a robust loss (:func:`triplet_costs`); spans of two and three key
   steps enter the same Viterbi exactly (they involve at most three consecutive signs). This is
   what separates a stop-and-reverse from a stop-and-continue, which velocity alone can hardly
   tell apart when the hand eases in and out of every stop.
   **Stops.** Where the hand stops (key steps of 4 frames or more and 4 times the median), the key
   step spanning the stop is poorly fitted (tremor and the turn itself), and its wrong |plane|
   misleads the triplet terms: on five simulated 1600-frame 480×640 rotation scans the DP went on
   through 13 of 52 turns, several with margins of 80-360. After the DP the key frames on the two
   sides of each stop are correlated across it (:func:`reversal_gain`): after a turn each frame
   meets its twin on the way back, through a pause none does. A gain above 0.25 (pauses measured at
   0.06 or less but one, turns at 0.6 in the median) sets a reversal between the signed motions of
   the nearest moving steps on the two sides; a lower gain says nothing, since a turn whose two
   paths differ in the other angle can show little. It raised 17 such scans from 0.65 to 0.83 (true
   mirror; ``benchmarks/README.md``, "Stops: turn or pause").
4. **Pivot near the skin.** In fixed-contact fanning (the 2025 rotation protocol) the row at the
   skin contact hardly moves out of plane: every plane fit then gets a prior ``z(contact) ≈ 0``.
   It does not decide a sign (−plane passes through the contact too), but it ties ``tz`` to the
   tilt and removes the tilt-translation mix-up, so velocities and triplet predictions are
   cleaner. Whether the scan is fixed-contact is decided from the data: the pivot-constrained
   fits must explain the key steps' ρ as well as the free ones (median robust cost increase
   < 0.5; measured −1.97 to −0.33 on rotation scans, +1.23 to +2.04 on sweeps). One noisy pair
   explains a fan about the skin and an elevational translation about equally well, so the free
   fits alone often miss the tilt. The pivot fits also start from planes through the contact on a
   grid of slopes: a fast fan (1° per frame) decorrelates mostly by its tilt, so ρ says little
   about |z| and the other starts often end in a plane far from the contact, e.g. a spin-like
   lateral tilt in place of a fan.
5. **Bundle adjustment** then refines every frame with all pairs; it starts from the chained
   signed key steps and keeps their signs.

Measured (simulated scans, ``benchmarks/accuracy.py``, 5 scans per protocol)
-------------------------------------------------------------------------------
Sweeps (linear, C, S; 1000 frames): 96-98 % of the moving frames get the right sign. Rotation
protocol: 83 % (240×320) and 80 % (480×640; 67 % before the stop test) with the right global
mirror. At 480×640 (1600 frames) the scores are 0.83 on 17 scans (0.65 before the stop test); on 43
scans at 240×320 0.68 (0.57 before the slide stage's crossing lines, 0.49 before its vote between
runs), 0.74 with the truth's relation across each quiet stretch, and the relation that fails most
is the spin's to the first fan. The rotation protocol
returns to the upright pose between its phases (fan, rock, spin, fan, rock), and the in-plane
"rock" phase moves hardly at all out of plane: a phase's mirror relative to the previous one is
then barely observable (only through pairs that straddle the quiet stretch with small tilts on
both sides), so each phase boundary is close to a coin flip. Re-deciding the least certain
junctions with such long-range pairs (all 2^8 flip patterns scored against their measured ρ) was
tried and measured: it helped on some scans and cost up to 0.7 of score on others (the long-range
ρ favoured wrong patterns), so it is not used. A bound on the accumulated fan (tilt about image x
within ±40° of the start, with a fixed contact) was also added to the Viterbi as an exact extra
state and measured. It lowered the rotation mean from 0.469 to 0.422, because it forces some flip
without saying which one, so it is not used either. With the true key-step signs the same
pipeline scores 0.775 (``benchmarks/trajectory_options.py --start oracle-signs``). Velocity
smoothness alone is also close to a coin flip at eased stops (tested in
``tests/test_direction.py``); the triplet spans decide those.

Not used yet: revisits. The rotation scans come back within 1 mm RMS of an earlier pose for 86 % of
their frames (``benchmarks/revisits.py``), which would tie the chain's two ends together across
any wrong junction; the DP above takes no such long-range constraint. Two attempts did not help
(measured in scratch code, issue 5's notes):

- flipping the least certain junctions to agree with the revisits: no better on the five
  benchmark scans;
- a Viterbi over the signs and the accumulated tilt about image x, pulled towards the tilts of
  each key frame's revisit partners: a gain on the five benchmark scans did not carry over to
  eight held-out ones.

Under the cost above plus the revisits' tilt residuals the true signs are still dearer than the
chosen ones on most scans: the poorly fitted key steps make them pay more in velocity smoothness
than the revisits give back.

Not used for single junctions: crossing planes. Two frames whose planes cross share the speckle
along their line of intersection, and mirroring the motion after a junction moves that line, so
pairs far apart in time could test a junction. On the true poses a mirror lowers the line
correlation at nearly every junction; on the estimated poses the lines already miss each other and
the test is a coin flip (``benchmarks/crossing_lines.py``). The slide stage's step 3 uses them
only for the relation of two long runs of key steps that nothing else links (below).

Then, anatomy slide (on by default; ``slide=False`` or ``speckle-rec reconstruct --no-slide`` turns
it off). A structure that crosses the image plane obliquely slides in the image when the plane
moves out of plane, by the signed elevation times a factor that belongs to the anatomy and the view
(:mod:`speckle_rec.slide`). Two key steps from about the same view then slide alike when they move
the same way, however far apart in time, so the steps on the two sides of a quiet stretch can vote
on its relation: with the true signs inside, their votes give the true relation at 74 of 89 quiet
stretches of 18 simulated rotation scans (all 15 misses with 6 pairs or fewer), the DP at 75
(``benchmarks/anatomy_slide.py``). As a stage after the DP, with the true mirror, it raised the
mean rotation score of those scans from 0.40 to 0.46, most of it on one scan
(``benchmarks/README.md``; its settings were chosen on the same scans); on fresh scans from 0.09 to
0.34 (six; two gain 0.69 and 0.82) and from 0.41 to 0.55 (24; seven gain 0.02-0.73, none loses). It
runs only on scans that fan about a fixed skin contact: sweeps do not come back to a view, and
before that gate it flipped one of 15 simulated sweeps wrongly. It costs a sparse flow per key step
near a quiet stretch (about 1 s per 1000-frame 240×320 scan, 3-4 s per 1600-frame 480×640 one).

The global mirror
-----------------
The whole trajectory mirrored through the first image plane (``z → −z`` for every frame,
``G → M·G·M`` with ``M = diag(1, 1, −1, 1)``) explains the images exactly as well: in-plane motion
and every |distance| are unchanged. Speckle cannot decide it. We fix it by a convention,
``first_direction`` (:func:`first_direction`): the sign of the mean elevation, over the image, of
the first frame that moves away from frame 0's plane by more than a threshold. The default +1 is
a convention, right on half of the scans whose first move is random. It weighs heavily: on the
simulated rotation scans the ground truth itself scores about −0.36 through the wrong mirror (the
``truth_mirrored`` row of ``benchmarks/README.md``), against 1 through the right one.
:class:`DirectionPrior` learns it from tracked scans (``speckle-rec calibrate`` stores it in the
calibration file and ``reconstruct --calibration`` uses it): protocols with a prescribed
direction (2024 sweeps perpendicular to the image plane go distal to proximal or back, as their
names say) get it right every time; where the first move is random (fanning, or sweeps parallel to
the image plane) the prior is not decisive and the convention stays.
"""

import re
from dataclasses import dataclass, field

import numpy as np

from .errors import DataError
from .io import read_json

MIRROR = np.diag([1.0, 1.0, -1.0, 1.0])


@dataclass(frozen=True)
class SignResolution:
    """Signs chosen by :func:`resolve_signs`.

    Attributes
    ----------
    signs : (n,) int ndarray
        +1 or −1 per step; ``signs[0] = +1`` (the global sign is a separate convention).
    flip_margin : (n - 1,) ndarray
        Extra cost of the best solution in which steps m and m + 1 have the other relative sign
        (≥ 0; small means an uncertain decision at that junction).
    cost : float
        Total cost of the chosen signs.
    """

    signs: np.ndarray
    flip_margin: np.ndarray
    cost: float


def _check_velocity(velocity):
    v = np.asarray(velocity, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    if v.ndim != 2 or v.shape[0] < 1:
        raise DataError(f"expected velocity of shape (n, k), got {np.shape(velocity)}")
    if not np.all(np.isfinite(v)):
        raise DataError("velocity contains NaN or inf")
    return v


def _per_step(values, n, name, default):
    if values is None:
        return np.full(n, float(default))
    out = np.asarray(values, dtype=np.float64)
    if out.ndim == 0:
        out = np.full(n, float(out))
    if out.shape != (n,):
        raise DataError(f"expected {name} of shape ({n},), got {out.shape}")
    if not np.all(np.isfinite(out)) or np.any(out < 0):
        raise DataError(f"expected finite non-negative {name}")
    return out


def resolve_signs(velocity, *, noise=None, times=None, acceleration=0.0, pair_costs=None, triple_costs=None):
    """Signs of velocity vectors known up to sign, by exact dynamic programming.

    Minimises over ``s ∈ {±1}^n`` (with ``s_0 = +1``)::

        Σ_m ‖Δ²(s·v)_m‖² / var_m  +  Σ_m pair_costs[m, s_m·s_{m+1} < 0]
                                  +  Σ_m triple_costs[m, pattern(s_{m-1}, s_m, s_{m+1})]

    where ``Δ²`` is the second divided difference of the signed velocities at ``times`` and
    ``var_m`` its variance from ``noise`` plus ``acceleration²`` (the expected true acceleration).

    Parameters
    ----------
    velocity : (n,) or (n, k) array_like
        Canonical velocity vectors (any units), each known up to sign.
    noise : (n,) array_like, optional
        Standard deviation of each vector's entries (default 1).
    times : (n,) array_like, optional
        Increasing times of the vectors (default 0, 1, …, n − 1), e.g. key-step centres in frames.
    acceleration : float
        Expected size of a true second divided difference (units of velocity per time²); makes
        the cost tolerant of real acceleration where the noise is small.
    pair_costs : (n - 1, 2) array_like, optional
        Extra cost of steps m, m + 1 having the same (column 0) or opposite (column 1) signs.
    triple_costs : (n - 2, 4) array_like, optional
        Extra cost for steps m, m + 1, m + 2 by sign pattern relative to step m:
        column ``2·[s_{m+1} ≠ s_m] + [s_{m+2} ≠ s_m]``.

    Returns
    -------
    SignResolution

    Raises
    ------
    DataError
        On bad shapes or non-finite values.
    """
    v = _check_velocity(velocity)
    n = v.shape[0]
    sd = _per_step(noise, n, "noise", 1.0)
    t = np.arange(n, dtype=np.float64) if times is None else np.asarray(times, dtype=np.float64)
    if t.shape != (n,) or not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
        raise DataError(f"expected {n} increasing finite times")
    pc = np.zeros((max(n - 1, 0), 2)) if pair_costs is None else np.asarray(pair_costs, dtype=np.float64)
    tc = np.zeros((max(n - 2, 0), 4)) if triple_costs is None else np.asarray(triple_costs, dtype=np.float64)
    if pc.shape != (max(n - 1, 0), 2) or not np.all(np.isfinite(pc)):
        raise DataError(f"expected finite pair_costs of shape ({max(n - 1, 0)}, 2), got {pc.shape}")
    if tc.shape != (max(n - 2, 0), 4) or not np.all(np.isfinite(tc)):
        raise DataError(f"expected finite triple_costs of shape ({max(n - 2, 0)}, 4), got {tc.shape}")
    if n == 1:
        return SignResolution(np.ones(1, np.int64), np.zeros(0), 0.0)

    signs = np.array([1.0, -1.0])
    # triple cost T[m, a, b, c] for signs (a, b, c) of steps m, m+1, m+2 (index 0: +, 1: −)
    triple = np.zeros((n - 2, 2, 2, 2))
    if n > 2:
        h0, h1 = t[1:-1] - t[:-2], t[2:] - t[1:-1]
        # second divided difference: 2·[v0/(h0(h0+h1)) − v1/(h0 h1) + v2/(h1(h0+h1))]
        w0, w1, w2 = 2 / (h0 * (h0 + h1)), -2 / (h0 * h1), 2 / (h1 * (h0 + h1))
        var = (w0 * sd[:-2]) ** 2 + (w1 * sd[1:-1]) ** 2 + (w2 * sd[2:]) ** 2 + float(acceleration) ** 2
        var = np.maximum(var, 1e-300)
        for a in range(2):
            for b in range(2):
                for c in range(2):
                    d2 = (w0[:, None] * signs[a] * v[:-2] + w1[:, None] * signs[b] * v[1:-1]
                          + w2[:, None] * signs[c] * v[2:])
                    pattern = 2 * (a != b) + (a != c)
                    triple[:, a, b, c] = np.sum(d2**2, axis=1) / var + tc[:, pattern]
    pair = np.zeros((n - 1, 2, 2))
    for a in range(2):
        for b in range(2):
            pair[:, a, b] = pc[:, int(a != b)]

    # Forward pass over pair states x_m = (s_m, s_{m+1}), m = 0..n-2, with s_0 = + fixed.
    inf = np.inf
    forward = np.full((n - 1, 2, 2), inf)
    forward[0, 0, :] = pair[0, 0, :]
    back = np.zeros((n - 1, 2, 2), np.int64)
    for m in range(1, n - 1):
        for b in range(2):
            for c in range(2):
                options = forward[m - 1, :, b] + triple[m - 1, :, b, c]
                back[m, b, c] = int(np.argmin(options))
                forward[m, b, c] = options[back[m, b, c]] + pair[m, b, c]
    # Backward pass: cost of everything after state x_m.
    backward = np.zeros((n - 1, 2, 2))
    for m in range(n - 3, -1, -1):
        for a in range(2):
            for b in range(2):
                backward[m, a, b] = np.min(triple[m, a, b, :] + pair[m + 1, b, :] + backward[m + 1, b, :])
    last = forward[-1]
    b, c = np.unravel_index(int(np.argmin(last)), (2, 2))
    cost = float(last[b, c])
    state = np.empty(n, np.int64)
    state[n - 2], state[n - 1] = b, c
    for m in range(n - 2, 0, -1):
        state[m - 1] = back[m, state[m], state[m + 1]]
    marginal = forward + backward  # min cost with x_m fixed
    chosen_relation = state[:-1] != state[1:]
    margin = np.empty(n - 1)
    for m in range(n - 1):
        other = [marginal[m, a, b] for a in range(2) for b in range(2) if (a != b) != chosen_relation[m]]
        margin[m] = max(float(np.min(other)) - cost, 0.0)
    return SignResolution(np.where(state == 0, 1, -1).astype(np.int64), margin, cost)


def triplet_costs(predicted_mm, rho, *, depth_mm, model, rotation_rad=0.0, tilt_rad=0.0, f_scale=2.0,
                  rho_sigma_floor=0.02):
    """Robust cost of predicted signed elevations against measured patch correlations.

    Each patch contributes ``ρ(u) = 2·f²·(√(1 + (r/f)²) − 1)`` (soft-L1) of the residual
    ``r = (ρ_measured − model.rho(|z|)) / (model.rho_sigma + floor)``: the score of one hypothesis
    (e.g. "same direction" vs "opposite") for the elevations of a frame pair.

    Parameters
    ----------
    predicted_mm : (h, P) array_like
        Predicted elevations at the P patches under h hypotheses, mm.
    rho : (P,) array_like
        Measured correlations (NaN: patch ignored).
    depth_mm : (P,) array_like
        Patch depths (image-mm y).
    model : DecorrelationModel
    rotation_rad : float
        In-plane rotation of the pair.
    tilt_rad : float or (h, P) array_like
        Out-of-plane rotation seen by each patch under each hypothesis (the model's tilt factor).
    f_scale : float
        Soft-L1 scale in σ units.
    rho_sigma_floor : float
        Added to the model's ρ spread (keeps patches at ρ ≈ 1 from dominating).

    Returns
    -------
    (h,) ndarray
        Cost of each hypothesis (lower is better).
    """
    z = np.atleast_2d(np.asarray(predicted_mm, dtype=np.float64))
    r = np.asarray(rho, dtype=np.float64)
    y = np.asarray(depth_mm, dtype=np.float64)
    if z.shape[1:] != r.shape or r.shape != y.shape:
        raise DataError(
            f"expected predicted_mm (h, P), rho (P,), depth_mm (P,), got {z.shape}, {r.shape}, {y.shape}")
    keep = np.isfinite(r)
    if not keep.any():
        return np.zeros(z.shape[0])
    tilt = np.broadcast_to(np.asarray(tilt_rad, dtype=np.float64), z.shape)[:, keep]
    expected = model.rho(z[:, keep], y[keep], rotation_rad, tilt)
    spread = model.rho_sigma(expected, y[keep]) + rho_sigma_floor
    u = (r[keep] - expected) / spread
    return np.sum(2.0 * f_scale**2 * (np.sqrt(1.0 + (u / f_scale) ** 2) - 1.0), axis=1)


def reversal_gain(rho):
    """How much frames on the two sides of a stop come back together: the evidence of a reversal.

    ``rho[i, j]`` correlates the i-th frame before a stop (row 0: the stop's first frame, then
    earlier ones) with the j-th frame after it (column 0: its last frame, then later ones). When the
    motion continues through the stop, a frame further out on one side is furthest from the other
    side's frames further out, so each row (column) is highest at column (row) 0. When it reverses,
    the hand passes the same planes again on the way back, and each frame meets its twin further
    out. The gain is the mean, over rows i ≥ 1 and columns j ≥ 1, of the best correlation along the
    row (column) above the one at the stop's own frame, the two means averaged.

    Parameters
    ----------
    rho : (B, A) array_like
        Correlations, NaN where not measured (ignored), with B, A ≥ 1.

    Returns
    -------
    float
        About 0 (or below) for a continuation; up to about ``rho[0, 0]`` for a clean reversal. 0 when
        no row or column beyond the first has a finite value at the stop and elsewhere.

    Raises
    ------
    DataError
        If ``rho`` is not 2-D or is empty.
    """
    r = np.asarray(rho, dtype=np.float64)
    if r.ndim != 2 or r.size == 0:
        raise DataError(f"expected rho of shape (B, A) with B, A >= 1, got {r.shape}")
    r = np.where(np.isfinite(r), r, -np.inf)

    def along(m):  # rows from 1: best over the row above its first entry
        best, first = m[1:].max(axis=1), m[1:, 0]
        keep = np.isfinite(best) & np.isfinite(first)
        return list(best[keep] - first[keep])

    means = [np.mean(g) for g in (along(r), along(r.T)) if g]
    return float(np.mean(means)) if means else 0.0


def first_direction(frame_to_first, points_mm, *, threshold_mm=1.0):
    """Sign of the first clear out-of-plane move of a trajectory (the mirror convention).

    The mean elevation, over ``points_mm``, of frame i's points in frame 0's coordinates is
    ``mean((G_i · q)_z)``; the first frame whose mean |elevation| exceeds ``threshold_mm`` decides.

    Parameters
    ----------
    frame_to_first : (N-1, 4, 4) array_like
        Frame i → frame 0 transforms (estimated or ground truth).
    points_mm : (P, 2) array_like
        Image-mm (x, y) points spread over the imaged region.
    threshold_mm : float
        Mean |elevation| that counts as a move.

    Returns
    -------
    int
        +1 or −1; 0 if no frame moves that far.
    """
    g = np.asarray(frame_to_first, dtype=np.float64)
    p = np.asarray(points_mm, dtype=np.float64)
    if g.ndim != 3 or g.shape[1:] != (4, 4):
        raise DataError(f"expected frame_to_first of shape (N-1, 4, 4), got {g.shape}")
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] < 1:
        raise DataError(f"expected points_mm of shape (P, 2), got {p.shape}")
    z = g[:, 2, 0, None] * p[None, :, 0] + g[:, 2, 1, None] * p[None, :, 1] + g[:, 2, 3, None]
    mean = z.mean(axis=1)
    moved = np.nonzero(np.abs(z).mean(axis=1) > threshold_mm)[0]
    if moved.size == 0:
        return 0
    return 1 if mean[moved[0]] >= 0 else -1


def mirror(frame_to_first):
    """The mirrored trajectory ``M · G · M`` (through frame 0's plane), shape (..., 4, 4)."""
    g = np.asarray(frame_to_first, dtype=np.float64)
    return MIRROR @ g @ MIRROR


_HAND = re.compile(r"^(LH|RH)_")


@dataclass(frozen=True)
class DirectionPrior:
    """The first out-of-plane direction of scans, counted per scan name on tracked scans.

    :meth:`choose` picks the direction for a scan name from decisive counts of the same name (e.g.
    ``LH_Per_L_DtP``), else of the same name with either hand (``Per_L_DtP``), else the +1
    convention; other protocols never decide (a fan's first move says nothing about a sweep's).
    Counts are decisive with at least ``min_scans`` scans of which a fraction ``min_agreement`` or
    more moved the same way first.

    Attributes
    ----------
    counts : dict
        Scan name → [scans whose first move was +1, scans whose first move was −1].
    min_scans : int
    min_agreement : float
    """

    counts: dict = field(default_factory=dict)
    min_scans: int = 3
    min_agreement: float = 0.75

    def __post_init__(self):
        if not isinstance(self.counts, dict):
            raise DataError(f"expected counts as a dict of scan name -> [plus, minus], got {type(self.counts).__name__}")
        for name, value in self.counts.items():
            ok = (isinstance(name, str) and isinstance(value, (list, tuple)) and len(value) == 2
                  and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in value))
            if not ok:
                raise DataError(f"expected counts[{name!r}] = [plus, minus] non-negative integers, got {value!r}")
        if int(self.min_scans) < 1 or not 0.5 < float(self.min_agreement) <= 1.0:
            raise DataError(f"expected min_scans >= 1 and 0.5 < min_agreement <= 1, got {self.min_scans}, "
                            f"{self.min_agreement}")

    @classmethod
    def learn(cls, first_directions, **options):
        """Count ``{scan name: [first_direction, ...]}`` (+1 / −1; 0 = never moved, not counted)."""
        counts = {}
        for name, values in first_directions.items():
            values = list(values)
            counts[str(name)] = [sum(1 for v in values if v > 0), sum(1 for v in values if v < 0)]
        return cls(counts, **options)

    def _decide(self, plus, minus):
        total = plus + minus
        if total < self.min_scans or max(plus, minus) < self.min_agreement * total:
            return None
        return 1 if plus > minus else -1

    def choose(self, scan_name):
        """(direction, basis): +1 or −1 for ``scan_name``, and which counts decided it.

        ``basis`` is ``"name"``, ``"name, either hand"`` or ``"convention"``.
        """
        bare = _HAND.sub("", str(scan_name))
        levels = (
            ("name", [c for n, c in self.counts.items() if n == scan_name]),
            ("name, either hand", [c for n, c in self.counts.items() if _HAND.sub("", n) == bare]),
        )
        for basis, rows in levels:
            decided = self._decide(sum(r[0] for r in rows), sum(r[1] for r in rows))
            if decided is not None:
                return decided, basis
        return 1, "convention"

    def to_dict(self):
        """JSON-ready dict."""
        return {"counts": {k: list(v) for k, v in sorted(self.counts.items())}, "min_scans": int(self.min_scans),
                "min_agreement": float(self.min_agreement)}

    @classmethod
    def from_json(cls, path):
        """The ``direction_prior`` of a calibration file from ``speckle-rec calibrate``; None if it has none."""
        data = read_json(path, "calibration file")
        if not isinstance(data, dict) or "direction_prior" not in data:
            return None
        return cls.from_dict(data["direction_prior"], source=path)

    @classmethod
    def from_dict(cls, data, *, source=None):
        """Build from :meth:`to_dict` output; ``source`` names the file in error messages."""
        if not isinstance(data, dict) or not isinstance(data.get("counts"), dict):
            raise DataError("expected direction_prior with a 'counts' mapping", source)
        try:
            counts = {k: [int(v[0]), int(v[1])] if isinstance(v, (list, tuple)) and len(v) == 2 else v
                      for k, v in data["counts"].items()}
            return cls(counts, min_scans=int(data.get("min_scans", 3)),
                       min_agreement=float(data.get("min_agreement", 0.75)))
        except (DataError, TypeError, ValueError) as exc:
            raise DataError(f"bad direction_prior: {getattr(exc, 'problem', exc)}", source) from None


__all__ = ["DirectionPrior", "SignResolution", "first_direction", "mirror", "resolve_signs", "reversal_gain",
           "triplet_costs"]
