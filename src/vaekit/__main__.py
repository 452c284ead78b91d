"""``python -m vaekit`` (also the entry point torchrun runs: ``torchrun -m vaekit train``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
