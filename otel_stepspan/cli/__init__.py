"""The ``otel-stepspan`` command: search and summarise step spans, run an engine instrumented.

Usage::

    otel-stepspan search --mode decode --min-duration 5ms
    otel-stepspan stats --since 15m --plot steps.png
    otel-stepspan run -- python -m sglang.launch_server --model-path ...
"""

from .main import main

__all__ = ["main"]
