"""The reference engine's KV cache, organised as sglang's: a token pool and a request table.

``TokenToKVPool`` holds keys and values for individual token slots; a request's tokens can sit in
any slots. ``ReqToTokenPool`` maps (request row, position) to the slot of that token. The free
list lives on the device like sglang's allocator, so allocating and freeing never wait for it.
"""

from __future__ import annotations

import torch


class OutOfKVCache(RuntimeError):
    """The scheduler admitted more than the cache holds (a bug: admission reserves first)."""


class TokenToKVPool:
    def __init__(
        self, size: int, num_layers: int, num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.size = size
        shape = (num_layers, size, num_heads, head_dim)
        self.k_buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.v_buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.free_slots = torch.arange(size, dtype=torch.int64, device=device)

    def available(self) -> int:
        return self.free_slots.numel()

    def alloc(self, n: int) -> torch.Tensor:
        if n > self.free_slots.numel():
            raise OutOfKVCache(f"{n} KV slots wanted, {self.free_slots.numel()} free")
        slots, self.free_slots = self.free_slots[:n], self.free_slots[n:]
        return slots

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self.free_slots = torch.cat([self.free_slots, slots])


class ReqToTokenPool:
    def __init__(self, rows: int, max_context: int, device: torch.device) -> None:
        self.req_to_token = torch.zeros((rows, max_context), dtype=torch.int64, device=device)
        self.max_context = max_context
        self._free_rows = list(range(rows))

    def available(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int:
        if not self._free_rows:
            raise OutOfKVCache("no free request row")
        return self._free_rows.pop()

    def free(self, row: int) -> None:
        self._free_rows.append(row)
