"""Evaluation on a text task's test split: responses of pi_ref and of a policy to every test prompt, scored by every
scorer; means with 95% confidence intervals, improvements over pi_ref, whether each constraint is met, win rates
against pi_ref by each score model, and a sample estimate of KL(pi || pi_ref). Also the end of a text run (saved
policy, summary, plots, MLflow) and a command that evaluates any saved policy or adapter:

    python -m dualign.evaluate experiment=pku_safety_tiny evaluation.policy_path=outputs/<run>/policy
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch

from dualign.tasks.text import scored_rollouts
from dualign.training.data import sequence_logprobs, tokenized

log = logging.getLogger("dualign")
Z95 = 1.959964


def mean_ci(values: torch.Tensor) -> tuple[float, float]:
    """Mean and 95% half-width of [P, K] values; prompts are the independent units (responses to one prompt are not)."""
    per_prompt = values.double().mean(-1)
    if per_prompt.numel() < 2:
        return per_prompt.mean().item(), float("nan")
    return per_prompt.mean().item(), Z95 * per_prompt.std().item() / math.sqrt(per_prompt.numel())


class TextEvaluator:
    """Scores pi_ref once (cached rollouts on the test prompts), then any policy against it."""

    def __init__(self, setup, seed_offset: int = 0):
        cfg = setup.cfg
        self.setup, self.cfg = setup, cfg
        self.prompt_set = setup.task.test
        self.P, self.K = len(self.prompt_set.prompts), cfg.evaluation.samples_per_prompt
        self.labels = ["reward"] + setup.names
        self.seed = 500_000 + 1_000 * cfg.seed + seed_offset
        key = {"task": setup.task.cache_key(), "split": "test", "samples": self.K, "seed": self.seed,
               "generation": asdict(cfg.generation)}
        self.reference_rollouts, self.reference_scores = scored_rollouts(
            setup, "rollouts", key, lambda: setup.sample_and_score(
                setup.reference, range(self.P), self.K, self.seed, prompt_set=self.prompt_set, score=False)[0],
            self.P * self.K)
        self.reference_mean = self.reference_scores[1:].view(-1, self.P, self.K).mean(dim=(1, 2))

    def evaluate(self, policy) -> dict:
        """Test prompts sharded over ranks (each rank generates and scores its share), gathered on every rank."""
        from dualign.util import distributed

        setup, P, K = self.setup, self.P, self.K
        mine = distributed.shard(list(range(P)))
        if mine:
            rollouts, scores = setup.sample_and_score(policy, mine, K, self.seed + 1 + 7_919 * distributed.rank(),
                                                      prompt_set=self.prompt_set)
            kl = self._kl(policy, rollouts)
            part = (mine, scores.view(-1, len(mine), K), kl.view(len(mine), K), rollouts.responses)
        else:
            part = None
        order, score_parts, kl_parts, responses = [], [], [], {}
        for piece in distributed.gather(part):
            if piece is not None:
                order += piece[0]
                score_parts.append(piece[1])
                kl_parts.append(piece[2])
                responses.update({p: piece[3][i * K:(i + 1) * K] for i, p in enumerate(piece[0])})
        back = torch.argsort(torch.tensor(order))  # prompt order again
        current = torch.cat(score_parts, dim=1)[:, back]  # [1 + m, P, K]
        kl = torch.cat(kl_parts)[back]
        reference = self.reference_scores.view(-1, P, K)
        result = {"prompts": P, "samples_per_prompt": K, "scores": {}, "constraints": {}}
        for j, label in enumerate(self.labels):
            wins = (current[j] > reference[j]).double() + 0.5 * (current[j] == reference[j]).double()
            entry = {}
            for key, values in (("reference", reference[j]), ("policy", current[j]),
                                ("improvement", current[j] - reference[j]), ("win_rate", wins)):
                entry[key], entry[f"{key}_ci"] = mean_ci(values)
            result["scores"][label] = entry
        threshold = setup.threshold.tolist()
        for i, name in enumerate(setup.names):
            entry = result["scores"][name]
            result["constraints"][name] = {
                "threshold": threshold[i], "improvement": entry["improvement"],
                "satisfied": entry["improvement"] >= threshold[i],
                "satisfied_at_95": entry["improvement"] - entry["improvement_ci"] >= threshold[i],  # CI's lower end
            }
        result["kl"], result["kl_ci"] = mean_ci(kl)
        result["objective"] = result["scores"]["reward"]["policy"] - self.cfg.beta * result["kl"]
        result["samples"] = [
            {"prompt": self.prompt_set.prompts[p], "policy_response": responses[p][0],
             "reference_response": self.reference_rollouts.responses[p * K],
             **{f"policy/{label}": current[j, p, 0].item() for j, label in enumerate(self.labels)},
             **{f"reference/{label}": reference[j, p, 0].item() for j, label in enumerate(self.labels)}}
            for p in range(P)  # the first response to every prompt
        ][: self.cfg.evaluation.samples_logged]
        result["_score_values"] = {"reference": self.reference_scores.tolist(), "policy": current.reshape(len(self.labels), -1).tolist()}
        return result

    def _kl(self, policy, rollouts) -> torch.Tensor:
        """Per-response log pi(y|x) - log pi_ref(y|x) on the policy's own samples: their mean estimates KL(pi || pi_ref)."""
        task = self.setup.task
        tensors = tokenized(self.prompt_set.prompt_token_ids, rollouts, task.tokenizer.pad_token_id)
        batch = 2 * self.cfg.policy_step.batch_size
        was_training = policy.training
        policy.eval()
        logps = sequence_logprobs(policy, *tensors, batch_size=batch)
        policy.train(was_training)
        return logps - sequence_logprobs(self.setup.reference, *tensors, batch_size=batch)

    def __call__(self, policy) -> dict:
        """Flat scalars for per-iteration logging (eval/*)."""
        return flat_metrics(self.evaluate(policy))


def flat_metrics(result: dict, prefix: str = "") -> dict[str, float]:
    out = {f"{prefix}kl": result["kl"], f"{prefix}objective": result["objective"]}
    for label, entry in result["scores"].items():
        out[f"{prefix}{label}"] = entry["policy"]
        out[f"{prefix}{label}_ci"] = entry["policy_ci"]
        out[f"{prefix}improvement_{label}"] = entry["improvement"]
        out[f"{prefix}improvement_{label}_ci"] = entry["improvement_ci"]
        out[f"{prefix}win_rate_{label}"] = entry["win_rate"]
    for name, entry in result["constraints"].items():
        out[f"{prefix}satisfied_{name}"] = float(entry["satisfied"])
        out[f"{prefix}violation_{name}"] = entry["threshold"] - entry["improvement"]
    return out


def table(result: dict, title: str, comparison: dict | None = None) -> str:
    lines = ["", f"== {title}: {result['prompts']} test prompts x {result['samples_per_prompt']} responses, "
                 "mean +- 95% CI ==", ""]
    header = f"{'score':<18}{'pi_ref':>18}{'policy':>18}{'improvement':>18}{'b':>8}{'met':>6}{'win rate':>10}"
    if comparison:
        header += f"{'one_shot impr.':>18}"
    lines.append(header)
    for label, entry in result["scores"].items():
        constraint = result["constraints"].get(label)
        row = (f"{label:<18}{entry['reference']:>10.4f} +- {entry['reference_ci']:<4.2f}"
               f"{entry['policy']:>10.4f} +- {entry['policy_ci']:<4.2f}"
               f"{entry['improvement']:>10.4f} +- {entry['improvement_ci']:<4.2f}"
               + (f"{constraint['threshold']:>8.3g}{'yes' if constraint['satisfied'] else 'no':>6}" if constraint
                  else f"{'':>14}")
               + f"{entry['win_rate']:>10.1%}")
        if comparison:
            other = comparison["scores"][label]
            row += f"{other['improvement']:>10.4f} +- {other['improvement_ci']:<4.2f}"
        lines.append(row)
    lines.append(f"{'KL(pi || pi_ref)':<18}{'':>18}{result['kl']:>10.4f} +- {result['kl_ci']:<4.2f}")
    lines.append(f"{'E[r] - beta KL':<18}{'':>18}{result['objective']:>10.4f}")
    return "\n".join(lines)


def plot(output_dir: Path, result: dict, comparison: dict | None = None, history: list | None = None,
         names: list | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    labels = list(result["scores"])
    values = result["_score_values"]
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.4), squeeze=False)
    for j, label in enumerate(labels):
        ax = axes[0, j]
        ax.hist(values["reference"][j], bins=20, alpha=0.55, label="pi_ref")
        ax.hist(values["policy"][j], bins=20, alpha=0.55, label="trained policy")
        ax.set(title=label, xlabel="score (utility sign)", ylabel="responses")
        ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(output_dir / "eval_score_histograms.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    constraints = list(result["constraints"])
    if constraints:
        fig, ax = plt.subplots(figsize=(3.2 + 1.6 * len(constraints), 3.8))
        x = torch.arange(len(constraints)).float()
        runs = [("this run", result)] + ([("one_shot", comparison)] if comparison else [])
        width = 0.8 / len(runs)
        for k, (name, run) in enumerate(runs):
            ax.bar(x + k * width, [run["scores"][c]["improvement"] for c in constraints], width,
                   yerr=[run["scores"][c]["improvement_ci"] for c in constraints], capsize=4, label=name)
        for i, c in enumerate(constraints):
            ax.hlines(result["constraints"][c]["threshold"], i - 0.1, i + 0.9, colors="k", linestyles="--",
                      label="threshold b" if i == 0 else None)
        ax.set_xticks(x + 0.4 - width / 2, constraints)
        ax.set(title="improvement over pi_ref\n(test split, 95% CI) vs b", ylabel="E_pi[g] - E_ref[g]")
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(output_dir / "eval_improvement_vs_threshold.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    if history and names:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        steps = [h["iteration"] for h in history]
        for i, name in enumerate(names):
            axes[0].plot([0] + steps, [history[0]["multipliers_used"][i]] + [h["multipliers"][i] for h in history],
                         "o-", color=f"C{i}", label=f"lambda_{name}")
            axes[1].plot(steps, [h["estimated_improvement"][i] for h in history], "o-", color=f"C{i}",
                         label=f"{name}: dual-step estimate (train prompts)")
            if all("eval" in h for h in history):  # evaluation.every_iteration
                axes[1].errorbar(steps, [h["eval"][f"improvement_{name}"] for h in history],
                                 yerr=[h["eval"][f"improvement_{name}_ci"] for h in history], fmt="s:", color=f"C{i}",
                                 capsize=3, label=f"{name}: test split (95% CI)")
            axes[1].axhline(result["constraints"][name]["threshold"], color=f"C{i}", ls="--", label=f"b_{name}")
        axes[0].set(title="multipliers per iteration", xlabel="iteration", ylabel="lambda")
        axes[1].set(title="achieved improvement vs b", xlabel="iteration", ylabel="E_pi[g] - E_ref[g]")
        for ax in axes:
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        files.append(output_dir / "dual_trajectory.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


def write_and_log(output_dir: Path, summary: dict, logger, raw_cfg, history=None, names=None) -> list[Path]:
    """summary.json, samples.jsonl, config.yaml and the plots; then MLflow metrics, artifacts and the sample table."""
    from omegaconf import OmegaConf

    output_dir.mkdir(parents=True, exist_ok=True)
    result, comparison = summary["evaluation"], (summary.get("one_shot") or {}).get("evaluation")
    files = plot(output_dir, result, comparison, history, names)
    samples = output_dir / "samples.jsonl"
    samples.write_text("".join(json.dumps(row) + "\n" for row in result["samples"]))
    public = json.loads(json.dumps(summary, default=str))
    for run in (public["evaluation"], (public.get("one_shot") or {}).get("evaluation")):
        if run:
            run.pop("_score_values", None)
    (output_dir / "summary.json").write_text(json.dumps(public, indent=2))
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(raw_cfg, resolve=True))
    files += [samples, output_dir / "summary.json", output_dir / "config.yaml"]
    if logger is not None:
        metrics = flat_metrics(result, "final/")
        if comparison:
            metrics.update(flat_metrics(comparison, "one_shot/"))
        for i, name in enumerate(summary.get("constraints", [])):
            if summary.get("final_multipliers"):
                metrics[f"final/lambda_{name}"] = summary["final_multipliers"][i]
        logger.log_metrics(metrics)
        for path in files:
            logger.log_artifact(path)
        columns = {key: [row[key] for row in result["samples"]] for key in (result["samples"][0] if result["samples"] else [])}
        if columns:
            logger.log_table(columns, "eval_samples.json")
    return files


def finish_text_run(setup, policy, dual, comparison_policy, timings: dict, output_dir: Path, logger, raw_cfg) -> dict:
    """The end of a text run: evaluate, save the policy with save_pretrained, write and log everything."""
    import time

    from dualign.models.hf import save_policy

    tic = time.perf_counter()
    evaluator = setup.evaluator or TextEvaluator(setup)
    result = evaluator.evaluate(policy)
    comparison = {"multipliers": setup.one_shot.tolist(), "evaluation": evaluator.evaluate(comparison_policy)} \
        if comparison_policy is not None else None
    timings["evaluation"] = time.perf_counter() - tic
    from dualign.util import distributed, timing

    timings["by stage"] = timing.breakdown()

    if not distributed.is_main():  # every rank evaluated its share of the prompts; rank 0 saves and reports
        return {}
    saved = save_policy(policy, setup.task.tokenizer, output_dir / "policy")
    summary = {
        "algorithm": setup.cfg.algorithm.name, "policy_step": setup.cfg.policy_step.name, "beta": setup.cfg.beta,
        "constraints": setup.names, "threshold": setup.threshold.tolist(),
        "reference_mean_estimate": setup.reference_mean.tolist(), "one_shot_multipliers": setup.one_shot.tolist(),
        "initial_multipliers": dual.history[0]["multipliers_used"] if dual.history else [],
        "final_multipliers": dual.history[-1]["multipliers"] if dual.history else [],
        "trajectory": dual.history, "evaluation": result, "one_shot": comparison, "policy": str(saved),
        "timings_s": timings,
    }
    with timing.stage("writing outputs"):
        write_and_log(output_dir, summary, logger, raw_cfg, dual.history, setup.names)
    print(table(result, f"{summary['algorithm']} ({summary['policy_step']} policy step)",
                comparison["evaluation"] if comparison else None))
    if dual.history:
        print("lambda per iteration: " + ", ".join(
            f"{h['iteration']}: " + "/".join(f"{v:.4f}" for v in h["multipliers"]) for h in dual.history))
    from dualign.tracking.report import time_lines

    print(time_lines(timings))
    print(f"policy saved to {saved} (save_pretrained; load with transformers/peft)")
    metrics = {"objective": result["objective"], "reward": result["scores"]["reward"]["policy"], "kl": result["kl"],
               "constraint_violation": [c["threshold"] - c["improvement"] for c in result["constraints"].values()]}
    metrics.update({f"improvement_{n}": result["constraints"][n]["improvement"] for n in setup.names})
    return metrics


def evaluate_saved(raw_cfg) -> dict:
    """`python -m dualign.evaluate`: a saved policy or adapter (evaluation.policy_path) against pi_ref
    (model.name_or_path) on the test split, with the configured scorers and constraints."""
    from dualign.config import ConfigError, validate
    from dualign.models.hf import load_causal_lm, load_trained_policy, resolve_device
    from dualign.run import Setup, _mlflow_logger, _quiet_libraries
    from dualign.tasks.text import TextTask, load_scorers
    from dualign.util.lifecycle import terminations

    cfg = validate(raw_cfg)
    if cfg.data.kind == "exact":
        raise ConfigError("python -m dualign.evaluate needs a text task (data=pku_saferlhf | hh_rlhf | jsonl)")
    if not cfg.evaluation.policy_path:
        raise ConfigError("evaluation.policy_path is null; give the folder of a saved policy or adapter")
    _quiet_libraries()
    torch.manual_seed(cfg.seed)
    output_dir = Path(cfg.paths.output_dir)
    logger = _mlflow_logger(cfg, raw_cfg, None, run_name=f"evaluate {Path(cfg.evaluation.policy_path).name}")
    with terminations(logger):  # the MLflow run ends FINISHED, FAILED or KILLED with the command
        setup = Setup(cfg, task=TextTask(cfg), names=list(cfg.constraints))
        device = resolve_device(cfg.model.device)
        setup.reference = load_causal_lm(cfg.model).to(device).eval().requires_grad_(False)
        setup.raw_scorers, setup.scorers = load_scorers(cfg)
        evaluator = TextEvaluator(setup)
        setup.reference_mean = evaluator.reference_mean
        setup.threshold = setup.thresholds(evaluator.reference_mean)
        policy = load_trained_policy(cfg.evaluation.policy_path, cfg.model).to(device)
        result = evaluator.evaluate(policy)
        summary = {"policy": cfg.evaluation.policy_path, "reference": cfg.model.name_or_path, "constraints": setup.names,
                   "threshold": setup.threshold.tolist(), "evaluation": result}
        write_and_log(output_dir, summary, logger, raw_cfg)
        print(table(result, f"evaluation of {cfg.evaluation.policy_path}"))
        print(f"outputs: {output_dir.resolve()}")
        return flat_metrics(result)


def main() -> None:
    import sys

    import hydra

    from dualign.cli import config_dir
    from dualign.errors import InputError

    def _main(cfg):
        try:
            return evaluate_saved(cfg)
        except InputError as error:
            print(f"dualign: {error.kind} error: {error}", file=sys.stderr)
            sys.exit(2)

    hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")(_main)()


if __name__ == "__main__":
    main()
