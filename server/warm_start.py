"""A public warm start: the transferable parameters pre-trained without DP on a PUBLIC dataset."""

from __future__ import annotations

import math

import numpy as np
import torch

from common.config import Settings
from common.site import dataset
from common.training import resolve_device, with_lower_states

# Parameters whose shape or meaning is tied to one catalogue: never transferred.
CATALOGUE_SPECIFIC = ("scorer.bias",)


def warm_start(settings: Settings) -> dict[str, np.ndarray]:
    """Pre-train the transferable parameters (LoRA, fusion, scale) without DP on a PUBLIC
    dataset, before the private rounds.

    A text model has no item ids, so what it learns on one catalogue transfers to
    another; the catalogue-specific item bias stays behind. The public set must not be
    the run's own data: that would spend the sites' users without accounting.
    """
    from dataclasses import replace

    from common.config import ConfigError
    from common.data import DataSpec
    from common.examples import training_rows
    from common.model import Recommender
    from common.privacy import PrivacySettings
    from common.training import train_local

    name = settings.run.warm_start
    if name == settings.data.dataset and not settings.data.data_path:
        raise ConfigError(f"warm-start: {name!r} is the run's own dataset; pick another public dataset")
    data, split = dataset(DataSpec(dataset=name))
    torch.manual_seed(settings.run.seed)
    model = Recommender.build(settings.model, list(data.catalogue.texts))
    m = settings.model
    rows = training_rows(data.catalogue, split, np.arange(len(data.user_ids)), model.tokenizer,
                         m.max_tokens, m.max_history, settings.train.targets_per_user)
    train = replace(settings.train, local_steps=settings.run.warm_start_steps)
    public = PrivacySettings(epsilon=math.inf, expected_batch=settings.privacy.expected_batch)
    state, _ = train_local(model.to(resolve_device(train.device)), None, with_lower_states(model, rows), train, public)
    return {k: v for k, v in state.items() if k not in CATALOGUE_SPECIFIC}
