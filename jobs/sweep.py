"""The main job: dataset and features, Tune sweep, ensemble, registry.

``python jobs/sweep.py --config demo`` (what ``make demo`` runs), or on a cluster
``ray job submit ... -- python jobs/sweep.py --config paper --set data.root=...``.
"""

import sys

from mirage.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
