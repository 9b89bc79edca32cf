"""Use a finished run: load its global model once, then recommend for any histories, or rank
the held-out items of the run's own users.

Thin over central evaluation, so that this API and ``summary.json`` cannot disagree: the
model is built from the run's own settings the way the server builds it and ``adapter/`` is
restored into it (PEFT adapter, head, item bank and popularity prior:
:func:`common.adapter.load_adapter`); histories become rows through
:func:`common.examples.evaluation_rows`, scores come from ``Recommender.score_all``, and
held-out ranks and metrics from :class:`common.evaluation.CentralEvaluator` itself.

Example::

    run = load_run("runs/default")
    top = run.recommend([["The Matrix (1999)", "Inception (2010)"]], k=3)[0]
    [(r.title, round(r.score, 2)) for r in top]
    # [('Interstellar (2014)', 3.12), ('The Dark Knight (2008)', 3.05), ('Memento (2000)', 2.9)]
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from .adapter import HEAD_FILE, SETTINGS_FILE, load_adapter, trainable_state
from .config import KEYS, ConfigError, Settings
from .data import DataError, Interactions, Split
from .encoder import ModelError
from .evaluation import CentralEvaluator
from .examples import evaluation_rows
from .model import Recommender
from .site import dataset
from .text import ITEM_SEP
from .training import as_batch, rank_of_targets, resolve_device, with_lower_states


class RunError(ValueError):
    """A folder that holds no finished run with a model, or a model that cannot be restored."""


class UnknownItems(RunError):
    """History items that name no single catalogue item; ``closest`` maps each to candidates."""

    def __init__(self, closest: dict[str, list[str]]):
        self.closest = closest
        super().__init__("; ".join(describe_unknown(q, c) for q, c in closest.items()))


def describe_unknown(query: str, closest: list[str]) -> str:
    """One line about an item that was not found, with the closest catalogue titles.

    >>> describe_unknown("Matrix", ["The Matrix (1999)"])
    "unknown item 'Matrix' (closest: The Matrix (1999))"
    """
    return f"unknown item {query!r} " + (f"(closest: {' | '.join(closest)})" if closest else "(no close title)")


class Recommendation(NamedTuple):
    item_id: str
    title: str
    score: float  # the model's score (a logit over the catalogue): higher is better


@dataclass(frozen=True)
class HeldOut:
    """Each evaluated user's held-out item and its 0-based rank among ``rankable`` items."""

    user_ids: list[str]
    item_ids: list[str]
    ranks: np.ndarray
    rankable: np.ndarray


def run_settings(values: dict, device: str = "auto") -> Settings:
    """Settings of a run from its saved key/values, on ``device``.

    Keys this version does not know cannot change how it scores and are left out; a value
    saved as ``null`` (strict JSON's non-finite float) falls back to its default, which only
    privacy and output keys can have.

    >>> run_settings({"k-core": 5, "epsilon": None, "gone-key": 1}, "cpu").train.device
    'cpu'
    """
    known = {k: v for k, v in values.items() if k in KEYS and v is not None}
    try:
        return Settings.from_config(known | {"device": device})
    except ConfigError as err:
        raise RunError(f"the run's settings: {err}") from None


class Run:
    """A finished run's global model, ready to score. Build with :func:`load_run`."""

    def __init__(self, path: Path, settings: Settings, data: Interactions, model: Recommender):
        self.path = path
        self.settings = settings
        self.data = data
        self.model = model
        self.device = resolve_device(settings.train.device)

    # -- the catalogue --------------------------------------------------------------------
    @cached_property
    def titles(self) -> tuple[str, ...]:
        """Each item's title: the first field of its text (``Title (Year) | Genres``)."""
        return tuple(text.split(ITEM_SEP)[0] for text in self.data.catalogue.texts)

    @cached_property
    def _names(self) -> dict[str, list[int]]:
        names: dict[str, list[int]] = {}
        cat = self.data.catalogue
        for i, keys in enumerate(zip(cat.item_ids, cat.texts, self.titles, strict=True)):
            for key in {k.casefold() for k in keys}:
                names.setdefault(key, []).append(i)
        return names

    @cached_property
    def _folded_titles(self) -> dict[str, str]:
        return {t.casefold(): t for t in self.titles}

    def lookup(self, items: Iterable[str]) -> tuple[list[int], dict[str, list[str]]]:
        """Catalogue indices of ``items`` (item ids, titles or whole item texts, any case), and
        for each item that names no single catalogue item the candidates: the closest titles,
        or, for a title several items share, each of them with its item id.

        Example::

            run.lookup(["the matrix (1999)", "Matrix"])  # ([1234], {'Matrix': ['The Matrix (1999)', ...]})
        """
        found, unknown = [], {}
        for query in items:
            hits = self._names.get(query.strip().casefold(), [])
            if len(hits) == 1:
                found.append(hits[0])
            elif hits:
                unknown[query] = [f"{self.data.catalogue.texts[i]} [item id {self.data.catalogue.item_ids[i]}]" for i in hits]
            else:
                unknown[query] = self.closest(query)
        return found, unknown

    def closest(self, query: str, n: int = 3) -> list[str]:
        """Up to ``n`` titles near ``query``: titles that contain it (shortest first), then
        the most similar ones (difflib).

        Example::

            run.closest("matrix")
            # ['The Matrix (1999)', 'The Matrix Reloaded (2003)', 'The Matrix Revolutions (2003)']
        """
        folded = query.strip().casefold()
        within = sorted((t for t in self._folded_titles if folded and folded in t), key=len)[:n]
        similar = difflib.get_close_matches(folded, self._folded_titles, n=n, cutoff=0.6)
        return [self._folded_titles[t] for t in dict.fromkeys(within + similar)][:n]

    def history_of(self, user_id: str) -> list[int]:
        """The whole interaction history (catalogue indices, oldest first) of one of the run's
        dataset's users."""
        try:
            u = self.data.user_ids.index(str(user_id))
        except ValueError:
            raise RunError(f"user {user_id!r} is not in the run's dataset ({self.data.name})") from None
        return [int(i) for i in self.data.sequences[u]]

    def _indices(self, histories: Sequence[Sequence[str | int]]) -> list[list[int]]:
        out, unknown = [], {}
        n = len(self.data.catalogue)
        for history in histories:
            row = []
            for item in history:
                if isinstance(item, str):
                    found, missing = self.lookup([item])
                    row += found
                    unknown |= missing
                elif 0 <= int(item) < n:
                    row.append(int(item))
                else:
                    raise RunError(f"catalogue index {item} is not in [0, {n})")
            out.append(row)
        if unknown:
            raise UnknownItems(unknown)
        return out

    # -- scoring --------------------------------------------------------------------------
    @torch.no_grad()
    def scores(self, histories: Sequence[Sequence[int]], batch_size: int = 256) -> Iterable[torch.Tensor]:
        """Scores over the whole catalogue, one (B, N) tensor per batch of histories
        (catalogue indices, oldest first): the rows and the scoring central evaluation uses."""
        n = len(histories)
        split = Split(
            train=tuple(np.asarray(h, dtype=np.int64) for h in histories),
            valid=np.zeros(n, dtype=np.int64),  # no held-out item: the row's target is unused
            test=np.zeros(n, dtype=np.int64),
            num_items=len(self.data.catalogue),
        )
        m = self.settings.model
        rows = evaluation_rows(self.data.catalogue, split, range(n), self.model.tokenizer, m.max_tokens, m.max_history, "valid")
        self.model.eval()
        for tensors in DataLoader(with_lower_states(self.model, rows.dataset), batch_size=batch_size):
            yield self.model.score_all(as_batch(tensors, self.device))

    def recommend(
        self, histories: Sequence[Sequence[str | int]], k: int = 10, batch_size: int = 256
    ) -> list[list[Recommendation]]:
        """The top ``k`` catalogue items for each history, never an item of that history.

        A history lists items oldest first: item ids, titles or item texts (see :meth:`lookup`),
        or catalogue indices. Raises :class:`UnknownItems` if any item names no single item.

        Example::

            [r.title for r in run.recommend([["Toy Story (1995)"]], k=2)[0]]
            # ['Toy Story 2 (1999)', 'Monsters, Inc. (2001)']
        """
        if k < 1:
            raise RunError(f"k must be at least 1, got {k}")
        indices = self._indices(histories)
        cat = self.data.catalogue
        out, start = [], 0
        for scores in self.scores(indices, batch_size):
            for row, history in zip(scores, indices[start : start + len(scores)], strict=True):
                row[torch.as_tensor(history, dtype=torch.long, device=row.device)] = -torch.inf
                top = torch.topk(row, min(k, len(cat) - len(set(history))))
                out.append([Recommendation(cat.item_ids[i], self.titles[i], float(s))
                            for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)])
            start += len(scores)
        return out

    # -- the run's own users --------------------------------------------------------------
    @cached_property
    def evaluator(self) -> CentralEvaluator:
        """The server's central evaluation (same users, rows and ranking) over this model."""
        return CentralEvaluator(self.settings, model=self.model)

    def evaluate(self) -> dict[str, float]:
        """The ``valid/…``, ``test/…`` and ``cold/…`` metrics central evaluation gives this
        model: for a run's final model, the final line of its ``metrics.jsonl``."""
        return self.evaluator(trainable_state(self.model))

    def held_out(self, which: str = "test") -> HeldOut:
        """Rank of each evaluated user's ``which`` ("valid" or "test") item, as central
        evaluation ranks it; ``ranking_metrics(h.ranks, rankable=h.rankable)`` gives its metrics."""
        ev = self.evaluator
        ranks, _ = rank_of_targets(self.model, ev.rows[which], ev.device)
        held = ev.split.test if which == "test" else ev.split.valid
        return HeldOut([self.data.user_ids[u] for u in ev.users], [self.data.catalogue.item_ids[i] for i in held[ev.users]],
                       ranks, ev.rankable[which])


def load_run(path: str | Path, device: str = "auto") -> Run:
    """Load the global model a run left in ``path/adapter`` (with the run's data catalogue).

    ``device``: auto (cuda when present), cpu, cuda or cuda:N. Runs offline: the base
    encoder is read from where the run read it.

    Example::

        run = load_run("runs/default", device="cpu")
    """
    path = Path(path)
    adapter = path / "adapter"
    if not path.is_dir():
        raise RunError(f"{path}: no such run folder")
    if not (adapter / SETTINGS_FILE).is_file() or not (adapter / HEAD_FILE).is_file():
        raise RunError(f"{path}: no model in adapter/ (not a finished run, or a baseline without a model)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device {device}: no CUDA device on this machine (use cpu)")
    try:
        settings = run_settings(json.loads((adapter / SETTINGS_FILE).read_text()), device)
        data, _ = dataset(settings.data)
    except (json.JSONDecodeError, DataError) as err:
        raise RunError(f"{path}: {err}") from None
    head = load_file(str(adapter / HEAD_FILE))
    if head["bank"].shape[0] != len(data.catalogue):
        raise RunError(f"{path}: the model ranks {head['bank'].shape[0]} items but the run's dataset "
                       f"({data.name}) now has {len(data.catalogue)}")
    torch.manual_seed(settings.train.seed)  # as the server's model: nothing random survives the load
    try:
        model = Recommender.build(settings.model, list(data.catalogue.texts), bank=head["bank"])
        load_adapter(model, adapter)
    except (ModelError, RuntimeError, KeyError, AssertionError) as err:
        raise RunError(f"{path}: the saved model does not fit its base encoder {settings.model.model!r}: "
                       f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    model.to(resolve_device(settings.train.device)).eval()
    return Run(path, settings, data, model)
