"""``python -m sc_c2s``: the ``sc-c2s`` command, for environments whose scripts folder is not on the path."""

import sys

from .cli import main

sys.exit(main())
