"""A GPU tensor stand-in shared by the engine adapters' tests: its shape is free to read, and any
read of its values (which on a real GPU would synchronise the device) is recorded and fails."""

from __future__ import annotations

from typing import Any

import torch

#: Every way a GPU value was touched during a test; must stay empty.
GPU_READS: list[str] = []


class GpuTensor:
    """A tensor that lives on the GPU: its shape is free to read, its values are not."""

    def __init__(self, *shape: int) -> None:
        self.shape = torch.Size(shape)
        self.device = torch.device("cuda", 0)

    def _touched(self, what: str) -> Any:
        GPU_READS.append(what)
        raise AssertionError(f"GPU value read through {what}: that would synchronise the device")

    def item(self):
        return self._touched("item()")

    def tolist(self):
        return self._touched("tolist()")

    def __int__(self):
        return self._touched("int()")

    def __index__(self):
        return self._touched("__index__")

    def __float__(self):
        return self._touched("float()")

    def __bool__(self):
        return self._touched("bool()")

    def __iter__(self):
        return self._touched("iteration")

    def __len__(self):
        return self._touched("len()")

    def sum(self, *args, **kwargs):
        return self._touched("sum()")

    def __getitem__(self, index):
        return self._touched("indexing")
