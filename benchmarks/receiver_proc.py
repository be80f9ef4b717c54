"""A real OTLP receiver in a process of its own, so its gRPC threads do not compete for the
benchmarked process's GIL.

Usage::

    python benchmarks/receiver_proc.py [--protocol grpc] [--delay 0.25]

It prints one JSON line with its endpoint, then answers commands on stdin, one per line:
``count`` prints ``{"spans": N, "all_spans": A, "requests": R, "rejected": J, "cpu_s": S}`` (N
step spans; A all spans, timeline roots included); ``wait N T`` waits until N step spans arrived
or T seconds passed, then prints the same; ``quit`` stops it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from otel_stepspan.testing.otlp_receiver import OtlpReceiver


class CountingReceiver(OtlpReceiver):
    """Keeps no request (memory stays flat); counts requests beside spans."""

    requests_total = 0

    def _accept(self, request, headers):
        verdict = super()._accept(request, headers)
        if verdict == "ok":
            with self._lock:
                self.requests_total += 1
        return verdict


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", default="grpc", choices=["grpc", "http/protobuf"])
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each export is held (a slow Collector)")
    args = parser.parse_args()
    receiver = CountingReceiver(protocol=args.protocol, delay_s=args.delay, keep_requests=False).start()

    def counts() -> str:
        with receiver._lock:
            return json.dumps(
                {
                    "spans": receiver.step_count,
                    "all_spans": receiver.span_count,
                    "requests": receiver.requests_total,
                    "rejected": receiver.rejected,
                    "cpu_s": time.process_time(),
                }
            )

    print(json.dumps({"endpoint": receiver.endpoint, "port": receiver.port}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "count":
            print(counts(), flush=True)
        elif words[0] == "wait":
            receiver.wait_for_steps(int(words[1]), float(words[2]))
            print(counts(), flush=True)
        elif words[0] == "quit":
            break
    receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
