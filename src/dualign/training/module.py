"""The LightningModule: policy + Lagrangian loss. It holds the multipliers as a buffer (so they are in every
checkpoint and identical on every rank); the DualUpdate callback decides when and how they change."""
from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy

from dualign.config import OptimizerConfig

AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype Lightning's mixed-precision plugin autocasts the training step to (None: no autocast)."""
    return AUTOCAST_DTYPES.get(str(precision))


def fused_adamw_supported(params) -> bool:
    return all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.device.type in ("cpu", "cuda")
               for p in params)


def clips_under_mixed_precision(trainer) -> bool:
    """Lightning's mixed-precision plugin (bf16-mixed, 16-mixed) refuses to clip gradients of an optimiser that
    unscales them inside its step, as fused AdamW does; the foreach AdamW it gets instead computes the same update."""
    clip = trainer.gradient_clip_val
    return isinstance(trainer.precision_plugin, MixedPrecision) and clip is not None and clip > 0


class AlignmentModule(L.LightningModule):
    def __init__(self, policy, policy_step, multipliers: torch.Tensor, optimizer: OptimizerConfig, epochs_per_iteration: int):
        super().__init__()
        self.policy = policy
        self.policy_step = policy_step
        self.optimizer_cfg = optimizer
        self.epochs_per_iteration = epochs_per_iteration
        self.register_buffer("multipliers", torch.as_tensor(multipliers, dtype=torch.float32).clone())
        # with LoRA the base weights are frozen and equal pi_ref: checkpoints hold only what training changes. Read the
        # state dict, not named_parameters(): a tied weight (lm_head = embed_tokens) is listed there once, but saved twice
        self.frozen = {f"policy.{name}" for name, tensor in policy.state_dict(keep_vars=True).items()
                       if isinstance(tensor, torch.nn.Parameter) and not tensor.requires_grad}
        self.strict_loading = not self.frozen
        self.config_fingerprint: dict | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.config_fingerprint is not None:  # compared with the resuming run's config (checkpoints.py)
            checkpoint["dualign_config"] = self.config_fingerprint
        for key in self.frozen:
            checkpoint["state_dict"].pop(key, None)

    @property
    def iteration(self) -> int:
        return self.current_epoch // self.epochs_per_iteration

    def training_step(self, batch, batch_idx):
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

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning's FSDP precision plugin refuses norm clipping: the norm must be taken over every rank's shard,
            # which only the FSDP root module can do
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        cfg = self.optimizer_cfg
        params = [p for p in self.policy.parameters() if p.requires_grad]
        fused = cfg.fused
        if fused is None:  # one kernel over all parameters instead of a loop: where every parameter supports it
            fused = fused_adamw_supported(params) and not clips_under_mixed_precision(self.trainer)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
        total = max(1, self.trainer.estimated_stepping_batches)
        # optimiser steps an iteration (between two dual steps): cosine_per_iteration restarts after each
        per_iteration = max(1, round(total * self.epochs_per_iteration / max(1, self.trainer.max_epochs)))

        def factor(step):
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            if cfg.schedule == "cosine":
                progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
            if cfg.schedule == "cosine_per_iteration":
                # Adam at a constant rate does not settle: its policy keeps jumping (TV to pi_lambda 0.03 -> 0.08
                # within 4 steps); the dual step measures, and the run returns, the policy at an iteration's end
                progress = (step % per_iteration) / per_iteration
                return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
