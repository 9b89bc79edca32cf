"""Flower's processes, started and stopped: by the local simulation and by deployment.

Python turns SIGINT (Ctrl-C) into ``KeyboardInterrupt`` but lets SIGTERM (a scheduler's
or ``timeout``'s kill) end the process at once: no ``finally`` runs, and the SuperLink,
the simulation runtime and its Ray workers, which run in sessions of their own, are left
behind. Inside :func:`interrupt_on_signals` both signals raise :class:`Interrupted` in
the main thread instead; :func:`uninterrupted` holds them while :func:`stop_tree` runs, so
a second Ctrl-C cannot abandon the cleanup half done.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil

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


def stop_tree(*procs: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop processes we started and everything under them, all at once (one grace period,
    not one per tree: a SuperLink and the ``flwr run`` following it shut down side by side).

    Flower's SuperExec and simulation runtime start their own sessions, so a process
    group is not enough: each tree is collected while its root is still alive.
    """
    tree = []
    for proc in procs:
        try:
            root = psutil.Process(proc.pid)
            tree += [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    for proc in procs:
        proc.wait()


def flower_env(home: Path, ray_tmp: str) -> dict:
    """The environment of every Flower process we start: its home and Ray's temp folder
    where we say, runtime dependency installs and update checks off."""
    env = os.environ.copy()
    env.update(
        FLWR_HOME=str(home),
        RAY_TMPDIR=ray_tmp,
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",  # a fresh env here would pull CUDA torch
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    return env




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 60.0,
                 context: ssl.SSLContext | None = None) -> None:
    """Wait until a SuperLink answers ``url`` (its ``/health``) with 200.

    Raises ``TimeoutError`` after ``timeout`` seconds and ``ChildProcessError`` as soon as
    ``proc`` (the SuperLink we started, if any) has exited; callers add what to look at.
    """
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ChildProcessError(f"flower-superlink exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as reply:
                if reply.status == 200:
                    return
        except OSError as err:
            last = err
            time.sleep(0.3)
    raise TimeoutError(f"no SuperLink answered at {url} within {timeout:.0f}s ({last})")


def last_error(log_path: Path) -> str:
    """The most telling line of a failed run's log: a site's exception, the Flower CLI's own
    error box, else the last line naming an error.

    Example::

        last_error(Path("runs/demo/flower.log"))  # 'a site failed: ...'
    """
    lines = log_path.read_text(errors="replace").splitlines()
    client = [ln.split("Message:", 1)[1].strip().rstrip("'>") for ln in lines if "ClientAppException occurred. Message:" in ln]
    if client and client[-1]:
        return "a site failed: " + client[-1][:300]
    boxed = [i for i, ln in enumerate(lines) if "─ Error ─" in ln and i + 1 < len(lines)]  # `flwr run` refused the run
    if boxed:
        return "flwr run: " + lines[boxed[-1] + 1].strip(" │")[:300]
    for needle in ("RunFailed", "Error:", "Exception"):
        hits = [ln.strip() for ln in lines if needle in ln]
        if hits:
            return hits[-1][:300]
    return "no error line found"


def staged_app(app: Path, into: Path) -> Path:
    """A copy of the Flower app folder ``app`` in ``into`` with only what runs: its top-level
    files and its Python packages (folders with an ``__init__.py``), without caches.

    ``flwr run`` walks and resolves every file under the folder it is given before it
    filters what goes into the app bundle: with a virtual environment and run folders
    inside the project it took 4.2 s to bundle 600 KB (Flower 1.42). Returns ``into``.

    Example::

        flwr_run_folder = staged_app(Path("."), Path(tempfile.mkdtemp()))
    """
    into.mkdir(parents=True, exist_ok=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for entry in Path(app).iterdir():
        if entry.is_symlink():  # Flower leaves links out of the bundle too
            continue
        if entry.is_file():
            shutil.copy2(entry, into / entry.name)
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            shutil.copytree(entry, into / entry.name, ignore=skip, dirs_exist_ok=True)
    return into
