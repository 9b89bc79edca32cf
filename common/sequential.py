"""The sequential recommender (``model-kind = "sequential"``), shaped after UniSRec: a small
causal transformer over the user's last items, each item its frozen text vector from the
catalogue bank through a shared parametric-whitening adapter, scored against every item.

Why this shape under user-level DP: every trainable parameter is shared across items (none
grows with the catalogue, except the optional item bias), and each user's loss reads only
their own sequence and the public bank, so one user is one example with one clipped gradient.

Every trainable module sees the user batch (batch first), so Opacus' per-sample gradients
are exact per USER in hooks or functorch mode. The adapter is also needed on the batch-less
bank for scoring; instead the score is moved to the user side. The adapter is affine,
a(e) = A e + c, so uᵀ a(e) = (Aᵀ u)ᵀ e + uᵀ c, and uᵀ c is the same for every item (the
softmax ignores it): ``readout`` applies the adapter's own weight transposed to the user
vector, and the bank stays the frozen weight of the scoring ``Linear`` (its bias is the
item bias), as in the fused model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .model import ModelSettings, Scalar

LAYERS = 2  # the prototype's depth; SASRec's on MovieLens
DROPOUT = 0.2  # SASRec's rate on MovieLens: sequences of ~1,000 users overfit fast without it


class Transposed(nn.Module):
    """x -> x A for another module's weight A (D, H): the adapter applied on the user side.

    It registers that same Parameter, so Opacus adds this use's per-user gradient to the
    adapter's own (one parameter, two uses).   (B, *, D) -> (B, *, H)
    """

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class CausalBlock(nn.Module):
    """Pre-norm transformer block, one attention head (SASRec found more heads no help).

    x (B, L, D), allowed (B, L, L) bool: query i may read key j -> (B, L, D)
    """

    def __init__(self, d: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.ffn_in, self.ffn_out = nn.Linear(d, d), nn.Linear(d, d)  # width d as SASRec: fewer noisy parameters
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        q, k, v = self.query(h), self.key(h), self.value(h)  # (B, L, D) each
        logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # (B, L, L)
        weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        x = x + self.dropout(self.out(weights @ v))
        return x + self.dropout(self.ffn_out(F.relu(self.ffn_in(self.norm2(x)))))


class SequentialRecommender(nn.Module):
    """Causal transformer over adapted bank vectors of the user's items, full-catalogue softmax.

    Batch keys (common/sequence_rows.py): ``text`` (B, L) catalogue indices oldest -> newest,
    right-aligned (-1 = pad), ``mask`` (B, L), ``targets`` (B, L) the next item at each
    position for training or (B, 1) the held-out item for evaluation (-1 = pad).

    Example::

        model = SequentialRecommender.build(ModelSettings(kind="sequential"), item_texts)
        loss = model.loss(batch); scores = model.score_all(batch)   # (B, N)
    """

    tokenizer = None  # no text input: common.examples then builds item-index rows

    def __init__(self, bank: torch.Tensor, settings: ModelSettings, prior=None):
        super().__init__()
        h, d, n = bank.shape[1], settings.sequence_hidden, bank.shape[0]
        self.settings = settings
        self.register_buffer("bank", F.normalize(bank.float(), dim=-1))  # (N, H)
        self.register_buffer("prior", torch.zeros(n) if prior is None else prior.float())  # (N,)
        self.adapter = nn.Linear(h, d)  # parametric whitening (e - b) W, written as A e + c
        self.positions = nn.Embedding(settings.max_history, d)  # learned, as SASRec and UniSRec
        self.blocks = nn.ModuleList(CausalBlock(d) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(DROPOUT)
        self.readout = Transposed(self.adapter.weight)
        self.scorer = nn.Linear(h, n)  # weight = bank (frozen), bias = item bias
        self.scorer.weight = nn.Parameter(self.bank.clone(), requires_grad=False)
        nn.init.zeros_(self.scorer.bias)
        self.prior_weight = Scalar(1.0)  # how much of the (DP) popularity prior to keep
        self._set_trainable()

    @classmethod
    def build(cls, settings: ModelSettings, item_texts: list[str], bank: torch.Tensor | None = None, prior=None):
        """Compute (or take) the catalogue bank with the frozen encoder, which is then dropped."""
        if bank is None:
            from .bank import item_bank
            from .encoder import load_backbone

            backbone, tokenizer = load_backbone(settings.model)
            bank = item_bank(backbone, tokenizer, settings.model, item_texts, settings.item_tokens)
        return cls(bank, settings, prior)

    def _set_trainable(self) -> None:
        self.scorer.bias.requires_grad_(self.settings.train_bias)
        self.prior_weight.weight.requires_grad_(self.settings.train_bias and bool(self.prior.any()))

    def states(self, batch: dict) -> torch.Tensor:
        """Transformer output at every position: (B, L, D); position t has read items ..t only."""
        items, valid = batch["text"], batch["mask"].bool()  # (B, L) each
        b, length = items.shape
        x = self.adapter(self.bank[items.clamp(min=0)]) * valid[..., None]  # (B, L, D), pads zero
        x = self.dropout(x + self.positions(torch.arange(length, device=items.device).expand(b, length)))
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()  # (L, L)
        eye = torch.eye(length, dtype=torch.bool, device=items.device)
        # A pad query reads itself so its softmax is defined; real queries never read pads.
        allowed = causal & (valid[:, None, :] | eye)  # (B, L, L)
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """(B, *, D) user states -> (B, *, N) scores over the catalogue."""
        user = self.readout(states)  # (B, *, H)
        prior = self.prior_weight(self.prior.expand(*user.shape[:-1], -1))  # (B, *, N): batch first for Opacus
        return self.scorer(user) + prior

    def score_all(self, batch: dict) -> torch.Tensor:
        """Scores over the whole catalogue from the newest position: (B, N). Higher is better."""
        return self.logits(self.states(batch)[:, -1])

    def per_user_loss(self, batch: dict) -> torch.Tensor:
        """Each user's mean next-item cross-entropy over their positions: (B,).

        Full softmax over the public catalogue, no in-batch negatives: user i's term reads
        only row i and public data."""
        targets = batch["targets"]  # (B, L)
        logp = torch.log_softmax(self.logits(self.states(batch)), dim=-1)  # (B, L, N)
        valid = (targets >= 0).float()
        picked = logp.gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)  # (B, L)
        return -(picked * valid).sum(1) / valid.sum(1).clamp(min=1.0)

    def loss(self, batch: dict) -> torch.Tensor:
        """Mean over users of :meth:`per_user_loss`."""
        return self.per_user_loss(batch).mean()

    @torch.no_grad()
    def set_prior(self, log_popularity) -> None:
        """Install a (DP) log-popularity prior (N,) as the base of every score; its weight then
        trains with the item bias (install it before taking the state that travels)."""
        self.prior.copy_(torch.as_tensor(log_popularity, dtype=torch.float32))
        self._set_trainable()

    def lower_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """No frozen text layers to cache: the item indices are the input."""
        return ids

    def forward(self, **batch) -> torch.Tensor:
        """Per-user losses (B,), so an Opacus-wrapped model can be called with the batch."""
        return self.per_user_loss(batch)
