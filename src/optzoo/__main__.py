"""``python -m optzoo``: the ``optzoo`` command line (see :mod:`optzoo.cli`)."""
import sys

from .cli import main

sys.exit(main())
