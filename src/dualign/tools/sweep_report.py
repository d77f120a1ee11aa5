"""Report on the runs of an MLflow experiment (a sweep): the reward-safety Pareto front, the lambda trajectories
of the best feasible runs, and a markdown table.

    python -m dualign.tools.sweep_report --experiment sweep-caid-eta-beta [--tracking-uri sqlite:///outputs/mlflow.db] [--out DIR]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import mlflow


def trial_runs(client: mlflow.MlflowClient, experiment_name: str) -> list:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise SystemExit(f"sweep_report: no MLflow experiment named {experiment_name!r}")
    runs = client.search_runs([experiment.experiment_id], max_results=10_000)
    return [r for r in runs if "final/objective" in r.data.metrics]  # the sweep's parent run has no final metrics


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both coordinates (both maximised)."""
    return [i for i, (x, y) in enumerate(points)
            if not any(a >= x and b >= y and (a > x or b > y) for j, (a, b) in enumerate(points) if j != i)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    parser.add_argument("--out", default=None,
                        help="folder for report.md and the PNGs (default outputs/sweep_reports/<experiment>)")
    parser.add_argument("--top", type=int, default=3, help="best feasible runs whose lambda trajectories are plotted")
    args = parser.parse_args(argv)
    out = Path(args.out or f"outputs/sweep_reports/{args.experiment}")
    out.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(args.tracking_uri)
    runs = trial_runs(client, args.experiment)
    if not runs:
        raise SystemExit(f"sweep_report: experiment {args.experiment!r} has no finished dualign runs")
    # the constraints every run has (final/violation_<name>); final/improvement_* also holds unconstrained scorers
    names = sorted(set.intersection(*({k[len("final/violation_"):] for k in r.data.metrics
                                       if k.startswith("final/violation_")} for r in runs)))
    first = names[0] if names else None

    def feasible(run) -> bool:
        return all(run.data.metrics.get(f"final/violation_{n}", 0.0) <= 1e-9 for n in names)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(runs, key=lambda r: (not feasible(r), -r.data.metrics["final/objective"]))
    if first:
        points = [(r.data.metrics[f"final/improvement_{first}"], r.data.metrics["final/reward"]) for r in runs]
        front = pareto(points)
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        ax.scatter(*zip(*points), c=["C0" if feasible(r) else "C3" for r in runs], s=18, label="runs (red: infeasible)")
        front_points = sorted(points[i] for i in front)
        ax.plot(*zip(*front_points), "k-o", ms=4, label="Pareto front")
        ax.set(xlabel=f"achieved improvement of {first} (exact)", ylabel="E[r] (exact)", title=args.experiment)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=110)
        plt.close(fig)
        best = [r for r in rows if feasible(r)][: args.top]
    if first and not best:
        print("sweep_report: no run meets its constraints; no lambda trajectories to plot")
    if first and best:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for k, run in enumerate(best):
            for name in names:
                history = client.get_metric_history(run.info.run_id, f"dual/lambda_{name}")
                ax.plot([m.step for m in history], [m.value for m in history], "o-", color=f"C{k}",
                        label=f"{run.info.run_name} {run.data.tags.get('optuna_trial', '')}: {name}")
        ax.set(xlabel="iteration", ylabel="lambda", title="lambda trajectories of the best feasible runs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "lambda_best.png", dpi=110)
        plt.close(fig)
    varied = sorted({k for r in runs for k, v in r.data.params.items() if len({x.data.params.get(k) for x in runs}) > 1})
    header = ["run", "trial", *varied, "J", "E[r]", *[f"improvement {n}" for n in names], "feasible"]
    lines = [f"# {args.experiment}", "", f"{len(runs)} runs; tracking store {args.tracking_uri}.", ""]
    if first:
        lines += ["![Pareto front](pareto.png)" + (" ![lambda](lambda_best.png)" if best else ""), ""]
        if not best:
            lines += ["No run meets its constraints.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in rows:
        m = run.data.metrics
        lines.append("| " + " | ".join([
            run.info.run_id[:8], run.data.tags.get("optuna_trial", ""), *[run.data.params.get(k, "") for k in varied],
            f"{m['final/objective']:.4f}", f"{m.get('final/reward', float('nan')):.4f}",
            *[f"{m.get(f'final/improvement_{n}', float('nan')):.4f}" for n in names], "yes" if feasible(run) else "no",
        ]) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'report.md'}")


if __name__ == "__main__":
    main()
