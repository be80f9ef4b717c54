"""The package version, reported as the tracer scope's version."""

__version__ = "0.1.0"
