"""``python -m qvec``: the same entry point as the ``qvec`` command."""

import sys

from .cli import main

sys.exit(main())
