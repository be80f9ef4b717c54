"""Where a step's label goes: the torch profiler, OpenTelemetry, NVTX."""
