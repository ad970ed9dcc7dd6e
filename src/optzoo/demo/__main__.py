"""``python -m optzoo.demo [options]``: the same as ``optzoo demo [options]``."""
import sys

from ..cli import main

sys.exit(main(["demo", *sys.argv[1:]]))
