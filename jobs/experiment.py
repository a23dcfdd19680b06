"""A declared experiment (Fig. 1a, 1b, 2c, 3, ...): its grid as Ray Tune trials, then its report.

``python jobs/experiment.py fig2c --config demo``, or on a cluster
``ray job submit ... -- python jobs/experiment.py fig1a --config paper --set data.root=...``.
"""

import sys

from mirage.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "run", *sys.argv[1:]]))
