"""Everything that speaks Hugging Face transformers' formats, in both directions:

- architectures.py: the architectures lmtrain reads and writes (GPT-2, Llama, Mistral, Qwen2), each one table
  of config keys and tensor names that import and export share;
- load.py: a transformers folder as a starting point: its config as a ModelConfig, its safetensors weights
  read tensor by tensor into lmtrain's model, its tokenizer;
- hub.py: `hf:<repo id>`, downloaded into the hub's own cache;
- export.py: lmtrain checkpoints written as transformers model folders.
"""

from lmtrain.hf.export import export_hf, hf_architecture

__all__ = ["export_hf", "hf_architecture"]
