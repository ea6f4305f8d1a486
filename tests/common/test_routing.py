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
