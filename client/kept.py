"""The update a site sent for a round, kept so that the round is paid once.

After a crash or a ``--resume`` the server asks for a round again. Training it again
would spend budget twice for one model; sending the kept reply again is free (it is the
same release). The reply is kept at the site, beside its ledger's marker, with the same
protection as the site's data, and only after the round was charged to the ledger:
a crash in between makes the site pay twice (safe), never release without paying.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.files import atomic_write


class KeptReplies:
    """One file per run token: the last round this site trained for that run.

    >>> import tempfile
    >>> kept = KeptReplies(Path(tempfile.mkdtemp()))
    >>> kept.put("run-a", 3, {"w": np.ones(2)}, {"steps": 10})
    >>> kept.get("run-a", 3)[1], kept.get("run-a", 4)
    ({'steps': 10}, None)
    """

    def __init__(self, folder: Path | None):
        self.folder = folder

    def _path(self, token: str) -> Path:
        safe = "".join(c for c in token if c.isalnum() or c in "-_")[:64]
        return self.folder / f"{safe}.npz"

    def get(self, token: str, run_round: int) -> tuple[dict[str, np.ndarray], dict] | None:
        """(state, metrics) kept for ``run_round`` of run ``token``, or None."""
        if self.folder is None or not token or not self._path(token).exists():
            return None
        with np.load(self._path(token)) as z:
            meta = json.loads(str(z["__meta__"]))
            if meta["round"] != run_round:
                return None
            return {k: z[k] for k in z.files if k != "__meta__"}, meta["metrics"]

    def put(self, token: str, run_round: int, state: dict[str, np.ndarray], metrics: dict) -> None:
        """Keep this round's reply (replacing the run's previous round atomically)."""
        if self.folder is None or not token:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = np.array(json.dumps({"round": run_round, "metrics": metrics}))

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                np.savez(f, __meta__=meta, **state)

        atomic_write(self._path(token), write)
