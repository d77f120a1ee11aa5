"""Bad configuration stops before anything is built, with one line naming the key and what is allowed."""
import subprocess
import sys

import pytest
from conftest import ROOT

from dualign.config import ConfigError, validate


def check(cfg):
    return validate(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("beta=-0.5", "beta=-0.5 must be > 0"),
        ("algorithm.name=ppo", "algorithm.name='ppo' is not allowed; allowed values: caid, one_shot, fixed_lambda"),
        ("constraints.safety.scorer=toxicity", "constraints.safety.scorer='toxicity' is not allowed; allowed values: reward, utility_0, utility_1"),
        ("constraints.safety.threshold=high", "constraints.safety.threshold"),
        ("constraints.safety.threshold_type=relative", "allowed values: improvement, absolute"),
        ("constraints.safety.step_size=0", "constraints.safety.step_size=0.0 must be > 0"),
        ("constraints.safety.initial_multiplier=-1", "must be >= 0"),
        ("policy_step.labels=fuzzy", "policy_step.labels='fuzzy' is not allowed; allowed values: soft, hard"),
        ("reward.scorer=helpfulness", "reward.scorer='helpfulness' is not allowed"),
        ("algorithm.iterations=0", "algorithm.iterations=0 must be > 0"),
        ("reference.samples_per_prompt=7", "must be even"),
        ("algorithm.dual_prompts=99", "exceeds data.num_prompts=16"),
        ("+constraints.harm.threshold=0.2", "constraints.harm.scorer"),
        ("trainer.precision=bf16-true", "trainer.precision='bf16-true' is not supported; allowed values: 32-true, bf16-mixed"),
        ("trainer.precision=8-bit", "trainer.precision='8-bit' is not allowed"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1.0 must be null or >= 0"),
        ("trainer.strategy=deepspeed_stage_2", "trainer.strategy=deepspeed_stage_2 needs trainer.accelerator=gpu"),
    ],
)
def test_bad_values_give_one_line_errors(make_cfg, override, message):
    with pytest.raises(ConfigError) as error:
        check(make_cfg(override))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_only_the_projected_rule_on_iteration_dual_steps_sizes_its_own_step(make_cfg):
    assert make_cfg().algorithm.step_size is None  # caid's default: half a Newton step, measured each dual step
    with pytest.raises(ConfigError, match="algorithm.dual_rule=log needs a step size alpha"):
        check(make_cfg("algorithm.dual_rule=log"))
    with pytest.raises(ConfigError, match="algorithm.step_size is null: algorithm.name=primal_dual measures no"):
        check(make_cfg("experiment=primal_dual", "algorithm.dual_rule=projected", "algorithm.step_size=null"))
    check(make_cfg("experiment=primal_dual", "algorithm.step_size=null", "constraints.safety.step_size=0.1"))


def test_fused_adamw_is_refused_only_where_it_cannot_be_clipped(make_cfg):
    """Lightning's mixed-precision plugin cannot clip an optimiser that unscales inside its step (fused AdamW)."""
    with pytest.raises(ConfigError, match="optimizer.fused=true cannot be clipped under trainer.precision=bf16-mixed"):
        check(make_cfg("trainer=gpu", "optimizer.fused=true"))
    assert check(make_cfg("trainer=gpu", "optimizer.fused=true", "trainer.gradient_clip_val=null")).optimizer.fused
    assert check(make_cfg("optimizer.fused=true")).trainer.precision == "32-true"  # 32-true clips it fine
    assert check(make_cfg("trainer=gpu")).optimizer.fused is None  # auto: the foreach AdamW under bf16-mixed


def test_caid_needs_a_constraint(make_cfg):
    with pytest.raises(ConfigError, match="constraints is empty; algorithm.name=caid needs at least one constraint"):
        check(make_cfg("constraints=none"))
    assert check(make_cfg("constraints=none", "algorithm=fixed_lambda")).constraints == {}


def test_defaults_and_experiments_validate(make_cfg):
    for overrides in ([], ["experiment=exact_policy_step"], ["experiment=two_constraints"], ["algorithm=one_shot"]):
        typed = check(make_cfg(*overrides))
        assert typed.beta > 0 and typed.constraints


def test_cli_reports_bad_config_in_one_line_before_building_anything(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "beta=-1", f"hydra.run.dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "dualign: config error: beta=-1.0 must be > 0"
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name", ["caid_eta_beta", "threshold_pareto", "pku_safety_slurm"])
def test_ready_sweeps_compose(name, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config-dir", str(ROOT / "sweeps"), "--config-name", name,
         "--cfg", "hydra", "-p", "hydra.sweeper"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "_target_" in result.stdout
