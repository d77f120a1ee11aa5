"""The console's end-of-run tables: the multipliers and evaluations per iteration, then the trained policy beside
the one-shot comparison, the optimum (where known) and pi_ref, the gaps, and where the time went."""
from __future__ import annotations

from dualign.tracking.summary import RunSummary


def _cell(value, ci=None, width: int = 16) -> str:
    if value is None:
        return f"{'':>{width}}"
    if ci is None or ci != ci:  # no interval (or nan: one prompt)
        return f"{value:>{width}.4f}"
    return f"{f'{value:.4f} +- {ci:.2f}':>{width}}"


def _ci(evaluation: dict | None, key: str, i: int | None = None):
    if evaluation is None or f"{key}_ci" not in evaluation:
        return None
    value = evaluation[f"{key}_ci"]
    return value[i] if i is not None else value


def trajectory(summary: RunSummary) -> list[str]:
    names, how = summary.constraints, summary.evaluation
    if not names or not summary.trajectory:
        return []
    lines = ["iteration  " + "  ".join(f"{'lambda_' + n:>16}{'improvement_' + n + f' ({how})':>28}" for n in names)
             + f"{f'J ({how})':>12}",
             f"{0:>9}  " + "  ".join(f"{summary.initial_multipliers[i]:>16.4f}{'':>28}" for i in range(len(names)))]
    for record in summary.trajectory:
        evaluation = record.get("evaluation")
        cells = [f"{record['multipliers'][i]:>16.4f}"
                 + (f"{evaluation['improvement'][i]:>28.4f}" if evaluation else f"{'':>28}") for i in range(len(names))]
        label = str(record.get("stage", record["iteration"]))[:9]  # a stepwise run's rows are its stages
        lines.append(f"{label:>9}  " + "  ".join(cells) + (f"{evaluation['objective']:>12.4f}" if evaluation else ""))
    what = ("lambda (fixed) of each stage" if "stage" in summary.trajectory[0] else "lambda after each dual step")
    lines.append(f"({what}; improvement and J of the policy trained up to it"
                 + ("" if summary.trajectory[0].get("evaluation") else ": not evaluated per iteration") + ")")
    return lines + [""]


def comparison(summary: RunSummary) -> list[str]:
    names, b, final, optimum = summary.constraints, summary.threshold, summary.final, summary.optimum
    columns = [("this run", final, summary.final_multipliers)]
    if summary.one_shot:
        columns.append(("one_shot", summary.one_shot["final"], summary.one_shot["multipliers"]))
    header = f"{'':<30}" + "".join(f"{title:>16}" for title, _, _ in columns)
    header += (f"{'optimum':>16}" if optimum else "") + f"{'pi_ref':>16}"
    lines = [header]

    def row(label: str, values: list[str], best: str | None, reference: str | None) -> None:
        lines.append(f"{label:<30}" + "".join(values) + ((best or _cell(None)) if optimum else "") + (reference or ""))

    for i, name in enumerate(names):
        row(f"lambda_{name}", [_cell(m[i] if m else None) for _, _, m in columns],
            _cell(optimum["multipliers"][i]) if optimum else None, None)
        row(f"improvement_{name} (b={b[i]:g})", [_cell(e["improvement"][i], _ci(e, "improvement", i)) for _, e, _ in columns],
            _cell(b[i]), _cell(0.0))
    row("E[r]", [_cell(e["reward"], _ci(e, "reward")) for _, e, _ in columns], _cell(None), _cell(summary.reference["reward"]))
    row("J = E[r] - beta KL", [_cell(e["objective"]) for _, e, _ in columns],
        _cell(optimum["value"]) if optimum else None, _cell(summary.reference["objective"]))
    row("KL to pi_ref", [_cell(e["kl"], _ci(e, "kl")) for _, e, _ in columns], None, None)
    if "tv_to_optimum" in final:
        row("TV to pi*", [_cell(e.get("tv_to_optimum")) for _, e, _ in columns], None, None)
    for label, entry in final.get("scores", {}).items():
        if "win_rate" in entry:
            row(f"win rate vs pi_ref ({label})", [_cell(e["scores"][label]["win_rate"]) for _, e, _ in columns], None, None)
    return lines + [""]


def gaps(summary: RunSummary) -> list[str]:
    lines, b, optimum = [], summary.threshold, summary.optimum
    errors = summary.gaps["improvement_error"]
    for i, name in enumerate(summary.constraints):
        achieved = summary.final["improvement"][i]
        if optimum and optimum["multipliers"][i] <= 1e-9:  # inactive at the optimum: b is a floor, not a target
            lines.append(f"{name}: inactive at the optimum (lambda* = 0): achieved {achieved:.4f} vs b = {b[i]:g}: "
                         f"{'met' if achieved >= b[i] else 'NOT met'}")
            continue
        line = f"|achieved - b| for {name}: {errors[i]:.4f} = {errors[i] / abs(b[i]) if b[i] else float('nan'):.1%} of b"
        ci = _ci(summary.final, "improvement", i)
        if ci is not None:
            line += f" ({'met' if achieved >= b[i] else 'NOT met'}; 95% CI of the improvement +- {ci:.2f})"
        lines.append(line)
    implicit = summary.details.get("implicit_evaluation")  # PeCAID: b is in its implicit utilities' units
    for i, name in enumerate(summary.constraints if implicit else []):
        achieved, ci = implicit["improvement"][i], implicit["improvement_ci"][i]
        spread = "exact" if ci is None else f"+- {ci:.2f}"
        lines.append(f"implicit improvement of {name} (PeCAID's own measure, b in its units; "
                     f"{implicit['prompts']} evaluation prompts x {implicit['samples_per_prompt']}): {achieved:.4f} "
                     f"{spread} vs b = {b[i]:g}: {'met' if achieved >= b[i] else 'NOT met'}")
    if optimum:
        line = f"P* - J: {summary.gaps['objective']:.4f}"
        if "gap_from_kl" in summary.final:  # the exact split: distance to pi*, and what missing b bought
            line += (f" = beta KL(pi || pi*) {summary.final['gap_from_kl']:.4f} + lambda* (a - b) "
                     f"{summary.final['gap_from_constraints']:.4f}")
        lines.append(f"{line} (std of r under pi_ref: {optimum['reference_reward_std']:.4f})")
    return lines


def run_table(summary: RunSummary) -> str:
    title = (f"== {summary.algorithm} ({summary.policy_step} policy step) on {summary.task}, beta={summary.beta}; "
             f"evaluation: {summary.evaluation} ==")
    lines = ["", title, "", *trajectory(summary), *comparison(summary), *gaps(summary), time_lines(summary.timings_s)]
    return "\n".join(lines)


def time_lines(timings: dict) -> str:
    """'time: phase 1.0s, ...' and, when measured, 'by stage: ...' (exclusive wall time, largest first)."""
    phases = {k: v for k, v in timings.items() if not isinstance(v, dict)}
    line = "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items())
    stages = timings.get("by stage")
    if stages:
        total = sum(stages.values())
        line += "\nby stage: " + ", ".join(f"{k} {v:.1f}s ({v / total:.0%})"
                                            for k, v in sorted(stages.items(), key=lambda kv: -kv[1]))
    return line
