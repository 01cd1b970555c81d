"""Training in this process, start to end: assemble the parts, fit, and say how it ended in plain values
(which cross process boundaries when lmtrain.distributed.launch started this process as a worker)."""

from __future__ import annotations

from pathlib import Path

from lmtrain.config import TrainConfig
from lmtrain.distributed import collectives, faults
from lmtrain.distributed.launch import Outcome
from lmtrain.distributed.world import shutdown
from lmtrain.training.loop import Trainer
from lmtrain.training.setup import build_parts


def run_training(cfg: TrainConfig, run_dir: Path) -> Outcome:
    """Train in this process (one of several, or the only one). A collective that fails because another rank died
    or stopped answering becomes a LostRank error that names that rank, said once."""
    trainer, lost = None, None
    try:
        trainer = Trainer(build_parts(cfg, run_dir))
        result = trainer.fit()
    except KeyboardInterrupt:
        return Outcome(interrupted=True)
    except Exception as e:
        if not (collectives.active() and faults.communication_failure(e)):
            raise
        lost = faults.lost_rank(e, cfg.trainer.dist_timeout_s,
                                "while starting" if trainer is None else f"at step {trainer.step + 1}")
    finally:
        # The model, and DDP's reducer with it, go before the process group: a gloo group whose last reference
        # went with them later, from Python, can deadlock in its destructor (it joins a thread that needs the GIL)
        trainer = None
        shutdown()
    if lost is not None:
        raise lost  # out here, not inside `except`: the failed collective's traceback would keep the model alive
    return Outcome(result.val_loss, result.best_val_loss, result.steps,
                   None if result.stopped_by is None else int(result.stopped_by))
