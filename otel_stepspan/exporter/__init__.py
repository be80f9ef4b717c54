"""The exporter process: step spans built, encoded and exported outside the engine process.

``wire`` (the records) and ``ring`` (the shared memory they cross in) are shared with the engine side,
:mod:`otel_stepspan.sinks.otel_process`; ``spans``, ``encode``, ``transport`` and ``process`` run
only in the exporter process. Nothing here is public API.
"""
