"""``python -m mirage``: the ``mirage`` command."""

import sys

from mirage.cli import main

if __name__ == "__main__":
    sys.exit(main())
