"""``python -m lntune``: the same as the ``lntune`` command."""

import sys

from lntune.cli import main

if __name__ == "__main__":
    sys.exit(main())
