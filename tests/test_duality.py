"""The dual machinery against brute force, autograd and strong duality."""
import itertools

import pytest
import torch

from dualign.core.dual_steps import (
    box_qp,
    curvature_step_sizes,
    newton_dual_step,
    projected_dual_step,
    within_prompt_scatter,
)
from dualign.core.duality import (
    InfeasibleError,
    dual_terms,
    solve_dual,
    tilted_log_weights,
)
from dualign.core.oracle import ExactOracle, Instance


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def random_instance(seed, m, P=6, N=40, beta=0.7, correlation=-0.6):
    g = torch.Generator().manual_seed(seed)
    reward = torch.randn(P, N, generator=g)
    utility = correlation * reward + 0.8 * torch.randn(m, P, N, generator=g)
    log_base = torch.log_softmax(torch.randn(P, N, generator=g), -1)
    reference_mean = (log_base.exp() * utility).sum(-1).mean(-1)
    threshold = torch.full((m,), 0.3)
    return reward, utility, reference_mean, threshold, beta, log_base


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("m", [1, 2])
def test_solver_matches_brute_force_grid(seed, m):
    reward, utility, reference_mean, threshold, beta, log_base = random_instance(seed, m)
    solution = solve_dual(reward, utility, reference_mean, threshold, beta, log_base=log_base)
    assert solution.converged
    grid = torch.linspace(0, 4, 201 if m == 1 else 81)
    values = [
        dual_terms(reward, utility, reference_mean, threshold, torch.tensor(point), beta, log_base).value.item()
        for point in itertools.product(grid.tolist(), repeat=m)
    ]
    best = min(values)
    assert solution.value <= best + 1e-9  # the solver beats every grid point
    spacing = (grid[1] - grid[0]).item()
    best_point = torch.tensor(list(itertools.product(grid.tolist(), repeat=m))[values.index(best)])
    assert torch.allclose(solution.multipliers, best_point, atol=spacing)
    # KKT: slack >= 0 everywhere, = 0 where the multiplier is positive
    assert (solution.gradient >= -1e-7).all()
    assert torch.allclose(solution.gradient * solution.multipliers, torch.zeros(m), atol=1e-7)


@pytest.mark.parametrize("beta", [1e-3, 2e-4, 1e-6])
@pytest.mark.parametrize("m", [1, 2])
def test_solver_stays_right_for_small_beta(beta, m):
    """Nearly deterministic tilted policies: the covariance (beta x Hessian) underflows and Newton cannot move; the
    solver once returned lambda = 0 unconverged there. Against a brute-force grid of the same D."""
    reward, utility, reference_mean, threshold, _, log_base = random_instance(0, m)
    solution = solve_dual(reward, utility, reference_mean, threshold, beta, log_base=log_base)
    assert solution.converged
    grid = torch.linspace(0, 4, 401 if m == 1 else 81)
    points = list(itertools.product(grid.tolist(), repeat=m))
    values = [dual_terms(reward, utility, reference_mean, threshold, torch.tensor(p), beta, log_base).value.item()
              for p in points]
    assert solution.value <= min(values) + 1e-9
    assert solution.multipliers.max() > 0  # the constraints bind on this instance


def test_an_unreachable_threshold_names_the_largest_reachable_improvement():
    reward, utility, reference_mean, _, beta, log_base = random_instance(0, 1)
    reachable = ((utility[0].masked_fill(~torch.isfinite(log_base), -1e9)).max(-1).values.mean() - reference_mean[0]).item()
    with pytest.raises(InfeasibleError, match=f"the largest improvements they allow are \\[{round(reachable, 6)}\\]"):
        solve_dual(reward, utility, reference_mean, torch.tensor([reachable + 0.1]), beta, log_base=log_base)
    assert solve_dual(reward, utility, reference_mean, torch.tensor([reachable - 0.05]), beta, log_base=log_base).converged


def test_gradient_and_hessian_match_autograd():
    reward, utility, reference_mean, threshold, beta, log_base = random_instance(3, 2)
    lam = torch.tensor([0.4, 1.3], requires_grad=True)
    terms = dual_terms(reward, utility, reference_mean, threshold, lam, beta, log_base)
    value = lambda x: dual_terms(reward, utility, reference_mean, threshold, x, beta, log_base).value  # noqa: E731
    assert torch.allclose(terms.gradient, torch.autograd.functional.jacobian(value, lam.detach()), atol=1e-10)
    assert torch.allclose(terms.hessian, torch.autograd.functional.hessian(value, lam.detach()), atol=1e-8)


def test_uniform_base_is_the_plug_in_log_mean_exp():
    reward, utility, reference_mean, threshold, beta, _ = random_instance(4, 1)
    lam = torch.tensor([0.8])
    h = utility - (reference_mean + threshold).view(-1, 1, 1)
    expected = beta * torch.log(torch.exp((reward + lam[0] * h[0]) / beta).mean(-1)).mean()
    got = dual_terms(reward, utility, reference_mean, threshold, lam, beta).value
    assert torch.allclose(got, expected)


def test_log_sum_exp_survives_huge_scores():
    reward, utility, reference_mean, threshold, beta, log_base = random_instance(5, 1)
    terms = dual_terms(reward * 1e4, utility, reference_mean, threshold, torch.tensor([1.0]), 0.01, log_base)
    assert torch.isfinite(terms.value) and torch.isfinite(terms.gradient).all()


@pytest.mark.parametrize("m", [1, 2])
def test_strong_duality_on_enumerated_instance(m):
    reward, utility, _, _, beta, log_base = random_instance(6, m)
    instance = Instance(log_base, reward, utility, beta, torch.full((m,), 0.25))
    oracle = ExactOracle(instance)
    optimum = oracle.optimum()
    assert (optimum.multipliers > 0).all(), "the test instance should bind"
    evaluation = oracle.evaluate(optimum.logprob)
    # D(lambda*) = J(pi_lambda*) and pi_lambda* meets every active constraint exactly
    assert abs(optimum.value - evaluation["objective"]) < 1e-8
    assert torch.allclose(torch.tensor(evaluation["improvement"]), instance.threshold, atol=1e-7)
    # weak duality: every lambda >= 0 bounds the optimum from above
    for lam in ([0.0] * m, [2.0] * m):
        assert oracle.dual_value(lam) >= optimum.value - 1e-12
    # pi_lambda* beats random feasible perturbations of itself in objective
    assert evaluation["tv_to_optimum"] < 1e-12


@pytest.mark.parametrize("m", [1, 2])
def test_the_gap_to_the_optimum_splits_into_distance_to_pi_star_and_missed_constraints(m):
    """P* - J = beta KL(pi || pi*) + lambda* . (a - b) for any policy, exactly; both parts vanish at pi*."""
    reward, utility, _, _, beta, log_base = random_instance(6, m)
    oracle = ExactOracle(Instance(log_base, reward, utility, beta, torch.full((m,), 0.25)))
    for scale in (0.0, 0.5, 3.0):  # pi_ref, and two policies either side of pi*
        logprob = (log_base + scale * reward).log_softmax(-1)
        evaluation = oracle.evaluate(logprob)
        assert evaluation["objective_gap"] == pytest.approx(
            evaluation["gap_from_kl"] + evaluation["gap_from_constraints"], abs=1e-9)
        assert evaluation["gap_from_kl"] >= 0
    at_optimum = oracle.evaluate(oracle.optimum().logprob)
    assert abs(at_optimum["gap_from_kl"]) < 1e-10 and abs(at_optimum["gap_from_constraints"]) < 1e-7


def test_tilted_policy_is_normalised_and_tilts_towards_the_composite_reward():
    reward, utility, _, _, beta, log_base = random_instance(7, 1)
    logw = tilted_log_weights(reward, utility, torch.tensor([0.0]), beta, log_base)
    assert torch.allclose(logw.exp().sum(-1), torch.ones(reward.shape[0]))
    assert ((logw.exp() * reward).sum(-1) > (log_base.exp() * reward).sum(-1)).all()


def test_projected_dual_step_signs_and_projection():
    lam = torch.tensor([1.0, 0.1, 2.0])
    slack = torch.tensor([0.5, 1.0, -0.5])  # over-satisfied, over-satisfied past zero, violated
    updated = projected_dual_step(lam, slack, torch.tensor([1.0, 1.0, 1.0]))
    assert torch.allclose(updated, torch.tensor([0.5, 0.0, 2.5]))
    assert torch.allclose(projected_dual_step(lam, slack, 1.0, max_multiplier=2.2), torch.tensor([0.5, 0.0, 2.2]))


def test_infeasible_threshold_is_reported():
    reward, utility, reference_mean, _, beta, log_base = random_instance(8, 1)
    with pytest.raises(InfeasibleError, match="not achievable"):
        solve_dual(reward, utility, reference_mean, torch.tensor([100.0]), beta, log_base=log_base)


def _brute_force_box_qp(hessian, linear, lower, upper):
    """Every active set (each coordinate free, at its lower or at its upper bound): solve the free block, keep the
    points inside the box, return the one of least value (the QP is convex, so that is the minimiser)."""
    best, best_value = None, float("inf")
    m = linear.numel()
    for states in itertools.product("fLU", repeat=m):
        point = torch.where(torch.tensor([s == "L" for s in states]), lower, upper)
        free = torch.tensor([s == "f" for s in states])
        if free.any():
            rest = ~free
            rhs = -(linear[free] + hessian[free][:, rest] @ point[rest])
            point[free] = torch.linalg.solve(hessian[free][:, free], rhs)
        if (point < lower - 1e-12).any() or (point > upper + 1e-12).any():
            continue
        value = float(linear @ point + 0.5 * point @ hessian @ point)
        if value < best_value:
            best, best_value = point, value
    return best


def test_box_qp_matches_brute_force_over_every_active_set():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        m = int(torch.randint(1, 4, (1,), generator=generator))
        root = torch.randn(m, m, generator=generator)
        hessian = root @ root.T + 0.05 * torch.eye(m)
        linear = 2 * torch.randn(m, generator=generator)
        lower = -torch.rand(m, generator=generator) * 2
        upper = torch.rand(m, generator=generator) * 2
        assert torch.allclose(box_qp(hessian, linear, lower, upper), _brute_force_box_qp(hessian, linear, lower, upper),
                              atol=1e-8)


def test_newton_dual_step_for_two_constraints_is_the_projected_qp_not_a_clip():
    hessian = torch.tensor([[1.0, 0.9], [0.9, 1.0]])
    multipliers = torch.tensor([0.2, 0.5])
    slack = torch.tensor([0.6, 0.5])  # both over-satisfied: lambda falls, the first one below 0 unprojected
    newton = newton_dual_step(multipliers, slack, hessian=hessian, trust_radius=100.0)
    # brute force over lambda' >= 0 of u . d + d' H d / 2, d = lambda' - lambda, on a fine grid
    grid = torch.linspace(0, 1.5, 1501)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    d = torch.stack([a - multipliers[0], b - multipliers[1]], dim=-1)
    value = d @ slack + 0.5 * torch.einsum("...i,ij,...j->...", d, hessian, d)
    index = int(value.argmin())
    brute = torch.stack([a.flatten()[index], b.flatten()[index]])
    assert torch.allclose(newton, brute, atol=1e-3)
    assert torch.allclose(newton, _brute_force_box_qp(hessian, slack, -multipliers, torch.full((2,), 100.0))
                          + multipliers, atol=1e-9)
    clipped = (multipliers - torch.linalg.solve(hessian, slack)).clamp(min=0)
    assert (newton - clipped).abs().max() > 0.1  # the clip keeps the second multiplier's step meant for lambda_1 < 0


def test_newton_dual_step_inside_the_bounds_is_lambda_minus_h_inverse_u_and_the_trust_region_bounds_it():
    hessian = torch.tensor([[2.0, 0.3], [0.3, 0.5]])
    multipliers, slack = torch.tensor([3.0, 2.0]), torch.tensor([0.4, -0.2])
    assert torch.allclose(newton_dual_step(multipliers, slack, hessian=hessian),
                          multipliers - torch.linalg.solve(hessian, slack), atol=1e-9)
    nearly_flat = torch.tensor([[1e-9]])  # a constraint the samples hardly vary on: the step stops at the region
    assert torch.allclose(newton_dual_step(torch.tensor([0.5]), torch.tensor([-0.3]), hessian=nearly_flat),
                          torch.tensor([2.5]))  # default region: a move of at most max(2, 2 lambda)
    assert torch.allclose(newton_dual_step(torch.tensor([4.0]), torch.tensor([-0.3]), hessian=nearly_flat),
                          torch.tensor([12.0]))  # at most triple lambda
    assert torch.allclose(newton_dual_step(torch.tensor([4.0]), torch.tensor([-0.3]), hessian=nearly_flat,
                                           trust_radius=0.5), torch.tensor([4.5]))  # algorithm.trust_radius
    assert torch.allclose(newton_dual_step(torch.tensor([4.0]), torch.tensor([-0.3]), 1.0, 5.0, nearly_flat),
                          torch.tensor([5.0]))  # and never past max_multiplier
    with pytest.raises(ValueError, match="Hessian"):
        newton_dual_step(multipliers, slack)


def test_newton_dual_steps_on_the_plug_in_dual_reach_its_minimiser_in_a_few_steps():
    generator = torch.Generator().manual_seed(3)
    reward, utility = torch.randn(6, 50, generator=generator), torch.randn(2, 6, 50, generator=generator)
    reference_mean, threshold = utility.mean(dim=(1, 2)), torch.tensor([0.4, 0.1])
    solution = solve_dual(reward, utility, reference_mean, threshold, 1.0)
    multipliers = torch.zeros(2)
    for _ in range(8):
        terms = dual_terms(reward, utility, reference_mean, threshold, multipliers, 1.0)
        multipliers = newton_dual_step(multipliers, terms.gradient, hessian=terms.hessian)
    assert torch.allclose(multipliers, solution.multipliers, atol=1e-6)


def test_curvature_step_sizes_are_half_newton_where_unset_and_bounded_by_the_trust_region():
    hessian = torch.tensor([[2.0, 0.7], [0.7, 0.5]])
    set_and_unset = torch.tensor([0.3, float("nan")])
    sizes = curvature_step_sizes(set_and_unset, hessian, torch.tensor([0.1, -0.2]), torch.tensor([1.0, 2.0]))
    assert torch.allclose(sizes, torch.tensor([0.3, 0.5 / 0.5]))  # a set eta stays; unset: 1 / (2 H_ii)
    # a constraint the samples barely vary on: the move is max(2, 2 lambda), not u / 1e-9
    flat = curvature_step_sizes(torch.tensor([float("nan")]), torch.tensor([[1e-9]]), torch.tensor([-0.4]),
                                torch.tensor([3.0]))
    assert projected_dual_step(torch.tensor([3.0]), torch.tensor([-0.4]), flat).item() == pytest.approx(9.0)
    configured = curvature_step_sizes(torch.tensor([float("nan")]), torch.tensor([[1e-9]]), torch.tensor([-0.4]),
                                      torch.tensor([3.0]), trust_radius=0.5)  # algorithm.trust_radius reads here too
    assert projected_dual_step(torch.tensor([3.0]), torch.tensor([-0.4]), configured).item() == pytest.approx(3.5)


def test_half_newton_steps_converge_on_the_plug_in_dual_for_every_beta_where_a_fixed_eta_oscillates():
    """One constraint, the dual's own gradient and curvature: the error shrinks by half a step at every beta, while
    eta = 1 chosen at beta = 1 overshoots (|1 - eta H| > 1 when beta is small)."""
    generator = torch.Generator().manual_seed(1)
    reward, utility = torch.randn(8, 60, generator=generator), torch.randn(1, 8, 60, generator=generator)
    reference_mean, threshold = utility.mean(dim=(1, 2)), torch.tensor([0.3])
    for beta in (0.1, 0.5, 1.0, 2.0):
        target = solve_dual(reward, utility, reference_mean, threshold, beta).multipliers
        auto, fixed = torch.zeros(1), torch.zeros(1)
        for _ in range(12):
            terms = dual_terms(reward, utility, reference_mean, threshold, auto, beta)
            auto = projected_dual_step(auto, terms.gradient, curvature_step_sizes(
                torch.tensor([float("nan")]), terms.hessian, terms.gradient, auto))
            fixed = projected_dual_step(fixed, dual_terms(reward, utility, reference_mean, threshold, fixed,
                                                          beta).gradient, 1.0)
        assert torch.allclose(auto, target, rtol=1e-2)
        if beta == 0.1:
            assert not torch.allclose(fixed, target, rtol=0.1)  # the fixed step does not settle there


def test_within_prompt_scatter_is_the_covariance_about_each_prompts_own_mean():
    utility = torch.tensor([[1.0, 3.0, 10.0, 14.0, 12.0], [0.0, 2.0, 5.0, 5.0, 5.0]])
    scatter, dof = within_prompt_scatter(utility, torch.tensor([0, 0, 1, 1, 1]))
    assert dof == 3
    expected = torch.zeros(2, 2)
    for columns in ([0, 1], [2, 3, 4]):
        centred = utility[:, columns] - utility[:, columns].mean(-1, keepdim=True)
        expected += centred @ centred.T
    assert torch.allclose(scatter, expected)
    assert scatter[0, 0] == 2 + 8  # the spread between prompts (means 2 and 12) is not in it
