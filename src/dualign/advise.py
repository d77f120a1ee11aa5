"""`python -m dualign.advise` (also `dualign-advise`): before training, what each threshold will cost.

Takes the same config and overrides as train.py, builds (or reads from the cache) pi_ref's scored rollouts, and for a
grid of thresholds of one constraint (advise.thresholds, or 10 from 5% to 95% of the supported edge, plus the
configured b) prints and plots the plug-in prediction of core/advice.py: lambda*(b), the change in E[r], the KL to
pi_ref and the change in J of the tilted policy, with 95% bootstrap intervals over prompts, and the largest
improvement the samples support. Where the task can enumerate its responses the exact values sit beside them.

    python -m dualign.advise                                  # the exact task's safety constraint
    python -m dualign.advise experiment=pku_safety_tiny advise.thresholds=[0.5,1,2]
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from dualign import cli, tasks
from dualign.config import ConfigError, validate
from dualign.core.advice import NEAR_EDGE, advise, edge_warning, edges, predict
from dualign.tasks.base import thresholds
from dualign.util.console import quiet_libraries

log = logging.getLogger("dualign")
GRID = 10  # thresholds between 5% and 95% of the edge when advise.thresholds is not given


def threshold_grid(cfg, configured: torch.Tensor, edge: list[float], varied: int) -> torch.Tensor:
    values = cfg.advise.thresholds or torch.linspace(0.05, 0.95, GRID).mul(max(edge[varied], 0.0)).tolist()
    values = sorted({round(float(v), 6) for v in values} | {round(float(configured[varied]), 6)})
    rows = configured.double().repeat(len(values), 1)
    rows[:, varied] = torch.tensor(values, dtype=torch.float64)
    return rows


def run_advice(raw_cfg: DictConfig) -> dict:
    cfg = validate(raw_cfg)
    quiet_libraries()
    torch.manual_seed(cfg.seed)
    names = list(cfg.constraints)
    if not names:
        raise ConfigError("constraints is empty; dualign-advise predicts the cost of constraint thresholds")
    varied = names.index(cfg.advise.constraint) if cfg.advise.constraint else 0
    task = tasks.build(cfg)
    stage = task.reference_stage()
    reward, utility = stage.reward, stage.utility
    configured = thresholds(cfg, utility.mean(dim=(1, 2)))
    grid = threshold_grid(cfg, configured, edges(utility.double()), varied)
    print(f"pi_ref: {len(stage.prompts)} prompts x {stage.samples} responses; bootstrap over prompts "
          f"({cfg.advise.resamples} resamples)", flush=True)
    advice, edge = advise(reward, utility, grid, cfg.beta, cfg.advise.resamples, cfg.seed)
    enumeration = task.enumeration(stage)
    exact = None
    if enumeration is not None:  # the exact values on every response, for comparison
        instance = enumeration.oracle.instance
        exact = {"edge": edges(instance.utility, instance.ref_logprob),
                 "rows": [predict(instance.reward, instance.utility, b, cfg.beta, instance.ref_logprob) for b in grid]}
    result = report(cfg, names, varied, configured, advice, edge, exact)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "advice.json").write_text(json.dumps(result, indent=1))
    plot(result, output_dir / "advice.png")
    print(f"outputs: {output_dir / 'advice.json'}, {output_dir / 'advice.png'}")
    warning = edge_warning(names, configured, utility)
    if warning:
        log.warning(warning)
    return {}


def _interval(advice, name: str, i: int | None = None) -> str:
    if name not in advice.low:
        return ""
    low, high = advice.low[name], advice.high[name]
    return f"[{low[i]:.3f}, {high[i]:.3f}]" if i is not None else f"[{low:.3f}, {high:.3f}]"


def _relative(estimate: float, truth: float | None) -> str:
    return "" if truth is None or truth == 0 else f"{abs(estimate / truth - 1):.1%}"


def report(cfg, names, varied, configured, advice, edge, exact) -> dict:
    name = names[varied]
    print(f"\nlargest improvement of {name} pi_ref's samples support: {edge['edge'][varied]:.4f} "
          f"[{edge['edge_low'][varied]:.4f}, {edge['edge_high'][varied]:.4f}]"
          + (f"; exact (every response): {exact['edge'][varied]:.4f}" if exact else ""))
    header = (f"{'b_' + name:>10} {'lambda*':>9} {'95% interval':>18}" + (f" {'exact':>9} {'error':>6}" if exact else "")
              + f" {'dE[r]':>8} {'95% interval':>18} {'KL':>8} {'95% interval':>18} {'dJ':>8}"
              + (f" {'exact KL':>9}" if exact else "") + "  note")
    print(header)
    rows = []
    for k, a in enumerate(advice):
        b = a.threshold[varied]
        note = ("beyond the samples' reach" if a.estimate is None else
                "near the edge" if a.near_edge else
                "inactive: the reward's tilt alone reaches b" if a.estimate.multipliers[varied] == 0 else "")
        note += " (configured)" if abs(b - float(configured[varied])) < 1e-6 else ""
        truth = exact["rows"][k] if exact else None
        if a.estimate is None:
            line = (f"{b:>10.4g} {'-':>9} {'':>18}" + (f" {'':>9} {'':>6}" if exact else "")
                    + f" {'':>8} {'':>18} {'':>8} {'':>18}")
        else:
            e = a.estimate
            line = (f"{b:>10.4g} {e.multipliers[varied]:>9.4f} {_interval(a, 'multipliers', varied):>18}"
                    + (f" {truth.multipliers[varied] if truth else float('nan'):>9.4f} "
                       f"{_relative(e.multipliers[varied], truth.multipliers[varied] if truth else None):>6}"
                       if exact else "")
                    + f" {e.reward_change:>8.4f} {_interval(a, 'reward_change'):>18} {e.kl:>8.4f} "
                      f"{_interval(a, 'kl'):>18} {e.objective_change:>8.4f}"
                    + (f" {truth.kl if truth else float('nan'):>9.4f}" if exact else ""))
        print(f"{line}  {note}".rstrip())
        rows.append({"threshold": a.threshold, "estimate": None if a.estimate is None else vars(a.estimate),
                     "low": a.low, "high": a.high, "infeasible_share": a.infeasible_share,
                     "edge_fraction": a.edge_fraction, "near_edge": a.near_edge,
                     "exact": None if truth is None else vars(truth)})
    print(("(exact: on every response; error: |plug-in / exact - 1|) " if exact else "")
          + f"(lambda*, dE[r] = E[r] - E_ref[r], KL to pi_ref and dJ = dE[r] - beta KL of the tilted policy at lambda*: "
          f"what CAID converges to; 'near the edge': b >= {NEAR_EDGE:.0%} of the edge or out of reach in some "
          f"bootstrap resamples)")
    return {"constraint": name, "constraints": names, "beta": cfg.beta, "configured": configured.tolist(),
            "edge": edge, "exact_edge": exact["edge"] if exact else None, "rows": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varied = result["constraints"].index(result["constraint"])
    rows = [r for r in result["rows"] if r["estimate"] is not None]
    b = [r["threshold"][varied] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (("multipliers", "lambda*(b)", varied), ("reward_change", "E[r] - E_ref[r]", None), ("kl", "KL to pi_ref", None))
    for axis, (key, label, index) in zip(axes, panels):
        pick = (lambda v: v[index]) if index is not None else (lambda v: v)  # noqa: E731
        axis.plot(b, [pick(r["estimate"][key]) for r in rows], marker="o", label="plug-in (pi_ref's samples)")
        with_ci = [r for r in rows if key in r["low"]]
        axis.fill_between([r["threshold"][varied] for r in with_ci], [pick(r["low"][key]) for r in with_ci],
                          [pick(r["high"][key]) for r in with_ci], alpha=0.25, label="95% bootstrap")
        exact = [r for r in rows if r["exact"]]
        if exact:
            axis.plot([r["threshold"][varied] for r in exact], [pick(r["exact"][key]) for r in exact], "k--",
                      label="exact (every response)")
        edge = result["edge"]
        axis.axvspan(edge["edge_low"][varied], edge["edge_high"][varied], color="red", alpha=0.15)
        axis.axvline(edge["edge"][varied], color="red", linewidth=1, label="largest supported improvement")
        axis.axvline(result["configured"][varied], color="grey", linestyle=":", label="configured b")
        axis.set(xlabel=f"required improvement b ({result['constraint']})", ylabel=label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"What each threshold costs (beta = {result['beta']:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    if not any(arg.startswith("hydra.run.dir=") for arg in sys.argv[1:]):  # its own folder, not a training run's
        sys.argv.append("hydra.run.dir=outputs/advise/${now:%Y-%m-%d_%H-%M-%S}_${uid:}")
    cli.hydra_entry(run_advice)


if __name__ == "__main__":
    main()
