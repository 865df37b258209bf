"""``python -m cellmnn``: the same command line as ``cellmnn``."""
import sys

from .cli import main

sys.exit(main())
