"""The text-task pipeline end to end on the committed offline stand-ins (tests/fixtures): experiment=pku_safety_tiny
through the real entry points, the evaluate command, other data formats, scorers and algorithms, and the caches."""
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
from dualign.util.cache import cached_folder

FIXTURES = ROOT / "tests" / "fixtures"


def compose_text(tmp_path, cache_dir, *overrides):
    GlobalHydra.instance().clear()
    base = ["experiment=pku_safety_tiny", f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={cache_dir}",
            f"paths.fixtures_dir={FIXTURES}", "logger.enabled=false", f"logger.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
            "trainer.enable_progress_bar=false"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=base + list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def _cli(module_args, tmp_path, cache_dir, *overrides):
    args = [sys.executable, *module_args, "experiment=pku_safety_tiny", f"paths.cache_dir={cache_dir}",
            f"paths.fixtures_dir={FIXTURES}", f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "trainer.enable_progress_bar=false", *overrides]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_pku_safety_tiny_end_to_end_and_evaluate_command(tmp_path, cache_dir):
    """Rollouts, one-shot solve, caid with on-policy dual steps, evaluation, saved adapter, MLflow run with plots;
    then `python -m dualign.evaluate` on the saved adapter reproduces the run's final evaluation."""
    run_dir = tmp_path / "run"
    # one epoch an iteration (the experiment has 2): every stage still runs, in less time
    result = _cli(["train.py"], tmp_path, cache_dir, f"hydra.run.dir={run_dir}", "algorithm.epochs_per_iteration=1")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["trajectory"]) == 3 and summary["one_shot"]["final"]
    evaluation = summary["final"]
    assert evaluation["prompts"] == 16 and evaluation["samples_per_prompt"] == 8
    safety = evaluation["scores"]["safety"]
    assert safety["improvement_ci"] > 0 and 0 <= safety["win_rate"] <= 1
    for name in ("score_histograms.png", "improvement_vs_threshold.png", "dual_trajectory.png", "samples.jsonl"):
        assert (run_dir / name).stat().st_size > 0

    from peft import AutoPeftModelForCausalLM  # the saved adapter loads with plain peft

    assert AutoPeftModelForCausalLM.from_pretrained(run_dir / "policy") is not None

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("dualign").experiment_id])
    assert mlflow_run.data.metrics["final/improvement_safety"] == pytest.approx(safety["improvement"])
    assert len(client.get_metric_history(mlflow_run.info.run_id, "eval/improvement_safety")) == 3  # every iteration
    assert len(client.get_metric_history(mlflow_run.info.run_id, "dual/lambda_safety")) == 4
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"improvement_vs_threshold.png", "score_histograms.png", "samples.json"} <= artifacts

    rollout_caches = sorted((cache_dir / "rollouts").iterdir())
    stamps = [(p / "key.json").stat().st_mtime_ns for p in rollout_caches]
    evaluated = tmp_path / "evaluated"
    result = _cli(["-m", "dualign.evaluate"], tmp_path, cache_dir, f"hydra.run.dir={evaluated}",
                  f"evaluation.policy_path={run_dir / 'policy'}")
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((evaluated / "summary.json").read_text())["final"]
    for label in ("reward", "safety"):
        assert again["scores"][label]["improvement"] == pytest.approx(evaluation["scores"][label]["improvement"], abs=1e-4)
    assert again["kl"] == pytest.approx(evaluation["kl"], abs=1e-3)
    assert [(p / "key.json").stat().st_mtime_ns for p in rollout_caches] == stamps  # pi_ref's test rollouts reused

    # the threshold advisor reads the same cached pi_ref rollouts of the training split
    advised = tmp_path / "advised"
    result = _cli(["-m", "dualign.advise"], tmp_path, cache_dir, f"hydra.run.dir={advised}", "advise.resamples=20",
                  "advise.thresholds=[0.5,1,100]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(p / "key.json").stat().st_mtime_ns for p in rollout_caches] == stamps
    advice = json.loads((advised / "advice.json").read_text())
    assert [row["threshold"][0] for row in advice["rows"]] == pytest.approx(sorted({0.5, 1.0, 100.0, summary["threshold"][0]}))
    assert advice["rows"][-1]["estimate"] is None and "beyond the samples' reach" in result.stdout
    assert advice["exact_edge"] is None and 0 < advice["edge"]["edge"][0] < 100
    assert (advised / "advice.png").stat().st_size > 0


def test_evaluate_command_without_a_policy_is_a_one_line_error(tmp_path, cache_dir):
    result = _cli(["-m", "dualign.evaluate"], tmp_path, cache_dir, f"hydra.run.dir={tmp_path / 'x'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "dualign: config error: evaluation.policy_path is null; " \
        "give the folder of a saved policy or adapter"


def test_hh_rlhf_with_classifier_callable_online_pairs_and_frozen_reference(tmp_path, cache_dir):
    cfg = compose_text(
        tmp_path, cache_dir, "data=hh_rlhf", f"data.path={FIXTURES / 'hh_rlhf'}", "model.lora.enabled=false",
        "model.prompt_template='{prompt}'", "constraints=none", "+constraints.humour.scorer=humour",
        "+constraints.humour.threshold=0.01", "+constraints.brevity.scorer=length", "+constraints.brevity.negate=true",
        "+constraints.brevity.threshold=-2", "+scorers.humour.kind=sequence_classifier",
        f"+scorers.humour.name_or_path={FIXTURES / 'tiny_models' / 'humour'}", "+scorers.humour.label=humorous",
        "+scorers.humour.output=probability", "+scorers.length.kind=callable",
        "+scorers.length._target_=dualign.models.scorers.response_length", "policy_step.pairs_from=policy",
        "algorithm.iterations=2", "algorithm.epochs_per_iteration=1", "algorithm.compare_one_shot=false",
        "evaluation.every_iteration=false", "evaluation.samples_per_prompt=2", "reference.samples_per_prompt=4",
        "optimizer.lr=1e-4",
    )
    metrics = run(cfg)
    assert set(metrics) >= {"objective", "reward", "kl", "improvement_humour", "improvement_brevity"}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["constraints"] == ["humour", "brevity"] and len(summary["trajectory"]) == 2
    assert (tmp_path / "run" / "policy" / "model.safetensors").is_file()  # no LoRA: the full model is saved


def test_primal_dual_policy_gradient_on_a_text_task(tmp_path, cache_dir):
    cfg = compose_text(tmp_path, cache_dir, "algorithm=primal_dual", "policy_step=policy_gradient",
                       "policy_step.name=policy_gradient", "algorithm.dual_every_steps=2",
                       "algorithm.iterations=1", "algorithm.epochs_per_iteration=1", "policy_step.steps_per_epoch=1",
                       "policy_step.batch_size=12", "policy_step.samples_per_prompt=2", "evaluation.every_iteration=false",
                       "evaluation.samples_per_prompt=2")
    run(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["algorithm"] == "primal_dual" and len(summary["trajectory"]) == 2  # 48 prompts / 12 = 4 steps: dual steps at 2 and 4


def test_real_experiment_configs_compose_and_validate(tmp_path, cache_dir):
    def composed(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}",
                                                          f"paths.fixtures_dir={tmp_path}", "logger.enabled=false",
                                                          f"logger.tracking_uri=sqlite:///{tmp_path}/m.db", *overrides])
        GlobalHydra.instance().clear()
        return validate(cfg)

    pku = composed("experiment=pku_safety")
    assert pku.model.name_or_path == "PKU-Alignment/alpaca-7b-reproduced"
    assert pku.scorers["cost"].kind == "score_model" and pku.constraints["safety"].negate
    assert (pku.model.lora.r, pku.model.lora.alpha, pku.model.lora.dropout) == (8, 16, 0.05)
    assert (pku.optimizer.lr, pku.beta, pku.generation.top_p, pku.algorithm.dual_prompts) == (5e-4, 0.1, 0.9, 600)
    assert not pku.model.trust_remote_code and not any(s.trust_remote_code for s in pku.scorers.values())
    pecaid = composed("experiment=pku_safety", "algorithm=pecaid")  # PKU-SafeRLHF's own labels, 2 epochs each
    assert pecaid.data.preference_columns == {"reward": "better_response_id", "safety": "safer_response_id"}
    assert pecaid.algorithm.preference_epochs == 2
    hh = composed("experiment=hh_two_constraints", "model.name_or_path=/models/llama2-7b-hh-sft")
    assert list(hh.constraints) == ["harmlessness", "humour"] and hh.algorithm.iterations == 3
    with pytest.raises(ConfigError, match="model.name_or_path: Missing mandatory value"):
        composed("experiment=hh_two_constraints")
    with pytest.raises(ConfigError, match="constraints.safety.scorer='utility_0' is not allowed"):
        composed("experiment=pku_safety", "constraints=safety")
    with pytest.raises(ConfigError, match="scorers.cost.kind='llm' is not allowed"):
        composed("experiment=pku_safety", "scorers.cost.kind=llm")
    with pytest.raises(ConfigError, match="does not go with data.kind='exact'"):
        composed("model=hf", "model.name_or_path=x")
    with pytest.raises(ConfigError, match="primal_dual needs policy_step=policy_gradient"):
        composed("algorithm=primal_dual")
    with pytest.raises(ConfigError, match="policy_step.pairs_from=dataset needs a text dataset"):
        composed("policy_step.pairs_from=dataset")


def test_cache_is_reused_and_a_damaged_entry_is_rebuilt(tmp_path):
    builds = []

    def build(folder):
        builds.append(folder)
        torch.save(torch.arange(4.0), folder / "values.pt")

    def load(folder):
        values = torch.load(folder / "values.pt", weights_only=True)
        assert values.shape == (4,)
        return values

    key = {"model": "m", "rows": 4}
    assert cached_folder(tmp_path, "kind", key, build, load).tolist() == [0, 1, 2, 3]
    cached_folder(tmp_path, "kind", key, build, load)
    assert len(builds) == 1  # reused
    (entry,) = (tmp_path / "kind").iterdir()
    (entry / "values.pt").write_bytes(b"truncated")
    assert cached_folder(tmp_path, "kind", key, build, load).tolist() == [0, 1, 2, 3]
    assert len(builds) == 2  # rebuilt, not used
    cached_folder(tmp_path, "kind", {"model": "other", "rows": 4}, build, load)
    assert len(builds) == 3 and len(list((tmp_path / "kind").iterdir())) == 2
    assert not [p for p in (tmp_path / "kind").iterdir() if p.name.startswith(".tmp")]


def test_vllm_backend_without_vllm_is_a_one_line_error(tmp_path, cache_dir, make_cfg):
    """vllm is optional: where it is not installed, asking for it is one clear line (skipped where it is)."""
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    from dualign.errors import LoadError

    with pytest.raises(LoadError, match="generation.backend=vllm needs the vllm package") as error:
        run(compose_text(tmp_path, cache_dir, "generation.backend=vllm"))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="generation.backend=vllm is for text tasks"):
        validate(make_cfg("generation.backend=vllm"))


def test_the_tree_sampler_is_refused_on_text_tasks(tmp_path, cache_dir, make_cfg):
    assert make_cfg().generation.backend == "enumerate"  # the exact task's default (conf/sizes/exact.yaml)
    assert compose_text(tmp_path, cache_dir).generation.backend == "fast"
    with pytest.raises(ConfigError, match="generation.backend=enumerate draws from the exact task"):
        validate(compose_text(tmp_path, cache_dir, "generation.backend=enumerate"))


def test_checkpoints_of_a_tied_embedding_model_hold_only_the_adapters_and_resume(tmp_path, cache_dir):
    """A tied weight (lm_head = embed_tokens) is listed once by named_parameters() but saved under both names: the
    frozen output matrix must not land in last.ckpt (a 135M SmolLM2 with LoRA gave 124 MB instead of a few)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tiny_models" / "policy")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=4096, hidden_size=128, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "tied")
    tokenizer.save_pretrained(tmp_path / "tied")
    common = [f"model.name_or_path={tmp_path / 'tied'}", "algorithm.epochs_per_iteration=1", "algorithm.compare_one_shot=false",
              "evaluation.every_iteration=false", "evaluation.samples_per_prompt=2", "reference.samples_per_prompt=4",
              "constraints.safety.threshold=-1", "algorithm.dual_prompts=4", "algorithm.dual_samples=2"]
    run(compose_text(tmp_path, cache_dir, *common, "algorithm.iterations=1"))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    saved = checkpoint["state_dict"]
    assert saved and all("lora_" in key for key in saved if key != "multipliers"), sorted(saved)[:5]
    embedding = 4096 * 128 * 4  # bytes of the output matrix that must not be there
    assert sum(t.numel() * t.element_size() for t in saved.values()) < embedding / 10
    run(compose_text(tmp_path, cache_dir, *common, "algorithm.iterations=2", "ckpt_path=last",  # loads non-strictly
                     "allow_resume_changes=[algorithm.iterations]"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["trajectory"]) == 2
