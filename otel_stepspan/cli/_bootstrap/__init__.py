"""Holds the ``sitecustomize.py`` that ``otel-stepspan run`` puts first on ``PYTHONPATH``.

Nothing here is imported as part of the package; the directory itself is what ``run`` uses.
"""
