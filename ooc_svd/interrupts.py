"""Ctrl-C and SIGTERM as exceptions in the main thread, and never lost there.

Python runs a signal's handler between two bytecodes of the main thread, wherever it is,
also inside a finalizer (an object's ``__del__``, a weakref's callback): an exception raised
there is printed as ignored and dropped, and a command would go on to its end, past a batch
scheduler's time limit. So while ``signals_as_interrupts`` holds, the handlers also record
the signal, and the loops over blocks call ``raise_if_lost`` between two blocks, which raises
it again. Outside that (the library called from a program), ``raise_if_lost`` does nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C is, so that the same cleanup runs: the
    output being written is removed, the checkpoint kept, the locks released."""


# The exception of the signal received while ``signals_as_interrupts`` holds, if any.
_received: type[KeyboardInterrupt] | None = None


def _raiser(exception: type[KeyboardInterrupt]):
    def handler(signal_number, frame) -> None:
        global _received
        _received = exception
        raise exception

    return handler


def raise_if_lost() -> None:
    """Raise again a Ctrl-C or SIGTERM already received, whose exception a finalizer may
    have dropped: its handler stopped the command if it did not."""
    if _received is not None and threading.current_thread() is threading.main_thread():
        raise _received


@contextlib.contextmanager
def signals_as_interrupts():
    """SIGINT raises KeyboardInterrupt and SIGTERM ``Terminated`` while the command runs, in
    the main thread (where Python runs signal handlers), and both are recorded for
    ``raise_if_lost``. A signal ignored when the command began (SIGINT of a job started in
    the background by a shell, ``trap '' INT``) stays ignored."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = None
    handlers = {signal.SIGINT: _raiser(KeyboardInterrupt), signal.SIGTERM: _raiser(Terminated)}
    previous = {number: signal.signal(number, handler) for number, handler in handlers.items()
                if signal.getsignal(number) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for number, handler in previous.items():
            # None: a handler not set from Python (an embedding program's), which Python
            # cannot set back; the default then
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        _received = None
