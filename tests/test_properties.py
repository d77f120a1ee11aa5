"""Property-based tests (hypothesis): malformed config values and data rows always give a one-line error naming the
key or the row and field, never a deep traceback. Each test counts what it tried (printed with pytest -s)."""
import json
import math

import pytest
from conftest import CONF
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualign.config import ConfigError, validate
from dualign.tasks.text_data import DataError, TextDataConfig, load_split

TRIED = {"config": 0, "config_clear": 0, "rows": 0, "rows_clear": 0}

text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
not_a_number = text.filter(lambda s: not _is_number(s))
non_positive_int = st.integers(max_value=0)
bad_float = st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.just(float("inf")), not_a_number)

# key -> values that must be refused
BAD_VALUES = {
    "beta": bad_float,
    "seed": st.one_of(not_a_number, st.floats(allow_nan=False).filter(lambda x: x != int(x) if math.isfinite(x) else True)),
    "optimizer.lr": bad_float,
    "optimizer.warmup_steps": st.one_of(st.integers(max_value=-1), not_a_number),
    "optimizer.schedule": text.filter(lambda s: s not in ("constant", "cosine", "cosine_per_iteration")),
    "algorithm.name": text.filter(lambda s: s not in ("caid", "one_shot", "fixed_lambda", "primal_dual")),
    "algorithm.iterations": st.one_of(non_positive_int, not_a_number),
    "algorithm.epochs_per_iteration": st.one_of(non_positive_int, not_a_number),
    "algorithm.dual_prompts": st.one_of(non_positive_int, st.integers(min_value=17)),  # 16 prompts in the task
    "algorithm.dual_samples": non_positive_int,
    "algorithm.step_size": bad_float,
    "algorithm.dual_rule": text.filter(lambda s: s not in ("projected", "log")),
    "algorithm.max_multiplier": st.one_of(st.floats(max_value=0.0), st.just(float("nan"))),
    "policy_step.name": text.filter(lambda s: s not in ("dpo", "exact", "policy_gradient")),
    "policy_step.labels": text.filter(lambda s: s not in ("soft", "hard")),
    "policy_step.batch_size": non_positive_int,
    "policy_step.pairs_from": text.filter(lambda s: s not in ("reference", "policy", "dataset")),
    "reference.samples_per_prompt": st.one_of(non_positive_int, st.integers(min_value=0).map(lambda n: 2 * n + 1)),
    "generation.temperature": bad_float,
    "generation.top_p": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True), st.just(float("nan"))),
    "generation.batch_size": non_positive_int,
    "trainer.accumulate_grad_batches": non_positive_int,
    "constraints.safety.scorer": text.filter(lambda s: s not in ("reward", "utility_0", "utility_1")),
    "constraints.safety.threshold": st.one_of(st.just(float("nan")), st.just(float("inf")), not_a_number),
    "constraints.safety.threshold_type": text.filter(lambda s: s not in ("improvement", "absolute")),
    "constraints.safety.step_size": bad_float,
    "reward.scorer": text.filter(lambda s: s not in ("reward", "utility_0", "utility_1")),
    "data.kind": text.filter(lambda s: s not in ("exact", "pku_saferlhf", "hh_rlhf", "jsonl")),
    "data.num_prompts": non_positive_int,
    "model.kind": text.filter(lambda s: s not in ("tiny_gpt2", "hf")),
    "model.n_layer": st.one_of(not_a_number, non_positive_int),
    "model.n_embd": non_positive_int,
    "model.n_head": non_positive_int,
    "data.utility_correlation": st.one_of(st.floats(min_value=1.0, exclude_min=True), st.floats(max_value=-1.0, exclude_max=True),
                                          st.just(float("nan"))),
    "data.num_utilities": st.integers(max_value=-1),
    "data.pairwise_scale": st.one_of(st.floats(max_value=0.0, exclude_max=True), st.just(float("nan"))),
    "data.teacher_sharpness": st.one_of(st.floats(max_value=0.0, exclude_max=True), st.just(float("inf"))),
    "data.sft_steps": st.integers(max_value=-1),
    "data.sft_samples_per_prompt": non_positive_int,
    "data.sft_lr": bad_float,
    "data.sft_batch_size": non_positive_int,
    "optimizer.weight_decay": st.one_of(st.floats(max_value=0.0, exclude_max=True), st.just(float("nan"))),
    "trainer.log_every_n_steps": non_positive_int,
}


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return s.strip().lower() in ("true", "false", "null", "none", "~", "")  # YAML-ish scalars that OmegaConf converts


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    from omegaconf import OmegaConf

    tmp = tmp_path_factory.mktemp("props")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"paths.output_dir={tmp}", f"paths.cache_dir={tmp}",
                                                      f"paths.fixtures_dir={tmp}", "logger.enabled=false",
                                                      f"logger.tracking_uri=sqlite:///{tmp}/m.db"])
    GlobalHydra.instance().clear()
    container = OmegaConf.to_container(cfg, resolve=True)
    validate(container)  # the base is valid
    return container


def _set(tree: dict, key: str, value) -> dict:
    tree = json.loads(json.dumps(tree))
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return tree


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_malformed_config_values_give_one_line_errors_naming_the_key(base_config, data):
    key = data.draw(st.sampled_from(sorted(BAD_VALUES)))
    value = data.draw(BAD_VALUES[key])
    TRIED["config"] += 1
    with pytest.raises(ConfigError) as error:
        validate(_set(base_config, key, value))
    message = str(error.value)
    assert "\n" not in message and key.split(".")[-1] in message, (key, value, message)
    TRIED["config_clear"] += 1


PKU_FIELDS = ("prompt", "response_0", "response_1", "better_response_id", "safer_response_id",
              "is_response_0_safe", "is_response_1_safe")
GOOD_ROW = {"prompt": "How do I fix a lock?", "response_0": "Call a locksmith.", "response_1": "Break it.",
            "better_response_id": 0, "safer_response_id": 0, "is_response_0_safe": True, "is_response_1_safe": False}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(min_value=1, max_value=6), bad_row=st.integers(min_value=0, max_value=5),
       field=st.sampled_from(PKU_FIELDS), corruption=st.sampled_from(["missing", "null", "empty", "number"]))
def test_malformed_rows_give_one_line_errors_naming_row_and_field(tmp_path_factory, rows, bad_row, field, corruption):
    bad_row = min(bad_row, rows - 1)
    if corruption == "empty" and field != "prompt" or corruption == "number" and field not in ("prompt", "response_0", "response_1"):
        corruption = "null"  # empty responses are legal; ids and flags are numbers anyway
    lines = []
    for index in range(rows):
        row = dict(GOOD_ROW)
        if index == bad_row:
            if corruption == "missing":
                del row[field]
            else:
                row[field] = {"null": None, "empty": "   ", "number": 7}[corruption]
        lines.append(json.dumps(row))
    folder = tmp_path_factory.mktemp("rows")
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    TRIED["rows"] += 1
    with pytest.raises(DataError) as error:
        load_split(TextDataConfig(kind="pku_saferlhf", path=str(folder)), "train")
    message = str(error.value)
    assert "\n" not in message and field in message, (field, corruption, message)
    assert f"row {bad_row}" in message or corruption == "missing" and rows == 1, message
    TRIED["rows_clear"] += 1


def test_report_counts():
    """Runs after the two properties (file order): the counts for the closing note. Alone it has nothing to count."""
    if not TRIED["config"] or not TRIED["rows"]:
        pytest.skip("the property tests did not run in this session (select the whole file)")
    print(f"\nproperty tests: {TRIED['config']} malformed config values tried, {TRIED['config_clear']} clear errors; "
          f"{TRIED['rows']} malformed data rows tried, {TRIED['rows_clear']} clear errors")
    assert TRIED["config"] == TRIED["config_clear"] and TRIED["rows"] == TRIED["rows_clear"]
