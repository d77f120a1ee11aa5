#!/usr/bin/env bash
# The exact-task study of issue 4: CAID vs one-shot across thresholds, primal-dual, DPO_h / DPO_s, online pairs,
# two constraints, and the parametrisation gap. Every part is a Hydra multirun of train.py; the report script then
# reads the runs' summary.json files and writes docs/study.md with its PNG plots. Runs are tracked in MLflow
# (outputs/mlflow.db, experiments study-*). About half an hour on 2 CPU cores; ONLY="part ..." runs some parts.
#   bash sweeps/study.sh            # everything
#   bash sweeps/study.sh report     # only regenerate docs/ from existing runs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=outputs/study
common="trainer.enable_progress_bar=false ${STUDY_OVERRIDES:-}"  # STUDY_OVERRIDES: more overrides for every run
sweep() {  # part name, then overrides
  local part=$1; shift
  rm -rf "$OUT/$part"
  $PY train.py -m hydra.sweep.dir="$OUT/$part" hydra.sweep.subdir='${hydra.job.num}' \
    logger.experiment_name="study-$part" $common "$@"
}
only=${ONLY:-}  # ONLY="thresholds dpo_h": run only these parts (the report reads every part present)
want() { [ -z "$only" ] || [[ " $only " == *" $1 "* ]]; }
if [ "${1:-all}" != report ]; then
  # 1. thresholds: caid (and one_shot on the same instance, same pairs, same epoch budget) over 7 b x 3 seeds
  want thresholds && sweep thresholds constraints.safety.threshold=0.1,0.35,0.6,0.85,1.1,1.35,1.6 seed=0,1,2
  # 2. primal-dual (Safe RLHF defaults, log rule) over the same thresholds and seeds, at its default budget of
  #    120 policy-gradient steps: about the wall time of a CAID run
  want primal_dual && sweep primal_dual experiment=primal_dual \
    constraints.safety.threshold=0.1,0.35,0.6,0.85,1.1,1.35,1.6 seed=0,1,2
  # 3. fixed multipliers: DPO_h (lambda = 0) and DPO_s (the utility as the reward, no constraint)
  want dpo_h && sweep dpo_h algorithm=fixed_lambda algorithm.initial_multiplier=0 seed=0,1,2
  want dpo_s && sweep dpo_s algorithm=fixed_lambda constraints=none reward.scorer=utility_0 seed=0,1,2
  # 4. CAID with pairs from the current policy instead of pi_ref
  want online_pairs && sweep online_pairs policy_step.pairs_from=policy algorithm.compare_one_shot=false \
    constraints.safety.threshold=0.85 seed=0,1,2
  # 5. two constraints over a grid of (b_safety, b_humour)
  want two_constraints && sweep two_constraints experiment=two_constraints constraints.safety.threshold=0.2,0.8 \
    constraints.humour.threshold=0.2,0.6
  # 6. parametrisation gap: exact policy step and exact dual estimates, shrinking the model
  want model_size && sweep model_size experiment=exact_policy_step algorithm.compare_one_shot=false model.n_embd=64,16,8,4 \
    model.n_layer=1,2 model.n_head=1
fi
$PY -m dualign.tools.study_report "$OUT" docs
