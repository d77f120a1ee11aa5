"""benchmarks/dual_controllers.py drives cooper's nuPI as CAID's dual step: its sign and projection, by hand."""
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("cooper", reason="cooper-optim is in the test extra: pip install -e '.[test]'")
spec = importlib.util.spec_from_file_location(
    "dual_controllers", Path(__file__).resolve().parents[1] / "benchmarks" / "dual_controllers.py")
dual_controllers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dual_controllers)


def test_nupi_is_the_projected_step_plus_a_proportional_term_on_the_change_of_slack():
    start = torch.tensor([1.0, 0.2], dtype=torch.float64)
    rule = dual_controllers.NuPI(start, step_size=0.5, proportional_gain=2.0)
    slacks = [torch.tensor([-0.4, 0.6]), torch.tensor([-0.1, 0.3]), torch.tensor([0.2, -0.2])]
    first = rule(start, slacks[0], None)
    # cooper's SGD initialisation: the first step is the integral term alone, lambda - eta u, projected onto >= 0
    assert torch.allclose(first, torch.tensor([1.2, 0.0], dtype=torch.float64))
    second = rule(first, slacks[1], None)
    # ...and it leaves the smoothed error at 0, so the second step's proportional term is K_P u_1 itself
    assert torch.allclose(second, (first - 0.5 * (1 + 2.0) * slacks[1].double()).clamp(min=0))
    third = rule(second, slacks[2], None)
    # from then on: lambda - eta (K_I u_t + K_P (u_t - u_{t-1})), projected
    expected = (second - 0.5 * (slacks[2] + 2.0 * (slacks[2] - slacks[1])).double()).clamp(min=0)
    assert torch.allclose(third, expected)
    assert torch.allclose(third, torch.tensor([0.95, 0.6], dtype=torch.float64))
