"""`python -m mcsmoe_fast ...`: the mcsmoe-fast command line (mcsmoe_fast/cli)."""
import sys

from .cli import main

sys.exit(main())
