"""Helpers for testing step spans end to end: a real OTLP receiver."""
