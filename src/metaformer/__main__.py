"""``python -m metaformer``: the command line (also run by ``torchrun -m metaformer train ...``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
