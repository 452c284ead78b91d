"""``python -m vaekit`` and the ``vaekit`` command (also the entry point torchrun runs:
``torchrun -m vaekit train``)."""

import builtins
import signal
import sys
import threading


class _HeldDuringImports:
    """Ctrl-C held back while the main thread imports a module, and raised where the
    outermost import returns. An interrupt in the middle of an import can leave a half-made
    module behind (one that a C extension's set-up swallowed), which fails later with an
    unrelated error: a Ctrl-C while ``vaekit train`` loaded scikit-learn for the digits
    ended now and then in an AttributeError or RecursionError traceback, status 1. A
    second Ctrl-C during the same import goes through at once. Only the command's process
    is concerned: ``builtins.__import__`` and the SIGINT handler are put back on leaving."""

    def __init__(self) -> None:
        self.depth, self.pending = 0, False
        self.main = threading.get_ident()
        self.real = builtins.__import__

    def importing(self, *args, **kwargs):
        if threading.get_ident() != self.main:
            return self.real(*args, **kwargs)
        self.depth += 1
        try:
            return self.real(*args, **kwargs)
        finally:
            self.depth -= 1
            if not self.depth and self.pending:
                self.pending = False
                raise KeyboardInterrupt

    def handle(self, signum, frame) -> None:
        if self.depth and not self.pending:
            self.pending = True
            return
        self.pending = False
        raise KeyboardInterrupt

    def __enter__(self):
        if threading.get_ident() == threading.main_thread().ident:
            self.old = signal.signal(signal.SIGINT, self.handle)
            builtins.__import__ = self.hook = self.importing
        return self

    def __exit__(self, *exc) -> None:
        hook = getattr(self, "hook", None)
        if hook is not None:
            if builtins.__import__ is hook:
                builtins.__import__ = self.real
            signal.signal(signal.SIGINT, self.old)


def run() -> int:
    """:func:`vaekit.cli.main`, with a Ctrl-C while PyTorch is still being imported (the
    first second or two) answered as main answers one: a line and status 130, no traceback;
    and none let into the middle of an import (:class:`_HeldDuringImports`)."""
    with _HeldDuringImports():
        try:
            from .cli import main
        except KeyboardInterrupt:
            print("vaekit: interrupted", file=sys.stderr)
            return 130
        return main()


if __name__ == "__main__":
    sys.exit(run())
