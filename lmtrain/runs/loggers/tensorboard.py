"""TensorBoard event files through torch.utils.tensorboard: scalars, text samples, and hyperparameters with
the final figures, so the HParams tab compares a sweep's jobs."""

from __future__ import annotations

from pathlib import Path

from lmtrain.runs.loggers import METRIC_NAMES


def _hparam_value(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


class TensorBoardLogger:
    name = "TensorBoard"

    def __init__(self, log_dir: Path, hparams: dict[str, str], tags: list[str] | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.hparams = {k: _hparam_value(v) for k, v in hparams.items()}
        if tags:  # the run's tags=[...]: a text entry, and a column of the HParams tab
            self.writer.add_text("tags", ", ".join(tags), 0)
            self.hparams["tags"] = ", ".join(tags)
        self.final: dict[str, float] = {}

    def start(self, config: dict) -> None:
        pass  # the hyperparameters TensorBoard compares are the overrides, known from the start

    def log(self, record: dict) -> None:
        step = record["step"]
        for key, tag in METRIC_NAMES.items():
            if key in record and record[key] is not None:
                self.writer.add_scalar(tag, record[key], step)
        if "val_loss" in record:
            self.final["hparam/val_loss"] = record["val_loss"]
            best = self.final.get("hparam/best_val_loss", float("inf"))
            self.final["hparam/best_val_loss"] = min(best, record["val_loss"])
        if "loss" in record:
            self.final["hparam/train_loss"] = record["loss"]
        for i, text in enumerate(record.get("samples", [])):
            self.writer.add_text(f"samples/{i}", f"```\n{text}\n```", step)

    def close(self) -> None:
        if self.hparams and self.final:
            from torch.utils.tensorboard.summary import hparams

            # Written into this run's own folder (SummaryWriter.add_hparams would start a new one).
            for summary in hparams(self.hparams, self.final):
                self.writer.file_writer.add_summary(summary)
            for tag, value in self.final.items():  # the HParams tab reads each metric from its scalar
                self.writer.add_scalar(tag, value)
        self.writer.close()
