"""The LightningModule: policy + Lagrangian loss. It holds the multipliers as a buffer (so they are in every
checkpoint and identical on every rank); the DualUpdate callback decides when and how they change."""
from __future__ import annotations

import math
import os
import signal

import lightning as L
import torch

from .config import OptimizerConfig


class AlignmentModule(L.LightningModule):
    def __init__(self, policy, policy_step, multipliers: torch.Tensor, optimizer: OptimizerConfig, epochs_per_iteration: int):
        super().__init__()
        self.policy = policy
        self.policy_step = policy_step
        self.optimizer_cfg = optimizer
        self.epochs_per_iteration = epochs_per_iteration
        self.register_buffer("multipliers", torch.as_tensor(multipliers, dtype=torch.float32).clone())
        # with LoRA the base weights are frozen and equal pi_ref: checkpoints hold only what training changes
        self.frozen = {f"policy.{name}" for name, p in policy.named_parameters() if not p.requires_grad}
        self.strict_loading = not self.frozen
        # fault injection for the resume tests: SIGKILL this process when it reaches this optimiser step
        self.kill_at_step = int(os.environ.get("DUALIGN_FAULT_KILL_AT_STEP", -1))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        for key in self.frozen:
            checkpoint["state_dict"].pop(key, None)

    @property
    def iteration(self) -> int:
        return self.current_epoch // self.epochs_per_iteration

    def training_step(self, batch, batch_idx):
        if self.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        loss, metrics = self.policy_step(self.policy, batch, self.multipliers, self.iteration, self.global_step)
        if not torch.isfinite(loss):
            bad = [name for name, value in metrics.items()
                   if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
            if not torch.isfinite(self.multipliers).all():
                bad.append("multipliers")
            raise FloatingPointError(f"loss is {loss.item()} at step {self.global_step}, batch {batch_idx}"
                                     + (f"; non-finite terms: {', '.join(bad)}" if bad else ""))
        stats = metrics.pop("constraint_stats", None)  # (utility sums, count) of on-policy samples, for the dual step
        if self._logging_step():
            size = next(iter(batch.values())).shape[0]
            self.log("train/loss", loss, prog_bar=True, batch_size=size)
            self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=size)
        return {"loss": loss, "constraint_stats": stats}

    def _logging_step(self) -> bool:
        """Lightning writes step metrics every log_every_n_steps and drops the values logged in between; each
        self.log call costs ~0.7 ms, the larger part of a small model's step, so log only where it is written."""
        trainer = self._trainer
        if trainer is None:
            return True
        every = max(1, trainer.log_every_n_steps)
        return (self.global_step + 1) % every == 0 or trainer.is_last_batch

    def configure_optimizers(self):
        cfg = self.optimizer_cfg
        params = [p for p in self.policy.parameters() if p.requires_grad]
        fused = cfg.fused
        if fused is None:  # one kernel over all parameters instead of a loop: where every parameter supports it
            fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params) and \
                all(p.device.type in ("cpu", "cuda") for p in params)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
        total = max(1, self.trainer.estimated_stepping_batches)

        def factor(step):
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            if cfg.schedule == "cosine":
                progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
