#!/usr/bin/env bash
# Newton, half Newton (the default step size) and the fixed projected dual step on the exact task (issue 14): after
# how many CAID iterations the policy's exact improvement is within 10% of b, over the study's 7 thresholds x 3 seeds,
# with the fixed step at eta = 1 (the default before half Newton) and at x0.3 and x3. Each part is a Hydra multirun
# of train.py (MLflow experiment dual-rules-<part>); the report reads their summary.json files and writes
# docs/dual_rules.md with a PNG. About 26 minutes on 2 CPU cores for the warm start (lambda_0 = the one-shot lambda*,
# the default); ONLY="newton_cold auto_cold fixed_cold" runs the same from lambda_0 = 0 (about 28 minutes).
#   bash sweeps/dual_rules.sh            # warm start: newton, auto (half Newton), fixed
#   bash sweeps/dual_rules.sh report     # only regenerate docs/dual_rules.md from existing runs
#   DUAL_RULES_GRID="constraints.safety.threshold=0.35,0.85,1.35 seed=0" ONLY="newton_cold auto_cold fixed_cold" \
#     bash sweeps/dual_rules.sh          # the cold start on a smaller grid (15 runs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=outputs/dual_rules
grid=${DUAL_RULES_GRID:-"constraints.safety.threshold=0.1,0.35,0.6,0.85,1.1,1.35,1.6 seed=0,1,2"}
common="trainer.enable_progress_bar=false algorithm.compare_one_shot=false ${DUAL_RULES_OVERRIDES:-}"
sweep() {  # part name, then overrides
  local part=$1; shift
  rm -rf "$OUT/$part"
  $PY train.py -m hydra.sweep.dir="$OUT/$part" hydra.sweep.subdir='${hydra.job.num}' \
    logger.experiment_name="dual-rules-$part" $common $grid "$@"
}
only=${ONLY:-newton auto fixed}
want() { [[ " $only " == *" $1 "* ]]; }
if [ "${1:-all}" != report ]; then
  want newton && sweep newton algorithm.dual_rule=newton
  want auto && sweep auto algorithm.dual_rule=projected algorithm.step_size=null
  want fixed && sweep fixed algorithm.dual_rule=projected algorithm.step_size=0.3,1,3
  want newton_cold && sweep newton_cold algorithm.dual_rule=newton algorithm.initial_multiplier=0
  want auto_cold && sweep auto_cold algorithm.dual_rule=projected algorithm.step_size=null \
    algorithm.initial_multiplier=0
  want fixed_cold && sweep fixed_cold algorithm.dual_rule=projected algorithm.step_size=0.3,1,3 \
    algorithm.initial_multiplier=0
fi
$PY -m dualign.tools.dual_rule_report "$OUT" docs
