"""``python -m ddp_train``."""

import sys

from ddp_train.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m ddp_train"))
