"""SACPO: stage 1 aligns pi_ref for the reward; stage 2 starts from and is referenced to stage 1's policy, on the
utility's preferences at temperature beta / lambda; P-SACPO merges the two in weights."""
import json

import pytest
import torch

from dualign.config import ConfigError, validate
from dualign.run import run
from dualign.training import stepwise


def test_second_stage_starts_from_and_is_referenced_to_the_reward_aligned_policy_and_p_sacpo_merges(
        make_cfg, tmp_path, monkeypatch):
    seen = []
    real = stepwise.train_policy

    def recording(stage_context, *args, policy=None, **kwargs):
        start = None if policy is None else {k: v.clone() for k, v in policy.state_dict().items()}
        trained = real(stage_context, *args, policy=policy, **kwargs)
        seen.append((stage_context, start, trained))
        return trained

    monkeypatch.setattr(stepwise, "train_policy", recording)
    cfg = make_cfg("algorithm=sacpo", "constraints.safety.initial_multiplier=2.0", "algorithm.iterations=1",
                   "algorithm.merge_weight=0.5")
    run(cfg)
    (first, no_start, reward_stage), (second, start, _) = seen
    assert no_start is None and first.cfg.beta == cfg.beta
    aligned = reward_stage.policy.state_dict()
    for key, value in second.reference.state_dict().items():  # referenced to stage 1, not pi_ref
        assert torch.equal(value, aligned[key]) and torch.equal(start[key], aligned[key])
    assert any(not torch.equal(v, first.reference.state_dict()[k]) for k, v in aligned.items())
    assert second.cfg.beta == pytest.approx(cfg.beta / 2.0)
    # stage 2's pairs: labelled by the utility alone, with log-probs of stage 1's policy as the reference
    assert torch.equal(second.pairs.tensors["reward"], second.pairs.tensors["utility"][:, 0])
    assert not torch.equal(second.pairs.tensors["ref_logps"], first.pairs.tensors["ref_logps"])

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["stage"] for r in summary["trajectory"]] == ["reward", "safety", "merge (q = 0.5)"]
    assert all(r["multipliers"] == [2.0] for r in summary["trajectory"])
    reward_only, both, merged = (r["evaluation"]["improvement"][0] for r in summary["trajectory"])
    assert reward_only < both  # the safety stage raises safety; the merge lands between the stages
    assert min(reward_only, both) - 0.05 <= merged <= max(reward_only, both) + 0.05
    assert summary["final"]["improvement"][0] == pytest.approx(merged)


def test_sacpo_settings_are_checked(make_cfg):
    with pytest.raises(ConfigError, match="merge_weight is P-SACPO's"):
        validate(make_cfg("algorithm.merge_weight=0.5"))
    with pytest.raises(ConfigError, match="needs policy_step=dpo"):
        validate(make_cfg("algorithm=sacpo", "policy_step=exact"))
