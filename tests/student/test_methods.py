import torch

from student.methods import METHODS, dance_index, gaussian_step_kl, single_plan
from student.rollout import rollout, rollout_times


def test_gaussian_kl_equals_weighted_velocity_gap():
    torch.manual_seed(0)
    x, vs, vt = torch.randn(6, 2), torch.randn(6, 2), torch.randn(6, 2)
    dt, sigma = 1 / 12, 0.3
    mu_s, mu_t = x - dt * vs, x - dt * vt
    cov = sigma**2 * torch.eye(2)
    direct = torch.stack(
        [
            torch.distributions.kl_divergence(
                torch.distributions.MultivariateNormal(mu_s[i].double(), cov.double()),
                torch.distributions.MultivariateNormal(mu_t[i].double(), cov.double()),
            )
            for i in range(6)
        ]
    )
    w = dt**2 / (2 * sigma**2)
    assert torch.allclose(gaussian_step_kl(vs, vt, dt, sigma).double(), direct, rtol=1e-5)
    assert torch.allclose(direct, w * (vs - vt).double().pow(2).sum(1), rtol=1e-5)


def test_dance_index_bounds_and_lean():
    n = 12
    assert dance_index(0.0, n) == 1 and dance_index(1.0, n) == n - 1
    torch.manual_seed(0)
    draws = torch.tensor([single_plan(n)[0] for _ in range(4000)])
    assert draws.min() >= 1 and draws.max() <= n - 1
    # Beta(5, 2) has mean 5/7: most queries sit at late, low-noise indices (t = 1 - i/N small)
    assert draws.float().mean() > (n - 1) / 2 + 1.5
    assert (draws >= n // 2).float().mean() > 0.8


def test_method_table():
    assert METHODS["diffusionopd"].plan(12) == list(range(12))
    assert METHODS["flowopd"].uses_anchor and METHODS["flowopd"].sde_noise == 0.05
    assert not METHODS["danceopd"].uses_anchor and len(METHODS["danceopd"].plan(12)) == 1
    v, vt = torch.ones(4, 2), torch.zeros(4, 2)
    t = torch.tensor([1.0, 0.5, 0.0, 0.9])
    assert torch.isclose(METHODS["diffusionopd"].loss(v, t, vt), torch.tensor(1.0))
    # Flow-OPD: clamp(1.2 - t, 0.2, 1.2) weights (0.2, 0.7, 1.2, 0.3) + 0.02 * anchor gap
    got = METHODS["flowopd"].loss(v, t, vt, v_anchor=torch.full((4, 2), 2.0))
    assert torch.isclose(got, torch.tensor((0.2 + 0.7 + 1.2 + 0.3) / 4 + 0.02))


def test_rollout_records_state_before_each_step_and_streams_it():
    net = lambda x, t: torch.ones_like(x)  # noqa: E731 - constant velocity 1
    seen = []
    states, final = rollout(net, torch.zeros(3, 2), 4, on_state=lambda i, x, t: seen.append((i, t)))
    assert [t for _, t in seen] == rollout_times(4) == [1.0, 0.75, 0.5, 0.25]
    assert torch.allclose(states[:, 0, 0], torch.tensor([0.0, -0.25, -0.5, -0.75]))
    assert torch.allclose(final, torch.full((3, 2), -1.0))


def test_rollout_without_the_final_update_records_the_same_states():
    net = torch.nn.Linear(2, 2)
    wrapped = lambda x, t: net(x)  # noqa: E731 - a velocity field v(x, t)
    torch.manual_seed(3)
    full, _ = rollout(wrapped, torch.randn(5, 2), 6, sde_noise=0.1)
    after_full = torch.randn(1)
    torch.manual_seed(3)
    short, last = rollout(wrapped, torch.randn(5, 2), 6, sde_noise=0.1, final=False)
    assert torch.equal(full, short) and torch.equal(last, short[-1])
    assert torch.equal(torch.randn(1), after_full)  # the same noise was drawn
