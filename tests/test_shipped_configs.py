"""Every shipped experiment overlay and trainer config, run on this CPU with its own settings.

A setting that only a GPU config uses is a setting nobody has run (the GPU trainer configs once died at their first
optimiser step: bf16-mixed + clipping + fused AdamW). So each case composes the shipped config and swaps only what a
CPU cannot hold: the model, data and scorers (for the committed tiny stand-ins; thresholds go with the scorers, being
in their units), the sizes, and the accelerator. `test_only_the_allowed_keys_are_swapped` checks that everything else
(precision, clipping, accumulation, optimiser, LoRA, dtypes, gradient checkpointing, generation settings, strategy,
algorithm, policy step) is what the shipped config says. Each case runs a few optimiser steps and at least one dual
step through the real entry point; a new overlay or trainer config must be added here
(`test_every_shipped_config_is_in_the_tier`).

FSDP and DeepSpeed: Lightning runs them on CUDA only (its accelerator connector refuses `fsdp` with a CPU
accelerator; `DeepSpeedStrategy.setup_environment` refuses anything but a CUDAAccelerator), so those two configs are
composed and validated here, and asking for them on a CPU is a one-line config error.
"""
import json
import subprocess
import sys

import pytest
import torch
from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from dualign.config import ConfigError, validate
from dualign.run import run

FIXTURES = ROOT / "tests" / "fixtures"
MODELS = FIXTURES / "tiny_models"

# sizes only: fewer prompts, samples, tokens, steps and iterations than the shipped config
EXACT_SIZES = ["data.sft_steps=80", "reference.samples_per_prompt=64", "algorithm.iterations=2",
               "algorithm.epochs_per_iteration=4", "algorithm.dual_samples=16"]
TEXT_SIZES = ["data.max_train_rows=24", "data.max_test_prompts=4", "model.max_prompt_length=48", "model.max_length=96",
              "generation.max_new_tokens=16", "reference.prompts=8", "reference.samples_per_prompt=2",
              "algorithm.dual_prompts=4", "algorithm.dual_samples=2", "algorithm.iterations=2",
              "evaluation.samples_per_prompt=2"]
PKU_STAND_INS = [f"data.path={FIXTURES / 'pku_saferlhf'}", f"model.name_or_path={MODELS / 'policy'}",
                 f"scorers.reward.name_or_path={MODELS / 'reward'}", f"scorers.cost.name_or_path={MODELS / 'cost'}",
                 "constraints.safety.threshold=0.1"]
HH_STAND_INS = [f"data.path={FIXTURES / 'hh_rlhf'}", f"model.name_or_path={MODELS / 'policy'}",
                f"scorers.helpful.name_or_path={MODELS / 'reward_classifier'}",
                f"scorers.harmless.name_or_path={MODELS / 'reward_classifier'}",
                f"scorers.humour.name_or_path={MODELS / 'humour'}",
                "constraints.harmlessness.threshold=0.01", "constraints.humour.threshold=0.001"]

SMOLLM2_SIZES = [f"data.path={ROOT / 'data' / 'everyday_prompts'}", "data.max_train_rows=4", "data.max_test_prompts=2",
                 "reference.samples_per_prompt=2", "algorithm.iterations=2", "algorithm.dual_prompts=2", "algorithm.dual_samples=2",
                 "generation.max_new_tokens=8", "evaluation.samples_per_prompt=1",
                 "constraints.tone.threshold=0.05"]  # within what 4 prompts x 2 samples of pi_ref can reach

# case -> (the shipped selection, the swaps); trainer configs run on the default exact task
EXPERIMENTS = {
    "exact_policy_step": (["experiment=exact_policy_step"], EXACT_SIZES + ["algorithm.epochs_per_iteration=1",
                                                                   "policy_step.steps_per_epoch=5"]),
    "two_constraints": (["experiment=two_constraints"], EXACT_SIZES),
    "primal_dual": (["experiment=primal_dual"], EXACT_SIZES[:2] + ["algorithm.iterations=1"]),
    # already CPU-sized: its b is set for its own pi_ref samples, so only the schedule and evaluation shrink
    "pku_safety_tiny": (["experiment=pku_safety_tiny"], ["algorithm.iterations=2", "evaluation.samples_per_prompt=2",
                                                          "data.max_test_prompts=4"]),
    "pku_safety": (["experiment=pku_safety"], PKU_STAND_INS + TEXT_SIZES + ["trainer.accelerator=cpu"]),
    "hh_two_constraints": (["experiment=hh_two_constraints"], HH_STAND_INS + TEXT_SIZES + ["trainer.accelerator=cpu"]),
    # the real model and scorers (they fit a CPU): only sizes shrink; run, and checked further, by tests/test_smollm2.py
    "smollm2_positive": (["experiment=smollm2_positive"], SMOLLM2_SIZES),
}
TRAINERS = {
    "cpu": (["trainer=cpu"], EXACT_SIZES),
    "gpu": (["trainer=gpu"], EXACT_SIZES + ["trainer.accelerator=cpu"]),
    "ddp": (["trainer=ddp"], EXACT_SIZES + ["trainer.accelerator=cpu"]),  # 2 processes over gloo: a subprocess
}
CUDA_ONLY = {"fsdp": "Lightning's FSDPStrategy needs a CUDA accelerator",
             "deepspeed": "Lightning's DeepSpeedStrategy needs a CUDAAccelerator"}

# what a swap may touch: the stand-ins' paths and units, sizes, the accelerator (and where outputs go)
SWAPPABLE = ("data.path", "data.max_", "data.sft_steps", "model.name_or_path", "model.max_", "scorers.", "constraints.",
             "generation.max_new_tokens", "reference.", "algorithm.iterations", "algorithm.epochs_per_iteration",
             "algorithm.dual_prompts",
             "algorithm.dual_samples", "evaluation.samples_per_prompt", "policy_step.steps_per_epoch",
             "trainer.accelerator", "paths.", "logger.")
SWAPPABLE_SCORER_KEYS = ("name_or_path",)


def _compose(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def _paths(tmp_path, cache_dir):
    return [f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={cache_dir}", f"paths.fixtures_dir={FIXTURES}",
            "logger.enabled=false", f"logger.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]


def _flat(cfg) -> dict:
    from omegaconf import OmegaConf

    from dualign.util.metrics import flatten_params

    return flatten_params(OmegaConf.to_container(cfg, resolve=False))


def _optimiser_steps(run_dir) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"]


def _check_ran(run_dir, summary_name="summary.json"):
    summary = json.loads((run_dir / summary_name).read_text())
    trajectory = summary["trajectory"]
    assert len(trajectory) >= 1 and all("estimated_improvement" in record for record in trajectory)  # dual steps
    steps = _optimiser_steps(run_dir)
    assert steps >= 2, steps
    return summary, steps


def test_every_shipped_config_is_in_the_tier():
    experiments = {p.stem for p in (CONF / "experiment").glob("*.yaml")}
    trainers = {p.stem for p in (CONF / "trainer").glob("*.yaml")}
    assert experiments == set(EXPERIMENTS), f"add {experiments ^ set(EXPERIMENTS)} to the tier in {__file__}"
    assert trainers == set(TRAINERS) | set(CUDA_ONLY), f"add {trainers ^ (set(TRAINERS) | set(CUDA_ONLY))} to the tier"


@pytest.mark.parametrize("case", sorted({**EXPERIMENTS, **TRAINERS}))
def test_only_the_allowed_keys_are_swapped(case, tmp_path):
    selection, swaps = {**EXPERIMENTS, **TRAINERS}[case]
    for swap in swaps:
        key = swap.split("=", 1)[0]
        assert key.startswith(SWAPPABLE), f"{case}: {key} is a real setting, not a stand-in, size or accelerator"
        if key.startswith("scorers."):
            assert key.rsplit(".", 1)[1] in SWAPPABLE_SCORER_KEYS, f"{case}: {key}"
        if key.startswith("constraints."):
            assert key.endswith(".threshold"), f"{case}: {key}"
    shipped = _flat(_compose(*selection, *_paths(tmp_path, tmp_path)))
    swapped = _flat(_compose(*selection, *swaps, *_paths(tmp_path, tmp_path)))
    changed = {k for k in shipped if shipped[k] != swapped.get(k)}
    assert all(k.replace("/", ".").startswith(SWAPPABLE) for k in changed), changed


@pytest.mark.parametrize("case", sorted(EXPERIMENTS))
def test_experiment_overlay_runs_with_its_real_settings(case, tmp_path, cache_dir):
    if case == "smollm2_positive":
        pytest.skip("run with the same swaps, and checked further, by tests/test_smollm2.py")
    selection, swaps = EXPERIMENTS[case]
    cfg = _compose(*selection, *swaps, *_paths(tmp_path, cache_dir), "trainer.enable_progress_bar=false")
    typed = validate(cfg)
    metrics = run(cfg)
    assert metrics
    summary, steps = _check_ran(tmp_path / "run")
    print(f"\n{case}: precision {typed.trainer.precision}, clip {typed.trainer.gradient_clip_val}, accumulate "
          f"{typed.trainer.accumulate_grad_batches}, {steps} optimiser steps, {len(summary['trajectory'])} dual steps")


def test_gpu_trainer_config_runs_on_cpu(tmp_path, cache_dir):
    """bf16-mixed, clipping 1.0, fused AdamW left on auto: the combination that crashed at the first step."""
    selection, swaps = TRAINERS["gpu"]
    cfg = _compose(*selection, *swaps, *_paths(tmp_path, cache_dir), "trainer.enable_progress_bar=false")
    typed = validate(cfg)
    assert (typed.trainer.precision, typed.trainer.gradient_clip_val, typed.optimizer.fused) == ("bf16-mixed", 1.0, None)
    run(cfg)
    _check_ran(tmp_path / "run")


def test_cpu_trainer_config_runs(tmp_path, cache_dir):
    selection, swaps = TRAINERS["cpu"]
    run(_compose(*selection, *swaps, *_paths(tmp_path, cache_dir), "trainer.enable_progress_bar=false"))
    _check_ran(tmp_path / "run")


def test_ddp_trainer_config_runs_two_processes_over_gloo(tmp_path, cache_dir):
    """The README's CPU check of the ddp config, with its own precision (bf16-mixed) and clipping."""
    selection, swaps = TRAINERS["ddp"]
    run_dir = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train.py"), *selection, *swaps, f"hydra.run.dir={run_dir}",
            f"paths.cache_dir={cache_dir}", "logger.enabled=false", "trainer.enable_progress_bar=false"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary, _ = _check_ran(run_dir)
    assert all(record["ranks"] == 2 for record in summary["trajectory"])
    assert "bf16-mixed" in (run_dir / ".hydra" / "config.yaml").read_text()


@pytest.mark.parametrize("name", sorted(CUDA_ONLY))
def test_cuda_only_strategies_compose_validate_and_refuse_a_cpu_in_one_line(name, tmp_path):
    typed = validate(_compose(f"trainer={name}", *_paths(tmp_path, tmp_path)))
    assert typed.trainer.accelerator == "gpu" and typed.trainer.precision == "bf16-mixed"
    assert typed.trainer.strategy.startswith(name) and typed.trainer.gradient_clip_val == 1.0
    with pytest.raises(ConfigError, match=f"trainer.strategy={name}.* needs trainer.accelerator=gpu") as error:
        validate(_compose(f"trainer={name}", "trainer.accelerator=cpu", *_paths(tmp_path, tmp_path)))
    assert "\n" not in str(error.value), CUDA_ONLY[name]


@pytest.mark.parametrize("task", ["exact", "text"])
def test_under_bf16_mixed_the_dpo_log_ratios_start_at_zero(task, tmp_path, cache_dir):
    """pi_ref's log-probs are cached once, before training; the policy's are taken inside Lightning's autocast. Both
    must be computed under the same precision, or the DPO rewards start off zero (bf16 rounding summed over tokens)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from dualign import tasks
    from dualign.training.fit import POLICY_STEPS

    chosen = EXACT_SIZES if task == "exact" else ["experiment=pku_safety_tiny"]
    cfg = validate(_compose(*chosen, "trainer.precision=bf16-mixed", *_paths(tmp_path, cache_dir)))
    setup = tasks.build(cfg).prepare()
    policy = setup.task.new_policy(setup)
    step, _ = POLICY_STEPS[cfg.policy_step.name](setup, 1)
    batch = setup.pairs.__getitems__(list(range(len(setup.pairs))))
    with torch.no_grad(), MixedPrecision("bf16-mixed", "cpu").forward_context():
        _, metrics = step(policy, batch, setup.one_shot, 0)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[name].item() == 0.0, (name, metrics[name].item())
