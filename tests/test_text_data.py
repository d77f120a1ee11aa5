"""Preference datasets in their published schemas (fixture files), loaded through datasets.load_dataset."""
import json
import logging

import pytest
from conftest import ROOT

from dualign.tasks.text_data import DataError, TextDataConfig, load_split, split_transcript

FIXTURES = ROOT / "tests" / "fixtures"


def test_pku_saferlhf_fixture_loads_both_splits():
    cfg = TextDataConfig(kind="pku_saferlhf", path=str(FIXTURES / "pku_saferlhf"))
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert (len(train), len(test)) == (48, 16)
    first = json.loads((FIXTURES / "pku_saferlhf" / "train.jsonl").read_text().splitlines()[0])
    assert train[0].prompt == first["prompt"] and train[0].responses == [first["response_0"], first["response_1"]]
    assert train[0].messages == [{"role": "user", "content": first["prompt"]}]
    assert train[0].labels == {"better_response_id": first["better_response_id"],
                               "safer_response_id": first["safer_response_id"]}


def test_hh_rlhf_split_keeps_multi_turn_conversations():
    transcript = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant: Use an oven."
    prompt, response, messages = split_transcript(transcript)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant:"
    assert response == " Use an oven." and prompt + response == transcript
    assert messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "How do I bake bread?"}]
    examples = load_split(TextDataConfig(kind="hh_rlhf", path=str(FIXTURES / "hh_rlhf")), "train")
    assert len(examples) == 32 and any(len(e.messages) == 3 for e in examples)
    assert all(e.prompt.endswith("\n\nAssistant:") and len(e.responses) == 2 for e in examples)


def test_jsonl_with_configured_columns_and_a_list_column(tmp_path):
    cfg = TextDataConfig(kind="jsonl", path=str(FIXTURES / "qa_pairs.parquet"), prompt_column="question",
                         response_columns=["answer_a", "answer_b"])
    assert len(load_split(cfg, "train")) == 20
    path = tmp_path / "lists.jsonl"
    path.write_text(json.dumps({"q": "x?", "rs": ["a", "b", "c", "d"]}) + "\n")
    examples = load_split(TextDataConfig(kind="jsonl", path=str(path), prompt_column="q", response_columns=["rs"]), "train")
    assert examples[0].responses == ["a", "b", "c", "d"]
    # preference labels: read from the configured columns a file has (the step that needs a missing one says so)
    path.write_text(json.dumps({"q": "x?", "a": "1", "b": "2", "kind": 1}) + "\n")
    labelled = TextDataConfig(kind="jsonl", path=str(path), prompt_column="q", response_columns=["a", "b"],
                              preference_columns={"reward": "kind", "safety": "absent"})
    assert load_split(labelled, "train")[0].labels == {"kind": 1}


def _pku_file(tmp_path, rows):
    folder = tmp_path / "pku"
    folder.mkdir()
    good = json.loads((FIXTURES / "pku_saferlhf" / "train.jsonl").read_text().splitlines()[0])
    lines = [json.dumps({**good, **row}) for row in rows]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return TextDataConfig(kind="pku_saferlhf", path=str(folder))


@pytest.mark.parametrize("row, message", [
    ({"prompt": "  "}, "row 2: field 'prompt' is empty"),
    ({"response_1": None}, "row 2: field 'response_1' is missing or not text"),
    ({"safer_response_id": None}, "row 2: field 'safer_response_id' is missing"),
    ({"better_response_id": 2}, "row 2: field 'better_response_id' must be 0 or 1"),
    ({"safer_response_id": True}, "row 2: field 'safer_response_id' must be 0 or 1"),
])
def test_bad_rows_stop_the_load_naming_row_and_field(tmp_path, row, message):
    cfg = _pku_file(tmp_path, [{}, {}, row])
    with pytest.raises(DataError) as error:
        load_split(cfg, "train")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_column_and_missing_split_are_named(tmp_path):
    folder = tmp_path / "pku"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"prompt": "x", "response_0": "a"}) + "\n")
    with pytest.raises(DataError, match="column 'response_1' is missing"):
        load_split(TextDataConfig(kind="pku_saferlhf", path=str(folder)), "train")
    with pytest.raises(DataError, match="split 'test'"):
        load_split(TextDataConfig(kind="pku_saferlhf", path=str(folder)), "test")
    with pytest.raises(DataError, match="no such file or folder"):
        load_split(TextDataConfig(kind="pku_saferlhf", path=str(tmp_path / "nowhere")), "train")


def test_filters_drop_only_when_configured_and_log_the_count(tmp_path, caplog):
    cfg = _pku_file(tmp_path, [{}, {"response_1": "same", "response_0": "same"}, {}])
    assert len(load_split(cfg, "train")) == 3  # nothing dropped by default
    cfg.drop_identical_responses, cfg.max_train_rows = True, 1
    with caplog.at_level(logging.INFO, logger="dualign"):
        assert len(load_split(cfg, "train")) == 1
    assert "drop_identical_responses dropped 1 of 3 rows" in caplog.text
    assert "max rows dropped 1 of 2 rows" in caplog.text


def test_hh_mismatched_conversations_error_or_filter(tmp_path, caplog):
    path = tmp_path / "hh.jsonl"
    rows = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: c"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TextDataConfig(kind="hh_rlhf", path=str(path))
    with pytest.raises(DataError, match="row 1: 'chosen' and 'rejected' hold different conversations"):
        load_split(cfg, "train")
    cfg.drop_mismatched_prompts = True
    with caplog.at_level(logging.INFO, logger="dualign"):
        assert len(load_split(cfg, "train")) == 1
    assert "drop_mismatched_prompts dropped 1 of 2 rows" in caplog.text


def test_a_single_file_warns_that_it_serves_both_splits_and_test_fraction_holds_a_part_out(caplog):
    path = str(FIXTURES / "qa_pairs.parquet")
    cfg = TextDataConfig(kind="jsonl", path=path, prompt_column="question", response_columns=["answer_a", "answer_b"])
    with caplog.at_level(logging.WARNING, logger="dualign"):
        assert len(load_split(cfg, "test")) == 20
    assert "is one file: it serves as the train and the test split" in caplog.text
    cfg.test_fraction = 0.25
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert (len(train), len(test)) == (15, 5)
    assert not {e.prompt for e in test} & {e.prompt for e in train} or len({e.prompt for e in train + test}) < 20
    assert [e.prompt for e in load_split(cfg, "test")] == [e.prompt for e in test]  # seeded: the same split again
    with pytest.raises(DataError, match="data.test_fraction=0.25 splits a single file"):
        load_split(TextDataConfig(kind="pku_saferlhf", path=str(FIXTURES / "pku_saferlhf"), test_fraction=0.25), "train")


def test_a_missing_local_path_and_a_non_utf8_line_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"data.path=\./no/such/folder: no such file or folder"):
        load_split(TextDataConfig(kind="pku_saferlhf", path="./no/such/folder"), "train")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"prompt": "ok", "response_0": "a", "response_1": "b"}).encode() + b"\n"
                     + '{"prompt": "caf\xe9", "response_0": "a", "response_1": "b"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="line 2 is not UTF-8 text") as error:
        load_split(TextDataConfig(kind="jsonl", path=str(path)), "train")
    assert "\n" not in str(error.value)
