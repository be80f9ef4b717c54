"""Make the tiny random-weight Llama the real-engine tests run, locally, with transformers.

No hub: the weights are random (seeded), the config is written out by hand, and sglang loads the
folder like any checkpoint. Token ids go in and come out (``skip_tokenizer_init=True``), so the
model needs no tokenizer. Usage: ``python make_model.py DIR``.
"""

import sys

VOCAB_SIZE = 512


def make_tiny_llama(path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        torch_dtype="float32",
    )
    LlamaForCausalLM(config).save_pretrained(path)


if __name__ == "__main__":
    make_tiny_llama(sys.argv[1])
