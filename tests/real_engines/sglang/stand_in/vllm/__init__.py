"""Test-only stand-in for the one vLLM binding sglang 0.5.23 imports on this machine (see
``_custom_ops``). Not vLLM: nothing else of it exists here."""
