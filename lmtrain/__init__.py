"""lmtrain: config-driven training of decoder-only transformer language models."""

__version__ = "0.1.0"
