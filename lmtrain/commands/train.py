"""`lmtrain train`: compose the config, check it, and train."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lmtrain.config import TrainConfig, register_configs, to_train_config
from lmtrain.config.overrides import explicit_model_keys
from lmtrain.console import quiet_libraries
from lmtrain.distributed.ranks import world_from_env
from lmtrain.errors import Diverged, RunStopped, in_multirun, reports_user_errors
from lmtrain.runs.records import read_metrics
from lmtrain.runs.run_dir import open_run_dir
from lmtrain.runs.sweeps.callback import finish_sweep
from lmtrain.runs.sweeps.jobs import finished_objective, register_job_name_resolver
from lmtrain.runs.sweeps.runs import run_from_metrics
from lmtrain.runs.sweeps.status import JobRecord, recorded_status

if TYPE_CHECKING:
    from lmtrain.distributed.launch import Outcome

register_configs("train")
register_job_name_resolver()
log = logging.getLogger(__name__)

_CONFIG_OPTIONS = ("--config-dir", "-cd", "--config-name", "-cn")


# The command line as typed, for the job processes of a launcher whose sys.argv is its own (submitit's)
TYPED_ARGS = "LMTRAIN_TRAIN_ARGS"


def resume_command(run_dir: Path) -> str:
    """The command that continues this run (or, in a sweep, the whole sweep): its launcher (torchrun, srun; the
    overrides keep trainer.nproc_per_node), its config options and overrides, plus resume=auto and its run (or
    sweep) dir."""
    from lmtrain.distributed.launch import launcher_prefix

    argv, options = json.loads(os.environ.get(TYPED_ARGS, "null")) or sys.argv[1:], []
    for i, arg in enumerate(argv):
        if arg in _CONFIG_OPTIONS and i + 1 < len(argv):
            options += [arg, argv[i + 1]]
        elif arg.startswith(tuple(f"{o}=" for o in _CONFIG_OPTIONS)):
            options.append(arg)
    hydra_cfg = HydraConfig.get()
    if in_multirun():  # the whole sweep command, as typed: rerunning it skips finished jobs
        sweep = [a for a in argv if a not in ("-m", "--multirun")
                 and not a.startswith(("trainer.resume=", "hydra.sweep.dir="))]
        return shlex.join(["lmtrain", "train", "-m", *sweep, "trainer.resume=auto",
                           f"hydra.sweep.dir={hydra_cfg.sweep.dir}"])
    overrides = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") != "trainer.resume"]
    return shlex.join([*launcher_prefix(), "lmtrain", "train", *options, "trainer.resume=auto",
                       f"hydra.run.dir={run_dir}", *overrides])


def main() -> None:
    """`lmtrain train`: the Hydra app, then the summary of a sweep that a failed job cut short."""
    os.environ[TYPED_ARGS] = json.dumps(sys.argv[1:])  # inherited by the jobs submitit starts
    try:
        train()
    finally:
        finish_sweep()


def extra_overrides(argv: list[str]) -> list[str]:
    """Added to the command line before Hydra composes (cli.py): under torchrun or srun, every rank's share of
    one run directory. A lone process needs none and knows it without torch, which the launcher imports: --help,
    shell completion and config errors do not wait for it."""
    if world_from_env().size == 1:
        return []
    from lmtrain.distributed.launch import shared_run_dir_overrides

    return shared_run_dir_overrides(argv)


@hydra.main(version_base="1.3", config_path="pkg://lmtrain.configs", config_name="train")
@reports_user_errors
def train(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    job_num = hydra_cfg.job.get("num") if in_multirun() else None
    main_rank = world_from_env().main  # of the ranks torchrun or srun started, rank 0 alone reports
    # A failed start removes the folder it created; a sweep job's folder stays, with its status.json.
    sweep = in_multirun()
    with (open_run_dir(run_dir, keep_on_failure=sweep) as run,
          recorded_status(run_dir, job_num, Path(hydra_cfg.sweep.dir) if sweep else None, writes=main_rank) as job):
        train_cfg = to_train_config(cfg)  # every check runs here, before any data is touched
        if train_cfg.model.init_from is not None:  # the checkpoint's own config sets the model's shape
            from lmtrain.training.preflight import model_from_checkpoint

            train_cfg = model_from_checkpoint(train_cfg, explicit_model_keys(cfg))
        objective = train_cfg.trainer.objective.value
        if train_cfg.trainer.resume == "auto" and in_multirun():
            done = finished_objective(run_dir, job.previous, objective)
            if done is not None:  # a rerun sweep: this job finished before, skip it without loading anything
                log.info("Job already completed (%s %.4f): skipping it", objective, done)
                job.facts.update(job.previous, objective=objective, value=done)
                return done
        from lmtrain.distributed import launch  # imported late: --help and config errors stay fast

        launch.resume_after_restart(train_cfg, previous_status=job.previous)
        run.claim(train_cfg.trainer.resume, train_cfg.trainer.overwrite)
        job.claimed()
        nproc = launch.processes_to_start(train_cfg.trainer.nproc_per_node, train_cfg.trainer.device)
        if nproc == 1:  # this process loads the data; workers set themselves up
            quiet_libraries()
        result = launch.start(train_here, train_cfg, run_dir, nproc, run.lock.filenos())
        if result.interrupted:
            raise RunStopped(signal.SIGINT, f"Interrupted. {_continue_hint(run_dir)}" if main_rank else "") from None
        if result.stopped_by is not None:
            raise _stopped(signal.Signals(result.stopped_by), result.steps, run_dir, job, main_rank)
        recorded = run_from_metrics(read_metrics(run_dir / "metrics.jsonl"))
        value = recorded.metric(objective)
        if value is None:  # resumed from another folder's checkpoint with nothing left to train: its own figures
            value = {"val_loss": result.val_loss, "best_val_loss": result.best_val_loss}.get(objective)
            value = value if value is not None and math.isfinite(value) else None
        if value is None:
            raise Diverged(f"training diverged: the final {objective} is {result.val_loss} (trainer.objective)")
        job.facts.update(objective=objective, value=value, steps=result.steps)
        if recorded.stopped_early is not None:  # a completed run all the same
            job.facts.update(stopped_early=recorded.stopped_early)
        return value  # what a sweeper minimizes


def train_here(cfg: TrainConfig, run_dir: Path) -> Outcome:
    """Training in this process, or in a worker: launch pickles this function by name, so a launcher of
    trainer.nproc_per_node workers never imports the training stack (each worker imports it anyway)."""
    from lmtrain.training.run import run_training

    return run_training(cfg, run_dir)


def _stopped(received: signal.Signals, steps: int, run_dir: Path, job: JobRecord, main_rank: bool) -> RunStopped:
    """A run that a signal stopped, and that saved: submitit requeues its job (this process ends there), or the
    resume command is printed, once."""
    from lmtrain.distributed.requeue import requeue, submitit_handler

    not_requeued = ""
    if submitit_handler(received) is not None:
        why = requeue(received, lambda: job.requeued(received, steps))
        not_requeued = f"submitit did not requeue the job ({why}). " if why else ""
    if not main_rank:
        return RunStopped(received, "")
    what = "sweep" if in_multirun() else "run"
    where = " (on every node)" if world_from_env().nodes > 1 else ""
    return RunStopped(received, f"{not_requeued}Continue this {what}{where} with:\n  {resume_command(run_dir)}")


def _continue_hint(run_dir: Path) -> str:
    """How to continue: only when a checkpoint exists to continue from."""
    from lmtrain.runs.records import LATEST

    if not (run_dir / "checkpoints" / LATEST).is_file():
        return "No checkpoint was saved yet, so there is nothing to continue; start the run again."
    return f"Continue from the last checkpoint saved with:\n  {resume_command(run_dir)}"
