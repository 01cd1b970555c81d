"""The transformer language model."""

from lmtrain.model.gpt import GPT

__all__ = ["GPT"]
