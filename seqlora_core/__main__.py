"""Run the command line: ``python -m seqlora_core --help``."""

import sys

from .apps.cli import main

sys.exit(main())
