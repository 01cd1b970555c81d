"""Everything that speaks Hugging Face transformers' formats: lmtrain checkpoints written as transformers
model folders (export.py)."""

from lmtrain.hf.export import export_hf, hf_architecture

__all__ = ["export_hf", "hf_architecture"]
