#!/usr/bin/env bash
# SACPO against CAID, one-shot and the exact frontier on the exact task (issue 14): SACPO at lambda* / 2, lambda* and
# 2 lambda* (lambda* = 1.1243: the exact optimum's multiplier at the default b = 0.5 on the machine that chose the grid;
# `python train.py` prints your machine's, 1.1222 on the one of docs/family.md),
# and P-SACPO's merge at q = 0.5 from 2 lambda*, over seeds 0-2; PeCAID at b = 0.35, 0.85, 1.35 x seeds 0-2. CAID's
# and one-shot's points come from the study's threshold runs (bash sweeps/study.sh, part thresholds), the same
# instances; PeCAID from PKU-SafeRLHF's own labels on experiment=pku_safety_tiny (b = 0.06, 0.09, 0.12 in implicit
# units x seeds 0-2). The reports write docs/family.md with its PNG and docs/pecaid_text.md. About 25 minutes on 2 CPU
# cores (PeCAID's pre-aligned models, about a minute each, are cached per seed).
#   ONLY=pecaid_text bash sweeps/family.sh   # one part (ONLY: any of sacpo p_sacpo pecaid pecaid_text), its report
#   bash sweeps/family.sh            # run, then report
#   bash sweeps/family.sh report     # only regenerate docs/family.md
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=outputs/family
common="trainer.enable_progress_bar=false ${FAMILY_OVERRIDES:-}"
sweep() {  # part name, then overrides
  local part=$1; shift
  rm -rf "$OUT/$part"
  $PY train.py -m hydra.sweep.dir="$OUT/$part" hydra.sweep.subdir='${hydra.job.num}' \
    logger.experiment_name="family-$part" $common "$@"
}
only=${ONLY:-sacpo p_sacpo pecaid pecaid_text}
want() { [[ " $only " == *" $1 "* ]]; }
if [ "${1:-all}" != report ]; then
  want sacpo && sweep sacpo algorithm=sacpo constraints.safety.initial_multiplier=0.56215,1.1243,2.2486 seed=0,1,2
  want p_sacpo && sweep p_sacpo algorithm=sacpo constraints.safety.initial_multiplier=2.2486 \
    algorithm.merge_weight=0.5 seed=0,1,2
  # PeCAID at 3 of the study's thresholds x 3 seeds: CAID on the same instance is the study's run at the same b, seed
  want pecaid && sweep pecaid algorithm=pecaid algorithm.compare_one_shot=false \
    constraints.safety.threshold=0.35,0.85,1.35 seed=0,1,2
  # PeCAID from PKU-SafeRLHF's own labels on the offline stand-ins, b in implicit units (about 2 minutes)
  want pecaid_text && sweep pecaid_text experiment=pku_safety_tiny algorithm=pecaid \
    constraints.safety.threshold=0.06,0.09,0.12 seed=0,1,2
fi
if want sacpo || want p_sacpo || want pecaid; then
  $PY -m dualign.tools.family_report "$OUT" outputs/study/thresholds docs
fi
if want pecaid_text; then
  $PY -m dualign.tools.family_report text "$OUT/pecaid_text" docs
fi
