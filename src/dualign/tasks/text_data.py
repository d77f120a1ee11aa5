"""Preference datasets in their published schemas, loaded through `datasets.load_dataset` (a hub name where there is
network, a local folder or file where there is not).

Every format becomes a list of `Example`s: the prompt as the dataset writes it, the same prompt as chat messages
(for models with a chat template), and the dataset's responses (two per prompt: the DPO pairs of the paper).
A row with a missing field or an empty prompt stops the load, naming the row and the field; rows are dropped only
by a configured filter, and the count is logged.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from dualign.config.tasks import FORMATS, TextDataConfig
from dualign.errors import DataError

log = logging.getLogger("dualign")

PKU_COLUMNS = ("prompt", "response_0", "response_1", "better_response_id", "safer_response_id",
               "is_response_0_safe", "is_response_1_safe")


@dataclass
class Example:
    prompt: str  # as the dataset writes it (hh_rlhf: the transcript up to the last "Assistant:")
    messages: list[dict]  # the same conversation as chat messages, for chat templates
    responses: list[str]
    labels: dict[str, int] = field(default_factory=dict)  # label column -> index of the response it prefers (0 or 1)


def load_split(cfg: TextDataConfig, split: str) -> list[Example]:
    rows = _load_rows(cfg, split)
    if cfg.kind == "pku_saferlhf":
        examples = _pku(rows, split)
    elif cfg.kind == "hh_rlhf":
        examples = _hh(rows, split, cfg.drop_mismatched_prompts)
    elif cfg.kind == "jsonl":
        examples = _columns(rows, split, cfg.prompt_column, list(cfg.response_columns),
                            sorted(set(cfg.preference_columns.values())))
    else:
        raise DataError(f"data.kind={cfg.kind!r} is not one of {', '.join(FORMATS)}")
    if cfg.drop_identical_responses:
        kept = [e for e in examples if len(set(e.responses)) == len(e.responses)]
        _log_filter(split, "drop_identical_responses", len(examples) - len(kept), len(examples))
        examples = kept
    limit = cfg.max_train_rows if split == cfg.train_split else cfg.max_test_prompts
    if limit is not None and len(examples) > limit:
        _log_filter(split, "max rows", len(examples) - limit, len(examples))
        examples = examples[:limit]
    if not examples:
        raise DataError(f"data split {split!r} of {cfg.path} has no rows")
    return examples


def _log_filter(split: str, name: str, dropped: int, total: int) -> None:
    if dropped:
        log.info("data %s: filter %s dropped %d of %d rows", split, name, dropped, total)


def _looks_local(path: str) -> bool:
    """A hub dataset is `name` or `org/name`; anything else (a leading / . ~, deeper nesting, a file suffix) is a path."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).suffix in (".jsonl", ".json", ".parquet", ".gz")


def _check_text_file(path: Path) -> None:
    """A JSON-lines file that is not UTF-8: name the line (datasets reports it without one)."""
    with open(path, "rb") as stream:
        for number, line in enumerate(stream, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"data.path={path}: line {number} is not UTF-8 text (byte {error.start}: "
                                f"{line[error.start:error.start + 1]!r}); re-save the file as UTF-8") from None


def _single_file_split(cfg: TextDataConfig, rows, split: str):
    """One file holds every row: with data.test_fraction a seeded part of it is the test split, the rest train."""
    if cfg.test_fraction is None:
        if split == cfg.test_split:
            log.warning("data.path=%s is one file: it serves as the train and the test split, so evaluation runs on "
                        "training prompts; hold out a part with data.test_fraction=0.1 (or give a folder with train "
                        "and test files)", cfg.path)
        return rows
    parts = rows.train_test_split(test_size=cfg.test_fraction, seed=0, shuffle=True)
    return parts["test"] if split == cfg.test_split else parts["train"]


def _load_rows(cfg: TextDataConfig, split: str):
    import datasets

    datasets.logging.set_verbosity_error()
    path = Path(cfg.path).expanduser()
    if not path.exists() and _looks_local(cfg.path):
        raise DataError(f"data.path={cfg.path}: no such file or folder")
    try:
        if path.is_file():  # a single local file: its format from the suffix, one split
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".gz": "json"}.get(path.suffix)
            if builder is None:
                raise DataError(f"data.path={cfg.path}: unknown file type (expected .jsonl, .json, .parquet)")
            if path.suffix in (".jsonl", ".json"):
                _check_text_file(path)
            rows = datasets.load_dataset(builder, data_files={"rows": str(path)}, split="rows")
            return _single_file_split(cfg, rows, split)
        if cfg.test_fraction is not None:
            raise DataError(f"data.test_fraction={cfg.test_fraction} splits a single file; data.path={cfg.path} is a "
                            f"{'folder' if path.is_dir() else 'hub dataset'} with its own splits")
        return datasets.load_dataset(cfg.path, data_dir=cfg.data_dir, revision=cfg.revision, split=split)
    except DataError:
        raise
    except (FileNotFoundError, ValueError) as error:  # datasets reports unknown splits and paths this way
        raise DataError(f"data.path={cfg.path} split {split!r}: {str(error).splitlines()[0]}") from None
    except Exception as error:  # offline hub lookups raise connection errors of several types
        raise DataError(f"data.path={cfg.path} split {split!r}: cannot load ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}); for offline use pass a local copy") from None


def _require_columns(rows, split: str, columns) -> None:
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise DataError(f"data split {split!r}: column {missing[0]!r} is missing (columns: {', '.join(rows.column_names)})")


def _text(row: dict, index: int, split: str, column: str, allow_empty: bool = True) -> str:
    value = row.get(column)
    if value is None or not isinstance(value, str):
        raise DataError(f"data split {split!r} row {index}: field {column!r} is missing or not text")
    if not allow_empty and not value.strip():
        raise DataError(f"data split {split!r} row {index}: field {column!r} is empty")
    return value


def _pku(rows, split: str) -> list[Example]:
    _require_columns(rows, split, PKU_COLUMNS)
    examples = []
    for index, row in enumerate(rows):
        for column in PKU_COLUMNS[3:]:
            if row[column] is None:
                raise DataError(f"data split {split!r} row {index}: field {column!r} is missing")
        prompt = _text(row, index, split, "prompt", allow_empty=False)
        responses = [_text(row, index, split, c) for c in ("response_0", "response_1")]
        labels = {c: _label(row, index, split, c) for c in ("better_response_id", "safer_response_id")}
        examples.append(Example(prompt, [{"role": "user", "content": prompt}], responses, labels))
    return examples


def _label(row: dict, index: int, split: str, column: str) -> int:
    """A preference label: the index of the preferred one of the row's two responses."""
    value = row.get(column)
    if isinstance(value, bool) or value not in (0, 1):  # True == 1 in Python: a flag is not an index
        raise DataError(f"data split {split!r} row {index}: field {column!r} must be 0 or 1 (the index of the preferred "
                        f"response), not {value!r}")
    return int(value)


def _columns(rows, split: str, prompt_column: str, response_columns: list[str],
             label_columns: list[str] = ()) -> list[Example]:
    _require_columns(rows, split, [prompt_column])
    if response_columns and not any(c in rows.column_names for c in response_columns):
        # prompt-only data: fine unless a step needs the dataset's responses (that step says so)
        log.info("data %s: no response columns (%s): prompt-only data", split, ", ".join(response_columns))
        response_columns = []
    _require_columns(rows, split, response_columns)  # some present, some not: a misnamed column
    examples = []
    for index, row in enumerate(rows):
        prompt = _text(row, index, split, prompt_column, allow_empty=False)
        if not response_columns:
            responses = []
        elif len(response_columns) == 1:  # one column holding a list of responses
            responses = row[response_columns[0]]
            if not isinstance(responses, list) or len(responses) < 2 or len(responses) % 2 or \
                    not all(isinstance(r, str) for r in responses):
                raise DataError(f"data split {split!r} row {index}: field {response_columns[0]!r} must be a list of an "
                                f"even number (>= 2) of texts")
        else:
            responses = [_text(row, index, split, c) for c in response_columns]
        # label columns the file lacks are not read here: the step that needs one says so (tasks/text.py)
        labels = {c: _label(row, index, split, c) for c in label_columns if c in rows.column_names}
        examples.append(Example(prompt, [{"role": "user", "content": prompt}], responses, labels))
    return examples


_TURN = re.compile(r"\n\n(Human|Assistant): ")


def split_transcript(transcript: str) -> tuple[str, str, list[dict]]:
    """An hh-rlhf transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." -> (prompt up to and including the last
    "\\n\\nAssistant:", the final assistant response, the earlier turns as chat messages)."""
    cut = transcript.rfind("\n\nAssistant:")
    if cut < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    marker = "\n\nAssistant:"
    prompt, response = transcript[: cut + len(marker)], transcript[cut + len(marker):]
    parts = _TURN.split(transcript[:cut])  # ['', 'Human', text, 'Assistant', text, ..., 'Human', text]
    if parts[0].strip():
        raise ValueError("text before the first turn")
    messages = [{"role": "user" if speaker == "Human" else "assistant", "content": text}
                for speaker, text in zip(parts[1::2], parts[2::2])]
    if not messages or messages[0]["role"] != "user" or messages[-1]["role"] != "user":
        raise ValueError("the conversation must start and end with a 'Human:' turn before the final 'Assistant:'")
    return prompt, response, messages  # prompt + response is the transcript again


def _hh(rows, split: str, drop_mismatched: bool) -> list[Example]:
    _require_columns(rows, split, ("chosen", "rejected"))
    examples, mismatched = [], 0
    for index, row in enumerate(rows):
        chosen, rejected = _text(row, index, split, "chosen"), _text(row, index, split, "rejected")
        try:
            prompt, chosen_response, messages = split_transcript(chosen)
            rejected_prompt, rejected_response, _ = split_transcript(rejected)
        except ValueError as error:
            raise DataError(f"data split {split!r} row {index}: field 'chosen'/'rejected': {error}") from None
        if rejected_prompt != prompt:
            if drop_mismatched:
                mismatched += 1
                continue
            raise DataError(f"data split {split!r} row {index}: 'chosen' and 'rejected' hold different conversations "
                            f"(set data.drop_mismatched_prompts=true to drop such rows)")
        if not messages[-1]["content"].strip():
            raise DataError(f"data split {split!r} row {index}: field 'chosen' has an empty prompt")
        examples.append(Example(prompt, messages, [chosen_response, rejected_response]))
    _log_filter(split, "drop_mismatched_prompts", mismatched, len(rows))
    return examples
