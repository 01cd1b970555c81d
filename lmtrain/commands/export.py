"""`lmtrain export`: a checkpoint as a folder another library loads (format=hf: Hugging Face transformers)."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from lmtrain.config import ExportConfig, register_configs, to_config
from lmtrain.errors import reports_user_errors

register_configs("export")
log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="pkg://lmtrain.configs", config_name="export")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    ex = to_config(cfg, ExportConfig)
    import torch  # imported late: --help and config errors stay fast

    from lmtrain.hf.export import export_hf, hf_architecture
    from lmtrain.runs.trained import load_trained

    trained = load_trained(ex.checkpoint, torch.device("cpu"))
    arch = hf_architecture(trained.model.cfg)  # refuses what transformers cannot compute, before any work
    out = export_hf(trained.model, trained.tokenizer, trained.path, ex.out, ex.overwrite)
    log.info("Exported %s as a transformers %s model to %s; load it with "
             "AutoModelForCausalLM.from_pretrained(%r) and AutoTokenizer.from_pretrained(%r)",
             trained.path, arch, out, str(out), str(out))
