"""Offline stand-ins in the real formats, for tests and `experiment=pku_safety_tiny`.

Data: a few dozen rows written here (not copied from the datasets) in the schemas of PKU-SafeRLHF-30K, hh-rlhf and
a generic JSONL/Parquet file. Models: a tokenizer trained in code, a tiny Llama causal LM (briefly fitted to the fixture
responses so it writes words and stops), safe-rlhf `LlamaForScore` reward and cost checkpoints (briefly fitted to the
fixture labels so their scores mean something) and a 2-label sequence classifier. Everything loads through the same
`from_pretrained` / `load_dataset` calls as hub names.

    python -m dualign.tools.fixtures tests/fixtures      # rewrite the committed fixtures
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

from dualign.models.scorers import LlamaForScore

TOPICS = ["a lock", "a password", "a car", "medicine", "a neighbour's dog", "a bank account", "a fire", "a knife",
          "a computer", "a phone", "an exam", "a tax form", "a garden", "a river", "a ladder", "a recipe"]
QUESTIONS = ["How can I break {t}?", "What is the best way to steal {t}?", "How do I take care of {t}?",
             "Can you help me with {t}?", "How do I get rid of {t} without anyone knowing?", "Tell me about {t}."]
SAFE = ["I can't help with harming anyone, but I can suggest asking a professional about {t}.",
        "Please stay safe: for {t}, talk to someone you trust and follow the law.",
        "Here is a careful answer about {t}: check the manual and ask an expert first.",
        "It is better to keep {t} safe and ask for help if you are unsure."]
UNSAFE = ["Sure, just break {t} at night when nobody is watching.",
          "Take {t} quickly and hide it so nobody finds out.",
          "Hit {t} hard until it stops, that always works.",
          "Ignore the rules about {t}, nobody will catch you."]
HELPFUL_EXTRA = [" First, read the instructions. Second, go slowly.", " Step one is to plan, step two is to act.", ""]
JOKES = [" Why did {t} cross the road? To get to the other side!", " Ha, {t} walks into a bar.", ""]


def _pku_rows(count: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(count):
        topic = rng.choice(TOPICS)
        safe = rng.choice(SAFE).format(t=topic) + rng.choice(HELPFUL_EXTRA)
        unsafe = rng.choice(UNSAFE).format(t=topic) + rng.choice(HELPFUL_EXTRA)
        both_safe = rng.random() < 0.25
        if both_safe:
            unsafe = rng.choice(SAFE).format(t=topic)
        first_safe = rng.random() < 0.5
        responses = [safe, unsafe] if first_safe else [unsafe, safe]
        safe_flags = [True, both_safe] if first_safe else [both_safe, True]
        rows.append({
            "prompt": rng.choice(QUESTIONS).format(t=topic),
            "response_0": responses[0], "response_1": responses[1],
            "better_response_id": int(len(responses[1]) > len(responses[0])),  # longer counts as more helpful
            "safer_response_id": 0 if first_safe else 1,
            "is_response_0_safe": safe_flags[0], "is_response_1_safe": safe_flags[1],
        })
    return rows


def _hh_rows(count: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(count):
        topic = rng.choice(TOPICS)
        turns = ""
        if rng.random() < 0.4:  # multi-turn: an earlier exchange before the final question
            turns = f"\n\nHuman: {rng.choice(QUESTIONS).format(t=topic)}\n\nAssistant: {rng.choice(SAFE).format(t=topic)}"
        prompt = f"{turns}\n\nHuman: {rng.choice(QUESTIONS).format(t=topic)}\n\nAssistant:"
        chosen = " " + rng.choice(SAFE).format(t=topic) + rng.choice(JOKES).format(t=topic)
        rejected = " " + rng.choice(UNSAFE).format(t=topic)
        rows.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
    return rows


def write_data(folder: Path, seed: int = 0) -> None:
    """pku_saferlhf/{train,test}.jsonl, hh_rlhf/{train,test}.jsonl, qa_pairs.parquet (custom column names)."""
    import datasets

    rng = random.Random(seed)
    for name, make, sizes in (("pku_saferlhf", _pku_rows, (48, 16)), ("hh_rlhf", _hh_rows, (32, 12))):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for split, size in zip(("train", "test"), sizes):
            with open(folder / name / f"{split}.jsonl", "w") as out:
                for row in make(size, rng):
                    out.write(json.dumps(row) + "\n")
    rows = _pku_rows(20, rng)
    datasets.Dataset.from_dict({
        "question": [r["prompt"] for r in rows],
        "answer_a": [r["response_0"] for r in rows],
        "answer_b": [r["response_1"] for r in rows],
    }).to_parquet(str(folder / "qa_pairs.parquet"))


def _corpus(folder: Path) -> list[str]:
    texts = []
    for split in ("train", "test"):
        for line in open(folder / "pku_saferlhf" / f"{split}.jsonl"):
            row = json.loads(line)
            texts += [row["prompt"], row["response_0"], row["response_1"]]
        for line in open(folder / "hh_rlhf" / f"{split}.jsonl"):
            texts.append(json.loads(line)["chosen"])
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the fixture text (any input encodes; no unknown tokens), Llama-style BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _llama_config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **extra)


PKU_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"


def build_policy(folder: Path, tokenizer, rows: list[dict], steps: int = 150, seed: int = 0) -> None:
    """A tiny Llama fitted for a few steps to the fixture responses under the PKU template (stands in for alpaca-7b)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tokenizer))
    texts = [PKU_TEMPLATE.format(prompt=r["prompt"]) + r[f"response_{k}"] + tokenizer.eos_token for r in rows for k in (0, 1)]
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.generation_config.do_sample = True
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_score_model(folder: Path, tokenizer, rows: list[dict], score_type: str, steps: int = 80, seed: int = 0,
                      do_normalize: bool = True) -> None:
    """A safe-rlhf LlamaForScore checkpoint, saved as safe-rlhf saves one: backbone under `model.`, linear
    `score_head`, `normalizer.{mean,var,count}` buffers, and the config keys score_dim, score_bias, score_type,
    do_normalize, normalizer_type, momentum, with mean / var as lists of score_dim floats (`normalizer.mean.tolist()`).
    Fitted like safe-rlhf's reward / cost training on `prompt + answer + EOS`: reward, the better response scores
    higher; cost, unsafe responses score > 0 and safe ones < 0. The statistics are those of the fitted end scores
    (safe-rlhf's RunningMeanStd over its training scores)."""
    torch.manual_seed(seed)
    config = _llama_config(tokenizer, score_dim=1, score_bias=True, score_type=score_type, do_normalize=False,
                           normalizer_type="RunningMeanStd", momentum=None, mean=[0.0], var=[1.0])
    config.architectures = ["LlamaForScore"]
    model = LlamaForScore(config)
    texts = [PKU_TEMPLATE.format(prompt=r["prompt"]) + r[f"response_{k}"] + tokenizer.eos_token for r in rows for k in (0, 1)]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    if score_type == "reward":
        better = torch.tensor([r["better_response_id"] for r in rows])
    else:
        unsafe = torch.tensor([[not r["is_response_0_safe"], not r["is_response_1_safe"]] for r in rows], dtype=torch.float)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        scores = model.end_scores(**batch).view(-1, 2)
        if score_type == "reward":
            margin = scores.gather(1, better[:, None]) - scores.gather(1, 1 - better[:, None])
            loss = -torch.nn.functional.logsigmoid(margin).mean()
        else:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(scores, unsafe)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        end = model.end_scores(**batch)  # [rows, score_dim]
    model.normalizer.mean.copy_(end.mean(0))
    model.normalizer.var.copy_(end.var(0, unbiased=False))
    model.normalizer.count.fill_(end.shape[0])
    config.mean, config.var = model.normalizer.mean.tolist(), model.normalizer.var.tolist()
    config.do_normalize = do_normalize
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_classifier(folder: Path, tokenizer, seed: int = 0, labels: int = 2) -> None:
    """A random LlamaForSequenceClassification: 2 named labels (stands in for a humour classifier) or 1 logit (for
    the GPT-2 helpful / harmless reward models of the hh experiment)."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    names = {0: "not_humorous", 1: "humorous"} if labels == 2 else {0: "LABEL_0"}
    config = _llama_config(tokenizer, num_labels=labels, id2label=names, label2id={v: k for k, v in names.items()})
    LlamaForSequenceClassification(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_all(folder: str | Path) -> Path:
    folder = Path(folder)
    write_data(folder)
    rows = [json.loads(line) for line in open(folder / "pku_saferlhf" / "train.jsonl")]
    tokenizer = build_tokenizer(_corpus(folder))
    models = folder / "tiny_models"
    build_policy(models / "policy", tokenizer, rows)
    build_score_model(models / "reward", tokenizer, rows, "reward")
    build_score_model(models / "cost", tokenizer, rows, "cost")
    build_classifier(models / "humour", tokenizer)
    build_classifier(models / "reward_classifier", tokenizer, seed=1, labels=1)
    return folder


if __name__ == "__main__":
    print(build_all(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"))
