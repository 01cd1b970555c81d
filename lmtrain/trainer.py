"""The training loop: step, accumulate, clip, evaluate, log, checkpoint. Orchestration only.

The pieces it wires live elsewhere: tokens from lmtrain.data, the model from lmtrain.model, the
optimizer and LR schedule from lmtrain.optim, files from lmtrain.checkpoint and lmtrain.metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmtrain import distributed, parallel
from lmtrain.clock import RunClock
from lmtrain.config import Precision, Strategy, TrainConfig, as_plain_dict
from lmtrain.console import PreparationProgress, print_table, progress_bar, wants_progress_bar
from lmtrain.data.loader import train_loader, val_batches
from lmtrain.data.prepare import prepare_data
from lmtrain.divergence import DivergenceGuard
from lmtrain.errors import ConfigError
from lmtrain.eta import Eta
from lmtrain.loggers import build_loggers
from lmtrain.memory import configured_size, format_bytes, micro_batches, peak_memory, trial_step
from lmtrain.metrics import MetricsLog, recorded_figures, summary_table
from lmtrain.mfu import Mfu
from lmtrain.model import GPT
from lmtrain.model.generation import encode_prompt, sample_texts
from lmtrain.optim import build_optimizer, lr_at, set_lr
from lmtrain.precision import TrainingPrecision, choose, confirm_on_model
from lmtrain.preflight import init_from_checked, warn_before_training
from lmtrain.signals import StopSignals
from lmtrain.train_state import Checkpointer

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    train_loss: float
    val_loss: float
    seconds: float
    checkpoint: Path
    stopped_by: signal.Signals | None = None  # SIGINT or SIGTERM when the run stopped before its last step


def pick_device(setting: str, key: str = "trainer.device") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={setting} but CUDA is not available here; use {key}=auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"{key}={setting}: this machine has {torch.cuda.device_count()} CUDA devices (0 to "
                          f"{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}={setting} but Apple's MPS is not available here; use {key}=auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def accumulate_gradients(forward, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                         autocast, backward=torch.Tensor.backward,
                         sync_gradients=lambda last: contextlib.nullcontext()) -> torch.Tensor:
    """Forward and backward each (input, target) micro-batch; returns their mean loss, detached.

    Each loss is divided by the number of micro-batches, so the summed gradient equals the gradient
    of the mean loss over the whole batch, as if it had been one batch k times larger. Under DDP,
    `sync_gradients(last)` lets only the last backward all-reduce the gradients.
    """
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with sync_gradients(i == len(micro_batches) - 1):
            with autocast():
                loss = forward(x, y)
            backward(loss / len(micro_batches))  # TrainingPrecision.backward scales the loss under fp16
        total += loss.detach()
    return total / len(micro_batches)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path):
        self.device = pick_device(cfg.trainer.device)
        vocab_multiple = cfg.model.vocab_multiple or (64 if self.device.type == "cuda" else 1)
        cfg = init_from_checked(cfg, vocab_multiple)  # before any data is read: init_from's tokenizer and shapes
        self.cfg, self.run_dir = cfg, Path(run_dir)
        t = cfg.trainer
        self.world, self.device = distributed.setup(self.device, t.dist_timeout_s,
                                                    group_of_one=t.strategy in (Strategy.ddp, Strategy.fsdp))
        strategy = parallel.resolve(t.strategy, self.world)
        precision = choose(t.precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
            torch.backends.cudnn.allow_tf32 = True
        seed_everything(t.seed)

        with distributed.local_main_first(self.world), \
                PreparationProgress(wants_progress_bar(t.progress) and self.world.main) as progress:
            self.data = prepare_data(cfg.data, cfg.tokenizer, progress)  # once per node: the others wait
        self.tokenizer = self.data.tokenizer
        vocab = cfg.model.vocab_size or self.tokenizer.vocab_size
        if vocab < self.tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {self.tokenizer.vocab_size}")
        self.model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab, vocab_multiple=vocab_multiple)
        self.model = GPT(self.model_cfg).to(self.device)
        self.model.activation_checkpointing = t.activation_checkpointing
        if t.precision == Precision.auto:  # before compiling: the probe runs the model eagerly
            precision = confirm_on_model(precision, self.model,
                                         configured_size(t.micro_batch_size, t.batch_size) or t.batch_size, self.device)
        self.precision = TrainingPrecision(precision, self.device)
        self.compiled = t.compile if t.compile is not None else self.device.type == "cuda"
        if self.compiled:
            self.model.compile_blocks()
        self.parallel = parallel.wrap(self.model, strategy, self.device, self.precision.name == "bf16")
        self.forward = self.parallel.forward  # the GPT or its DDP wrapper; compilation, if on, is inside, per block
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.device.type)

        block, ranks = self.model_cfg.block_size, self.world.size
        batch = t.batch_size * ranks  # the global batch: the loaders hand out whole ones, each rank trains on its rows
        self.train_loader = train_loader(self.data, block, batch, t.seed, t.num_workers,
                                         pin_memory=self.device.type == "cuda", rows=self.world.rows(batch))
        self.val_batches = val_batches(self.data, block, batch, t.eval_batches, self.world.rows)
        per_epoch = max(1, self.train_loader.batches_per_epoch // t.grad_accum_steps)
        self.total_steps = t.max_steps or t.epochs * per_epoch
        self.tokens_per_step = t.batch_size * t.grad_accum_steps * block * ranks  # every rank's tokens
        self.flops_per_token = self.model.flops_per_token()
        # MFU per device: every rank's tokens/s over all devices' peak, i.e. each rank's share of the FLOPs
        self.mfu = Mfu(self.device, self.precision.name, self.flops_per_token / ranks)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.world.main,
                                  loggers=build_loggers(cfg.logger, self.run_dir, self.checkpoint_config())
                                  if self.world.main else None)
        # Encoded only when sampling is on: a char tokenizer may lack the default prompts' characters.
        self.sample_prompts = [encode_prompt(self.tokenizer, p, "trainer.sample_prompts")
                               for p in (t.sample_prompts if t.sample_every else [])]
        self.step = 0
        self.epoch_loss, self.epoch_steps = torch.zeros((), device=self.device), 0  # sum of this epoch's step losses
        self.val_loss, self.best_val_loss = float("nan"), float("inf")
        self.saved: tuple[int, Path | None] = (-1, None)  # the step and folder of the last step checkpoint
        self.divergence = DivergenceGuard(t, self.device, loss_scaling=self.precision.scaler is not None)
        self.stop: StopSignals | None = None  # set while fit() runs: an evaluation stops at its next batch
        self.checkpoints = Checkpointer(self.run_dir, t.keep_last, self.checkpoint_config(), self.tokenizer,
                                        self.world, self.parallel.sharded)
        resumed = self.checkpoints.start(t.resume, cfg.model.init_from, self.model, self.optimizer, self.train_loader)
        if resumed is not None:
            self._restore(resumed)
            self.divergence.load_state_dict(resumed)
        self.micro = micro_batches(t.micro_batch_size, t.batch_size, self.device, trial_step(  # the bare model:
            self.model, self.model, self.tokenizer.vocab_size, block, self.device, self.autocast))  # no DDP all-reduce
        self.micro.size = distributed.smallest(self.micro.size, self.device)  # every rank runs as many micro-batches

    def autocast(self):
        return self.precision.autocast()

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the fixed validation batches, each rank scoring its rows of every batch; None when a
        stop signal cut the pass short."""
        self.model.eval()
        total = torch.zeros(2, device=self.device)  # (loss summed over rows, rows)
        for i in range(len(self.val_batches)):
            if self.stop is not None and self.stop.received and not distributed.active():  # ranks stop together
                self.model.train()
                return None
            for x, y in self.micro.split([self.val_batches[i]]):  # what fits with gradients fits without
                x, y = x.to(self.device), y.to(self.device)
                with self.autocast():
                    loss = self.forward(x, y).float()
                total += torch.stack([loss * x.shape[0], torch.tensor(float(x.shape[0]), device=self.device)])
        self.model.train()
        total = distributed.sum_across(total)  # each rank scored its own rows
        return (total[0] / total[1]).item()

    def _record_eval(self) -> None:
        val_loss = self.evaluate()
        if val_loss is None:
            return
        self.val_loss = val_loss
        self.metrics.write({"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
        log.info("Step %d, validation loss: %.4f, perplexity: %.2f", self.step, val_loss, math.exp(min(val_loss, 50)))
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            self.checkpoints.save_best(self.model, self.step, val_loss)

    def _save(self) -> Path:
        """A step checkpoint of everything a resume needs, the loop's own counters included."""
        state = {"step": self.step, "total_steps": self.total_steps, "epoch": self.train_loader.state.epoch,
                 "tokens": self.step * self.tokens_per_step, "epoch_loss_sum": self.epoch_loss.item(),
                 "epoch_steps": self.epoch_steps, "val_loss": _finite_or_none(self.val_loss),
                 "best_val_loss": _finite_or_none(self.best_val_loss), "precision": self.precision.state_dict(),
                 **self.divergence.state_dict()}
        folder = self.checkpoints.save(self.model, self.optimizer, self.train_loader, state)
        self.saved = (self.step, folder)
        return folder

    def _restore(self, state: dict) -> None:
        self.step, self.epoch_steps = state["step"], state.get("epoch_steps", 0)
        self.epoch_loss = torch.tensor(state.get("epoch_loss_sum", 0.0), dtype=torch.float32, device=self.device)
        self.val_loss = float("nan") if state.get("val_loss") is None else state["val_loss"]
        self.best_val_loss = float("inf") if state.get("best_val_loss") is None else state["best_val_loss"]
        self.precision.load_state_dict(state.get("precision"))  # fp16's loss scale and skipped-step count

    def _roll_back(self) -> None:
        """Back to the newest finite checkpoint after a divergence (or raise Diverged)."""
        diverged_at = self.divergence.found()
        checkpoint = self.divergence.roll_back(self.checkpoints.root, self.model, self.optimizer, self.train_loader,
                                               self.parallel.sharded, self.world.rank)
        self._restore(checkpoint.state)
        self.saved = (self.step, checkpoint.folder)
        self.checkpoints.rewind_metrics(checkpoint.state)
        self.metrics.write({"step": self.step, "rolled_back_from": diverged_at, **self.divergence.state_dict()})

    def _reads_weights(self, logging_step: bool) -> bool:
        """Whether this step logs, evaluates, saves or samples: the divergence check must come first."""
        t, s = self.cfg.trainer, self.step
        return (logging_step or s % t.eval_every == 0 or bool(t.save_every and s % t.save_every == 0)
                or bool(t.sample_every and s % t.sample_every == 0))

    def _stopped(self, received: signal.Signals, seconds: float) -> TrainResult:
        if self.divergence.found() is not None:  # never save the diverged weights
            self._roll_back()
        saved = self.saved[1] if self.saved[0] == self.step else self._save()
        report = log.warning if self.world.main else log.info  # said once, by rank 0
        report("Stopped by %s at step %d of %d after %.1f s; %s holds all that resuming needs",
               received.name, self.step, self.total_steps, seconds, saved)
        self.metrics.close()
        return TrainResult(self.step, self.step * self.tokens_per_step, float("nan"), self.val_loss, seconds, saved,
                           stopped_by=received)

    def _record_samples(self) -> None:
        if not (self.world.main or self.parallel.sharded):  # FSDP2: every rank takes part in each forward
            return
        t = self.cfg.trainer
        with self.autocast():
            texts = sample_texts(self.model, self.tokenizer, self.sample_prompts, t.sample_tokens, seed=t.seed)
        for text in texts:
            log.info("Step %d, sample: %r", self.step, text)
        self.metrics.write({"step": self.step, "samples": texts})

    def _describe(self) -> None:
        m, t = self.model_cfg, self.cfg.trainer
        log.info("Model %s: %s parameters, %d layers, d_model %d, %d heads, block %d, vocab %s",
                 m.name, f"{self.model.num_params():,}", m.n_layers, m.d_model, m.n_heads, m.block_size,
                 f"{m.vocab_size:,}")
        log.info("Training %d steps of %s tokens (batch %d x accumulation %d x block %d%s; micro-batch %d) on %s, %s%s",
                 self.total_steps, f"{self.tokens_per_step:,}", t.batch_size, t.grad_accum_steps, m.block_size,
                 f" x {self.world.size} ranks" if self.world.size > 1 else "", self.micro.size, self.device,
                 self.precision.name, ", compiled per block" if self.compiled else "")
        log.info("Precision %s: %s", self.precision.name, self.precision.choice.reason)
        log.info(distributed.describe(self.world, self.parallel.strategy.value, self.device))
        log.info("Run directory: %s", self.run_dir)

    def fit(self) -> TrainResult:
        t = self.cfg.trainer
        self._describe()
        start = time.perf_counter()
        batches = iter(self.train_loader)
        params = [p for p in self.model.parameters() if p.requires_grad]
        clock = RunClock()  # counts only this process's steps: after a resume, from the restart
        train_loss = float("nan")
        fields = {"loss": "-", "lr": "-", "speed": "-", "mfu": "-"}
        finished = self.step >= self.total_steps  # resumed from the checkpoint a complete run saved last
        eta = Eta(self.step, self.total_steps)
        if not finished and self.world.main:  # one device's share of a step against one device's peak
            warn_before_training(self.cfg, self.total_steps, self.tokens_per_step // self.world.size,
                                 self.flops_per_token, self.mfu.peak, self.device)
        with progress_bar(wants_progress_bar(t.progress) and self.world.main) as bar, StopSignals() as stop:
            self.stop = stop
            task = bar.add_task("train", total=self.total_steps, completed=self.step, **fields)
            stopping = None  # the signal every rank agreed to stop on
            while self.step < self.total_steps and stopping is None:
                lr = lr_at(self.step, self.total_steps, self.cfg.optimizer.lr * self.divergence.lr_factor,
                           self.cfg.scheduler)
                set_lr(self.optimizer, lr)
                completed_epochs = self.train_loader.completed_epochs
                loaded = [next(batches) for _ in range(t.grad_accum_steps)]
                accumulate = lambda micro: accumulate_gradients(self.forward, micro, self.device, self.autocast,
                                                                self.precision.backward,
                                                                self.parallel.sync_gradients)
                step_loss = self.micro.run(accumulate, loaded, self.optimizer, self.step)  # halves on out-of-memory
                step_loss, stopping = distributed.agree(step_loss, stop.received)  # mean over ranks; any stop
                self.epoch_loss, self.epoch_steps = self.epoch_loss + step_loss, self.epoch_steps + 1
                if self.train_loader.completed_epochs > completed_epochs:
                    avg = (self.epoch_loss / self.epoch_steps).item()
                    log.info("Epoch %d complete. Average loss: %.4f", completed_epochs, avg)
                    self.metrics.write({"step": self.step + 1, "epoch": completed_epochs, "epoch_avg_loss": avg})
                    self.epoch_loss, self.epoch_steps = torch.zeros((), device=self.device), 0
                logging_step = (self.step + 1) % t.log_every == 0 or self.step + 1 == self.total_steps
                grad_norm = self.precision.step(self.optimizer, params, t.grad_clip, want_norm=logging_step)
                self.divergence.observe(self.step + 1, step_loss, grad_norm)
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                clock.step(self.tokens_per_step)
                if self._reads_weights(logging_step) and self.divergence.found() is not None:
                    self._roll_back()
                    batches = iter(self.train_loader)
                    continue

                if logging_step:
                    train_loss = step_loss.item()
                    fields = self._log_step(train_loss, lr, float(parallel.full_value(grad_norm)), clock.rate(),
                                            eta.text(self.step))
                elif note := eta.first_step_note(self.step):  # a slow run's first log line may be far away
                    log.info("%s", note)
                if self.step % t.eval_every == 0 and self.step < self.total_steps:  # not training time: timed apart
                    with clock.phase("eval"):
                        self._record_eval()
                if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                    with clock.phase("save"):
                        self._save()
                if t.sample_every and self.step % t.sample_every == 0:
                    with clock.phase("sample"):
                        self._record_samples()
                bar.update(task, completed=self.step, **fields)
            if self.step < self.total_steps:
                return self._stopped(stopping, time.perf_counter() - start)
            if finished:
                log.info("This run finished at step %d already: nothing left to train", self.step)
            else:
                with clock.phase("eval"):
                    self._record_eval()
                with clock.phase("save"):
                    self.checkpoints.save_final(self.model)
                    self._save()  # last: a checkpoint at the final step means the whole run is done
        self.metrics.close()
        result = TrainResult(self.step, self.step * self.tokens_per_step, train_loss, self.val_loss,
                             time.perf_counter() - start, self.checkpoints.root / "final")
        if self.world.main:
            rate = clock.overall_rate()  # settled training steps only: no compilation, eval, save or sampling
            if finished:  # nothing trained in this process: the figures the run logged when it trained
                result.train_loss, rate = recorded_figures(self.metrics.path)
            self._summarize(result, clock, rate)
        return result

    def _log_step(self, loss: float, lr: float, grad_norm: float, tokens_per_s: float | None, eta: str) -> dict:
        """One log line and metrics record; tokens/s and MFU are None while the step time settles."""
        loader = self.train_loader.state
        mfu = self.mfu(tokens_per_s)
        speed = "warming up" if tokens_per_s is None else f"{tokens_per_s:,.0f}"
        mfu_text = "-" if mfu is None else f"{100 * mfu:.1f}%"
        peak = peak_memory(self.device)
        record = {"step": self.step, "epoch": loader.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_s, "mfu": mfu, "tokens": self.step * self.tokens_per_step,
                  "micro_batch_size": self.micro.size, **({} if peak is None else {"peak_memory": peak})}
        extra = "" if peak is None else f", Peak memory: {format_bytes(peak)}"
        if self.precision.scaler is not None:
            record["skipped_steps"] = self.precision.skipped_steps
            extra += f", skipped steps (inf/NaN gradients): {record['skipped_steps']}"
        log.info("Epoch %d, Batch %d, Loss: %.4f, LR: %.2e, Tokens/s: %s, MFU: %s%s, ETA: %s",
                 loader.epoch, loader.batch, loss, lr, speed, mfu_text, extra, eta)
        self.metrics.write(record)
        return {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "speed": speed, "mfu": mfu_text}

    def checkpoint_config(self) -> dict:
        """The resolved run config as saved with checkpoints: vocab_size filled in from the tokenizer."""
        return as_plain_dict(dataclasses.replace(self.cfg, model=self.model_cfg))

    def _summarize(self, r: TrainResult, clock: RunClock, rate: float | None) -> None:
        mfu = self.mfu(rate)
        rows = [("parameters", f"{self.model.num_params():,}"), ("steps", f"{r.steps:,}"),
                ("tokens seen", f"{r.tokens:,}"), ("final train loss", f"{r.train_loss:.4f}"),
                ("final validation loss", f"{r.val_loss:.4f} (perplexity {math.exp(min(r.val_loss, 50)):.2f})"),
                ("wall time", clock.split()),
                ("throughput", "- (no step after warm-up)" if rate is None else f"{rate:,.0f} tokens/s of training"),
                ("MFU", ("-" if mfu is None else f"{100 * mfu:.1f}%") + f" of {self.mfu.source} "
                        f"({self.mfu.peak / 1e12:.2f} TFLOP/s)"),
                ("precision", self.precision.name + (f", {self.precision.skipped_steps} steps skipped (inf/NaN "
                                                     "gradients)" if self.precision.scaler is not None else "")),
                *self.train_loader.summary_rows(), *self.micro.summary_rows(), ("checkpoint", str(r.checkpoint))]
        print_table(summary_table(rows))
