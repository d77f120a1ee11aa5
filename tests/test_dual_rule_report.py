"""The dual-rule report's counting: first iteration within a tolerance of b, and the settled error."""
from dualign.tools.dual_rule_report import claims, iterations_to_reach, settled_error, table


def run(rule: dict, seed: int, threshold: float, improvements: list[float]) -> dict:
    trajectory = [{"iteration": t + 1, "evaluation": {"improvement": [a]}} for t, a in enumerate(improvements)]
    return {"config": {"seed": seed, "algorithm": {**rule, "iterations": len(improvements)}},
            "threshold": [threshold], "trajectory": trajectory}


NEWTON = {"dual_rule": "newton", "step_size": None}
FIXED = {"dual_rule": "projected", "step_size": 1.0}


def test_first_iteration_within_tolerance_and_the_settled_error():
    oscillating = run(FIXED, 0, 1.0, [0.5, 1.2, 0.95, 1.02, 0.98, 1.04])
    assert iterations_to_reach(oscillating) == 3  # |0.95 - 1| <= 0.1, |1.2 - 1| is not
    assert iterations_to_reach(oscillating, 0.03) == 4
    assert iterations_to_reach(run(FIXED, 0, 1.0, [0.5] * 6)) is None
    assert abs(settled_error(oscillating) - (0.02 + 0.02 + 0.04) / 3) < 1e-12  # iterations 4-6


def test_claims_compare_each_adaptive_rule_with_the_best_and_worst_fixed_step():
    runs = [run(NEWTON, 0, 1.0, [0.5, 1.0, 1.0]), run(FIXED, 0, 1.0, [0.5, 0.8, 1.0]),
            run({"dual_rule": "projected", "step_size": 3.0}, 0, 1.0, [0.5, 2.0, 0.0])]
    cells, thresholds, rules, horizon = table(runs)
    assert cells[("newton", 1.0)] == [2] and cells[("fixed eta=1", 1.0)] == [3] and cells[("fixed eta=3", 1.0)] == [None]
    (line,) = claims(cells, thresholds, rules, horizon)
    assert "best fixed step at 1 of 1 thresholds" in line and "2.00 fewer than the worst" in line  # never counts as 4
