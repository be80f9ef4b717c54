"""The batch the reference engine hands to its model runner, shaped like sglang's.

sglang's ``ForwardBatch`` is what the sglang integration reads. The reference engine builds the
very same shape (same field names, same CPU mirrors, the same MIXED layout) so that its step
spans go through the sglang integration unchanged and show what an sglang server would show.
Only the fields the engine needs are here; everything a forward reads lives on the device, the
``*_cpu`` mirrors are what the scheduler already knew in Python.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional

import torch


class ForwardMode(enum.IntEnum):
    """sglang's forward modes (0.5.23), by the same member names
    (``sglang.srt.model_executor.forward_batch_info``; the values shift between releases, so
    nothing may rely on them).

    The reference engine itself runs EXTEND, DECODE, MIXED and IDLE; the other members exist so
    that the names an sglang server can send are all spelled here. The predicates copy sglang's,
    including its surprise: ``is_extend()`` is true for MIXED, TARGET_VERIFY and the draft
    extend too, which is why the integration classifies by name instead.
    """

    EXTEND = enum.auto()
    DECODE = enum.auto()
    MIXED = enum.auto()
    IDLE = enum.auto()
    TARGET_VERIFY = enum.auto()
    DRAFT_EXTEND_V2 = enum.auto()
    PREBUILT = enum.auto()
    SPLIT_PREFILL = enum.auto()
    DLLM_EXTEND = enum.auto()

    def is_extend(self) -> bool:
        return self in (
            ForwardMode.EXTEND,
            ForwardMode.MIXED,
            ForwardMode.DRAFT_EXTEND_V2,
            ForwardMode.TARGET_VERIFY,
            ForwardMode.SPLIT_PREFILL,
            ForwardMode.DLLM_EXTEND,
        )

    def is_decode(self) -> bool:
        return self == ForwardMode.DECODE

    def is_mixed(self) -> bool:
        return self == ForwardMode.MIXED

    def is_idle(self) -> bool:
        return self == ForwardMode.IDLE


@dataclass
class ForwardBatch:
    """One step's inputs, field for field as sglang names them.

    ``seq_lens`` are the lengths *after* this step; ``extend_prefix_lens_cpu`` what each sequence
    had cached before it. For DECODE the extend fields are ``None``, as in sglang. For MIXED the
    running decodes come last, as length-1 extends (sglang's ``mix_with_running``).
    """

    forward_mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor
    req_pool_indices: torch.Tensor
    seq_lens: torch.Tensor
    seq_lens_cpu: torch.Tensor
    out_cache_loc: torch.Tensor
    positions: torch.Tensor
    seq_lens_sum: int = 0
    extend_num_tokens: Optional[int] = None
    extend_seq_lens: Optional[torch.Tensor] = None
    extend_prefix_lens: Optional[torch.Tensor] = None
    extend_start_loc: Optional[torch.Tensor] = None
    extend_seq_lens_cpu: Optional[list[int]] = None
    extend_prefix_lens_cpu: Optional[list[int]] = None
    spec_info: Any = None

    @property
    def device(self) -> torch.device:
        return self.input_ids.device


def idle_batch(device: torch.device) -> ForwardBatch:
    """sglang's IDLE batch: nothing to compute, every tensor empty."""
    empty = torch.empty(0, dtype=torch.int64, device=device)
    return ForwardBatch(
        forward_mode=ForwardMode.IDLE,
        batch_size=0,
        input_ids=empty,
        req_pool_indices=empty,
        seq_lens=empty,
        seq_lens_cpu=torch.empty(0, dtype=torch.int64),
        out_cache_loc=empty,
        positions=empty,
    )
