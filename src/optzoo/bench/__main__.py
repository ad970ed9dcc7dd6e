"""``python -m optzoo.bench``: see :mod:`optzoo.bench`."""
import sys

from . import main

sys.exit(main())
