"""The CUDA paths, checked on a machine with an NVIDIA GPU, in one run.

Usage::

    python scripts/gpu_check.py --out DIR        # from the repository root, otel_stepspan importable

CI has no GPU, so the CUDA-only behaviour (GPU step timing from CUDA events, NVTX ranges, the
reference engine on ``--device cuda``) is checked here instead, and the figures are written to
``DIR/gpu_check.json`` and printed. It exits non-zero when a check fails; every check runs even
when an earlier one failed, so one run answers every question.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

results: dict[str, Any] = {}
failures: list[str] = []


def check(name: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    def run(fn: Callable[[], Any]) -> Callable[[], Any]:
        started = time.monotonic()
        try:
            results[name] = fn()
            print(f"PASS {name}: {results[name]}", flush=True)
        except Exception as exc:  # every check runs; the summary says which failed
            failures.append(name)
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(f"FAIL {name}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}", flush=True)
        print(f"     ({time.monotonic() - started:.1f} s)", flush=True)
        return fn

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-check", help="folder for gpu_check.json and the demo's files")
    parser.add_argument("--steps", type=int, default=2000, help="steps per cost measurement")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    @check("device")
    def _device():
        assert torch.cuda.is_available(), "torch sees no CUDA device"
        props = torch.cuda.get_device_properties(0)
        return {"torch": torch.__version__, "cuda": torch.version.cuda, "name": props.name}

    @check("elapsed_time sign: an event recorded after the start gives a negative offset")
    def _negative():
        first = torch.cuda.Event(enable_timing=True)
        second = torch.cuda.Event(enable_timing=True)
        first.record()
        torch.cuda._sleep(1_000_000)
        second.record()
        second.synchronize()
        forward_ms, backward_ms = first.elapsed_time(second), second.elapsed_time(first)
        assert forward_ms > 0 and backward_ms < 0, (forward_ms, backward_ms)
        return {"forward_ms": forward_ms, "backward_ms": backward_ms}

    @check("pytest -m cuda and the GPU-timing and engine tests")
    def _pytest():
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
               "tests/test_gpu_timing.py", "tests/test_engine.py", "tests/test_profiler_and_otel.py"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
        (out / "pytest.log").write_text(proc.stdout + proc.stderr)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        assert proc.returncode == 0, "\n".join(tail)
        assert " skipped" not in tail[-1], "a CUDA test skipped on a GPU: " + tail[-1]
        return tail[-1]

    @check("demo --device cuda with GPU timing and NVTX")
    def _demo():
        env = dict(os.environ, OTEL_STEPSPAN_GPU_TIMING="1", OTEL_STEPSPAN_NVTX="1")
        cmd = [sys.executable, "-m", "otel_stepspan.cli", "demo", "--device", "cuda", "--out-dir", str(out),
               "--trace-file", "trace.json.gz", "--requests", "40"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
        (out / "demo.log").write_text(proc.stdout + proc.stderr)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
        from otel_stepspan.otlp_json import iter_step_spans

        spans = list(iter_step_spans(out / "spans.jsonl"))
        timed = [s for s in spans if "forward.gpu_time_ms" in s.attributes]
        assert spans and len(timed) == len(spans), f"{len(timed)} of {len(spans)} spans have GPU times"
        by_mode: dict[str, list[float]] = {}
        gaps = []
        for s in timed:
            by_mode.setdefault(s.attributes["forward.mode"], []).append(s.attributes["forward.gpu_time_ms"])
            gaps.append(abs((s.end_ns - s.start_ns) / 1e6 - s.attributes["forward.gpu_time_ms"]))
        assert max(gaps) < 0.01, f"span duration differs from the GPU window by up to {max(gaps)} ms"
        return {
            "spans": len(spans),
            "gpu_ms_p50_by_mode": {m: round(statistics.median(v), 3) for m, v in by_mode.items()},
            "summary": proc.stdout.strip().splitlines()[-8:],
        }

    @check("CUDA event primitives, ns per call")
    def _primitives():
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2 * args.steps)]
        figures = {}
        started = time.perf_counter_ns()
        for _ in range(args.steps):
            torch.cuda.Event(enable_timing=True)
        figures["create"] = (time.perf_counter_ns() - started) / args.steps
        started = time.perf_counter_ns()
        for event in events:
            event.record()
        figures["record"] = (time.perf_counter_ns() - started) / len(events)
        torch.cuda.synchronize()
        started = time.perf_counter_ns()
        for event in events:
            event.query()
        figures["query"] = (time.perf_counter_ns() - started) / len(events)
        started = time.perf_counter_ns()
        for first, second in zip(events[::2], events[1::2]):
            first.elapsed_time(second)
        figures["elapsed_time"] = (time.perf_counter_ns() - started) / args.steps
        return {k: round(v) for k, v in figures.items()}

    @check("engine-thread cost per step, OTLP export to a receiver process: CPU vs GPU timing vs NVTX")
    def _cost():
        receiver = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "receiver_proc.py")],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        endpoint = json.loads(receiver.stdout.readline())["endpoint"]
        code = f"""
import json, os, statistics, sys, time, torch
sys.path.insert(0, {str(ROOT)!r})
from otel_stepspan import StepInfo, flush, stats, traced_forward
x = torch.ones(256, device="cuda")
info = StepInfo("decode", 8, 0, 8, 0, 8)
@traced_forward(lambda batch: info)
def forward(self, batch):
    return x.add_(1)
def bare():
    return x.add_(1)
def per_step(fn, steps):
    for _ in range(200): fn()
    torch.cuda.synchronize()
    walls, cpus = [], []
    for _ in range(5):
        wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
        for _ in range(steps): fn()
        walls.append((time.perf_counter_ns() - wall) / steps); cpus.append((time.thread_time_ns() - cpu) / steps)
        torch.cuda.synchronize()
    return statistics.median(walls), statistics.median(cpus)
out = {{}}
out["bare_wall_ns"], out["bare_cpu_ns"] = per_step(bare, {args.steps})
out["traced_wall_ns"], out["traced_cpu_ns"] = per_step(lambda: forward(None, 1), {args.steps})
flush(60)
out["stats"] = stats()
print(json.dumps(out))
"""
        figures = {}
        try:
            for name, env in (("cpu_timing", {}), ("gpu_timing", {"OTEL_STEPSPAN_GPU_TIMING": "1"}),
                              ("nvtx", {"OTEL_STEPSPAN_NVTX": "1"})):
                child_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
                child_env.update(env, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint)
                proc = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True,
                                      text=True, timeout=300)
                assert proc.returncode == 0, proc.stderr[-2000:]
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                assert result["stats"]["dropped"] == 0 and result["stats"]["exported"] >= 5 * args.steps, result
                figures[name] = {
                    "over_bare_wall_ns": round(result["traced_wall_ns"] - result["bare_wall_ns"]),
                    "over_bare_engine_thread_cpu_ns": round(result["traced_cpu_ns"] - result["bare_cpu_ns"]),
                    "bare_wall_ns": round(result["bare_wall_ns"]),
                }
        finally:
            receiver.stdin.write("quit\n")
            receiver.stdin.close()
            receiver.wait(30)
        return figures

    (out / "gpu_check.json").write_text(json.dumps({"results": results, "failures": failures}, indent=2))
    print("\nFAILED: " + ", ".join(failures) if failures else "\nall GPU checks passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
