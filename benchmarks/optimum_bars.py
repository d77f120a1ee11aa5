"""How close the default CAID run gets to the exact optimum: the README's table of issue 16's bars, rerun.

    python benchmarks/optimum_bars.py                      # every row, seeds 0 1 2 (about 15 minutes on 2 CPU cores)
    python benchmarks/optimum_bars.py --rows default beta=2 --seeds 0
    python benchmarks/optimum_bars.py --extra algorithm.epochs_per_iteration=8   # every row with an override added

Each run is `python train.py logger=none <row> seed=S` in its own process (the one-shot comparison only in the first
row, whose one-shot figures are the second row). Prints, per row and seed, |achieved - b| / b of the worst constraint,
and P* - J = beta KL(pi || pi*) + lambda* (a - b) with both parts and the TV to pi*, in units of sd(r under pi_ref),
then the markdown table of the README and whether each bar holds (|a - b| <= 3% of b, P* - J <= 0.03 sd,
beta KL <= 0.02 sd; near the edge: within 5% of b).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EDGE = 2.571  # E over prompts of max_y g minus E_ref[g] (utility_0, the default task): the largest feasible b
ROWS = {
    "default": ("(none: the default)", []),
    "two_constraints": ("`experiment=two_constraints` (b = 0.5, 0.4)", ["experiment=two_constraints"]),
    "beta=0.5": ("`beta=0.5`", ["beta=0.5"]),
    "beta=2": ("`beta=2`", ["beta=2"]),
    "edge60": ("`constraints.safety.threshold=1.5425` (60% of the edge)", [f"constraints.safety.threshold={0.6 * EDGE:.4f}"]),
    "edge80": ("`constraints.safety.threshold=2.0567` (80% of the edge)", [f"constraints.safety.threshold={0.8 * EDGE:.4f}"]),
}


def figures(result: dict) -> dict:
    """The bars' figures of one evaluated policy (summary.json's `final` or `one_shot`), in sd(r) units."""
    sd = result["sd"]
    b = result["threshold"]
    error = max(abs(a - t) / t for a, t in zip(result["improvement"], b))
    return {"error_of_b": error, "gap": result["objective_gap"] / sd, "beta_kl": result["gap_from_kl"] / sd,
            "overshoot": result["gap_from_constraints"] / sd, "tv": result["tv_to_optimum"]}


def run(overrides: list[str], seed: int, one_shot: bool) -> tuple[dict, dict | None, float]:
    folder = tempfile.mkdtemp(prefix="bars_")
    command = [sys.executable, str(ROOT / "train.py"), "logger=none", f"seed={seed}", f"hydra.run.dir={folder}",
               f"algorithm.compare_one_shot={str(one_shot).lower()}", *overrides]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    summary = json.loads((Path(folder) / "summary.json").read_text())
    sd = summary["optimum"]["reference_reward_std"]
    caid = figures({**summary["final"], "sd": sd, "threshold": summary["threshold"]})
    other = None
    if one_shot:
        other = figures({**summary["one_shot"]["final"], "sd": sd, "threshold": summary["threshold"]})
    return caid, other, seconds


def cell(rows: list[dict], key: str, form: str) -> str:
    return " / ".join(format(r[key], form) for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every row")
    args = parser.parse_args()
    table: list[tuple[str, list[dict], bool]] = []
    for name in args.rows:
        label, overrides = ROWS[name]
        first = name == "default"
        results, one_shots = [], []
        for seed in args.seeds:
            caid, one_shot, seconds = run([*overrides, *args.extra], seed, first)
            results.append(caid)
            print(f"{name:<16} seed {seed}: |a-b|/b {caid['error_of_b']:6.1%}  P*-J {caid['gap']:+.4f} = "
                  f"bKL {caid['beta_kl']:.4f} + l*(a-b) {caid['overshoot']:+.4f}  TV {caid['tv']:.4f}  "
                  f"wall {seconds:.1f} s", flush=True)
            if one_shot is not None:
                one_shots.append(one_shot)
        table.append((label, results, name.startswith("edge")))
        if one_shots:
            table.append(("the default's one-shot comparison", one_shots, False))
    print("\n| overrides | \\|a - b\\| / b | P\\* - J | beta KL(pi \\|\\| pi\\*) | lambda\\* (a - b) | TV to pi\\* |")
    print("|---|---|---|---|---|---|")
    for label, rows, _ in table:
        print(f"| {label} | {cell(rows, 'error_of_b', '.1%')} | {cell(rows, 'gap', '.3f')} | {cell(rows, 'beta_kl', '.3f')} "
              f"| {cell(rows, 'overshoot', '+.3f')} | {cell(rows, 'tv', '.3f')} |")
    print()
    for label, rows, edge in table:
        if "one-shot" in label:
            continue
        if edge:
            held = [r["error_of_b"] <= 0.05 for r in rows]
            print(f"{label}: within 5% of b in {sum(held)}/{len(rows)}")
        else:
            bars = {"|a-b| <= 3% b": [r["error_of_b"] <= 0.03 for r in rows],
                    "P*-J <= 0.03 sd": [r["gap"] <= 0.03 for r in rows],
                    "bKL <= 0.02 sd": [r["beta_kl"] <= 0.02 for r in rows]}
            print(f"{label}: " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in bars.items()))


if __name__ == "__main__":
    main()
