"""Train MIRAGE (``ray job submit ... -- python jobs/train.py --config paper --set ...``)."""

import sys

from mirage.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
