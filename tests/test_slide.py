"""Anatomy slide (speckle_rec.slide): slide fields, view similarity, same-view pairs, stretch votes."""

import cv2
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from speckle_rec import slide
from speckle_rec.direction import MIRROR


def _anatomy(shape, seed=3):
    """Smooth random texture (uint8): large structures, no speckle."""
    texture = gaussian_filter(np.random.default_rng(seed).normal(size=shape), 3.0 * shape[1] / 128)
    return ((texture - texture.min()) / np.ptp(texture) * 255).astype(np.uint8)


def _slid(image, shift_px, local_px, centre, radius_px):
    """``image`` moved rigidly by ``shift_px`` (x, y) plus a Gaussian bump of ``local_px`` x-motion
    at ``centre``."""
    rows, cols = np.mgrid[0:image.shape[0], 0:image.shape[1]].astype(np.float32)
    squared = (cols - centre[0]) ** 2 + (rows - centre[1]) ** 2
    bump = np.exp(-squared / (2 * radius_px**2)).astype(np.float32)
    map_x = (cols - shift_px[0] - local_px * bump).astype(np.float32)
    map_y = (rows - shift_px[1]).astype(np.float32)
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


class _GaussianModel:
    """Gaussian decorrelation at every depth that falls to ``MIN_RHO`` at 0.4 mm."""

    sigma_mm = 0.4 / np.sqrt(-2 * np.log(slide.MIN_RHO))

    def rho(self, distance_mm, depth_mm):
        return np.exp(-0.5 * (np.asarray(distance_mm) / self.sigma_mm) ** 2) + 0 * np.asarray(depth_mm)


def _field(base, shift_px, local_px, plane):
    """One key step's slide field: ``base`` (0.2 mm pixels when 128 wide, finer when wider) and
    ``_slid(base, ...)``, shifts in pixels of the 128-wide image, elevation ``plane`` (tz, a, b)."""
    h, w = base.shape
    scale = w / 128
    moved = _slid(base, np.multiply(shift_px, scale), local_px * scale, (w / 2, h / 2), 12 * scale)
    stack, mask, spacing = np.stack([base, moved]), np.ones((h, w), bool), (0.2 / scale, 0.2 / scale)
    return slide.slide_fields(stack, mask, spacing, np.array([0, 1]), np.array([plane], float),
                              model=_GaussianModel())[0]


def test_slide_field_keeps_the_non_rigid_motion_signed_by_the_elevation():
    base = _anatomy((96, 128))
    up, down = (0.3, 0.0, 0.0), (-0.3, 0.0, 0.0)
    right = _field(base, (0, 0), 1.5, up)
    # points 1.8 mm (9 px) apart: 10 x 14 blocks, of which the 3 rows above 4 mm (20 px) are the skin's
    assert right.shape == (2 * (10 - 3) * 14,)
    assert slide.slide_points(np.ones((96, 128), bool), (0.2, 0.2)).shape == ((10 - 3) * 14, 2)
    assert np.linalg.norm(right) == pytest.approx(1.0)
    assert right @ _field(base, (1, 1), 1.5, up) > 0.95  # the rigid part is removed
    assert right @ _field(base, (0, 0), -1.5, up) < -0.9  # sliding the other way
    assert right @ _field(base, (0, 0), 1.5, down) < -0.9  # the same slide under the opposite elevation
    # a tilt whose elevation changes sign across the slide's region: the field is weighted per point
    tilt = (-0.02 * 64 * 0.2, 0.02, 0.0)  # elevation 0.02·(x − 12.8 mm)
    assert abs(right @ _field(base, (0, 0), 1.5, tilt)) < 0.5


def test_slide_fields_are_defined_in_mm():
    """The same scene at 0.2 and 0.1 mm per pixel gives the same points and about the same field."""
    coarse = _anatomy((96, 128))
    fine = cv2.resize(coarse, (256, 192), interpolation=cv2.INTER_CUBIC)
    a, b = _field(coarse, (0, 0), 1.5, (0.3, 0.0, 0.0)), _field(fine, (0, 0), 1.5, (0.3, 0.0, 0.0))
    assert a.shape == b.shape
    assert a @ b > 0.8


def test_slide_fields_of_chosen_steps_only():
    base = _anatomy((96, 128))
    h, w = base.shape
    centre = (w / 2, h / 2)
    stack = np.stack([base, _slid(base, (0, 0), 1.5, centre, 12), _slid(base, (1, 0), -1.5, centre, 12)])
    planes = np.array([[0.3, 0.0, 0.0], [0.3, 0.0, 0.0]])
    args = (stack, np.ones((h, w), bool), (0.2, 0.2), np.array([0, 1, 2]), planes)
    every = slide.slide_fields(*args, model=_GaussianModel(), threads=2)
    second = slide.slide_fields(*args, model=_GaussianModel(), steps=np.array([1]))
    assert np.linalg.norm(every, axis=1) == pytest.approx([1.0, 1.0])
    assert not np.any(second[0]) and np.array_equal(second[1], every[1])


def test_slide_fields_in_chunks_and_threads_match_one_by_one(monkeypatch):
    """Steps split over chunks (key frames shared at their borders) and two workers give the rows
    of each step computed alone, and OpenCV's thread count is restored."""
    base = _anatomy((96, 128))
    h, w = base.shape
    stack = np.stack([_slid(base, (0.3 * k, 0), 1.5 * (-1) ** k, (w / 2, h / 2), 12) for k in range(6)])
    keys, planes = np.array([0, 1, 3, 4, 5]), np.tile([0.3, 0.0, 0.0], (4, 1))
    args = (stack, np.ones((h, w), bool), (0.2, 0.2), keys, planes)
    alone = np.array([slide.slide_fields(*args, model=_GaussianModel(), steps=np.array([m]))[m]
                      for m in range(4)])
    monkeypatch.setattr(slide, "_CHUNK_STEPS", 3)
    threads = cv2.getNumThreads()
    chunked = slide.slide_fields(*args, model=_GaussianModel(), threads=2)
    assert cv2.getNumThreads() == threads
    assert np.array_equal(chunked, alone)
    assert np.linalg.norm(chunked, axis=1) == pytest.approx(np.ones(4))
    empty = slide.slide_fields(*args, model=_GaussianModel(), steps=np.zeros(0, np.int64), threads=2)
    assert empty.shape == chunked.shape and not empty.any()


def test_slide_field_leaves_out_points_that_move_too_far_out_of_plane():
    base = _anatomy((96, 128))
    assert not np.any(_field(base, (0, 0), 1.5, (0.5, 0.0, 0.0)))
    # elevation 0.05·(x − 12.8 mm): beyond 0.4 mm (MIN_RHO) left of x = 4.8 and right of 20.8 mm
    field = _field(base, (0, 0), 1.5, (-0.05 * 64 * 0.2, 0.05, 0.0)).reshape(-1, 2)
    x_mm = (slide.slide_points(np.ones((96, 128), bool), (0.2, 0.2))[:, 0] + 1) * 0.2
    tracked = np.any(field != 0, axis=1)
    assert not np.any(tracked[(x_mm < 4.7) | (x_mm > 20.9)])
    assert np.mean(tracked[(x_mm > 4.9) & (x_mm < 20.7)]) > 0.9


def test_view_similarity_is_one_for_the_same_view():
    a, b = _anatomy((240, 320), 1), _anatomy((240, 320), 2)
    stack = np.stack([a, a, b, _slid(a, (1, 0), 0.0, (0, 0), 1.0), _slid(a, (4, 0), 0.0, (0, 0), 1.0)])
    s = slide.view_similarity(stack, [0, 1, 2, 3, 4], (0.2, 0.2))
    assert s.shape == (5, 5) and s[0, 1] == pytest.approx(1.0)
    assert s[0, 2] < 0.5  # other anatomy
    assert s[0, 3] > slide.SAME_VIEW > s[0, 4]  # 1 px (0.2 mm) along is the same view, 4 px is not


def test_same_view_pairs_keep_far_apart_alike_views_with_clear_cosines():
    m = slide.MIN_GAP + 5
    rng = np.random.default_rng(0)
    fields = rng.normal(size=(m, 6))
    fields[m - 1] = -fields[0]  # the same slide, the other way: cosine −1
    fields[m - 2] = fields[1] + 0.01 * rng.normal(size=6)
    fields /= np.linalg.norm(fields, axis=1, keepdims=True)
    similarity = np.full((m, m), 0.5)
    similarity[0, m - 1] = similarity[1, m - 2] = similarity[0, 2] = 0.999
    moving = np.ones(m, bool)
    first, second, cosine = slide.same_view_pairs(fields, similarity, moving)
    assert sorted(zip(first.tolist(), second.tolist())) == [(0, m - 1), (1, m - 2)]  # (0, 2) is too near
    assert cosine[first == 0][0] == pytest.approx(-1.0) and cosine[first == 1][0] > 0.99
    moving[m - 1] = False
    first, _, _ = slide.same_view_pairs(fields, similarity, moving)
    assert first.tolist() == [1]
    # a weak cosine is dropped unless the threshold is lowered (the benchmark's table of every |cosine|)
    across = rng.normal(size=6)
    across -= (across @ fields[1]) * fields[1]
    fields[m - 2] = 0.1 * fields[1] + np.sqrt(1 - 0.1**2) * across / np.linalg.norm(across)  # cosine 0.1
    assert slide.same_view_pairs(fields, similarity, moving)[0].size == 0
    weak = slide.same_view_pairs(fields, similarity, moving, min_cosine=0.0)
    assert weak[0].tolist() == [1] and 0.0 < weak[2][0] < slide.MIN_COSINE


def test_paired_steps_are_the_moving_steps_with_a_far_same_view_partner():
    m = slide.MIN_GAP + 5
    similarity = np.full((m, m), 0.5)
    similarity[0, m - 1] = similarity[m - 1, 0] = 0.999
    similarity[1, 3] = similarity[3, 1] = 0.999  # too near
    similarity[2, m - 2] = similarity[m - 2, 2] = 0.999
    moving = np.ones(m, bool)
    moving[m - 2] = False
    assert slide.paired_steps(similarity, moving).tolist() == [0, m - 1]
    # they are the steps same_view_pairs can use: fields elsewhere do not change its pairs
    fields = np.random.default_rng(1).normal(size=(m, 6))
    fields /= np.linalg.norm(fields, axis=1, keepdims=True)
    fields[0] = fields[m - 1]
    alone = np.zeros_like(fields)
    alone[[0, m - 1]] = fields[[0, m - 1]]
    full = slide.same_view_pairs(fields, similarity, moving)
    some = slide.same_view_pairs(alone, similarity, moving)
    assert all(np.array_equal(a, b) for a, b in zip(full, some)) and full[0].tolist() == [0]


def test_quiet_stretches_need_moving_steps_on_both_sides():
    moving = np.array([False, True, False, False, True, True, False, True, False])
    assert slide.quiet_stretches(moving) == [(2, 3), (6, 6)]
    assert slide.quiet_stretches(np.ones(4, bool)) == []
    assert slide.quiet_stretches(np.zeros(4, bool)) == []


def _quiet_scene(wrong_from):
    """80 key steps, 40-41 quiet; the truth moves one way, the DP's signs are flipped from ``wrong_from``.

    Returns moving, true signs, DP signs.
    """
    moving = np.ones(80, bool)
    moving[40:42] = False
    truth = np.ones(80, np.int64)
    dp = truth.copy()
    dp[wrong_from:] = -1
    return moving, truth, dp


def test_votes_decide_the_relation_across_a_quiet_stretch():
    """The DP flipped the relation across the quiet stretch; the votes mend it."""
    moving, truth, dp = _quiet_scene(42)
    first, second = np.array([30, 35, 38, 5]), np.array([50, 60, 45, 79])
    cosine = np.array([0.6, 0.4, 0.5, -0.9])  # the last pair is out of the window (and wrong)
    signs, counts = slide.vote_across_stretches(dp, moving, first, second, cosine, window=20, min_pairs=3)
    assert signs.tolist() == truth.tolist() and dp[42] == -1  # a new array
    assert counts == {"quiet_stretches": 1, "decided": 1, "flipped": 1, "moved": 0}
    # the same votes under the right signs change nothing
    assert slide.vote_across_stretches(truth, moving, first, second, cosine, window=20, min_pairs=3)[0].tolist() \
        == truth.tolist()
    # too few votes: the DP's relation stays
    signs, counts = slide.vote_across_stretches(dp, moving, first, second, cosine, window=20, min_pairs=4)
    assert signs.tolist() == dp.tolist() and counts["decided"] == 0
    # a pair 35 steps before and 37 after the stretch votes only when the window reaches it
    far = (np.array([5]), np.array([79]), np.array([0.9]))
    assert slide.vote_across_stretches(dp, moving, *far, window=20, min_pairs=1)[1]["decided"] == 0
    assert slide.vote_across_stretches(dp, moving, *far, window=40, min_pairs=1)[0].tolist() == truth.tolist()


def test_votes_flip_where_the_pairs_disagree_most_when_the_error_is_beside_the_stretch():
    """The DP's signs are wrong after step 50, not across the quiet stretch 40-41: the flip goes there."""
    moving, truth, dp = _quiet_scene(51)
    # true cosines (all positive: the truth moves one way); under the DP's signs the three pairs
    # reaching past step 50 disagree, and so does (42, 61), which does not straddle the stretch
    first, second = np.array([25, 30, 28, 33, 36, 42]), np.array([46, 48, 55, 58, 60, 61])
    cosine = np.array([0.5, 0.4, 0.6, 0.5, 0.4, 0.5])
    # the pairs place the error at one of the junctions 48-54; the DP is least sure of junction 50
    margins = np.full(79, 5.0)
    margins[50] = 0.5
    signs, counts = slide.vote_across_stretches(dp, moving, first, second, cosine, window=20, min_pairs=3,
                                                margins=margins)
    assert signs.tolist() == truth.tolist()
    assert counts == {"quiet_stretches": 1, "decided": 1, "flipped": 1, "moved": 1}
    unsure = slide.vote_across_stretches(dp, moving, first, second, cosine, window=20, min_pairs=3)[0]
    assert np.flatnonzero(np.diff(unsure * dp)).tolist() == [48]  # equal margins: the first, junction 48
    # without the pairs past step 50 the two sides agree: nothing changes
    keep = second < 51
    assert slide.vote_across_stretches(dp, moving, first[keep], second[keep], cosine[keep], window=20,
                                       min_pairs=2)[0].tolist() == dp.tolist()


def test_moving_steps_by_rms_elevation_at_the_anchors():
    elevation = np.array([[0.12, -0.12, 0.12], [0.05, 0.0, -0.05], [0.0, 0.0, 0.3]])  # RMS 0.12, 0.041, 0.173 mm
    np.testing.assert_allclose(slide.step_travel(elevation), [0.12, np.sqrt(0.005 / 3), np.sqrt(0.03)])
    assert slide.moving_steps(elevation).tolist() == [True, False, True]


def test_segments_split_after_each_quiet_stretch():
    moving = np.array([False, True, False, False, True, True, False, True, False])  # stretches 2-3, 6
    assert slide.segments(moving).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    assert slide.segments(np.ones(3, bool)).tolist() == [0, 0, 0]


def _runs_scene():
    """30 key steps in three runs (quiet stretches 9-10 and 19-20); the truth moves one way."""
    moving = np.ones(30, bool)
    moving[[9, 10, 19, 20]] = False
    return moving, slide.segments(moving), np.ones(30, np.int64)


def test_votes_between_runs_choose_the_relations_at_all_stretches():
    moving, segment, truth = _runs_scene()
    wrong = truth.copy()
    wrong[21:] = -1  # the relation at the second stretch is wrong
    # pairs run 0 - run 2 only (true cosines > 0): they say runs 0 and 2 disagree, not at which stretch
    first, second, cosine = np.array([2, 3, 5]), np.array([24, 25, 27]), np.array([0.5, 0.6, 0.4])
    signs, counts = slide.vote_between_segments(wrong, segment, first, second, cosine, min_pairs=3,
                                                margins=np.array([2.0, 1.0]))
    assert signs.tolist() == truth.tolist() and wrong[21] == -1  # a new array
    assert counts == {"runs": 3, "run_pairs_voting": 1, "flipped": 1, "unlinked": []}  # 0-2 spans both
    # the first stretch's relation is the less sure: it flips instead (one flip either way)
    other = slide.vote_between_segments(wrong, segment, first, second, cosine, min_pairs=3,
                                        margins=np.array([1.0, 2.0]))[0]
    assert other[[0, 15, 25]].tolist() == [1, -1, 1]
    # a pair run 1 - run 2 places it: the first stretch's relation was right
    both = (np.append(first, [12, 13, 14]), np.append(second, [23, 24, 26]), np.append(cosine, [0.3] * 3))
    assert slide.vote_between_segments(wrong, segment, *both, min_pairs=3,
                                       margins=np.array([1.0, 2.0]))[0].tolist() == truth.tolist()
    # pairs run 1 - run 2 alone span only the second stretch: the first is unlinked
    later = slide.vote_between_segments(wrong, segment, *(part[3:] for part in both), min_pairs=3)
    assert later[0].tolist() == truth.tolist() and later[1]["unlinked"] == [0]
    # too few pairs, or right signs: nothing changes; pairs within a run never vote
    few = slide.vote_between_segments(wrong, segment, first, second, cosine, min_pairs=4)
    assert few[0].tolist() == wrong.tolist() and few[1]["unlinked"] == [0, 1]
    assert slide.vote_between_segments(truth, segment, first, second, cosine, min_pairs=3)[1]["flipped"] == 0
    inside = (np.array([0, 1, 2]), np.array([25, 26, 27]), np.array([-0.5, -0.5, -0.5]))
    assert slide.vote_between_segments(truth, np.zeros(30, np.int64), *inside, min_pairs=1)[1] \
        == {"runs": 1, "run_pairs_voting": 0, "flipped": 0, "unlinked": []}


def test_votes_between_runs_refuse_more_stretches_than_the_brute_force_takes():
    segment = np.repeat(np.arange(slide.MAX_STRETCHES + 2), 2)
    with pytest.raises(ValueError, match=f"at most {slide.MAX_STRETCHES} quiet stretches, got 13"):
        slide.vote_between_segments(np.ones(segment.size), segment, np.zeros(0, int), np.zeros(0, int),
                                    np.zeros(0), min_pairs=1)


def _chained(steps, flips_after=()):
    """(K, 4, 4) poses of the key frames chained from ``steps`` (K − 1, 4, 4), each step after a
    junction in ``flips_after`` mirrored through the image plane (its out-of-plane sign flipped)."""
    poses = [np.eye(4)]
    for m, step in enumerate(steps):
        flipped = sum(m > end for end in flips_after) % 2
        poses.append(poses[-1] @ (MIRROR @ step @ MIRROR if flipped else step))
    return np.array(poses)


def test_view_distances_take_the_nearest_relation_at_the_stretches_between():
    """The reflection of later frames equals re-chaining the key steps with their signs flipped."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(4)
    _, segment, _ = _runs_scene()
    steps = np.tile(np.eye(4), (30, 1, 1))
    steps[:, :3, :3] = Rotation.from_rotvec(rng.normal(scale=0.03, size=(30, 3))).as_matrix()
    steps[:, :3, 3] = rng.normal(scale=0.5, size=(30, 3))
    points = np.stack(np.meshgrid([5.0, 20.0, 35.0], [5.0, 25.0, 45.0]), -1).reshape(-1, 2)
    first, second = np.array([2, 3, 4, 12, 1]), np.array([8, 15, 25, 27, 29])  # the first within a run
    homogeneous = np.concatenate([points.T, np.zeros((1, 9)), np.ones((1, 9))])

    def rms(poses):
        gap = (poses[first] @ homogeneous - poses[second] @ homogeneous)[:, :3]
        return np.sqrt(np.mean(np.sum(gap**2, axis=1), axis=1))

    every = [rms(_chained(steps, flips)) for flips in [(), (10,), (20,), (10, 20)]]
    found = slide.view_distances(_chained(steps), first, second, segment, points)
    assert np.allclose(found, np.min(every, axis=0), atol=1e-9)
    assert found[0] == pytest.approx(every[0][0])  # no stretch between: one relation
    assert not np.allclose(every[0], every[3])  # the flips matter
    # chained under a wrong relation, a pair still finds its nearest one
    assert np.allclose(slide.view_distances(_chained(steps, (20,)), first, second, segment, points), found)
