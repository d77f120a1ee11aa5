"""Progress bars on the long stages outside Lightning's own (rollouts, scoring, reference log-probs): counts, rate and
ETA on a terminal; nothing where the output is not one (tqdm's rule: logs, SLURM files, CI)."""
from __future__ import annotations

from tqdm.auto import tqdm

enabled = True  # run.py sets it from trainer.enable_progress_bar


def bar(total: int, desc: str, unit: str = "seq") -> tqdm:
    """A bar that clears when done (leave=False): the final table, not finished bars, is what stays on screen."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, mininterval=0.5,
                disable=None if enabled else True)
