"""The fused text recommender: a LoRA-adapted encoder over the user's history text, fused
with a behaviour vector over the catalogue bank, scored against the whole catalogue.

Every trainable module sees the user batch (batch first), so Opacus' per-sample
gradients are per USER. The catalogue side is a detached bank of item vectors from
the frozen base encoder; item-side transforms live on the user side
(uᵀ W e = (Wᵀ u)ᵀ e) and the per-item bias is the bias of a ``Linear`` whose weight is
the bank.

Interface (after RecBole): ``loss(batch)``, ``score_all(batch)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import SplitEncoder, add_lora, find_layers, hidden_size, is_decoder_only, load_backbone
from .memory import ffn_row_bytes, rows_per_pass
from .settings import ModelSettings


class Scalar(nn.Module):
    """x -> w x with one learnable scalar (single input, so Opacus can vmap it per user)."""

    def __init__(self, value: float):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x


class RecencyAttention(nn.Module):
    """Behaviour vector: attention over the history's bank vectors with a learned recency bias.

    bank_vecs (B, M, H), valid (B, M), query (B, H) -> (B, H)
    """

    def __init__(self, max_history: int):
        super().__init__()
        self.recency = nn.Embedding(max_history, 1)  # one bias per position, most recent first
        with torch.no_grad():
            self.recency.weight.copy_(torch.linspace(0.0, -2.0, max_history)[:, None])  # recent items count more
        self.content = Scalar(4.0)  # weight of similarity to the text vector

    def forward(self, bank_vecs: torch.Tensor, valid: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        b, m, _ = bank_vecs.shape
        positions = torch.arange(m, device=bank_vecs.device).expand(b, m)  # (B, M)
        sim = torch.einsum("bmh,bh->bm", bank_vecs, query)  # (B, M)
        logits = self.recency(positions).squeeze(-1) + self.content(sim)
        logits = logits.masked_fill(~valid, float("-inf"))
        weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # users with no history: zeros
        return torch.einsum("bm,bmh->bh", weights, bank_vecs)


class Gate(nn.Module):
    """Dynamic feature fusion: g = σ(w·[t; b] + c), u = g t + (1 - g) b.   (B, H) x2 -> (B, H)"""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(2 * hidden, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)  # start at an even mix

    def forward(self, text: torch.Tensor, behaviour: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.linear(torch.cat([text, behaviour], dim=-1)))  # (B, 1)
        return g * text + (1 - g) * behaviour


class LogitScale(nn.Module):
    """Multiplies by exp(log_scale): a temperature that is either fixed or learned."""

    def __init__(self, scale: float, learn: bool):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(float(scale)).log(), requires_grad=learn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.log_scale.exp()


class Recommender(nn.Module):
    """User tower (text ⊕ behaviour) scored against a fixed catalogue bank.

    Batch keys: ``text`` (B, T) token ids of the history text, or (B, T, H) its cached
    lower-layer states (:func:`common.training.with_lower_states`), ``mask`` (B, T),
    ``history`` (B, M) item indices most recent first (-1 = pad), ``targets`` (B, P) item
    indices (-1 = pad).

    Example::

        model = Recommender.build(ModelSettings(), item_texts)
        loss = model.loss(batch); scores = model.score_all(batch)
    """

    def __init__(self, encoder: SplitEncoder, tokenizer, bank: torch.Tensor, settings: ModelSettings, prior=None):
        super().__init__()
        h = bank.shape[1]
        self.settings = settings
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.register_buffer("bank", F.normalize(bank.float(), dim=-1))  # (N, H)
        self.register_buffer("prior", torch.zeros(bank.shape[0]) if prior is None else prior.float())  # (N,)
        self.behaviour = RecencyAttention(settings.max_history)
        self.gate = Gate(h)
        self.projection = nn.Linear(h, h, bias=False)
        nn.init.eye_(self.projection.weight)
        self.scale = LogitScale(settings.logit_scale, settings.learn_logit_scale)
        self.prior_weight = Scalar(1.0)  # how much of the (DP) popularity prior to keep
        self.scorer = nn.Linear(h, bank.shape[0])  # weight = bank (frozen), bias = item bias
        self.scorer.weight = nn.Parameter(self.bank.clone(), requires_grad=False)
        nn.init.zeros_(self.scorer.bias)
        self._set_trainable()

    @classmethod
    def build(cls, settings: ModelSettings, item_texts: list[str], bank: torch.Tensor | None = None, prior=None):
        """Load the encoder, add LoRA, and compute (or take) the catalogue bank; with
        ``settings.kind == "sequential"``, the :class:`common.sequential.SequentialRecommender`
        instead (one constructor for every caller)."""
        if settings.kind == "sequential":
            from .sequential import SequentialRecommender

            return SequentialRecommender.build(settings, item_texts, bank, prior)
        from .bank import item_bank

        backbone, tokenizer = load_backbone(settings.model)
        n_layers = len(find_layers(backbone)[2])
        if bank is None:
            bank = item_bank(backbone, tokenizer, settings.model, item_texts, settings.item_tokens)
        peft_model = add_lora(backbone, settings.lora)
        split = n_layers - settings.lora.layers if settings.cache_lower_layers else 0
        encoder = SplitEncoder(peft_model, split, last_token=is_decoder_only(backbone))
        assert bank.shape[1] == hidden_size(backbone)
        return cls(encoder, tokenizer, bank, settings, prior)

    def _set_trainable(self) -> None:
        s = self.settings
        for name, p in self.encoder.named_parameters():
            p.requires_grad_(s.train_lora and "lora_B" in name or (s.train_lora and not s.lora.ffa and "lora_A" in name))
        for p in list(self.behaviour.parameters()) + list(self.gate.parameters()):
            p.requires_grad_(s.train_fusion)
        self.projection.weight.requires_grad_(s.train_projection)
        self.scorer.bias.requires_grad_(s.train_bias)
        self.prior_weight.weight.requires_grad_(s.train_bias and bool(self.prior.any()))

    # -- user tower -------------------------------------------------------------------------
    def user_vector(self, batch: dict) -> torch.Tensor:
        states = batch["text"]
        if not states.is_floating_point():
            states = self.encoder.lower(states, batch["mask"])  # (B, T, H), no grad: frozen; ids if nothing is cached
        if states.is_floating_point():
            states = states.to(self.bank.dtype)  # cached in fp16 (cache-fp16): the layers above run in fp32
        text = F.normalize(self.encoder(states, batch["mask"]), dim=-1)  # (B, H)
        history = batch["history"]  # (B, M)
        valid = history >= 0
        behaviour = self.behaviour(self.bank[history.clamp(min=0)], valid, text)  # (B, H)
        user = self.gate(text, behaviour)
        if self.settings.train_projection:
            user = self.projection(user)
        return self.scale(F.normalize(user, dim=-1))

    def score_all(self, batch: dict) -> torch.Tensor:
        """Scores over the whole catalogue: (B, N). Higher is better."""
        user = self.user_vector(batch)  # (B, H)
        prior = self.prior_weight(self.prior.expand(user.shape[0], -1))  # (B, N): batch first for Opacus
        return self.scorer(user) + prior

    def loss(self, batch: dict) -> torch.Tensor:
        """Mean over users of each user's mean next-item cross-entropy over their targets.

        Each user's term depends only on their own row and public data (the catalogue,
        the global model): no in-batch negatives, so one user = one DP example.
        """
        per_user = self.per_user_loss(batch)
        return per_user.mean()

    def per_user_loss(self, batch: dict) -> torch.Tensor:
        logp = torch.log_softmax(self.score_all(batch), dim=-1)  # (B, N)
        targets = batch["targets"]  # (B, P)
        valid = (targets >= 0).float()
        picked = logp.gather(1, targets.clamp(min=0))  # (B, P)
        return -(picked * valid).sum(1) / valid.sum(1).clamp(min=1.0)  # (B,)

    @torch.no_grad()
    def set_prior(self, log_popularity) -> None:
        """Install a (DP) log-popularity prior, (N,), as the base of every score; its weight
        then trains with the item bias (so the trainable state changes: install the prior
        before taking the state that travels)."""
        self.prior.copy_(torch.as_tensor(log_popularity, dtype=torch.float32))
        self._set_trainable()

    @torch.no_grad()
    def lower_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Frozen lower-layer states of token ids, (U, T) -> (U, T, H), computed in batches.

        Unchanged by training (no LoRA below the split): compute once, reuse every step and
        every round. Bit-identical to what the full forward computes, unless ``cache-fp16``
        keeps them rounded to fp16 (half the memory of the largest thing a process holds).
        """
        if self.encoder.split == 0:
            return ids
        device = self.bank.device
        batch_size = rows_per_pass(ffn_row_bytes(ids.shape[1], self.bank.shape[1]), device)
        out = None  # filled in place: a list of batches then torch.cat would hold every state twice
        for i in range(0, len(ids), batch_size):
            states = self.encoder.lower(ids[i : i + batch_size].to(device), mask[i : i + batch_size].to(device))
            if out is None:
                dtype = torch.float16 if self.settings.cache_fp16 else states.dtype
                out = torch.empty((len(ids), *states.shape[1:]), dtype=dtype)
            out[i : i + len(states)] = states.cpu()
        return out if out is not None else torch.empty((0, ids.shape[1], self.bank.shape[1]))

    def forward(self, **batch) -> torch.Tensor:
        """Per-user losses (B,), so an Opacus-wrapped model can be called with the batch."""
        return self.per_user_loss(batch)
