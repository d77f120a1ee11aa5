"""The threshold advisor: its predictions against the exact optimum, the merge of repeated samples, the edge
warning, and `python -m dualign.advise` on the exact task."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from dualign.core.advice import advise, edge_warning, edges, merge_repeats, predict
from dualign.core.oracle import ExactOracle, Instance


def _instance(seed=0, prompts=5, responses=40, threshold=0.6):
    generator = torch.Generator().manual_seed(seed)
    ref_logprob = torch.log_softmax(torch.randn(prompts, responses, generator=generator, dtype=torch.float64), -1)
    reward = torch.randn(prompts, responses, generator=generator, dtype=torch.float64)
    utility = torch.randn(1, prompts, responses, generator=generator, dtype=torch.float64)
    return Instance(ref_logprob, reward, utility, 0.7, [threshold])


def test_prediction_on_every_response_is_the_exact_optimum():
    instance = _instance()
    oracle = ExactOracle(instance)
    optimum = oracle.optimum()
    exact = oracle.evaluate(optimum.logprob)
    reference = oracle.evaluate(instance.ref_logprob)
    prediction = predict(instance.reward, instance.utility, instance.threshold, instance.beta, instance.ref_logprob)
    assert prediction.multipliers == pytest.approx(optimum.multipliers.tolist(), abs=1e-8)
    assert prediction.improvement == pytest.approx([0.6], abs=1e-8)
    assert prediction.kl == pytest.approx(exact["kl"], abs=1e-8)
    assert prediction.reward_change == pytest.approx(exact["reward"] - reference["reward"], abs=1e-8)
    assert prediction.objective_change == pytest.approx(exact["objective"] - reference["objective"], abs=1e-8)
    reach = edges(instance.utility, instance.ref_logprob)[0]
    assert predict(instance.reward, instance.utility, [reach + 1e-3], instance.beta, instance.ref_logprob) is None


def test_merged_repeats_predict_what_the_raw_samples_predict():
    generator = torch.Generator().manual_seed(1)
    reward = torch.randint(0, 6, (4, 300), generator=generator).double() / 3
    utility = (reward * 7 % 5).unsqueeze(0) + torch.randint(0, 2, (1, 4, 300), generator=generator)
    merged_reward, merged_utility, log_base = merge_repeats(reward, utility)
    assert merged_reward.shape[1] < 20 and torch.allclose(log_base.exp().sum(-1), torch.ones(4, dtype=torch.float64))
    raw = predict(reward, utility, [0.4], 1.0)
    merged = predict(merged_reward, merged_utility, [0.4], 1.0, log_base)
    for key in ("multipliers", "improvement"):
        assert getattr(merged, key) == pytest.approx(getattr(raw, key), abs=1e-8)
    assert (merged.kl, merged.reward_change) == pytest.approx((raw.kl, raw.reward_change), abs=1e-8)
    assert edges(merged_utility, log_base) == pytest.approx(edges(utility), abs=1e-12)


def test_bootstrap_intervals_cover_the_estimate_and_mark_the_edge():
    generator = torch.Generator().manual_seed(2)
    reward, utility = torch.randn(12, 64, generator=generator), torch.randn(1, 12, 64, generator=generator)
    reach = edges(utility.double())[0]
    rows, edge = advise(reward, utility, torch.tensor([[0.2 * reach], [0.9 * reach], [1.1 * reach]]), 1.0, resamples=30)
    inside, near, beyond = rows
    assert inside.low["multipliers"][0] <= inside.estimate.multipliers[0] <= inside.high["multipliers"][0]
    assert inside.low["kl"] <= inside.estimate.kl <= inside.high["kl"] and not inside.near_edge
    assert near.near_edge and near.estimate is not None
    assert beyond.estimate is None and beyond.near_edge
    assert edge["edge_low"][0] <= reach <= edge["edge_high"][0]


def test_edge_warning_names_the_constraint_only_near_the_edge():
    utility = torch.tensor([[[0.0, 1.0], [0.0, 3.0]]])  # E_ref[g] = 1, the best of each prompt averages 2: edge 1
    assert edge_warning(["safety"], torch.tensor([0.5]), utility) is None
    message = edge_warning(["safety"], torch.tensor([0.85]), utility)
    assert "constraints.safety.threshold=0.85 is 85% of the largest improvement" in message and "dualign-advise" in message


def test_advise_command_on_the_exact_task_against_the_exact_values(tmp_path, cache_dir):
    out = tmp_path / "advice"
    result = subprocess.run(
        [sys.executable, "-m", "dualign.advise", f"hydra.run.dir={out}", f"paths.cache_dir={cache_dir}",
         "data.sft_steps=80", "reference.samples_per_prompt=512", "advise.resamples=20",
         "advise.thresholds=[0.2,0.8,50]"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    advice = json.loads((out / "advice.json").read_text())
    rows = {row["threshold"][0]: row for row in advice["rows"]}
    assert set(rows) == {0.2, 0.5, 0.8, 50.0}  # the grid and the configured b
    for b in (0.2, 0.5, 0.8):
        estimate, exact = rows[b]["estimate"], rows[b]["exact"]
        assert estimate["multipliers"][0] == pytest.approx(exact["multipliers"][0], rel=0.25)
        assert rows[b]["low"]["kl"] <= estimate["kl"] <= rows[b]["high"]["kl"]
    assert rows[50.0]["estimate"] is None and rows[50.0]["exact"] is None
    assert 0 < advice["edge"]["edge"][0] <= advice["exact_edge"][0] + 1e-9  # samples cannot beat every response
    assert "exact" in result.stdout and (out / "advice.png").stat().st_size > 0
