"""The transformer language model, and what is done with one: its loss, sampling text, scoring a split.

- gpt.py: `GPT` (attention, MLP, norms, RoPE, grouped-query attention, the KV cache);
- loss.py: cross-entropy in chunks, without a float32 copy of the whole logits;
- weights.py: the weights as plain tensors (tied ones once), checked for NaN;
- generation.py: the sampling loop; evaluation.py: loss, perplexity and bits per byte over a split.
"""

from lmtrain.model.gpt import GPT

__all__ = ["GPT"]
