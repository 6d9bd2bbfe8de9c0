"""`python -m experiments FILE [--resume RUN_DIR]`: same as `sagellm experiment run`."""

import sys

from sagellm.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "run", *sys.argv[1:]]))
