"""The one writer of a run's results, for every task kind: summary.json, config.yaml, samples.jsonl (where the
evaluation kept sample rows), the plots, MLflow metrics, artifacts and sample table, and the console table."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from dualign.tracking import plots
from dualign.tracking.summary import RunSummary
from dualign.tracking.tables import run_table
from dualign.util.metrics import flatten_metrics


def mlflow_metrics(summary: RunSummary) -> dict[str, float]:
    names = summary.constraints
    metrics = flatten_metrics(summary.final, "final", names)
    metrics.update(flatten_metrics({"lambda": summary.final_multipliers,
                                    "violation": [b - a for a, b in zip(summary.final["improvement"], summary.threshold)]},
                                   "final", names))
    metrics.update(flatten_metrics(summary.gaps, "gap", names))
    if summary.optimum:
        metrics.update(flatten_metrics({"value": summary.optimum["value"], "lambda": summary.optimum["multipliers"]},
                                       "optimum", names))
    if summary.one_shot:
        metrics.update(flatten_metrics(summary.one_shot["final"], "one_shot", names))
    return metrics


def write(summary: RunSummary, output_dir: Path, raw_cfg, logger=None, task_files: list[Path] = ()) -> list[Path]:
    """Write every file, log them and the metrics to MLflow, print the table. Returns the files written."""
    output_dir.mkdir(parents=True, exist_ok=True)
    files = list(task_files) + plots.plot_all(summary, output_dir)
    samples = summary.final.get("samples")
    if samples:
        files.append(output_dir / "samples.jsonl")
        files[-1].write_text("".join(json.dumps(row) + "\n" for row in samples))
    files += [output_dir / "summary.json", output_dir / "config.yaml"]
    files[-2].write_text(json.dumps(summary.to_json(), indent=2, default=str))
    files[-1].write_text(OmegaConf.to_yaml(raw_cfg, resolve=True))
    if logger is not None:
        logger.log_metrics(mlflow_metrics(summary))
        for path in files:
            logger.log_artifact(path)
        if samples:
            logger.log_table({key: [row[key] for row in samples] for key in samples[0]}, "samples.json")
    print(run_table(summary))
    print(f"outputs: {output_dir.resolve()}")
    return files
