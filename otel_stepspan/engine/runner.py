"""The reference engine's model runner, shaped like sglang's ``ModelRunner``.

Its ``forward`` has sglang's signature and increments ``forward_pass_id`` first thing, and the
runner carries the attributes the sglang integration reads (``is_draft_worker``, ``tp_rank``,
``pp_rank``). The step span is put on it with the sglang integration's own wrapper, so the
demo's spans are produced by exactly the code that labels a real sglang server's steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..integrations.sglang import traced_forward
from .batch import ForwardBatch
from .kv_cache import ReqToTokenPool, TokenToKVPool
from .model import ModelConfig, TinyDecoder

#: ``engine.name`` on the reference engine's step spans.
ENGINE_NAME = "otel-stepspan-reference"


@dataclass
class ModelRunnerOutput:
    """What sglang's ``ModelRunner.forward`` returns, reduced to the logits."""

    logits: torch.Tensor
    can_run_graph: bool = False


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        device: torch.device,
        *,
        kv_tokens: int,
        max_running: int,
        is_draft_worker: bool = False,
        tp_rank: int = 0,
        pp_rank: int = 0,
    ) -> None:
        self.model_config = model_config
        self.device = torch.device(device)
        self.model = TinyDecoder.seeded(model_config).to(self.device)
        self.token_to_kv_pool = TokenToKVPool(
            kv_tokens,
            model_config.num_layers,
            model_config.num_heads,
            model_config.head_dim,
            torch.float32,
            self.device,
        )
        self.req_to_token_pool = ReqToTokenPool(max_running, model_config.max_context, self.device)
        self.forward_pass_id = 0
        self.is_draft_worker = is_draft_worker
        self.tp_rank = tp_rank
        self.pp_rank = pp_rank

    def forward(
        self,
        forward_batch: ForwardBatch,
        skip_attn_backend_init: Optional[bool] = None,
        pp_proxy_tensors: Any = None,
        reinit_attn_backend: bool = False,
        split_forward_count: int = 1,
    ) -> ModelRunnerOutput:
        self.forward_pass_id += 1
        with torch.inference_mode():
            if forward_batch.forward_mode.is_idle():
                logits = torch.empty((0, self.model_config.vocab_size), device=self.device)
            else:
                logits = self.model(forward_batch, self.token_to_kv_pool, self.req_to_token_pool)
        return ModelRunnerOutput(logits)


# The step span, applied the way SGLangInstrumentor patches sglang's ModelRunner.forward.
ModelRunner.forward = traced_forward(ModelRunner.forward, engine_name=ENGINE_NAME)  # type: ignore[method-assign]
