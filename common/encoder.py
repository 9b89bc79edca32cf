"""The language-model encoder: loading, pooling, LoRA, and the frozen-lower-layer cache.

Any Hugging Face ``AutoModel`` works (a local path or a model id already on disk).
Encoder-only models pool by mean over real tokens, decoder-only models by the last
real token. LoRA goes on the attention projections, optionally only in the top
``k`` layers; everything below the lowest LoRA layer is frozen *and* unchanged by
training, so its output can be computed once and reused (``lower`` / ``upper``).
"""

from __future__ import annotations

import contextlib

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from .settings import LoraSettings, resolve_model_path

# Attention projections by naming family; the first family present in the model wins.
_ATTENTION_PROJECTIONS = (
    ("query", "value"),  # BERT, MiniLM, RoBERTa, ...
    ("q_proj", "v_proj"),  # Llama, Qwen2, Mistral, OPT, ...
    ("q_lin", "v_lin"),  # DistilBERT
    ("c_attn",),  # GPT-2
)


class ModelError(ValueError):
    """A user-facing problem with the encoder or its LoRA settings."""


def load_backbone(name: str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load an ``AutoModel`` and its tokenizer from disk, never from the network.

    Example::

        model, tokenizer = load_backbone("default")  # all-MiniLM-L6-v2, from the installed package
    """
    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, config=config, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load model {name!r} from {path!r}: {err}".splitlines()[0]) from None
    if tokenizer.pad_token is None:  # decoder-only tokenizers often lack one
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"  # last-token pooling reads the last real token's index
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def is_decoder_only(model: nn.Module) -> bool:
    config = model.config
    return bool(getattr(config, "is_decoder", False)) or config.model_type in _DECODER_TYPES


_DECODER_TYPES = {"llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox", "opt", "phi", "phi3", "gemma", "gemma2"}


def find_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """Return (parent, attribute, list) of the transformer block list: the longest ModuleList
    whose length equals ``num_hidden_layers``."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        for attr, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n:
                return module, attr, child
    raise ModelError(f"cannot find the {n} transformer layers of {type(model).__name__}")


def lora_targets(model: nn.Module, settings: LoraSettings) -> list[str]:
    """The attention projection names to adapt, found per architecture."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if settings.target_modules:
        missing = [t for t in settings.target_modules if t not in names]
        if missing:
            raise ModelError(f"lora-target-modules {missing} not found in the model; linear layers are {sorted(names)}")
        return list(settings.target_modules)
    for family in _ATTENTION_PROJECTIONS:
        if all(t in names for t in family):
            return list(family)
    raise ModelError(
        f"no attention projections to put LoRA on in {type(model).__name__}; "
        f"set lora-target-modules to some of {sorted(names)}"
    )


def add_lora(model: nn.Module, settings: LoraSettings) -> PeftModel:
    """Wrap ``model`` with LoRA in its top ``settings.layers`` layers; base weights stay frozen."""
    _, attr, layers = find_layers(model)
    n = len(layers)
    if not 1 <= settings.layers <= n:
        raise ModelError(f"lora-layers must be in 1..{n} for this model, got {settings.layers}")
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_targets(model, settings),
        layers_to_transform=list(range(n - settings.layers, n)),
        layers_pattern=attr,
    )
    # A fixed seed makes lora_A identical at every site and the server: with FFA-LoRA only B
    # travels, so A must agree everywhere without being sent.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        peft_model = get_peft_model(model, config)
    if settings.ffa:
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return peft_model


def pool(hidden: torch.Tensor, mask: torch.Tensor, last_token: bool) -> torch.Tensor:
    """Mean over real tokens, or the last real token (right padding).

    hidden (B, T, H), mask (B, T) -> (B, H)
    """
    if last_token:
        last = mask.sum(dim=1).clamp(min=1) - 1  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


class SplitEncoder(nn.Module):
    """An encoder run in two halves: frozen ``lower`` layers (cacheable) and the ``upper`` ones.

    ``upper(lower(ids, mask), mask)`` equals the full forward bit for bit; ``split = 0``
    means no split (the whole model is the upper half and ``lower`` returns the ids).
    The split is done with hooks on the block list, so it works for any architecture
    whose blocks take the hidden states as first argument.

    Example::

        enc = SplitEncoder(peft_model, split=5, last_token=False)
        states = enc.lower(ids, mask); vec = enc(states, mask)
    """

    def __init__(self, model: nn.Module, split: int, last_token: bool):
        super().__init__()
        self.model = model
        self.split = split
        self.last_token = last_token
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        # Plain references, not submodules: registered, the same blocks (and their LoRA
        # modules) would be reachable by three paths, and Opacus hooks every path, so each
        # per-sample gradient was counted three times (and state_dict held duplicate keys).
        parent, attr, layers = find_layers(base)
        object.__setattr__(self, "_parent", parent)
        object.__setattr__(self, "_attr", attr)
        object.__setattr__(self, "_layers", layers)

    @torch.no_grad()
    def lower(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H) input of the first upper layer (or the ids when not split)."""
        if self.split == 0:
            return input_ids
        handle = self._layers[self.split].register_forward_pre_hook(_stop_hook)
        try:
            self.model(input_ids=input_ids, attention_mask=mask)
        except _Stop as stop:
            return stop.hidden
        finally:
            handle.remove()
        raise ModelError("the encoder returned before reaching its split layer")

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) lower states (or (B, T) ids) -> (B, H) pooled user text vector."""
        if self.split == 0:
            out = self.model(input_ids=states, attention_mask=mask).last_hidden_state
            return pool(out, mask, self.last_token)
        # The token ids only fix the (B, T) shape the embeddings produce; the hook on the first
        # upper layer then swaps their output for the cached lower states.
        ids = torch.zeros(states.shape[:2], dtype=torch.long, device=states.device)
        handle = self._layers[self.split].register_forward_pre_hook(_inject_hook(states))
        try:
            with self._only_upper_layers():
                out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            handle.remove()
        return pool(out, mask, self.last_token)

    @contextlib.contextmanager
    def _only_upper_layers(self):
        full = self._layers
        setattr(self._parent, self._attr, nn.ModuleList(list(full)[self.split :]))
        try:
            yield
        finally:
            setattr(self._parent, self._attr, full)


def _stop_hook(module, args):
    raise _Stop(args[0])


def _inject_hook(states: torch.Tensor):
    def hook(module, args):
        return (states,) + tuple(args[1:])

    return hook


def encode_texts(
    encoder: SplitEncoder, tokenizer, texts: list[str], max_tokens: int, batch_size: int = 256
) -> torch.Tensor:
    """Pooled vectors of ``texts`` through the whole encoder, without gradients. -> (N, H)"""
    device = next(encoder.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            tok = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
            ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
            out.append(encoder(encoder.lower(ids, mask), mask).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)

