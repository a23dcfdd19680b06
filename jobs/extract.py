"""Extract backbone features into the feature store (``ray job submit ... -- python jobs/extract.py``)."""

import sys

from mirage.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
