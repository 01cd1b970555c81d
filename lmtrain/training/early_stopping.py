"""Stop a run whose validation loss no longer improves: `trainer.early_stopping.patience` evaluations in a row
without a new best lower by more than `min_delta`.

The loop hands each evaluation's loss to `EarlyStopping.observe`; once it says `stopped`, the loop ends the run
as at its last step (final weights, a last checkpoint) and the run counts as completed (exit 0). Its state (the
best loss, its step, the evaluations since) is part of the training state, so a resumed run counts on; a run
that stopped early is finished, unless it is resumed with a larger patience.
"""

from __future__ import annotations

import logging
import math

from lmtrain.config import EarlyStoppingConfig

log = logging.getLogger(__name__)


class EarlyStopping:
    def __init__(self, cfg: EarlyStoppingConfig):
        self.patience, self.min_delta = cfg.patience, cfg.min_delta
        self.best, self.best_step, self.waited = math.inf, 0, 0  # waited: evaluations since the best one

    @property
    def stopped(self) -> bool:
        return 0 < self.patience <= self.waited

    def observe(self, step: int, val_loss: float) -> bool:
        """Count one evaluation; True when it ends the run (said once, in the log)."""
        if val_loss < self.best - self.min_delta:
            self.best, self.best_step, self.waited = val_loss, step, 0
            return False
        self.waited += 1
        if self.stopped:
            log.info("Stopping early at step %d: %s", step, self.reason())
        return self.stopped

    def reason(self) -> str:
        improve = f"by more than {self.min_delta:g}" if self.min_delta else "at all"
        return (f"the validation loss has not improved {improve} in {self.waited} evaluations "
                f"(trainer.early_stopping.patience={self.patience}); the best, {self.best:.4f}, was at step "
                f"{self.best_step}")

    def record(self, step: int) -> dict:
        """The metrics.jsonl record that says the run stopped early."""
        return {"step": step, "stopped_early": True, "best_val_loss": self.best, "best_step": self.best_step}

    def summary_rows(self) -> list[tuple[str, str]]:
        return [("stopped early", self.reason())] if self.stopped else []

    def state_dict(self) -> dict:
        best = None if math.isinf(self.best) else self.best
        return {"early_stopping": {"best": best, "best_step": self.best_step, "waited": self.waited}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("early_stopping") or {}
        self.best = math.inf if saved.get("best") is None else saved["best"]
        self.best_step, self.waited = saved.get("best_step", 0), saved.get("waited", 0)
