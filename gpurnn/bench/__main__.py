"""`python -m gpurnn.bench`, the same command as `python -m gpurnn bench`."""

import sys

from gpurnn.bench.cli import main

sys.exit(main())
