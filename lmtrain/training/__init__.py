"""Training: the parts of a run assembled in one written order, and the loop that drives them.

- setup.py: `build_parts` builds every part from a TrainConfig (the one place that knows them all);
- loop.py: `Trainer(parts).fit()`, the step read top to bottom;
- run.py: `run_training`, both in one process, ending in plain values a launcher can pass on;
- one module per concern the loop calls: state (step checkpoints, resume), precision, memory (micro-batches),
  divergence, signals, clock and eta (time), mfu, preflight (checks before the first step), optim and muon.
"""

from lmtrain.training.loop import Trainer, TrainResult
from lmtrain.training.run import run_training
from lmtrain.training.setup import Parts, build_parts

__all__ = ["Parts", "TrainResult", "Trainer", "build_parts", "run_training"]
