"""``python -m otel_stepspan.cli``: the same as the ``otel-stepspan`` command."""

import sys

from .main import main

sys.exit(main())
