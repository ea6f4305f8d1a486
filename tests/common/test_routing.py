import numpy as np
import pytest
import torch

from common import ring, routing


def centers():
    return [ring.centers_of(ring.TEACHER_MODES["a"]), ring.centers_of(ring.TEACHER_MODES["b"])]


def test_state_on_a_teachers_mode_center_goes_to_that_teacher():
    x = ring.ring_centers()[[0, 1, 2, 3]]
    assert routing.assign("nearest", x, centers()).tolist() == [0, 1, 0, 1]


def test_nearest_picks_the_closest_own_mode():
    # mode 7 is next to mode 0 (teacher a); mode 4 is next to mode 3 (teacher b)
    x = ring.ring_centers()[[7, 4]]
    assert routing.route_nearest(x, centers()).tolist() == [0, 1]


def test_label_and_fallback():
    x = ring.ring_centers()[[0, 1, 2]]
    route = torch.tensor([1, -1, 0], dtype=torch.int32)
    assert routing.assign("nearest", x, centers(), route).tolist() == [1, 1, 0]
    with pytest.raises(routing.RoutingError, match="route"):
        routing.assign("label", x, centers())
    with pytest.raises(routing.RoutingError, match=r"\[-1, 1\]"):
        routing.assign("label", x, centers(), torch.tensor([0, 2, 0]))


def test_nearest_without_centers_is_refused_clearly():
    with pytest.raises(routing.RoutingError, match="mode centers"):
        routing.assign("nearest", torch.zeros(2, 2), [centers()[0], None])


def test_merge_scatters_rows_and_average_takes_the_mean():
    x = ring.ring_centers()[[0, 1, 2, 3]]
    a = routing.assign("nearest", x, centers())
    rows = routing.rows_by_teacher(a, 2)
    answers = [torch.full((len(r), 2), float(k + 1)) for k, r in enumerate(rows)]
    assert routing.merge_answers(a, rows, answers, 2)[:, 0].tolist() == [1, 2, 1, 2]
    avg = routing.assign("average", x, centers())
    rows = routing.rows_by_teacher(avg, 2)
    assert all(len(r) == 4 for r in rows)
    out = routing.merge_answers(avg, rows, [torch.ones(4, 2), 3 * torch.ones(4, 2)], 2)
    assert torch.equal(out, torch.full((4, 2), 2.0))


def test_nearest_with_one_teacher_gives_it_every_state_and_still_checks_centers():
    x = torch.randn(50, 2) * 4
    assert routing.assign("nearest", x, centers()[:1]).tolist() == [0] * 50
    with pytest.raises(routing.RoutingError, match="dimension"):
        routing.assign("nearest", torch.zeros(2, 3), centers()[:1])


def test_nearest_owner_matches_brute_force_distances():
    """The laid-out table (one matrix product, per-teacher minimums) picks the teacher of the
    closest center, as computing every distance does; ties go to the lower index."""
    rng = np.random.default_rng(3)
    per_teacher = [rng.normal(size=(m, 3)).astype(np.float32) * 3 for m in (2, 1, 4)]
    x = rng.normal(size=(500, 3)).astype(np.float32) * 3
    table = routing.nearest_table(per_teacher)
    dist = [((x[:, None, :] - c[None]) ** 2).sum(-1).min(axis=1) for c in per_teacher]
    want = np.argmin(np.stack(dist), axis=0)
    got = routing.nearest_owner(x, table)
    assert got.dtype == np.int64
    # float32 rounding may flip states that are equally far (to 1e-4) from two teachers
    near_tie = np.sort(np.stack(dist), axis=0)
    clear = (near_tie[1] - near_tie[0]) > 1e-4
    assert np.array_equal(got[clear], want[clear]) and clear.mean() > 0.95
    same = [np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32)]
    assert (
        routing.nearest_owner(np.ones((4, 2), np.float32), routing.nearest_table(same)).tolist()
        == [0] * 4
    )


def test_split_and_merge_rows_put_every_answer_back_in_place():
    rng = np.random.default_rng(4)
    for k in (2, 5, 12):  # a compare per teacher up to 8 teachers, one stable sort beyond
        a = rng.integers(0, k, size=300)
        rows = routing.split_rows(a, k)
        assert [r.tolist() for r in rows] == [np.flatnonzero(a == j).tolist() for j in range(k)]
        answers = [np.stack([r, -r], axis=1).astype(np.float32) for r in rows]  # row's own index
        merged = routing.merge_rows(a, rows, answers, 2)
        assert np.array_equal(merged[:, 0], np.arange(300)) and np.array_equal(
            merged[:, 1], -np.arange(300)
        )


def test_centers_of_different_dimensions_refuse_every_state():
    table = routing.nearest_table([np.zeros((1, 2)), np.zeros((1, 3))])
    with pytest.raises(routing.RoutingError, match="teacher 1 mode centers have dimension 3"):
        routing.nearest_owner(np.zeros((4, 2), np.float32), table)
