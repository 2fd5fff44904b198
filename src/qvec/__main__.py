"""``python -m qvec``: the same entry point as the ``qvec`` command."""

import sys

from qvec.cli import main

sys.exit(main())
