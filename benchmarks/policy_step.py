"""The policy step alone at the exact lambda*: how close each form of the pseudo-preference loss gets to the tilted
target pi* on the same pi_ref samples (exact task, enumeration).

    python benchmarks/policy_step.py [overrides ...] [--seeds 0 1 2] [--schemes consecutive all listwise]
                                     [--group-size 0 --groups 16] [--consecutive-epochs 3 --pairs 64]

For each scheme: TV to pi*, |achieved - b| / b, P* - J split as beta KL(pi || pi*) + lambda* (a - b) (an identity),
in units of sd(r under pi_ref), and the training time, measured side by side in one process. The grouped schemes
train for the run's iterations x epochs_per_iteration epochs with `--groups` groups of `--group-size` responses a
step (0: a prompt's whole sample set, repeats merged; 16 groups: the full batch); the consecutive scheme trains
`--consecutive-epochs` epochs of `--pairs` pairs a step, about the same number of sequence passes on 4096 samples.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from dualign import tasks
from dualign.config import ALGORITHMS, validate
from dualign.training.fit import train_policy
from dualign.util.console import quiet_libraries

ROOT = Path(__file__).resolve().parents[1]


def sampled(task, pairs) -> torch.Tensor:
    """[P, N]: which responses of each prompt the step's samples hold (the exact task's enumeration order)."""
    rows = pairs.tensors["input_ids"].reshape(-1, pairs.tensors["input_ids"].shape[-1])
    if "count" in pairs.tensors:
        rows = rows[pairs.tensors["count"].reshape(-1) > 0]
    problem, prompt_length = task.problem, len(task.prompt_token_ids[0])
    decode = lambda ids: task.tokenizer.batch_decode(ids, skip_special_tokens=True)  # noqa: E731
    prompts = problem.prompt_indices(decode(rows[:, :prompt_length]))
    responses = problem.response_indices(decode(rows[:, prompt_length:prompt_length + problem.max_new_tokens]))
    mask = torch.zeros(len(task.prompt_token_ids), problem.num_responses, dtype=torch.bool)
    mask[prompts, responses] = True
    return mask


def measure(overrides: list[str], scheme: str, seed: int, cache: str, args) -> dict:
    if scheme == "consecutive":
        # at the rate and schedule it was the default with (lr 1e-3, cosine); 4e-3 at a constant rate suits full batches
        overrides = [f"policy_step.batch_size={args.pairs}", "optimizer.lr=1e-3", "optimizer.schedule=cosine", *overrides]
    else:
        size = args.group_size or "null"  # 0: every response of a prompt in one group
        overrides = [f"policy_step.group_size={size}", f"policy_step.batch_size={args.groups}", *overrides]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = validate(compose(config_name="train", overrides=[
            f"paths.output_dir={tempfile.mkdtemp()}", f"paths.cache_dir={cache}", "logger=none",
            "trainer.enable_progress_bar=false", f"paths.fixtures_dir={ROOT / 'tests' / 'fixtures'}",
            f"seed={seed}", f"policy_step.pairs={scheme}", *overrides]))
    task = tasks.build(cfg)
    context = task.prepare()
    evaluator = task.evaluator(context)
    oracle = context.enumeration.oracle
    optimum = oracle.optimum()
    multipliers = optimum.multipliers.float()
    algorithm = ALGORITHMS["fixed_lambda"]
    tic = time.perf_counter()
    epochs = (args.consecutive_epochs if scheme == "consecutive"
              else cfg.algorithm.iterations * cfg.algorithm.epochs_per_iteration)
    trained = train_policy(context, algorithm, multipliers, 1, epochs, Path(cfg.paths.output_dir))
    seconds = time.perf_counter() - tic
    final = evaluator(trained.policy)
    with torch.no_grad():
        logprob = context.enumeration.logprobs(trained.policy).double()
    logprob = logprob - logprob.logsumexp(-1, keepdim=True)
    terms = logprob.exp() * (logprob - optimum.logprob)
    kl_to_optimum = terms.sum(-1).mean().item()
    unsampled = (terms * ~sampled(task, context.pairs)).sum(-1).mean().item()  # beta KL's part on never-sampled y
    sd = evaluator.optimum["reference_reward_std"]
    b = torch.tensor(evaluator.threshold, dtype=torch.float64)
    slack = torch.tensor(final["improvement"], dtype=torch.float64) - b
    return {"scheme": scheme, "seed": seed, "tv": final["tv_to_optimum"],
            "error_of_b": (slack.abs() / b.abs()).max().item(),
            "gap_sd": (optimum.value - final["objective"]) / sd,
            "beta_kl_sd": cfg.beta * kl_to_optimum / sd, "overshoot_sd": (multipliers.double() @ slack).item() / sd,
            "unsampled_kl_sd": cfg.beta * unsampled / sd, "seconds": seconds, "epochs": epochs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--schemes", nargs="+", default=["consecutive", "all", "listwise"])
    parser.add_argument("--group-size", type=int, default=0, help="responses per group (all, listwise); 0: all of a prompt's")
    parser.add_argument("--groups", type=int, default=16, help="groups per micro-batch (all, listwise)")
    parser.add_argument("--consecutive-epochs", type=int, default=3, help="epochs of the consecutive scheme")
    parser.add_argument("--pairs", type=int, default=64, help="pairs per micro-batch (consecutive)")
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(2)
    quiet_libraries()
    cache = str(ROOT / "outputs" / "cache")
    rows = [measure(overrides, scheme, seed, cache, args)
            for seed in args.seeds for scheme in args.schemes]
    print(f"{'scheme':<12}{'seed':>5}{'TV to pi*':>11}{'|a-b|/b':>9}{'P*-J':>8}{'bKL':>8}{'l*(a-b)':>9}{'unsmp':>7}{'time s':>8}{'epochs':>7}"
          "   (P* - J, beta KL(pi||pi*), lambda*(a-b) in sd(r) units;\n   unsmp: the part of beta KL on responses the step's "
          "samples never held)")
    for r in rows:
        print(f"{r['scheme']:<12}{r['seed']:>5}{r['tv']:>11.4f}{r['error_of_b']:>9.1%}{r['gap_sd']:>8.4f}"
              f"{r['beta_kl_sd']:>8.4f}{r['overshoot_sd']:>9.4f}{r['unsampled_kl_sd']:>7.4f}{r['seconds']:>8.1f}{r['epochs']:>7}")
    print(json.dumps(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
