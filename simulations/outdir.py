"""The output folder of a simulation: nothing in it is lost to a typo or a crash.

- :func:`check_out_path` refuses, before anything is written, an ``--out`` that names a
  file or a place this process cannot write;
- :func:`check_reuse` refuses to mix runs (``--resume`` or ``--overwrite`` needed) and a
  ``--resume`` without a usable checkpoint (never a silent restart at round 0);
- :class:`Replaced` moves the old run's files aside under ``--overwrite`` and removes
  them only once the new run has started (its first metrics line); a new run that fails
  before that puts the old one back. A replacement cut short (killed) is settled the
  next time the folder is used.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from common.config import ConfigError
from server.recorder import usable_checkpoint

# Every file and folder a simulation run leaves in its output folder.
RUN_FILES = ("metrics.jsonl", "summary.json", "adapter", "checkpoint", "ledgers", "flower.log", "run_config.toml",
             "prior.npy", "run.json", "failure.json", ".flwr", "MODEL_CARD.md", "report.png", "progress.jsonl")
_ASIDE = ".replaced-"  # prefix of the folder holding a run being replaced


def holds_run(out: Path) -> bool:
    return (out / "metrics.jsonl").exists() or (out / "summary.json").exists()


def check_out_path(out: Path) -> None:
    """Raise ConfigError unless ``out`` is (or can be made) a folder this process writes in.

    Example::

        check_out_path(Path("/proc/fedenc-out"))  # ConfigError: --out /proc/fedenc-out: cannot write in /proc (...)
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder")
    base = out
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"--out {out}: {base} is a file, not a folder")
    try:  # os.access would say yes to root on a read-only file system
        fd, probe = tempfile.mkstemp(prefix=".fedenc-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write in {base} ({err.strerror or err})") from None


def check_reuse(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs, and a ``--resume`` with nothing to resume from."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if holds_run(out) and not (resume or overwrite):
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    if resume and usable_checkpoint(out) is None:
        raise ConfigError(f"--resume: {out} has no usable checkpoint (no round finished); "
                          "pass --overwrite to start the run afresh")


class Replaced:
    """The previous run of ``out``, moved aside while a new one starts (``--overwrite``).

    Example::

        old = Replaced.move_aside(out)
        ...  # start the new run
        old.discard()  # it has started; or old.restore() if it never did
    """

    def __init__(self, out: Path, aside: Path):
        self.out, self.aside = out, aside

    @classmethod
    def move_aside(cls, out: Path) -> Replaced:
        aside = Path(tempfile.mkdtemp(prefix=_ASIDE, dir=out))
        for name in RUN_FILES:
            if os.path.lexists(out / name):
                os.replace(out / name, aside / name)  # same folder, same file system: a rename
        return cls(out, aside)

    def discard(self) -> None:
        """The new run has started: the old one goes, every file of it."""
        shutil.rmtree(self.aside, ignore_errors=True)

    def restore(self) -> None:
        """The new run never started: remove what it wrote and put the old run back."""
        _remove_run(self.out)
        for path in self.aside.iterdir():
            os.replace(path, self.out / path.name)
        self.aside.rmdir()


def settle(out: Path) -> None:
    """Finish a replacement that was cut short: the new run had started (it wrote a
    metrics line), so the old one goes; or it had not, so the old one comes back."""
    if not out.is_dir():
        return
    for aside in out.glob(f"{_ASIDE}*"):
        replaced = Replaced(out, aside)
        started = (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0
        replaced.discard() if started else replaced.restore()


def _remove_run(out: Path) -> None:
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
