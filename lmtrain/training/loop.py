"""The training loop: the step read top to bottom, then evaluating, logging and saving. Orchestration only.

Its parts arrive built (lmtrain.training.setup assembles them); each concern is one call. One step:

    batches                       the loader's (input, target) pairs: the shift happened there (loader.shift)
    forward, loss, backward       accumulate_gradients over the micro-batches, autocast by the precision
    agree                         the mean loss over ranks, and whether any rank was asked to stop (one step late)
    clip, step                    TrainingPrecision.step: unscale (fp16), clip, optimizer step
    guard                         DivergenceGuard.observe: a non-finite loss or gradient norm rolls back
    log, evaluate, save, sample   every trainer.log_every / eval_every / save_every / sample_every steps
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmtrain.console import print_table, progress_bar, wants_progress_bar
from lmtrain.distributed import collectives, strategies
from lmtrain.distributed.world import describe
from lmtrain.model.generation import sample_texts
from lmtrain.runs.metrics import recorded_figures, summary_table
from lmtrain.training.clock import RunClock
from lmtrain.training.debugging import check_resume, overfit_verdict
from lmtrain.training.eta import Eta
from lmtrain.training.memory import format_bytes, peak_memory
from lmtrain.training.optim import lr_at, set_lr
from lmtrain.training.preflight import warn_before_training
from lmtrain.training.setup import Parts
from lmtrain.training.signals import StopSignals

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
    best_val_loss: float = float("inf")  # the lowest validation loss of the run, resumed ones included


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
    def __init__(self, parts: Parts):
        p = parts
        self.cfg, self.run_dir, self.world, self.device = p.cfg, p.run_dir, p.world, p.device
        self.tokenizer, self.model_cfg, self.model, self.compilation = p.tokenizer, p.model_cfg, p.model, p.compilation
        self.precision, self.parallel, self.optimizer = p.precision, p.parallel, p.optimizer
        self.forward = p.parallel.forward  # the GPT or its DDP wrapper; compilation, if on, is inside, per block
        self.params = [param for param in p.model.parameters() if param.requires_grad]
        self.train_loader, self.val_batches, self.total_steps = p.train_loader, p.val_batches, p.total_steps
        self.schedule_steps = p.total_steps  # the LR schedule's length: fixed when the run starts (see _restore)
        self.tokens_per_step, self.mfu, self.metrics = p.tokens_per_step, p.mfu, p.metrics
        self.checkpoints, self.divergence, self.micro = p.checkpoints, p.divergence, p.micro
        self.early_stopping, self.profiler = p.early_stopping, p.profiler
        self.sample_prompts = p.sample_prompts
        self.step = 0
        self.epoch_loss, self.epoch_steps = torch.zeros((), device=self.device), 0  # sum of this epoch's step losses
        self.val_loss, self.best_val_loss = float("nan"), float("inf")
        self.saved: tuple[int, Path | None] = (-1, None)  # the step and folder of the last step checkpoint
        self.stop: StopSignals | None = None  # set while fit() runs: an evaluation stops at its next batch
        if p.resumed is not None:
            self._restore(p.resumed)
            self._warn_if_length_changed()

    def fit(self) -> TrainResult:
        """Train to the last step (trainer.max_steps or epochs), or until a stop signal; returns how it ended."""
        t = self.cfg.trainer
        self._describe()
        start, clock = time.perf_counter(), RunClock()  # this process's steps only: after a resume, from the restart
        eta = Eta(clock, self.step, self.total_steps)
        batches = iter(self.train_loader)
        # resumed from the checkpoint a complete run saved last (or one that stopped early)
        finished = self.step >= self.total_steps or self.early_stopping.stopped
        if not finished and self.world.main:  # one device's share of a step against one device's peak
            warn_before_training(self.cfg, self.total_steps, self.tokens_per_step // self.world.size,
                                 self.model.flops_per_token(), self.mfu.peak, self.device)
        train_loss, fields = float("nan"), {"loss": "-", "lr": "-", "speed": "-", "mfu": "-"}
        with progress_bar(wants_progress_bar(t.progress) and self.world.main) as bar, StopSignals() as stop:
            self.stop, stopping = stop, None  # stopping: the signal every rank agreed to stop on
            agree = collectives.StepAgreement(self.device)  # no host sync: every rank reads it a step late
            task = bar.add_task("train", total=self.total_steps, completed=self.step, eta="-", **fields)
            while self.step < self.total_steps and stopping is None and not self.early_stopping.stopped:
                lr = self._set_lr()
                completed_epochs = self.train_loader.completed_epochs
                step_loss = self._forward_backward([next(batches) for _ in range(t.grad_accum_steps)])
                step_loss, stopping = agree(step_loss, stop.received)  # mean over ranks; any stop
                self._count_epoch(step_loss, completed_epochs)
                logging_step = (self.step + 1) % t.log_every == 0 or self.step + 1 == self.total_steps
                grad_norm = self.precision.step(self.optimizer, self.params, t.grad_clip, want_norm=logging_step)
                self.divergence.observe(self.step + 1, step_loss, grad_norm)
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                clock.step(self.tokens_per_step)
                self.profiler.step()
                if self._reads_weights(logging_step) and self.divergence.found() is not None:
                    self._roll_back()
                    batches = iter(self.train_loader)
                    continue
                if logging_step:
                    train_loss = step_loss.item()
                    fields = self._log_step(train_loss, lr, float(strategies.full_value(grad_norm)), clock.rate(),
                                            eta.text(self.step))
                elif note := eta.first_step_note(self.step):  # a slow run's first log line may be far away
                    log.info("%s", note)
                self._evaluate_save_sample(clock)
                bar.update(task, completed=self.step, eta=eta.text(self.step), **fields)
            if stopping is not None and self.step < self.total_steps:
                return self._stopped(stopping, time.perf_counter() - start)
            self._finish(clock, finished)
        return self._result(train_loss, start, clock, finished)

    def _set_lr(self) -> float:
        """The schedule's learning rate for this step (scaled down after a divergence rollback), set in place."""
        peak = self.cfg.optimizer.lr * self.divergence.lr_factor
        lr = lr_at(self.step, self.schedule_steps, peak, self.cfg.scheduler)
        set_lr(self.optimizer, lr)
        return lr

    def _forward_backward(self, loaded: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The gradients of one optimizer step, accumulated over the loaded batches' micro-batches (halved after
        an out-of-memory error); returns the step's mean loss, on the device."""
        accumulate = lambda micro: accumulate_gradients(self.forward, micro, self.device, self.precision.autocast,
                                                        self.precision.backward, self.parallel.sync_gradients)
        return self.micro.run(accumulate, loaded, self.optimizer, self.step)

    def _count_epoch(self, step_loss: torch.Tensor, completed_epochs: int) -> None:
        """Add the step's loss to the epoch's; when the loader finished an epoch, log its average loss."""
        self.epoch_loss, self.epoch_steps = self.epoch_loss + step_loss, self.epoch_steps + 1
        if self.train_loader.completed_epochs > completed_epochs:
            avg = (self.epoch_loss / self.epoch_steps).item()
            if not self.cfg.trainer.overfit_batches:  # repeated batches: each "epoch" is a step or two, no news
                log.info("Epoch %d complete. Average loss: %.4f", completed_epochs, avg)
                self.metrics.write({"step": self.step + 1, "epoch": completed_epochs, "epoch_avg_loss": avg})
            self.epoch_loss, self.epoch_steps = torch.zeros((), device=self.device), 0

    def _evaluate_save_sample(self, clock: RunClock) -> None:
        """What falls due at this step; not training time, so each is timed as its own phase."""
        t, s = self.cfg.trainer, self.step
        if s % t.eval_every == 0 and s < self.total_steps:
            with clock.phase("eval"):
                self._record_eval(screen=True)
        if t.save_every and s % t.save_every == 0 and s < self.total_steps:
            with clock.phase("save"):
                folder = self._save()
                if t.resume_check:  # debug=fast: resume from it now, as trainer.resume would
                    self._restore(check_resume(folder, self.model, self.optimizer, self.train_loader,
                                               self.world.rank).state)
        if t.sample_every and s % t.sample_every == 0:
            with clock.phase("sample"):
                self._record_samples()

    def _finish(self, clock: RunClock, finished: bool) -> None:
        """At the last step: a final evaluation, final/ weights and the last step checkpoint."""
        if finished:
            log.info("This run finished at step %d already: nothing left to train", self.step)
            return
        if not self.early_stopping.stopped:  # an early stop has just evaluated this step
            with clock.phase("eval"):
                self._record_eval()
        with clock.phase("save"):
            self.checkpoints.save_final(self.model)
            self._save()  # last: a checkpoint at the final step means the whole run is done

    def _result(self, train_loss: float, start: float, clock: RunClock, finished: bool) -> TrainResult:
        self.metrics.close()
        self.profiler.close()
        result = TrainResult(self.step, self.step * self.tokens_per_step, train_loss, self.val_loss,
                             time.perf_counter() - start, self.checkpoints.root / "final",
                             best_val_loss=self.best_val_loss)
        if self.world.main:
            rate = clock.overall_rate()  # settled training steps only: no compilation, eval, save or sampling
            if finished:  # nothing trained in this process: the figures the run logged when it trained
                result.train_loss, rate = recorded_figures(self.metrics.path)
            self._summarize(result, clock, rate)
        return result

    @torch.no_grad()
    def evaluate(self, n_batches: int | None = None) -> float | None:
        """Mean loss over the fixed validation batches (the first n_batches of them; None: all), each rank scoring
        its rows of every batch; None when a stop signal cut the pass short."""
        self.model.eval()
        total = torch.zeros(2, device=self.device)  # (loss summed over rows, rows)
        for i in range(n_batches or len(self.val_batches)):
            if self.stop is not None and self.stop.received and not collectives.active():  # ranks stop together
                self.model.train()
                return None
            for x, y in self.micro.split([self.val_batches[i]]):  # what fits with gradients fits without
                x, y = x.to(self.device), y.to(self.device)
                with self.precision.autocast():
                    loss = self.forward(x, y).float()
                total += torch.stack([loss * x.shape[0], torch.tensor(float(x.shape[0]), device=self.device)])
        self.model.train()
        total = collectives.sum_across(total)  # each rank scored its own rows
        return (total[0] / total[1]).item()

    def _record_eval(self, screen: bool = False) -> None:
        """A validation pass, logged and recorded; with `screen` and trainer.eval_screen_batches, the whole pass
        only when the first batches read within trainer.eval_screen_margin of trainer.target_val_loss."""
        t = self.cfg.trainer
        if screen and t.eval_screen_batches:
            screened = self.evaluate(t.eval_screen_batches)
            if screened is None:
                return
            self.metrics.write({"step": self.step, "val_screen_loss": screened})
            if screened > t.target_val_loss + t.eval_screen_margin:
                log.info("Step %d, validation loss on %d of %d batches: %.4f (the whole pass runs once this is at "
                         "most %.4f)", self.step, t.eval_screen_batches, len(self.val_batches), screened,
                         t.target_val_loss + t.eval_screen_margin)
                return
        val_loss = self.evaluate()
        if val_loss is None:
            return
        self.val_loss = val_loss
        self.metrics.write({"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
        log.info("Step %d, validation loss: %.4f, perplexity: %.2f", self.step, val_loss, math.exp(min(val_loss, 50)))
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            self.checkpoints.save_best(self.model, self.step, val_loss)
        if self.step < self.total_steps and self.early_stopping.observe(self.step, val_loss):
            self.metrics.write(self.early_stopping.record(self.step))

    def _save(self) -> Path:
        """A step checkpoint of everything a resume needs, the loop's own counters included."""
        state = {"step": self.step, "total_steps": self.total_steps, "schedule_steps": self.schedule_steps,
                 "epoch": self.train_loader.state.epoch,
                 "tokens": self.step * self.tokens_per_step, "epoch_loss_sum": self.epoch_loss.item(),
                 "epoch_steps": self.epoch_steps, "val_loss": _finite_or_none(self.val_loss),
                 "best_val_loss": _finite_or_none(self.best_val_loss), "precision": self.precision.state_dict(),
                 **self.divergence.state_dict(), **self.early_stopping.state_dict()}
        folder = self.checkpoints.save(self.model, self.optimizer, self.train_loader, state)
        self.saved = (self.step, folder)
        return folder

    def _restore(self, state: dict) -> None:
        """The loop's counters from a checkpoint. The LR schedule keeps the length it was planned with when the run
        started (older checkpoints: their run's length), whatever trainer.max_steps or epochs say now."""
        self.schedule_steps = state.get("schedule_steps", state.get("total_steps", self.total_steps))
        self.step, self.epoch_steps = state["step"], state.get("epoch_steps", 0)
        self.epoch_loss = torch.tensor(state.get("epoch_loss_sum", 0.0), dtype=torch.float32, device=self.device)
        self.val_loss = float("nan") if state.get("val_loss") is None else state["val_loss"]
        self.best_val_loss = float("inf") if state.get("best_val_loss") is None else state["best_val_loss"]
        self.precision.load_state_dict(state.get("precision"))  # fp16's loss scale and skipped-step count
        self.early_stopping.load_state_dict(state)

    def _warn_if_length_changed(self) -> None:
        """A resume that lengthens or shortens the run: say what the kept schedule means for the LR."""
        planned, now = self.schedule_steps, self.total_steps
        if planned == now or not self.world.main:
            return
        end_lr = lr_at(planned - 1, planned, self.cfg.optimizer.lr, self.cfg.scheduler)
        at_end = lr_at(now - 1, planned, self.cfg.optimizer.lr, self.cfg.scheduler)
        what = (f"steps {max(planned, self.step) + 1}-{now} train at its final LR, {end_lr:.2e}" if now > planned
                else f"the run ends at step {now} with the LR at {at_end:.2e}, before the schedule has decayed")
        log.warning("The run's length changed from %d to %d steps (trainer.max_steps / trainer.epochs), but its "
                    "learning-rate schedule keeps the %d steps it was planned with: %s. For a new schedule, start a "
                    "new run from these weights with model.init_from (docs/checkpoints.md#extending-a-run)",
                    planned, now, planned, what)

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
        # how long the stop took on the rank that got the signal: what a scheduler's warning time must exceed
        took = f" ({time.monotonic() - self.stop.received_at:.1f} s after the signal)" \
            if self.stop is not None and self.stop.received_at is not None else ""
        report("Stopped by %s at step %d of %d after %.1f s; %s holds all that resuming needs%s",
               received.name, self.step, self.total_steps, seconds, saved, took)
        self.metrics.close()
        self.profiler.close()
        return TrainResult(self.step, self.step * self.tokens_per_step, float("nan"), self.val_loss, seconds, saved,
                           stopped_by=received)

    def _record_samples(self) -> None:
        if not (self.world.main or self.parallel.sharded):  # FSDP2: every rank takes part in each forward
            return
        t = self.cfg.trainer
        with self.precision.autocast():
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
                 self.precision.name, ", compiled per block" if self.compilation.on else "")
        log.info("Precision %s: %s", self.precision.name, self.precision.choice.reason)
        log.info("Compilation %s: %s", "on" if self.compilation.on else "off", self.compilation.reason)
        log.info(describe(self.world, self.parallel.strategy.value, self.device))
        log.info("Run directory: %s", self.run_dir)

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
                *self.train_loader.summary_rows(), *self.micro.summary_rows(), *self.early_stopping.summary_rows(),
                ("checkpoint", str(r.checkpoint)),
                *([("tags", ", ".join(self.cfg.tags))] if self.cfg.tags else [])]
        print_table(summary_table(rows))
        if self.cfg.trainer.overfit_batches:  # debug=overfit: the verdict, in one line under the table
            passed, line = overfit_verdict(self.cfg.trainer.overfit_batches, r.steps, r.train_loss)
            (log.info if passed else log.warning)("%s", line)
