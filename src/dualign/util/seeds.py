"""Named seed streams: every seeded draw of a run comes from `seed(stream, run_seed, step, rank)`, so a stream's draws
depend only on its own (run seed, step, rank), never on how many draws another stream made: a resumed run, a longer
run or another rank count draws the same. Seed = base + stride * run_seed + step + 7_919 * rank (7_919, a prime,
keeps ranks apart from steps). The bases are the offsets the code used before they had names, kept so that every
figure stays the same; two streams may therefore meet on an integer (exact_tables and reference_prompts share theirs),
which is harmless because they seed different kinds of draw."""
from __future__ import annotations

STREAMS = {  # name: (base, stride per unit of the run's seed)
    "exact_tables": (10_000, 1),  # the exact task's reward and utility tables (data.seed)
    "exact_teacher": (20_000, 1),  # the teacher whose samples pi_ref is fine-tuned on (data.seed)
    "exact_init": (30_000, 1),  # the tiny model's initial weights (data.seed)
    "exact_sft_batches": (40_000, 1),  # the SFT minibatches (data.seed)
    "reference_prompts": (10_000, 1),  # which training prompts get pi_ref rollouts (reference.prompts)
    "pair_labels": (50_000, 1_000),  # hard labels: one column of uniforms per iteration
    "group_labels": (110_000, 1_000),  # hard labels of all pairs: one draw per (iteration, group)
    "dual_prompts": (60_000, 1_000),  # the Q prompts of an on-policy dual step
    "dual_rollouts": (70_000, 1_000),  # its K responses per prompt
    "policy_gradient": (80_000, 1_000_003),  # the policy-gradient step's samples, per optimiser step
    "policy_pairs": (90_000, 1_000),  # pairs_from=policy: the current policy's rollouts, per iteration
    "preference_labels": (120_000, 1_000),  # pecaid: the run seed of each objective's pre-alignment (its labels)
    "pre_alignment": (130_000, 1_000),  # pecaid: the global stream while an objective's model trains (LoRA init, dropout)
    "evaluation": (500_000, 1_000),  # text tasks' test-split rollouts (pi_ref: step 0, policies: step 1)
    "epoch_order": (0, 100_003),  # the order of the training batches, per epoch
}
RANK_STRIDE = 7_919


def seed(stream: str, run_seed: int, step: int = 0, rank: int = 0) -> int:
    base, stride = STREAMS[stream]
    return base + stride * run_seed + step + RANK_STRIDE * rank
