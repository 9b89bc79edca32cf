"""A site's privacy ledger: every release of its users' data, on the site's own disk.

One ledger per site identity, never per version of its data: new interactions, new
items, other filters or another run add to the same ledger, so spent ε never goes
down. The ledger is

- locked: :meth:`PrivacyLedger.hold` takes an exclusive lock from open to the last
  write, so two processes training on one ledger both pay (the second sees the first);
- durable: every write goes to a file beside, is fsynced, swapped in atomically and the
  folder fsynced (:mod:`common.files`);
- fail-closed: a marker kept outside the ledger file remembers where the ledger is and
  how much it held; a missing, moved or rolled-back ledger is refused, not restarted;
- the source of the budget: the budget stored in the ledger is what the site enforces;
  a configuration can lower it, only :meth:`PrivacyLedger.raise_budget` (``fedenc ledger
  raise-budget``) raises it, and that is logged in the ledger.

Its ``history`` is Opacus' accountant history (``[(noise_multiplier, sample_rate,
steps), ...]``), so ε composes over every release with the same accountant as DP-SGD.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from .files import atomic_write_text
from .privacy import BudgetExhausted, History, PrivacyError, epsilon_spent

FORMAT = 2  # 1: one entry per data fingerprint (before sites owned their ledgers)


class LedgerRefused(PrivacyError):
    """The ledger cannot be trusted as it is (missing, moved, rolled back, another site's)."""


@dataclass
class PrivacyLedger:
    """What one site has released about its users, and what it may still release.

    >>> ledger = PrivacyLedger.open(None, "site-0", budget=8.0, delta=1e-5)
    >>> ledger.record([(1.0, 0.01, 100)])
    >>> 0 < ledger.epsilon() <= 8.0, ledger.rounds
    (True, 1)
    """

    site: str
    budget: float
    delta: float
    accountant: str = "rdp"
    releases: list[dict] = field(default_factory=list)  # {"kind", "history", "run", "round", "time"}
    events: list[dict] = field(default_factory=list)  # budget raises, migrations: who, when, what
    runs: dict[str, dict] = field(default_factory=dict)  # run token -> {"noise_multiplier": σ}
    rounds: int = 0  # training rounds (DP or not): a non-private shuffle differs per round
    run: str = ""  # the run this process serves (its noise multiplier is kept per run)
    path: Path | None = None
    marker: Path | None = None

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path | None,
        site: str,
        budget: float,
        delta: float,
        accountant: str = "rdp",
        marker: str | Path | None = None,
    ) -> PrivacyLedger:
        """The site's ledger at ``path`` (a fresh one if the site never released anything).

        ``budget`` and ``delta`` are the site's current policy: they can lower what the
        ledger stores, never raise it. ``marker`` (a file outside the ledger) makes the
        ledger fail closed. Read-only unless you call a writing method; use :meth:`hold`
        around a check and the release it allows.
        """
        path = Path(path) if path else None
        marker = Path(marker) if marker else None
        saved = _read(path) if path else None
        if saved is None:
            _refuse_if_marked(marker, path, site)
            ledger = cls(site, budget, delta, accountant, path=path, marker=marker)
        else:
            ledger = cls._from_saved(saved, path, site)
            ledger.marker = marker
            _refuse_if_rolled_back(ledger)
            if budget < ledger.budget:  # a lower budget in the site's configuration tightens
                ledger.budget = budget
            ledger.delta = min(ledger.delta, delta)  # a smaller δ only makes the reported ε larger
        return ledger

    @classmethod
    @contextlib.contextmanager
    def hold(cls, path, site: str, budget: float, delta: float, accountant: str = "rdp", marker=None):
        """:meth:`open` under an exclusive lock held until the block ends.

        >>> with PrivacyLedger.hold(None, "site-0", 8.0, 1e-5) as ledger:
        ...     ledger.check(1.0, 0.01, 100) <= 8.0
        True
        """
        if path is None:
            yield cls.open(None, site, budget, delta, accountant, marker)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also on a crash
            yield cls.open(path, site, budget, delta, accountant, marker)

    @classmethod
    def read(cls, path: str | Path) -> PrivacyLedger:
        """The ledger at ``path`` as it stands, for people (``fedenc ledger show``).

        Example::

            PrivacyLedger.read("site-ledger.json").epsilon()
        """
        path = Path(path)
        saved = _read(path)
        if saved is None:
            raise PrivacyError(f"privacy ledger {path} does not exist")
        site = saved.get("site") if saved.get("format") == FORMAT else path.stem
        return cls._from_saved(saved, path, site)

    def summary(self) -> dict:
        """What ``fedenc ledger show --json`` prints: spent ε in all and per kind of release."""
        return {
            "site": self.site, "epsilon": self.epsilon(), "delta": self.delta, "budget": self.budget,
            "accountant": self.accountant, "epsilon_by_kind": self.epsilon_by_kind(),
            "releases": len(self.releases), "rounds": self.rounds, "runs": len(self.runs), "events": self.events,
            "path": str(self.path) if self.path else None,
        }  # fmt: skip

    @classmethod
    def from_state(cls, state: dict, site: str) -> PrivacyLedger:
        """A ledger from :meth:`state` (kept in Flower's ``context.state`` when no path is set)."""
        return cls._from_saved(state, None, site)

    @classmethod
    def _from_saved(cls, saved: dict, path: Path | None, site: str) -> PrivacyLedger:
        if saved.get("format") != FORMAT:
            saved = _migrate(saved, site)
        if saved["site"] != site:
            raise LedgerRefused(f"privacy ledger {path} belongs to {saved['site']!r}, not to {site!r}")
        return cls(
            site,
            float(saved["budget"]),
            float(saved["delta"]),
            saved["accountant"],
            [r | {"history": [tuple(h) for h in r["history"]]} for r in saved["releases"]],
            list(saved["events"]),
            dict(saved["runs"]),
            int(saved["rounds"]),
            path=path,
        )

    # -- what was spent --------------------------------------------------------------------

    @property
    def history(self) -> History:
        """Every release, as one accountant history (neighbouring equal steps merged)."""
        return _merge([h for r in self.releases for h in r["history"]])

    def epsilon(self, extra: History = ()) -> float:
        """ε spent so far (plus ``extra``), at the ledger's δ."""
        # Merged exactly as the stored history, so check() and the recorded ε agree to the bit
        # (v·33 + v·11 and v·44 can differ in the last place, enough to refuse a round at the budget).
        return epsilon_spent(_merge(self.history + _entries(extra)), self.delta, self.accountant)

    def epsilon_by_kind(self) -> dict[str, float]:
        """ε of each kind of release on its own (they compose to :meth:`epsilon`, not by sum)."""
        kinds = dict.fromkeys(r["kind"] for r in self.releases)
        of_kind = {k: _merge([h for r in self.releases if r["kind"] == k for h in r["history"]]) for k in kinds}
        return {k: epsilon_spent(history, self.delta, self.accountant) for k, history in of_kind.items()}

    @property
    def noise_multiplier(self) -> float | None:
        """The DP-SGD noise multiplier calibrated for this run (kept across its rounds)."""
        return self.runs.get(self.run, {}).get("noise_multiplier")

    @noise_multiplier.setter
    def noise_multiplier(self, sigma: float) -> None:
        self.runs.setdefault(self.run, {})["noise_multiplier"] = float(sigma)

    # -- spending --------------------------------------------------------------------------

    def check(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε after the proposed release; raises :class:`BudgetExhausted` if over budget."""
        return self._check([(noise_multiplier, sample_rate, steps)])

    def _check(self, history: History) -> float:
        after = self.epsilon(history)
        if after > self.budget:
            raise BudgetExhausted(
                f"site budget ε={self.budget:g} reached: spent {self.epsilon():.4g}, "
                f"the next release would make it {after:.4g}"
            )
        return after

    def charge(self, kind: str, history: History, round: int | None = None) -> None:
        """Append one release (checked against the budget first) and persist it."""
        self._check(history)
        self.releases.append(
            {"kind": kind, "history": _entries(history), "run": self.run, "round": round, "time": _now()}
        )
        self.save()

    def record(self, history: History, round: int | None = None) -> None:
        """A DP-SGD training round: its accountant history, charged and persisted."""
        self._check(history)
        self.rounds += 1
        self.charge("dp-sgd", history, round)

    def count_round(self) -> None:
        """A round trained without DP: nothing spent, but the next round must draw other batches."""
        self.rounds += 1
        self.save()

    def raise_budget(self, new_budget: float, reason: str = "") -> None:
        """Raise the stored budget: a deliberate act of the site, logged in the ledger.

        >>> ledger = PrivacyLedger.open(None, "site-0", budget=8.0, delta=1e-5)
        >>> ledger.raise_budget(16.0, "board decision 2026-11"); ledger.budget
        16.0
        """
        if not (new_budget > self.budget and math.isfinite(new_budget)):
            raise PrivacyError(f"the new budget must be finite and above the current one ({self.budget:g}), got {new_budget:g}")
        event = {"kind": "budget", "from": self.budget, "to": float(new_budget), "reason": reason, "by": _who(), "time": _now()}
        self.events.append(event)
        self.budget = float(new_budget)
        self.save()

    # -- persistence -----------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "format": FORMAT,
            "site": self.site,
            "budget": self.budget,
            "delta": self.delta,
            "accountant": self.accountant,
            "epsilon": self.epsilon(),  # for people reading the file; recomputed from history on load
            "history": [list(h) for h in self.history],  # what Opacus' accountants take
            "rounds": self.rounds,
            "releases": [r | {"history": [list(h) for h in r["history"]]} for r in self.releases],
            "events": self.events,
            "runs": self.runs,
        }

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.state(), indent=1))
        if self.marker is not None:
            mark = {"site": self.site, "ledger": str(self.path.resolve()), "releases": len(self.releases),
                    "epsilon": self.epsilon()}
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.marker, json.dumps(mark, indent=1))


def _refuse_if_marked(marker: Path | None, path: Path | None, site: str) -> None:
    """No ledger file: fine for a site that never released anything, refused for one that did."""
    if marker is None or not marker.exists():
        return
    mark = json.loads(marker.read_text())
    raise LedgerRefused(
        f"{site} has released {mark['releases']} time(s) (ε {mark['epsilon']:.4g}) into the ledger "
        f"{mark['ledger']}, but {path} does not exist; restore that ledger or point ledger-path at it. "
        f"To start over deliberately, delete the marker {marker} (see README, 'Privacy ledger')"
    )


def _refuse_if_rolled_back(ledger: PrivacyLedger) -> None:
    if ledger.marker is None or not ledger.marker.exists():
        return
    mark = json.loads(ledger.marker.read_text())
    if len(ledger.releases) < mark["releases"] or ledger.epsilon() < mark["epsilon"] - 1e-9:
        raise LedgerRefused(
            f"privacy ledger {ledger.path} holds {len(ledger.releases)} release(s) (ε {ledger.epsilon():.4g}) but "
            f"{ledger.site} had already made {mark['releases']} (ε {mark['epsilon']:.4g}): an older copy; refusing"
        )


def _migrate(saved: dict, site: str) -> dict:
    """A format-1 file (one entry per data fingerprint) becomes one site ledger holding all of
    its entries: whatever was spent on any version of the data was spent on these people."""
    entries = [e for e in saved.values() if isinstance(e, dict) and "history" in e]
    if not entries:
        raise PrivacyError(f"privacy ledger: unknown format {saved.get('format')!r}")
    return {
        "format": FORMAT,
        "site": site,
        "budget": min(float(e.get("budget", math.inf)) for e in entries),
        "delta": min(float(e["delta"]) for e in entries),
        "accountant": entries[0]["accountant"],
        "rounds": sum(int(e["rounds"]) for e in entries),
        "releases": [{"kind": "migrated", "history": e["history"], "run": "", "round": None, "time": ""} for e in entries],
        "events": [{"kind": "migrated", "from_entries": len(entries), "by": _who(), "time": _now()}],
        "runs": {},
    }


def _read(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PrivacyError(f"privacy ledger {path} is corrupt ({err}); refusing to guess what was spent") from None


def _entries(history) -> History:
    return [(float(s), float(q), int(n)) for s, q, n in history]


def _merge(history: History) -> History:
    """Join neighbouring entries with equal (σ, q), as Opacus' own accountant does."""
    out: History = []
    for s, q, n in history:
        if out and out[-1][0] == s and out[-1][1] == q:
            out[-1] = (s, q, out[-1][2] + n)
        else:
            out.append((s, q, n))
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"
