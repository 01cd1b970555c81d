"""`lmtrain eval`: loss, perplexity and bits per byte of a trained model on a data split, also as JSON."""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lmtrain.config import DataConfig, EvalConfig, register_configs, to_config
from lmtrain.errors import CheckpointError, DataError, reports_user_errors
from lmtrain.hf.hub import hub_repo, is_hub_id

register_configs("eval")
log = logging.getLogger(__name__)


def checkpoint_data(config: dict) -> DataConfig:
    """The data a checkpoint was trained on; the token cache is today's (LMTRAIN_CACHE), not the run's."""
    data = {k: v for k, v in config.get("data", {}).items() if k != "cache_dir"}
    if not data:
        raise CheckpointError("the checkpoint's config.json names no training data: give data=NAME")
    return to_config(data, DataConfig)


def results_file(ev: EvalConfig, checkpoint: Path) -> Path:
    """`out`, else a file beside the weights it describes: eval_<split>.json in the checkpoint folder
    (eval_<data>_<split>.json for data other than the checkpoint's own); for hf:<repo id>, whose folder is the
    hub's cache, eval_<repo>_<data>_<split>.json in the working directory."""
    if ev.out is not None:
        return Path(ev.out).expanduser()
    name = f"{'' if ev.data is None else ev.data.name + '_'}{ev.split.value}.json"
    if is_hub_id(ev.checkpoint):
        return Path(f"eval_{hub_repo(ev.checkpoint).replace('/', '_')}_{name}")
    return checkpoint / f"eval_{name}"


@hydra.main(version_base="1.3", config_path="pkg://lmtrain.configs", config_name="eval")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    ev = to_config(cfg, EvalConfig)

    from lmtrain.console import count_bar, err_console, quiet_libraries, wants_progress_bar
    from lmtrain.data.prepare import prepare_data
    from lmtrain.data.sources import source_texts
    from lmtrain.distributed.world import pick_device
    from lmtrain.files import write_json
    from lmtrain.model.evaluation import check_no_unknown, evaluate_shards, first_tokens, windows
    from lmtrain.runs.trained import load_trained
    from lmtrain.training.precision import autocast_for, choose

    quiet_libraries()
    device = pick_device(ev.device, "device")
    trained = load_trained(ev.checkpoint, device)
    data = ev.data or checkpoint_data(trained.config)
    # the checkpoint's own tokenizer, so the tokens are the ones the model was trained on
    prepared = prepare_data(data, trained.tokenizer_config)
    shards = [s for cache in prepared.caches.values() for s in cache.shards(ev.split.value)]  # every source's
    shards = first_tokens(shards, ev.max_tokens)
    check_no_unknown(trained.tokenizer, shards, lambda: source_texts(data), f"the {ev.split.value} split of "
                     f"data={data.name}")
    scored = sum(max(0, len(s) - 1) for s in shards)
    if scored < 1:
        raise DataError(f"the {ev.split.value} split of data={data.name} has no two tokens in a row: nothing to score")
    choice = choose(ev.precision, device, "precision")
    autocast = functools.partial(autocast_for, device, choice)
    block = trained.model.cfg.block_size
    log.info("Evaluating %s on the %s split of %s: %s tokens in windows of %d", trained.path, ev.split.value,
             data.name, f"{scored:,}", block)
    start = time.perf_counter()
    with count_bar(wants_progress_bar(ev.progress, err_console)) as bar:
        task = bar.add_task("eval", total=sum(len(windows(len(s), block)) for s in shards))
        result = evaluate_shards(trained.model, trained.tokenizer, shards, ev.batch_size, autocast,
                                 on_batch=lambda n: bar.advance(task, n))
    report = {"checkpoint": str(trained.path.resolve()), "data": data.name, "split": ev.split.value,
              "tokens": result.tokens, "bytes": result.bytes, "loss": result.loss, "perplexity": result.perplexity,
              "bits_per_byte": result.bits_per_byte, "seconds": round(time.perf_counter() - start, 2)}
    out = results_file(ev, trained.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file():
        log.warning("Replacing the earlier results in %s", out)
    write_json(out, report, allow_nan=True)  # a diverged model's loss is NaN: still worth a record
    log.info("Loss %.4f, perplexity %.2f, bits per byte %.4f over %s tokens (%s bytes); written to %s",
             result.loss, result.perplexity, result.bits_per_byte, f"{result.tokens:,}", f"{result.bytes:,}", out)
