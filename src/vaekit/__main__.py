"""``python -m vaekit`` and the ``vaekit`` command (also the entry point torchrun runs:
``torchrun -m vaekit train``)."""

import sys


def run() -> int:
    """:func:`vaekit.cli.main`, with a Ctrl-C while PyTorch is still being imported (the
    first second or two) answered as main answers one: a line and status 130, no traceback."""
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("vaekit: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
