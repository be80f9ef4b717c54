"""Write a tiny random-weight Llama that vLLM's CPU build can load, with no hub and no tokenizer.

Run with the vLLM environment's python: ``python tiny_model.py OUT_DIR``. The model is made
here, at test time, from a fixed seed: two layers, hidden size 64, two heads of dimension 32
(vLLM's CPU attention backend rejects a head dimension of 16), float32. The engine is then run
with ``skip_tokenizer_init=True`` and token-id prompts, so no tokenizer files are needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

VOCAB_SIZE = 512
MAX_POSITIONS = 1024


def make(out_dir: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config).to(torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


if __name__ == "__main__":
    print(make(Path(sys.argv[1])))
