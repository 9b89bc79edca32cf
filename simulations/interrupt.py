"""SIGTERM and SIGINT as an exception, so the code that started Flower's processes stops them.

Python turns SIGINT (Ctrl-C) into ``KeyboardInterrupt`` but lets SIGTERM (a scheduler's
or ``timeout``'s kill) end the process at once: no ``finally`` runs, and the SuperLink,
the simulation runtime and its Ray workers, which run in sessions of their own, are left
behind. Inside :func:`interrupt_on_signals` both signals raise :class:`Interrupted` in
the main thread instead; :func:`uninterrupted` holds them while that cleanup runs, so a
second Ctrl-C cannot abandon it half done.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """A SIGTERM or SIGINT arrived. A ``KeyboardInterrupt``, so ``except Exception`` lets it pass.

    >>> Interrupted(signal.SIGTERM).exit_code
    143
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


def _in_main_thread() -> bool:
    # Python runs signal handlers in the main thread only, and only it may install them.
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """While inside, SIGTERM and SIGINT raise :class:`Interrupted`; the previous handlers
    come back on the way out. Outside the main thread it changes nothing.

    >>> import os
    >>> with interrupt_on_signals():
    ...     try:
    ...         os.kill(os.getpid(), signal.SIGTERM)
    ...     except Interrupted as stop:
    ...         print(stop.exit_code)
    143
    """
    if not _in_main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold SIGTERM and SIGINT until the block is done, then raise :class:`Interrupted` for
    the first one that came (unless an exception is already on its way out).

    >>> import os
    >>> with interrupt_on_signals():
    ...     try:
    ...         with uninterrupted():
    ...             os.kill(os.getpid(), signal.SIGINT)
    ...             print("cleanup finished")
    ...     except Interrupted as stop:
    ...         print(stop.exit_code)
    cleanup finished
    130
    """
    if not _in_main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if held:
        raise Interrupted(held[0])
