"""A small decoder-only transformer with seeded random weights: the reference engine's model.

It is not meant to say anything: it is there so that every step does real tensor work whose cost
grows with the tokens and sequences of the batch, on the CPU or a GPU, the way a real model's
does. Pre-norm GPT-style blocks (LayerNorm, multi-head attention over the paged KV cache, GELU
MLP) and learned positions. Attention reads each request's keys through the request table, like
sglang's ``torch_native`` attention backend, with loop bounds from the batch's CPU mirrors.

Kept lean in *operators*, not only in FLOPs: the demo profiles every step, and each aten call is
an event in the Chrome trace (hence LayerNorm rather than a hand-written RMSNorm, and additive
masks built once per step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .batch import ForwardBatch
from .kv_cache import ReqToTokenPool, TokenToKVPool


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 512
    hidden: int = 256
    num_layers: int = 2
    num_heads: int = 4
    ffn: int = 1024
    max_context: int = 1024
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.attn_norm = nn.LayerNorm(config.hidden)
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden, bias=False)
        self.o = nn.Linear(config.hidden, config.hidden, bias=False)
        self.mlp_norm = nn.LayerNorm(config.hidden)
        self.up = nn.Linear(config.hidden, config.ffn, bias=False)
        self.down = nn.Linear(config.ffn, config.hidden, bias=False)

    def forward(self, h: torch.Tensor, step: "_StepLayout", kv: TokenToKVPool) -> torch.Tensor:
        tokens = h.shape[0]
        q, k, v = self.qkv(self.attn_norm(h)).view(tokens, 3, self.num_heads, self.head_dim).unbind(1)
        k_cache, v_cache = kv.k_buffer[self.layer_id], kv.v_buffer[self.layer_id]
        k_cache[step.out_cache_loc] = k
        v_cache[step.out_cache_loc] = v
        out = torch.empty_like(q)
        if step.single is not None:
            # Every one-token sequence (the decodes) in one padded call: [n, heads, 1, dim].
            rows, slots, mask = step.single
            q_s = q[rows].unsqueeze(2)
            k_s = k_cache[slots].transpose(1, 2)  # [n, heads, max_len, dim]
            v_s = v_cache[slots].transpose(1, 2)
            out[rows] = F.scaled_dot_product_attention(q_s, k_s, v_s, attn_mask=mask).squeeze(2)
        for start, length, slots, mask in step.chunks:
            q_i = q[start:start + length].transpose(0, 1)  # [heads, length, dim]
            k_i = k_cache[slots].transpose(0, 1)  # [heads, seq_len, dim]
            v_i = v_cache[slots].transpose(0, 1)
            out[start:start + length] = F.scaled_dot_product_attention(q_i, k_i, v_i, attn_mask=mask).transpose(0, 1)
        h = h + self.o(out.reshape(tokens, -1))
        return h + self.down(F.gelu(self.up(self.mlp_norm(h))))


class _StepLayout:
    """Per-step facts shared by every layer: where each sequence's queries and cached keys are.

    Sequences computing one token (decodes, in DECODE and MIXED steps alike) are attended in one
    padded call; each longer prompt chunk gets a call of its own with a causal mask offset by
    its cached prefix. Built from the batch's CPU mirrors, once per step.
    """

    __slots__ = ("out_cache_loc", "single", "chunks", "last_token")

    def __init__(self, batch: ForwardBatch, req_to_token: ReqToTokenPool) -> None:
        bs = batch.batch_size
        seq_lens = batch.seq_lens_cpu.tolist()
        if batch.forward_mode.is_decode():
            ext_lens = [1] * bs
        else:
            ext_lens = list(batch.extend_seq_lens_cpu or ())
        device = batch.device
        table = req_to_token.req_to_token[batch.req_pool_indices]  # [bs, max_context]
        self.out_cache_loc = batch.out_cache_loc
        self.chunks = []
        single_rows: list[int] = []
        single_seqs: list[int] = []
        last: list[int] = []
        start = 0
        for i in range(bs):
            length, seq_len = ext_lens[i], seq_lens[i]
            if length == 1:
                single_rows.append(start)
                single_seqs.append(i)
            else:
                # Query j sits at position prefix + j and sees every key up to there.
                mask = torch.full((length, seq_len), -math.inf, device=device).triu_(seq_len - length + 1)
                self.chunks.append((start, length, table[i, :seq_len], mask))
            start += length
            last.append(start - 1)
        self.single = None
        if single_rows:
            lens_cpu = torch.tensor([seq_lens[i] for i in single_seqs], dtype=torch.int64)
            max_len = int(lens_cpu.max())
            seqs = torch.tensor(single_seqs, dtype=torch.int64, device=device)
            slots = table[seqs, :max_len]  # past a sequence's end: stale slots, masked out below
            mask = torch.zeros((len(single_seqs), 1, 1, max_len))
            mask.masked_fill_(torch.arange(max_len) >= lens_cpu[:, None, None, None], -math.inf)
            self.single = (torch.tensor(single_rows, dtype=torch.int64, device=device), slots, mask.to(device))
        self.last_token = torch.tensor(last, dtype=torch.int64, device=device)


class TinyDecoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden)
        self.pos_embed = nn.Embedding(config.max_context, config.hidden)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden)
        self.lm_head = nn.Linear(config.hidden, config.vocab_size, bias=False)

    @classmethod
    def seeded(cls, config: ModelConfig) -> "TinyDecoder":
        """The model with weights drawn from ``config.seed`` only (the global RNG is left alone)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = cls(config)
            for module in model.modules():
                if isinstance(module, nn.Embedding):
                    nn.init.normal_(module.weight, std=0.5)
        return model.eval()

    def forward(self, batch: ForwardBatch, kv: TokenToKVPool, req_to_token: ReqToTokenPool) -> torch.Tensor:
        """Next-token logits of each sequence's last computed token: ``[batch_size, vocab]``."""
        step = _StepLayout(batch, req_to_token)
        h = self.embed(batch.input_ids) + self.pos_embed(batch.positions)
        for layer in self.layers:
            h = layer(h, step, kv)
        return self.lm_head(self.norm(h[step.last_token]))
