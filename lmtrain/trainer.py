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

from lmtrain.config import Precision, TrainConfig, as_plain_dict
from lmtrain.console import PreparationProgress, print_table, progress_bar, wants_progress_bar
from lmtrain.data.loader import train_loader, val_batches
from lmtrain.data.prepare import prepare_data
from lmtrain.errors import ConfigError
from lmtrain.eta import Eta
from lmtrain.loggers import build_loggers
from lmtrain.memory import format_bytes, micro_batches, peak_memory, trial_step
from lmtrain.metrics import MetricsLog, Throughput, peak_flops, recorded_figures, summary_table
from lmtrain.model import GPT
from lmtrain.model.generation import encode_prompt, sample_texts
from lmtrain.optim import build_optimizer, lr_at, set_lr
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
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def accumulate_gradients(forward, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                         autocast) -> torch.Tensor:
    """Forward and backward each (input, target) micro-batch; returns their mean loss, detached.

    Each loss is divided by the number of micro-batches, so the summed gradient equals the gradient
    of the mean loss over the whole batch, as if it had been one batch k times larger.
    """
    total = torch.zeros((), device=device)
    for x, y in micro_batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            loss = forward(x, y)
        (loss / len(micro_batches)).backward()
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
        self.bf16 = t.precision == Precision.bf16 or (t.precision == Precision.auto and self.device.type == "cuda")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
            torch.backends.cudnn.allow_tf32 = True
        seed_everything(t.seed)

        with PreparationProgress(wants_progress_bar(t.progress)) as progress:
            self.data = prepare_data(cfg.data, cfg.tokenizer, progress)
        self.tokenizer = self.data.tokenizer
        vocab = cfg.model.vocab_size or self.tokenizer.vocab_size
        if vocab < self.tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {self.tokenizer.vocab_size}")
        self.model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab, vocab_multiple=vocab_multiple)
        self.model = GPT(self.model_cfg).to(self.device)
        self.model.activation_checkpointing = t.activation_checkpointing
        self.compiled = t.compile if t.compile is not None else self.device.type == "cuda"
        if self.compiled:
            self.model.compile_blocks()
        self.forward = self.model  # the call the loop makes; compilation, if on, is inside, per block
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.device.type)

        block = self.model_cfg.block_size
        self.train_loader = train_loader(self.data, block, t.batch_size, t.seed, t.num_workers,
                                         pin_memory=self.device.type == "cuda")
        self.val_batches = val_batches(self.data, block, t.batch_size, t.eval_batches)
        per_epoch = max(1, self.train_loader.batches_per_epoch // t.grad_accum_steps)
        self.total_steps = t.max_steps or t.epochs * per_epoch
        self.tokens_per_step = t.batch_size * t.grad_accum_steps * block
        self.flops_per_token = self.model.flops_per_token()
        self.peak, self.peak_source = peak_flops(self.device, self.bf16)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl",
                                  loggers=build_loggers(cfg.logger, self.run_dir, self.checkpoint_config()))
        # Encoded only when sampling is on: a char tokenizer may lack the default prompts' characters.
        self.sample_prompts = [encode_prompt(self.tokenizer, p, "trainer.sample_prompts")
                               for p in (t.sample_prompts if t.sample_every else [])]
        self.step = 0
        self.epoch_loss, self.epoch_steps = torch.zeros((), device=self.device), 0  # sum of this epoch's step losses
        self.val_loss, self.best_val_loss = float("nan"), float("inf")
        self.saved: tuple[int, Path | None] = (-1, None)  # the step and folder of the last step checkpoint
        self.checkpoints = Checkpointer(self.run_dir, t.keep_last, self.checkpoint_config(), self.tokenizer)
        resumed = self.checkpoints.start(t.resume, cfg.model.init_from, self.model, self.optimizer, self.train_loader)
        if resumed is not None:
            self._restore(resumed)
        self.micro = micro_batches(t.micro_batch_size, t.batch_size, self.device, trial_step(
            self.forward, self.model, self.tokenizer.vocab_size, block, self.device, self.autocast))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches."""
        self.model.eval()
        total, rows = torch.zeros((), device=self.device), 0
        for i in range(len(self.val_batches)):
            for x, y in self.micro.split([self.val_batches[i]]):  # what fits with gradients fits without
                x, y = x.to(self.device), y.to(self.device)
                with self.autocast():
                    total += self.forward(x, y).float() * x.shape[0]
                rows += x.shape[0]
        self.model.train()
        return (total / rows).item()

    def _record_eval(self) -> float:
        val_loss = self.val_loss = self.evaluate()
        self.metrics.write({"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
        log.info("Step %d, validation loss: %.4f, perplexity: %.2f", self.step, val_loss, math.exp(min(val_loss, 50)))
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            self.checkpoints.save_best(self.model, self.step, val_loss)
        return val_loss

    def _save(self) -> Path:
        """A step checkpoint of everything a resume needs, the loop's own counters included."""
        state = {"step": self.step, "total_steps": self.total_steps, "epoch": self.train_loader.state.epoch,
                 "tokens": self.step * self.tokens_per_step, "epoch_loss_sum": self.epoch_loss.item(),
                 "epoch_steps": self.epoch_steps, "val_loss": _finite_or_none(self.val_loss),
                 "best_val_loss": _finite_or_none(self.best_val_loss)}
        folder = self.checkpoints.save(self.model, self.optimizer, self.train_loader, state)
        self.saved = (self.step, folder)
        return folder

    def _restore(self, state: dict) -> None:
        self.step, self.epoch_steps = state["step"], state.get("epoch_steps", 0)
        self.epoch_loss = torch.tensor(state.get("epoch_loss_sum", 0.0), dtype=torch.float32, device=self.device)
        self.val_loss = float("nan") if state.get("val_loss") is None else state["val_loss"]
        self.best_val_loss = float("inf") if state.get("best_val_loss") is None else state["best_val_loss"]

    def _stopped(self, received: signal.Signals, seconds: float) -> TrainResult:
        saved = self.saved[1] if self.saved[0] == self.step else self._save()
        log.warning("Stopped by %s at step %d of %d after %.1f s; %s holds all that resuming needs",
                    received.name, self.step, self.total_steps, seconds, saved)
        self.metrics.close()
        return TrainResult(self.step, self.step * self.tokens_per_step, float("nan"), self.val_loss, seconds, saved,
                           stopped_by=received)

    def _record_samples(self) -> None:
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
        log.info("Training %d steps of %s tokens (batch %d x accumulation %d x block %d; micro-batch %d) on %s, %s%s",
                 self.total_steps, f"{self.tokens_per_step:,}", t.batch_size, t.grad_accum_steps, m.block_size,
                 self.micro.size, self.device, "bf16 autocast" if self.bf16 else "fp32",
                 ", compiled per block" if self.compiled else "")
        log.info("Run directory: %s", self.run_dir)

    def fit(self) -> TrainResult:
        t = self.cfg.trainer
        self._describe()
        start = time.perf_counter()
        batches = iter(self.train_loader)
        params = [p for p in self.model.parameters() if p.requires_grad]
        throughput = Throughput()
        train_loss = float("nan")
        fields = {"loss": "-", "lr": "-", "speed": "-", "mfu": "-"}
        first_step = self.step  # above 0 after a resume: throughput counts only this process's steps
        finished = self.step >= self.total_steps  # resumed from the checkpoint a complete run saved last
        eta = Eta(self.step, self.total_steps)
        if not finished:
            warn_before_training(self.cfg, self.total_steps, self.tokens_per_step, self.flops_per_token, self.peak,
                                 self.device)
        with progress_bar(wants_progress_bar(t.progress)) as bar, StopSignals() as stop:
            task = bar.add_task("train", total=self.total_steps, completed=self.step, **fields)
            while self.step < self.total_steps and not stop.received:
                lr = lr_at(self.step, self.total_steps, self.cfg.optimizer.lr, self.cfg.scheduler)
                set_lr(self.optimizer, lr)
                completed_epochs = self.train_loader.completed_epochs
                loaded = [next(batches) for _ in range(t.grad_accum_steps)]
                accumulate = lambda micro: accumulate_gradients(self.forward, micro, self.device, self.autocast)
                step_loss = self.micro.run(accumulate, loaded, self.optimizer, self.step)  # halves on out-of-memory
                self.epoch_loss, self.epoch_steps = self.epoch_loss + step_loss, self.epoch_steps + 1
                if self.train_loader.completed_epochs > completed_epochs:
                    avg = (self.epoch_loss / self.epoch_steps).item()
                    log.info("Epoch %d complete. Average loss: %.4f", completed_epochs, avg)
                    self.metrics.write({"step": self.step + 1, "epoch": completed_epochs, "epoch_avg_loss": avg})
                    self.epoch_loss, self.epoch_steps = torch.zeros((), device=self.device), 0
                logging_step = (self.step + 1) % t.log_every == 0 or self.step + 1 == self.total_steps
                if t.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                elif logging_step:  # clipping is off, but the norm is still worth logging
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                throughput.add(self.tokens_per_step)

                if logging_step:
                    train_loss = step_loss.item()
                    fields = self._log_step(train_loss, lr, float(grad_norm), throughput.rate(), eta.text(self.step))
                elif note := eta.first_step_note(self.step):  # a slow run's first log line may be far away
                    log.info("%s", note)
                with throughput.paused():  # evaluating, saving and sampling are not training time
                    if self.step % t.eval_every == 0 and self.step < self.total_steps:
                        self._record_eval()
                    if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                        self._save()
                    if t.sample_every and self.step % t.sample_every == 0:
                        self._record_samples()
                bar.update(task, completed=self.step, **fields)
            if self.step < self.total_steps:
                return self._stopped(stop.received, time.perf_counter() - start)
            if finished:
                log.info("This run finished at step %d already: nothing left to train", self.step)
            else:
                self._record_eval()
                self.checkpoints.save_final(self.model)
                self._save()  # last: a checkpoint at the final step means the whole run is done
        self.metrics.close()
        result = TrainResult(self.step, self.step * self.tokens_per_step, train_loss, self.val_loss,
                             time.perf_counter() - start, self.checkpoints.root / "final")
        rate = (self.step - first_step) * self.tokens_per_step / result.seconds
        if finished:  # nothing trained in this process: the figures the run logged when it trained
            result.train_loss, rate = recorded_figures(self.metrics.path)
        self._summarize(result, rate)
        return result

    def _log_step(self, loss: float, lr: float, grad_norm: float, tokens_per_s: float, eta: str) -> dict:
        loader = self.train_loader.state
        mfu = tokens_per_s * self.flops_per_token / self.peak
        peak = peak_memory(self.device)
        log.info("Epoch %d, Batch %d, Loss: %.4f, LR: %.2e, Tokens/s: %s, MFU: %.1f%%%s, ETA: %s",
                 loader.epoch, loader.batch, loss, lr, f"{tokens_per_s:,.0f}", 100 * mfu,
                 "" if peak is None else f", Peak memory: {format_bytes(peak)}", eta)
        self.metrics.write({"step": self.step, "epoch": loader.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                            "tokens_per_s": tokens_per_s, "mfu": mfu, "tokens": self.step * self.tokens_per_step,
                            "micro_batch_size": self.micro.size, **({} if peak is None else {"peak_memory": peak})})
        return {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "speed": f"{tokens_per_s:,.0f}", "mfu": f"{100 * mfu:.1f}%"}

    def checkpoint_config(self) -> dict:
        """The resolved run config as saved with checkpoints: vocab_size filled in from the tokenizer."""
        return as_plain_dict(dataclasses.replace(self.cfg, model=self.model_cfg))

    def _summarize(self, r: TrainResult, rate: float) -> None:
        rows = [("parameters", f"{self.model.num_params():,}"), ("steps", f"{r.steps:,}"),
                ("tokens seen", f"{r.tokens:,}"), ("final train loss", f"{r.train_loss:.4f}"),
                ("final validation loss", f"{r.val_loss:.4f} (perplexity {math.exp(min(r.val_loss, 50)):.2f})"),
                ("wall time", f"{r.seconds:.1f} s"), ("throughput", f"{rate:,.0f} tokens/s"),
                ("MFU", f"{100 * rate * self.flops_per_token / self.peak:.1f}% of {self.peak_source} "
                        f"({self.peak / 1e12:.2f} TFLOP/s)"),
                *self.train_loader.summary_rows(), *self.micro.summary_rows(), ("checkpoint", str(r.checkpoint))]
        print_table(summary_table(rows))
