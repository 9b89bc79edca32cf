"""Cost of one training step, DP against non-DP: the measurement ``fedenc bench`` makes
(its ``steps`` part; ``fedenc bench --parts steps`` runs only that).

:func:`measure_step` times the forward, backward and optimizer step (under DP also the
per-user clipping and noise) over fixed batches of users; :func:`parameter_counts` gives
trainable vs total parameters and the bytes of one adapter update against the whole model's.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from common.adapter import state_bytes, trainable_state
from common.model import Recommender
from common.privacy import PrivacySettings
from common.training import TrainSettings, as_batch, cycle, make_private


def measure_step(
    model: Recommender,
    rows: TensorDataset,
    batch_size: int,
    private: bool,
    steps: int = 10,
    warmup: int = 2,
    train: TrainSettings = TrainSettings(),
    privacy: PrivacySettings = PrivacySettings(),
    noise_multiplier: float = 1.0,
) -> dict:
    """Seconds per training step on fixed batches of ``batch_size`` users (the first ``warmup``
    steps are not counted). Under DP the model is wrapped exactly as ``train_local`` wraps it,
    with fixed-size batches instead of Poisson ones so both arms see the same batch size.
    The trainable parameters are restored afterwards.

    Example::

        dp = measure_step(model, rows, 64, private=True)
        dp["median_cpu_s"] / measure_step(model, rows, 64, private=False)["median_cpu_s"]
    """
    if len(rows) < batch_size:
        raise ValueError(f"need at least {batch_size} rows, got {len(rows)}")
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=train.learning_rate)
    loader = DataLoader(rows, batch_size=batch_size, shuffle=False, drop_last=True)
    module, engine = model, None
    if private:
        module, optimizer, loader, engine = make_private(model, optimizer, loader, noise_multiplier, privacy, train,
                                                         poisson=False)
    batches = [as_batch(t, "cpu") for t, _ in zip(cycle(loader), range(warmup + steps), strict=False)]  # cycle: endless
    times, cpu_times = [], []
    try:
        for batch in batches:
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = module(**batch).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)  # robust to other load on the machine
    finally:
        if engine is not None:
            module._close()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
                p.grad = None
    counted, cpu = times[warmup:], cpu_times[warmup:]
    return {
        "batch_size": batch_size,
        "private": private,
        "steps": len(counted),
        "median_s": statistics.median(counted),
        "min_s": min(counted),
        "max_s": max(counted),
        "median_cpu_s": statistics.median(cpu),
    }


def parameter_counts(model: Recommender) -> dict:
    """Trainable, total and encoder parameters, and the bytes of the model's parameters and of one
    adapter update (what a site sends).

    Example::

        counts = parameter_counts(model)
        counts["adapter_update_bytes"] / counts["model_parameter_bytes"]
    """
    params = list(model.named_parameters())
    return {
        "trainable_parameters": sum(p.numel() for _, p in params if p.requires_grad),
        "total_parameters": sum(p.numel() for _, p in params),
        "encoder_parameters": sum(p.numel() for n, p in params if n.startswith("encoder.")),
        "model_parameter_bytes": sum(p.numel() * p.element_size() for _, p in params),
        "adapter_update_bytes": state_bytes(trainable_state(model)),
    }
