"""A text run's folder as a markdown page: the final table (pi_ref, the policy and the one-shot comparison, with 95%
CIs), the multipliers per iteration, time by stage, the run's plots, and before/after samples chosen by a fixed rule
(the first N test prompts in the split's order, each with pi_ref's and the policy's first response).

    python -m dualign.tools.text_run_report outputs/runs/<run> --out docs/smollm2.md --title "..." [--samples 8]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def _mean_ci(mean: float, ci: float | None) -> str:
    return f"{mean:.4f} ± {ci:.4f}" if ci is not None else f"{mean:.4f}"


def table(summary: dict) -> list[str]:
    final, one_shot = summary["final"], (summary.get("one_shot") or {}).get("final")
    columns = ["pi_ref", "this run (" + summary["algorithm"] + ")"] + (["one-shot"] if one_shot else [])
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, score in final["scores"].items():
        row = [_mean_ci(score["reference"], score["reference_ci"]), _mean_ci(score["policy"], score["policy_ci"])]
        if one_shot:
            other = one_shot["scores"][name]
            row.append(_mean_ci(other["policy"], other["policy_ci"]))
        lines.append(f"| {name} (mean) | " + " | ".join(row) + " |")
    for name, score in final["scores"].items():
        row = ["0", _mean_ci(score["improvement"], score["improvement_ci"])]
        if one_shot:
            row.append(_mean_ci(one_shot["scores"][name]["improvement"], one_shot["scores"][name]["improvement_ci"]))
        lines.append(f"| improvement of {name} over pi_ref | " + " | ".join(row) + " |")
    for name, score in final["scores"].items():
        row = ["", _mean_ci(score["win_rate"], score["win_rate_ci"])]
        if one_shot:
            row.append(_mean_ci(one_shot["scores"][name]["win_rate"], one_shot["scores"][name]["win_rate_ci"]))
        lines.append(f"| win rate vs pi_ref ({name}) | " + " | ".join(row) + " |")
    row = ["0", _mean_ci(final["kl"], final["kl_ci"])] + ([_mean_ci(one_shot["kl"], one_shot["kl_ci"])] if one_shot else [])
    lines.append("| KL to pi_ref (sample estimate) | " + " | ".join(row) + " |")
    row = [f"{summary['reference']['objective']:.4f}", f"{final['objective']:.4f}"] + \
        ([f"{one_shot['objective']:.4f}"] if one_shot else [])
    lines.append(f"| J = E[r] - beta KL (beta={summary['beta']}) | " + " | ".join(row) + " |")
    multipliers = ["", ", ".join(f"{v:.4f}" for v in summary["final_multipliers"])]
    if one_shot:
        multipliers.append(", ".join(f"{v:.4f}" for v in summary["one_shot"]["multipliers"]))
    lines.append("| lambda (final) | " + " | ".join(multipliers) + " |")
    for name, constraint in final["constraints"].items():
        verdict = "met" if constraint["satisfied"] else "NOT met"
        verdict += ", and at 95%" if constraint["satisfied_at_95"] else ", not at 95%"
        lines.append(f"| constraint {name}: improvement >= b = {constraint['threshold']:.4g} | | {verdict} |"
                     + (" " + ("met" if one_shot["constraints"][name]["satisfied"] else "NOT met") + " |" if one_shot else ""))
    return lines


def trajectory(summary: dict) -> list[str]:
    names = summary["constraints"]
    lines = ["| iteration | lambda used | on-policy improvement estimate | lambda after the dual step |", "|---|---|---|---|"]
    for record in summary["trajectory"]:
        fmt = lambda values: ", ".join(f"{v:.4f}" for v in values)  # noqa: E731
        lines.append(f"| {record['iteration']} | {fmt(record['multipliers_used'])} | {fmt(record['estimated_improvement'])} "
                     f"| {fmt(record['multipliers'])} |")
    lines.append(f"\n(constraints: {', '.join(names)}; the one-shot lambda from pi_ref's samples: "
                 f"{', '.join(f'{v:.4f}' for v in summary['one_shot_multipliers'])})")
    return lines


def timings(summary: dict) -> list[str]:
    lines = ["| stage | seconds |", "|---|---|"]
    for key, value in summary["timings_s"].items():
        if isinstance(value, dict):
            lines += [f"| &nbsp;&nbsp;{k} | {v:.1f} |" for k, v in value.items()]
        else:
            lines.append(f"| {key} | {value:.1f} |")
    return lines


def samples(run: Path, count: int) -> list[str]:
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()[:count]]
    scores = sorted({k.split("/", 1)[1] for row in rows for k in row if k.startswith("policy/")})
    lines = []
    for number, row in enumerate(rows, start=1):
        lines += [f"**{number}. {row['prompt']}**", ""]
        for who, label in (("reference", "pi_ref"), ("policy", "policy")):
            marks = ", ".join(f"{name} {row[f'{who}/{name}']:+.3f}" for name in scores)
            lines += [f"- *{label}* ({marks}): {row[f'{who}_response']!r}"]
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="A text run")
    parser.add_argument("--intro", default="")
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    summary = json.loads((args.run / "summary.json").read_text())
    plots = []
    for png in sorted(args.run.glob("*.png")):
        target = args.out.parent / f"{args.out.stem}_{png.name}"
        shutil.copyfile(png, target)
        plots.append(f"![{png.stem}]({target.name})")
    lines = [f"# {args.title}", "", args.intro, "", f"Evaluated on {summary['task']}: {summary['final']['prompts']} test "
             f"prompts x {summary['final']['samples_per_prompt']} responses each, for pi_ref and for every policy; 95% "
             "confidence intervals with prompts as units.", "", *table(summary), "", "## lambda per iteration", "",
             *trajectory(summary), "", "## Time by stage (seconds)", "", *timings(summary), "", "## Plots", "", *plots, "",
             f"## {args.samples} before/after samples", "",
             f"Fixed rule, not picked by hand: the first {args.samples} test prompts in the split's order, each with the "
             "first response of pi_ref and of the trained policy, and their scores.", "", *samples(args.run, args.samples)]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
