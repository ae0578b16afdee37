"""Run the command line: ``python -m seqlora_core --help``."""

import sys

from .cli import main

sys.exit(main())
