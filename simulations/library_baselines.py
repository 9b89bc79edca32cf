"""Reference recommenders from maintained libraries, trained centrally WITHOUT privacy on
fedenc's split and scored by fedenc's evaluator: ``bpr`` and ``als`` (the ``implicit``
package) and ``sasrec`` (Cornac's SASRec). They need the optional extra
``pip install 'fedenc[baselines]'``.

Every library model is trained on the pooled training prefixes only (validation and test
items never seen in training), evaluated every few epochs on validation and test with
:func:`common.training.rank_of_targets` (the user's history excluded except the target, a
target ranked below every strictly higher score), and the summary's ``best_validation``
is the evaluated epoch with the best validation NDCG@10 — :class:`RunRecorder`'s rule for
the federated rounds, with one line per evaluated epoch (``round`` = epoch).

Example::

    summary = run_library_baseline("bpr", settings, "runs/bpr")
    summary["best_round"], summary["best_validation"]["ndcg@10"]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.config import ConfigError, Settings
from common.evaluation import CentralEvaluator
from common.training import rank_of_targets
from server.recorder import RunRecorder

EXTRA = "baselines"
# name -> (module it needs, hyper-parameters). Library defaults except where a value is set
# for ML-100K-sized data; nothing here was tuned on test.
LIBRARY_BASELINES = {
    "bpr": ("implicit", {"factors": 64, "learning_rate": 0.01, "regularization": 0.01, "epochs": 300, "every": 10}),
    "als": ("implicit", {"factors": 64, "regularization": 0.01, "alpha": 1.0, "epochs": 30, "every": 1}),
    "sasrec": ("cornac", {"embedding_dim": 64, "num_blocks": 2, "num_heads": 1, "dropout": 0.2, "max_len": 50,
                          "learning_rate": 0.001, "batch_size": 512, "n_sample": 2048, "loss": "ce",
                          "epochs": 50, "every": 5}),
}


def progress_unit(method: str) -> str:
    """What one ``metrics.jsonl`` line of ``method`` is: an ``epoch`` of a library model, else a ``round``.

    >>> progress_unit("sasrec"), progress_unit("centralized")
    ('epoch', 'round')
    """
    return "epoch" if method in LIBRARY_BASELINES else "round"


def require(name: str):
    """The library module baseline ``name`` needs, or a ConfigError naming the extra to install."""
    module = LIBRARY_BASELINES[name][0]
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"baseline {name!r} needs the {module!r} package: pip install 'fedenc[{EXTRA}]'") from None


class ScoreRows(torch.nn.Module):
    """A (users × items) score matrix with the model's ``score_all`` interface, so that the
    ranks are :func:`rank_of_targets`' own. It serves the rows in order, batch after batch;
    ``rank_of_targets`` calls ``eval()`` before its first batch, which rewinds it."""

    def __init__(self, scores: np.ndarray):
        super().__init__()
        self.scores = torch.as_tensor(np.asarray(scores, dtype=np.float64))
        self.cursor = 0

    def train(self, mode: bool = True):
        self.cursor = 0
        return super().train(mode)

    def score_all(self, batch: dict) -> torch.Tensor:
        n = batch["targets"].shape[0]
        rows = self.scores[self.cursor : self.cursor + n].clone()
        self.cursor += n
        return rows.to(batch["targets"].device)


def library_ranks(evaluator: CentralEvaluator, score) -> dict[str, tuple[np.ndarray, float]]:
    """Per split, :func:`rank_of_targets`' (ranks, loss) of ``score(users, histories) -> (U, N)``
    scores; ``histories`` are the evaluation rows' (everything before the held-out item).

    Example::

        ranks, _ = library_ranks(evaluator, lambda users, hist: np.zeros((len(users), n)))["test"]
    """
    return {which: rank_of_targets(ScoreRows(score(evaluator.users, rows.exclude)), rows, evaluator.device)
            for which, rows in evaluator.rows.items()}


def library_metrics(evaluator: CentralEvaluator, score) -> dict:
    """fedenc's valid/test/cold metrics (:meth:`CentralEvaluator.metrics`) of :func:`library_ranks`."""
    return evaluator.metrics(library_ranks(evaluator, score))


class _EpochRecorder(RunRecorder):
    """RunRecorder without checkpoints: a library model is no fedenc adapter, and a baseline
    starts afresh anyway."""

    def _checkpoint(self, rnd: int, model, state: dict) -> None:
        return None


def _open(settings: Settings, out: str | Path) -> tuple[CentralEvaluator, _EpochRecorder]:
    from simulations.baselines import _open as open_baseline

    evaluator, recorder = open_baseline(settings, out)
    return evaluator, _EpochRecorder(**vars(recorder))


def implicit_mf(name: str, settings: Settings, out: str | Path) -> dict:
    """BPR or ALS from ``implicit`` on the binary user × item matrix of the training prefixes.
    A user's factors come from training items only, for validation and test alike."""
    require(name)
    from implicit.cpu.als import AlternatingLeastSquares
    from implicit.cpu.bpr import BayesianPersonalizedRanking
    from scipy.sparse import csr_matrix

    evaluator, recorder = _open(settings, out)
    hp = LIBRARY_BASELINES[name][1]
    train = evaluator.split.train
    rows = np.repeat(np.arange(len(train)), [len(s) for s in train])
    items = np.concatenate(train)
    matrix = csr_matrix((np.ones(len(items), dtype=np.float32), (rows, items)), shape=(len(train), evaluator.split.num_items))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0  # a re-watched item is one positive, as BPR treats it
    common = {"factors": hp["factors"], "regularization": hp["regularization"], "iterations": hp["epochs"],
              "random_state": settings.run.seed, "num_threads": 1}  # one thread: reproducible updates
    if name == "bpr":
        model = BayesianPersonalizedRanking(learning_rate=hp["learning_rate"], **common)
    else:
        model = AlternatingLeastSquares(alpha=hp["alpha"], calculate_training_loss=True, **common)

    def score(users, _histories):
        return model.user_factors[users] @ model.item_factors.T

    def after_epoch(epoch, _seconds, *progress):
        if (epoch + 1) % hp["every"] == 0:
            # ALS reports its loss; BPR (correct, skipped) samples, so 1 - its training AUC stands in
            loss = progress[0] if name == "als" else 1.0 - progress[0] / max(matrix.nnz - progress[1], 1)
            recorder.round_done(epoch + 1, library_metrics(evaluator, score), {"train_loss": float(loss)}, None, {})

    model.fit(matrix, show_progress=False, callback=after_epoch)
    return recorder.finish(None, {}, {"method": name, "library": "implicit " + require(name).__version__,
                                      "hyperparameters": hp})


def _sequences(split, num_items: int):
    """Cornac's SequentialDataset of the training prefixes: one session per user, in time
    order, with fedenc's user and item indices as Cornac's (identity maps)."""
    from cornac.data import SequentialDataset

    train = split.train
    users = np.repeat(np.arange(len(train)), [len(s) for s in train])
    items = np.concatenate(train).astype(np.int64)
    ident = {u: u for u in range(len(train))}
    return SequentialDataset(num_users=len(train), num_sessions=len(train), num_items=num_items, uid_map=ident,
                             sid_map=ident, iid_map={i: i for i in range(num_items)},
                             uir_tuple=(users, items, np.ones(len(items))), session_indices=users)


def sasrec(settings: Settings, out: str | Path) -> dict:
    """Cornac's SASRec model, loss and next-item batches (one sequence per user, every prefix
    a training example, sampled negatives); the epoch loop is here so that fedenc's
    evaluator, not Cornac's, picks the epoch."""
    cornac = require("sasrec")
    from cornac.models.sasrec.sasrec import SASRecModel
    from cornac.models.seq_utils import session_seq_iter
    from cornac.models.seq_utils.losses import get_loss_function
    from cornac.utils import get_rng

    evaluator, recorder = _open(settings, out)
    hp = LIBRARY_BASELINES["sasrec"][1]
    n = evaluator.split.num_items
    torch.manual_seed(settings.run.seed)
    rng = get_rng(settings.run.seed)
    data = _sequences(evaluator.split, n)
    model = SASRecModel(item_num=n, embedding_dim=hp["embedding_dim"], maxlen=hp["max_len"], n_layers=hp["num_blocks"],
                        n_heads=hp["num_heads"], use_pos_emb=True, use_biases=False, dropout=hp["dropout"], pad_idx=n,
                        device=evaluator.device)  # the run's `device` setting: auto picks a GPU when there is one
    loss_fn = get_loss_function(hp["loss"])
    opt = torch.optim.Adam(model.parameters(), lr=hp["learning_rate"], betas=(0.9, 0.98))  # Cornac's fit uses these

    def score(_users, histories):
        seqs = np.full((len(histories), hp["max_len"]), n, dtype=np.int64)  # left-padded, most recent last
        for i, h in enumerate(histories):
            recent = h[-hp["max_len"]:]
            seqs[i, hp["max_len"] - len(recent):] = recent
        model.eval()
        out = np.concatenate([model.predict(None, torch.as_tensor(seqs[i : i + 256], device=evaluator.device)).reshape(-1, n)
                              for i in range(0, len(seqs), 256)])
        model.train()
        return out

    for epoch in range(1, hp["epochs"] + 1):
        total, count = 0.0, 0
        for _uids, hist, out_iids in session_seq_iter(data, pad_index=n, batch_size=hp["batch_size"], max_len=hp["max_len"],
                                                       n_sample=hp["n_sample"], rng=rng, shuffle=True):
            out_t = torch.as_tensor(out_iids, dtype=torch.long, device=evaluator.device)
            hist_t = torch.as_tensor(hist, dtype=torch.long, device=evaluator.device)
            loss = loss_fn(model(None, hist_t, out_t), out_iids=out_t,
                           batch_size=len(hist), n_sample=hp["n_sample"], bpreg=1.0, elu_param=0.5)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(hist), count + len(hist)
        if epoch % hp["every"] == 0:
            recorder.round_done(epoch, library_metrics(evaluator, score), {"train_loss": total / max(count, 1)}, None, {})
    return recorder.finish(None, {}, {"method": "sasrec", "library": "cornac " + cornac.__version__, "hyperparameters": hp})


def run_library_baseline(name: str, settings: Settings, out: str | Path) -> dict:
    """Train library baseline ``name`` (a key of :data:`LIBRARY_BASELINES`) into ``out``;
    non-private whatever ``epsilon`` says, like ``popularity``."""
    return sasrec(settings, out) if name == "sasrec" else implicit_mf(name, settings, out)
