"""sglang 0.5.23's own classes, for the paths a CPU cannot run end to end.

Speculative decoding (EAGLE verify, DSpark/DFlash ragged verify, draft runners, draft CUDA-graph
replays), DP attention's decode-to-extend conversion, SPLIT_PREFILL and DLLM_EXTEND need GPUs,
several ranks or models this machine does not have. Here the instrumentor is installed as a user
would, and sglang's real ``ModelRunner.forward``, ``ScheduleBatch.convert_decode_to_extend`` and
``EAGLEDraftCudaGraphRunner.execute`` (and multi-layer EAGLE's range around its draft replays) run on real ``ForwardBatch``/``ForwardMode``/spec inputs,
with the least state those methods touch before the model itself would run. The model never
runs: ``_forward_raw`` (and the graph's device copies) stop with a marker exception, which the
span must record and pass through unchanged.

Prints one JSON document: per case, the step spans made and the profiler ranges seen.
Run by ``tests/test_real_sglang.py`` with the sglang environment's python.
"""

import json
import sys
import warnings

warnings.simplefilter("ignore")

import torch  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

import otel_stepspan  # noqa: E402
from otel_stepspan.integrations.sglang import SGLangInstrumentor, counted_init_new  # noqa: E402

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
SGLangInstrumentor().instrument()

from sglang.srt.managers.schedule_batch import ScheduleBatch  # noqa: E402
from sglang.srt.model_executor import step_span_utils  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode  # noqa: E402
from sglang.srt.model_executor.model_runner import ModelRunner  # noqa: E402
from sglang.srt.speculative.dflash_info import DFlashVerifyInput  # noqa: E402
from sglang.srt.speculative.eagle_draft_cuda_graph_runner import EAGLEDraftCudaGraphRunner  # noqa: E402
from sglang.srt.speculative.eagle_info import EagleVerifyInput  # noqa: E402
from sglang.srt.speculative import multi_layer_eagle_worker_v2 as multi_layer_eagle  # noqa: E402
from sglang.srt.speculative.ragged_verify import RaggedVerifyLayout  # noqa: E402


class ModelWouldRunHere(Exception):
    """Raised where the model's own computation would start."""


def zeros(n):
    return torch.zeros(n, dtype=torch.int64)


def forward_batch(mode, bs, extend_lens=None, **fields):
    """A real ForwardBatch with the host-side fields sglang's init_new fills for ``mode``."""
    tokens = sum(extend_lens) if extend_lens else bs
    batch = ForwardBatch(
        forward_mode=mode,
        batch_size=bs,
        input_ids=zeros(tokens),
        req_pool_indices=zeros(bs),
        seq_lens=zeros(bs) + 16,
        out_cache_loc=zeros(tokens),
        seq_lens_sum=16 * bs,
        seq_lens_cpu=zeros(bs) + 16,
        **fields,
    )
    if extend_lens is not None:
        batch.extend_seq_lens_cpu = list(extend_lens)
        batch.extend_prefix_lens_cpu = [0] * len(extend_lens)
        batch.extend_num_tokens = tokens
    return batch


def model_runner(is_draft_worker=False):
    """A real ModelRunner with only what ``forward`` reads before the model runs."""
    runner = object.__new__(ModelRunner)
    runner.forward_pass_id = 0
    runner.is_draft_worker = is_draft_worker
    runner.msprobe_debugger = None
    runner.canary_manager = None
    runner.decode_cuda_graph_runner = None

    def _forward_raw(*args, **kwargs):
        raise ModelWouldRunHere()

    runner._forward_raw = _forward_raw
    return runner


def run_forward(runner, batch, **kwargs):
    try:
        runner.forward(batch, **kwargs)
    except ModelWouldRunHere:
        return "passed through"
    return "no exception"


class Req:
    """What convert_decode_to_extend touches on a request."""

    extend_end = 0

    def refresh_fill_ids(self):
        pass


def dp_converted_schedule_batch(bs):
    """A real ScheduleBatch in decode, turned into EXTEND by sglang's own conversion (what the
    DP-attention MLP sync does when a peer rank runs an extend)."""
    batch = object.__new__(ScheduleBatch)
    batch.reqs = [Req() for _ in range(bs)]
    batch.forward_mode = ForwardMode.DECODE
    batch.seq_lens_cpu = torch.arange(bs, dtype=torch.int64) + 20
    batch.encoder_swa_reset = None
    batch.decoding_reqs = None
    batch.convert_decode_to_extend()
    return batch


class Builder:
    """Stands in for the rest of ``ForwardBatch.init_new``, which needs a live model runner: the
    fields it copies from the ScheduleBatch, onto a real ForwardBatch."""

    @classmethod
    def init_new(cls, batch, model_runner):
        return forward_batch(batch.forward_mode, len(batch.reqs), list(batch.extend_lens))


def spans_of(case, action):
    exporter.clear()
    outcome = action()
    otel_stepspan.flush(10.0)
    return {
        "case": case,
        "outcome": outcome,
        "spans": [
            {"name": s.name, "attributes": dict(s.attributes), "status": s.status.status_code.name}
            for s in exporter.get_finished_spans()
        ],
    }


def profiled(action):
    """The names of the profiler ranges a call makes, sglang's detailed annotations on."""
    step_span_utils.set_detailed_annotations_enabled(True)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            action()
    finally:
        step_span_utils.set_detailed_annotations_enabled(False)
    return [e.name for e in prof.events() if e.name.startswith(("step[", "sglang["))]


def main():
    results = []
    target, draft = model_runner(), model_runner(is_draft_worker=True)

    results.append(spans_of("idle", lambda: run_forward(target, forward_batch(ForwardMode.IDLE, 4))))
    verify = EagleVerifyInput(
        draft_token=zeros(12), custom_mask=None, positions=zeros(12), retrieve_index=zeros(12),
        retrieve_next_token=zeros(12), retrieve_next_sibling=zeros(12), retrieve_cum_len=None,
        spec_steps=3, topk=1, draft_token_num=4, capture_hidden_mode=CaptureHiddenMode.FULL,
        seq_lens_sum=48, seq_lens_cpu=zeros(3) + 16,
    )
    results.append(spans_of("verify", lambda: run_forward(
        target, forward_batch(ForwardMode.TARGET_VERIFY, 3, spec_info=verify))))
    layout = RaggedVerifyLayout.from_verify_lens(verify_lens_cpu=[3, 1, 5], device=torch.device("cpu"), grid=[16])
    ragged = DFlashVerifyInput(
        draft_token=zeros(16), positions=zeros(16), draft_token_num=16, num_tokens_per_req=1,
        ragged_verify_layout=layout,
    )
    results.append(spans_of("ragged_verify", lambda: run_forward(
        target, forward_batch(ForwardMode.TARGET_VERIFY, 3, spec_info=ragged))))
    results.append(spans_of("draft_runner", lambda: run_forward(draft, forward_batch(ForwardMode.DECODE, 3))))
    for index in (0, 1):
        results.append(spans_of(f"split_prefill_{index}", lambda: run_forward(
            target, forward_batch(ForwardMode.SPLIT_PREFILL, 2, [5, 7], split_index=index), split_forward_count=1)))
    results.append(spans_of("dllm_extend", lambda: run_forward(
        target, forward_batch(ForwardMode.DLLM_EXTEND, 2, [8, 8]))))

    counting = counted_init_new(Builder.init_new)
    results.append(spans_of("dp_converted_decode", lambda: run_forward(
        target, counting.__get__(None, Builder)(dp_converted_schedule_batch(4), target))))

    def replay(graph_runner):
        try:
            graph_runner.execute(forward_batch(ForwardMode.DECODE, 3))
        except ModelWouldRunHere:
            return "passed through"
        return "no exception"

    class DeepEP:
        def replay(self):
            raise ModelWouldRunHere()

    bypass = object.__new__(EAGLEDraftCudaGraphRunner)
    bypass.model_runner, bypass.deepep_adapter = draft, DeepEP()
    results.append(spans_of("draft_graph_replay", lambda: replay(bypass)))
    owned = object.__new__(EAGLEDraftCudaGraphRunner)
    owned.model_runner, owned.deepep_adapter = model_runner(is_draft_worker=True), DeepEP()
    owned.model_runner.decode_cuda_graph_runner = owned
    results.append(spans_of("graph_replay_inside_forward", lambda: replay(owned)))

    def multi_layer_replay():
        """What multi-layer EAGLE's draft extend does around its graph replays (no
        ModelRunner.forward): ``with profile_range(build_step_span_name(forward_batch)):``."""
        batch = forward_batch(ForwardMode.DRAFT_EXTEND_V2, 3, [2, 1, 3])
        try:
            with multi_layer_eagle.profile_range(multi_layer_eagle.build_step_span_name(batch)):
                raise ModelWouldRunHere()
        except ModelWouldRunHere:
            return "passed through"
        return "no exception"

    results.append(spans_of("multi_layer_draft_replay", multi_layer_replay))

    ranges = {
        "multi_layer": profiled(multi_layer_replay),
        "decode": profiled(lambda: run_forward(target, forward_batch(ForwardMode.DECODE, 2))),
        "extend": profiled(lambda: run_forward(target, forward_batch(ForwardMode.EXTEND, 2, [5, 7]))),
    }
    json.dump({"cases": results, "ranges": ranges, "pass_id_after": target.forward_pass_id}, sys.stdout)


if __name__ == "__main__":
    main()
