"""``python -m ddkit`` (and ``torchrun -m ddkit``): the same entry point as the ``ddkit`` command."""
import sys

from .cli import console_main

sys.exit(console_main())
