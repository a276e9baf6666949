"""`python -m neoxfuse ARGS`: the neoxfuse command (neoxfuse.cli)."""

import sys

from neoxfuse.cli import main

sys.exit(main())
