import math

import torch

from common import ring


def test_ring_centers_are_on_the_circle():
    c = ring.ring_centers()
    assert c.shape == (8, 2)
    assert torch.allclose(c.norm(dim=1), torch.full((8,), 4.0), atol=1e-5)
    assert torch.allclose(c[2], torch.tensor([0.0, 4.0]), atol=1e-5)


def test_mixture_logp_matches_direct_computation():
    torch.manual_seed(0)
    x = torch.randn(50, 2) * 3
    centers = ring.centers_of([0, 2, 5])
    s = ring.MODE_STD
    direct = torch.zeros(50, dtype=torch.float64)
    for c in centers.double():
        sq = ((x.double() - c) ** 2).sum(dim=1)
        direct += torch.exp(-sq / (2 * s**2)) / (2 * math.pi * s**2) / 3
    got = ring.mixture_logp(x, centers)
    near = direct > 1e-250  # far points underflow the direct formula; logsumexp does not
    assert near.sum() > 10
    assert torch.allclose(got[near], direct[near].log(), atol=1e-9)
    assert torch.isfinite(got).all()


def test_target_logp_is_log_mean_of_teacher_densities():
    x = torch.randn(20, 2)
    a, b = ring.TEACHER_MODES["a"], ring.TEACHER_MODES["b"]
    x = torch.cat([x, ring.ring_centers()[:4] + 0.2])
    p = (
        ring.mixture_logp(x, ring.centers_of(a)).exp()
        + ring.mixture_logp(x, ring.centers_of(b)).exp()
    ) / 2
    assert torch.allclose(ring.target_logp(x, [a, b]), torch.log(p + ring.DENSITY_FLOOR), atol=1e-9)
    assert torch.allclose(ring.target_logp(x, [a, b], floor=0)[-4:], p[-4:].log(), atol=1e-9)
    # two teachers with two modes each = one uniform 4-mode mixture
    assert torch.allclose(
        ring.target_logp(x, [a, b], floor=0),
        ring.mixture_logp(x, ring.centers_of([0, 1, 2, 3])),
        atol=1e-9,
    )


def test_density_floor_bounds_far_points():
    far = torch.tensor([[-4.0, 0.0], [100.0, 100.0]])  # mode 4, and nowhere
    got = ring.target_logp(far, [ring.TEACHER_MODES["a"]])
    assert torch.allclose(
        got, torch.full((2,), math.log(ring.DENSITY_FLOOR), dtype=torch.float64), atol=1e-6
    )


def test_effective_modes_of_even_sample_equals_k():
    for k in (1, 2, 3, 4, 8):
        pts = ring.ring_centers()[:k].repeat(25, 1)
        assert abs(ring.effective_modes(pts) - k) < 1e-9


def test_teacher_mode_mass():
    pts = ring.ring_centers()[[0, 0, 2, 5]] + 0.01
    assert ring.teacher_mode_mass(pts, [0, 2]) == 0.75
    assert ring.teacher_mode_mass(pts, [1]) == 0.0


def test_sample_modes_lands_on_the_given_modes():
    x = ring.sample_modes(2000, [1, 3], torch.Generator().manual_seed(0))
    assert ring.teacher_mode_mass(x, [1, 3]) > 0.999
    assert abs(ring.effective_modes(x) - 2) < 0.05
