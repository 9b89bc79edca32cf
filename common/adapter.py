"""The adapter-transfer contract, in one place.

What travels between sites and server is the *trainable* state only (LoRA B — and A
unless FFA-LoRA — plus the head parameters that train), as an ordered dict of numpy
arrays for Flower's ``ArrayRecord``. Opacus wraps the model in a ``GradSampleModule``
whose parameter names carry a ``_module.`` prefix; it is removed here so both sides
speak the same names. On disk the global model is a PEFT adapter directory
(``save_pretrained``; loadable with ``PeftModel.from_pretrained``) plus the head.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

HEAD_FILE = "fedenc_head.safetensors"
SETTINGS_FILE = "fedenc_model.json"


def _clean(name: str) -> str:
    return name[len("_module.") :] if name.startswith("_module.") else name


def trainable_state(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """Trainable parameters as CPU numpy arrays, in a stable order.

    Example (the default model)::

        list(trainable_state(model))[:1]
        # ['encoder.model.base_model.model.encoder.layer.5.attention.self.query.lora_B.default.weight']
    """
    return OrderedDict(
        (_clean(name), p.detach().to("cpu", torch.float32).numpy().copy())
        for name, p in model.named_parameters()
        if p.requires_grad
    )


def load_trainable_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    """Copy ``state`` into the model's trainable parameters; names and shapes must match exactly."""
    params = {_clean(n): p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or unexpected:
        raise ValueError(
            f"adapter state does not match the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            value = torch.as_tensor(np.asarray(state[name]))
            if value.shape != p.shape:
                raise ValueError(f"adapter tensor {name} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
            p.copy_(value.to(p.device, p.dtype))


def peft_model_of(model: nn.Module) -> PeftModel:
    return model.encoder.model


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything outside the encoder that a restored model needs (trainable or not)."""
    return {
        _clean(n): t.detach().cpu().contiguous()
        for n, t in list(model.named_parameters()) + list(model.named_buffers())
        if not _clean(n).startswith("encoder.")
    }


def save_adapter(model: nn.Module, directory: str | Path, settings: dict) -> None:
    """Write the global model: PEFT adapter files + head tensors + model settings.

    Example::

        save_adapter(model, "out/adapter", {"model": "default"})
        PeftModel.from_pretrained(AutoModel.from_pretrained(base), "out/adapter")
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "encoder"):  # the sequential model has no text encoder: its head is all of it
        peft_model_of(model).save_pretrained(directory)
    save_file(head_state(model), str(directory / HEAD_FILE))
    (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=1, default=str))


def load_adapter(model: nn.Module, directory: str | Path) -> None:
    """Load a directory written by :func:`save_adapter` into a model built with the same settings."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    directory = Path(directory)
    if hasattr(model, "encoder"):
        set_peft_model_state_dict(peft_model_of(model), load_peft_weights(str(directory), device="cpu"))
    head = load_file(str(directory / HEAD_FILE))
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, value in head.items():
            own[name].copy_(value.to(own[name].device))


def state_bytes(state: dict[str, np.ndarray]) -> int:
    """Bytes of one adapter update as sent (the array payloads)."""
    return int(sum(np.asarray(a).nbytes for a in state.values()))
