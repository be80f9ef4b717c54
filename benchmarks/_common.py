"""Shared pieces of the benchmarks: sglang-shaped batches, the baselines the issue compares
against, interleaved timing, and table printing.

Nothing here imports sglang: batches are plain objects with sglang's field names, and the
``ModelRunner.forward`` stand-ins return at once, so what is measured is the cost of the step
span itself.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))


# -- sglang-shaped batches ---------------------------------------------------------------------


# sglang 0.5.23's member names, from the reference engine (only the names matter to the adapter).
from otel_stepspan.engine.batch import ForwardMode  # noqa: E402


class ForwardBatch:
    """The fields of sglang's ``ForwardBatch`` the step span reads; CPU mirrors only."""

    def __init__(self, forward_mode, batch_size, extend_seq_lens_cpu=None, extend_num_tokens=None, spec_info=None):
        self.forward_mode = forward_mode
        self.batch_size = batch_size
        self.extend_seq_lens_cpu = extend_seq_lens_cpu
        self.extend_num_tokens = extend_num_tokens
        self.spec_info = spec_info


def traced_runner() -> Any:
    """A stand-in sglang ``ModelRunner`` whose ``forward`` returns at once, instrumented exactly as
    ``SGLangInstrumentor`` does it: what a traced step costs, and nothing else."""
    from otel_stepspan.integrations import sglang

    class Runner:
        forward_pass_id = 0

        def forward(self, forward_batch, pp_proxy_tensors=None):
            return forward_batch

    Runner.forward = sglang.traced_forward(Runner.forward)
    return Runner()


def decode_batch(bs: int) -> ForwardBatch:
    return ForwardBatch(ForwardMode.DECODE, bs)


def prefill_batch(bs: int, tokens_each: int = 512) -> ForwardBatch:
    lens = [tokens_each] * bs
    return ForwardBatch(ForwardMode.EXTEND, bs, lens, sum(lens))


def mixed_batch(bs: int) -> ForwardBatch:
    """A MIXED batch as sglang builds it: prefill chunks plus the running decodes appended as
    length-1 extends, so ``extend_seq_lens_cpu`` has ``bs`` entries."""
    prefills = max(1, bs // 8)
    lens = [256] * prefills + [1] * (bs - prefills)
    batch = ForwardBatch(ForwardMode.MIXED, bs, lens, sum(lens))
    # What sglang's scheduler knows (ScheduleBatch.decoding_reqs) and the instrumentor carries
    # onto the batch in ForwardBatch.init_new.
    from otel_stepspan.integrations.sglang import mark_decode_rows

    mark_decode_rows(batch, bs - prefills)
    return batch


def batch_cycle() -> list[ForwardBatch]:
    """A scheduler-like sequence: mostly decode at varying sizes, some prefill and mixed."""
    out: list[ForwardBatch] = []
    for i in range(16):
        out.append(decode_batch(32 + 2 * i))
    out.append(prefill_batch(4))
    out.append(mixed_batch(64))
    out.append(ForwardBatch(ForwardMode.IDLE, 0))
    return out


# -- baselines: the label formatted inline from the batch (docs/spans.md) ------------------------

_MODE = {
    "EXTEND": "prefill",
    "DECODE": "decode",
    "MIXED": "mixed",
    "IDLE": "idle",
    "TARGET_VERIFY": "verify",
    "DRAFT_EXTEND": "draft_extend",
    "DRAFT_EXTEND_V2": "draft_extend",
}


def inline_counts(fb: Any) -> tuple[str, int, int, int, int, int]:
    """(mode, bs, ext, dec, prefill_seqs, num_tokens), computed the way an engine would inline."""
    mode = _MODE.get(fb.forward_mode.name) or fb.forward_mode.name.lower()
    bs = fb.batch_size
    if mode == "decode":
        return mode, bs, 0, bs, 0, bs
    if mode == "idle":
        return mode, 0, 0, 0, 0, 0
    if mode == "mixed":
        lens = fb.extend_seq_lens_cpu
        dec = sum(1 for n in lens if n == 1)
        total = sum(lens)
        return mode, bs, total - dec, dec, len(lens) - dec, total
    toks = fb.extend_num_tokens
    return mode, bs, toks, 0, bs, toks


def inline_label(fb: Any) -> str:
    mode, bs, ext, dec, _, toks = inline_counts(fb)
    if mode == "decode":
        return f"step[decode bs={bs}]"
    if mode == "idle":
        return "step[idle]"
    if mode == "mixed":
        return f"step[mixed bs={bs} ext={ext} dec={dec}]"
    if mode == "prefill":
        return f"step[prefill bs={bs} toks={toks}]"
    return f"step[{mode} bs={bs}]"


def inline_span_args(fb: Any, pass_id: int = 1) -> tuple[str, dict]:
    """The plain-SDK baseline's name and attributes: the keys of docs/spans.md the project's spans
    carry for an sglang step (``forward.*`` with ``forward.pass_id``, ``engine.name``)."""
    mode, bs, ext, dec, pre, toks = inline_counts(fb)
    if mode == "decode":
        label = f"step[decode bs={bs}]"
    elif mode == "mixed":
        label = f"step[mixed bs={bs} ext={ext} dec={dec}]"
    else:
        label = inline_label(fb)
    return label, {
        "forward.mode": mode,
        "forward.batch_size": bs,
        "forward.extend_tokens": ext,
        "forward.decode_seqs": dec,
        "forward.prefill_seqs": pre,
        "forward.num_tokens": toks,
        "forward.label": label,
        "forward.pass_id": pass_id,
        "engine.name": "sglang",
    }


def sglang_0523_label(fb: Any) -> str:
    """sglang 0.5.23's ``build_step_span_name`` (detailed annotations off), run every step."""
    detailed = _DETAILED
    mode = fb.forward_mode
    bs = fb.batch_size
    if mode == ForwardMode.EXTEND:
        base = f"step[EXTEND bs={bs} toks={fb.extend_num_tokens or 0}"
    else:
        base = f"step[{mode.name} bs={bs}"
    if detailed:
        base = base + " ..."
    return f"{base}]"


_DETAILED = False


# -- ModelRunner stand-ins ---------------------------------------------------------------------


class BareRunner:
    """``ModelRunner.forward(self, forward_batch)`` that returns at once."""

    forward_pass_id = 0

    def forward(self, forward_batch, pp_proxy_tensors=None):
        return forward_batch


def make_off_runners() -> dict[str, Any]:
    """The off-path variants: the bare call, the two inline patterns, and the project's three
    ways in (instrumentor wrapper, decorator, context manager)."""
    import torch

    from otel_stepspan import step_span, traced_forward
    from otel_stepspan.integrations import sglang

    record_function = torch.profiler.record_function
    profiler_enabled = torch.autograd._profiler_enabled
    nullcontext = contextlib.nullcontext

    class PRRunner:
        """The PR's pattern: label formatted only when profiling."""

        forward_pass_id = 0

        def forward(self, forward_batch, pp_proxy_tensors=None):
            with record_function(inline_label(forward_batch)) if profiler_enabled() else nullcontext():
                return forward_batch

    null = nullcontext()

    def profile_range(name: str):
        if not profiler_enabled():
            return null
        return record_function(name)

    class Sglang0523Runner:
        """sglang 0.5.23: the label is built every step, then ``profile_range`` checks."""

        forward_pass_id = 0

        def forward(self, forward_batch, pp_proxy_tensors=None):
            step_span_ctx = profile_range(sglang_0523_label(forward_batch))
            with step_span_ctx:
                return forward_batch

    class InstrumentedRunner:
        forward_pass_id = 0

        def forward(self, forward_batch, pp_proxy_tensors=None):
            return forward_batch

    InstrumentedRunner.forward = sglang.traced_forward(InstrumentedRunner.forward)

    class DecoratedRunner:
        forward_pass_id = 0

        @traced_forward(sglang.describe, attributes={"engine.name": "sglang"})
        def forward(self, forward_batch, pp_proxy_tensors=None):
            return forward_batch

    describe = sglang.describe

    class ContextRunner:
        forward_pass_id = 0

        def forward(self, forward_batch, pp_proxy_tensors=None):
            with step_span(describe, forward_batch):
                return forward_batch

    return {
        "bare": BareRunner(),
        "pr_pattern": PRRunner(),
        "sglang_0523": Sglang0523Runner(),
        "instrumentor": InstrumentedRunner(),
        "decorator": DecoratedRunner(),
        "step_span": ContextRunner(),
    }


def loop_of(runner: Any, batch: Any, keyword: bool = False) -> Callable[[int], None]:
    """``n`` calls shaped like sglang's ``self.model_runner.forward(forward_batch)``."""
    repeat = itertools.repeat
    if keyword:

        def loop_kw(n: int) -> None:
            for _ in repeat(None, n):
                runner.forward(batch, pp_proxy_tensors=None)

        return loop_kw

    def loop(n: int) -> None:
        for _ in repeat(None, n):
            runner.forward(batch)

    return loop


def cycle_loop_of(runner: Any, batches: list) -> Callable[[int], None]:
    cycle = itertools.cycle(batches)

    def loop(n: int) -> None:
        for batch in itertools.islice(cycle, n):
            runner.forward(batch)

    return loop


# -- timing ------------------------------------------------------------------------------------


def interleaved(
    variants: dict[str, tuple[Callable[[int], None], int]],
    rounds: int,
    between: Optional[Callable[[], None]] = None,
) -> dict[str, dict[str, list[float]]]:
    """Run every variant once per round, in a rotating (and alternately reversed) order, and
    return per-batch means in ns/step: ``cpu`` (this thread's CPU clock: what the step costs the
    engine thread, immune to the machine's other processes preempting us) and ``wall``."""
    names = list(variants)
    out = {name: {"cpu": [], "wall": []} for name in names}
    for loop, steps in variants.values():  # warm up: lazy decisions, caches, first allocations
        loop(min(steps, 200))
        if between:
            between()
    freeze_heap()
    perf, thread = time.perf_counter_ns, time.thread_time_ns
    for r in range(rounds):
        k = r % len(names)
        order = names[k:] + names[:k]
        if r % 2:
            order.reverse()
        for name in order:
            loop, steps = variants[name]
            w0, c0 = perf(), thread()
            loop(steps)
            c1, w1 = thread(), perf()
            out[name]["cpu"].append((c1 - c0) / steps)
            out[name]["wall"].append((w1 - w0) / steps)
            if between:
                between()
    return out


def freeze_heap() -> None:
    """Move everything alive now out of the collector's reach, as long-running engines do after
    warm-up. Without it every full collection rescans the ~200,000 objects of torch's import
    (~100 ms each, a third of a span-heavy run's time) and lands in whichever batch happens to
    trigger it; the collection of what the step spans themselves allocate still counts."""
    import gc

    gc.collect()
    gc.freeze()


def summary(values: Iterable[float]) -> dict[str, float]:
    data = sorted(values)
    n = len(data)
    return {
        "median": statistics.median(data),
        "min": data[0],
        "p10": data[max(0, int(0.1 * (n - 1)))],
        "p90": data[min(n - 1, int(round(0.9 * (n - 1))))],
        "n": n,
    }


def summarize(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    return {name: {"cpu": summary(s["cpu"]), "wall": summary(s["wall"])} for name, s in samples.items()}


# -- output ------------------------------------------------------------------------------------


def fmt_ns(ns: float) -> str:
    if ns >= 10_000:
        return f"{ns / 1000:.1f} µs"
    if ns >= 1_000:
        return f"{ns / 1000:.2f} µs"
    return f"{ns:.0f} ns"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table (also readable on a terminal)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without any OTEL_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(extra)
    return env


def run_child(script: str, args: list[str], env: dict[str, str], timeout: float = 600) -> dict:
    """Run ``script`` in a fresh interpreter and return the JSON object it prints last, with
    ``stderr_lost_lines``: the loss reports on its stderr (an exporter process writes them there,
    and the run returns once it too has exited)."""
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{script} {' '.join(args)} failed (exit {proc.returncode})")
    result = json.loads(lines[-1])
    if isinstance(result, dict):
        result["stderr_lost_lines"] = [line for line in proc.stderr.splitlines() if "otel_stepspan: lost" in line]
    return result


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def machine_line() -> str:
    import platform

    try:
        import torch

        torch_v = torch.__version__
    except Exception:
        torch_v = "-"
    from importlib.metadata import version

    return (
        f"python {platform.python_version()}, torch {torch_v}, opentelemetry-sdk {version('opentelemetry-sdk')}, "
        f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}; otel_stepspan from {_package_dir()}"
    )


def _package_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("otel_stepspan")
    return os.path.dirname(spec.origin) if spec and spec.origin else "?"
