"""Cost of one training step, DP against non-DP, for the default model on the built-in data.

    python -m simulations.step_numbers --out step_numbers.json

Measures on CPU with one torch thread (one per simulated client process, docs/DESIGN.md, "Processes"):
the median step time (forward, backward, optimizer step; under DP also per-user
clipping and noise) over fixed batches of users with cached lower-layer states, the
DP / non-DP ratio, peak RSS, trainable vs total parameters, and the bytes of one
adapter update against the bytes of the whole model. :func:`measure_step` is the
reusable part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from common.adapter import state_bytes, trainable_state
from common.data import DataSpec, leave_one_out, load
from common.examples import training_rows
from common.files import atomic_write_text
from common.model import ModelSettings, Recommender
from common.privacy import PrivacySettings
from common.training import TrainSettings, as_batch, cycle, make_private, with_lower_states


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
    The trainable parameters are restored afterwards."""
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
    params = list(model.named_parameters())
    return {
        "trainable_parameters": sum(p.numel() for _, p in params if p.requires_grad),
        "total_parameters": sum(p.numel() for _, p in params),
        "encoder_parameters": sum(p.numel() for n, p in params if n.startswith("encoder.")),
        "model_parameter_bytes": sum(p.numel() * p.element_size() for _, p in params),
        "adapter_update_bytes": state_bytes(trainable_state(model)),
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run(batch_sizes=(32, 64), steps: int = 10, warmup: int = 2, users: int = 256, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    settings, train, privacy = ModelSettings(), TrainSettings(), PrivacySettings()
    data = load(DataSpec())
    split = leave_one_out(data)
    start = time.perf_counter()
    model = Recommender.build(settings, list(data.catalogue.texts))
    build_s = time.perf_counter() - start
    users = min(users, len(data.user_ids))
    rows = training_rows(data.catalogue, split, range(users), model.tokenizer, settings.max_tokens,
                         settings.max_history, train.targets_per_user)
    start = time.process_time()
    rows = with_lower_states(model, rows)
    lower_s = time.process_time() - start  # CPU seconds
    results = []
    for b in batch_sizes:
        plain = measure_step(model, rows, b, private=False, steps=steps, warmup=warmup, train=train, privacy=privacy)
        dp = measure_step(model, rows, b, private=True, steps=steps, warmup=warmup, train=train, privacy=privacy)
        results.append({"batch_size": b, "nondp_median_s": plain["median_s"], "dp_median_s": dp["median_s"],
                        "dp_over_nondp": dp["median_s"] / plain["median_s"],
                        "nondp_median_cpu_s": plain["median_cpu_s"], "dp_median_cpu_s": dp["median_cpu_s"],
                        "dp_over_nondp_cpu": dp["median_cpu_s"] / plain["median_cpu_s"], "nondp": plain, "dp": dp})
    return {
        "model": settings.model,
        "model_settings": {k: str(v) for k, v in vars(settings).items()},
        "train_settings": vars(train),
        "dataset": data.name,
        "catalogue_items": len(data.catalogue),
        "users_measured": users,
        "torch_threads": torch.get_num_threads(),
        "build_s": build_s,
        "lower_states_cpu_s_per_1000_users": lower_s / users * 1000,
        "steps": results,
        **parameter_counts(model),
        "peak_rss_mib": peak_rss_mib(),
        "load_average": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def table(numbers: dict) -> str:
    lines = [
        f"model {numbers['model']}  ({numbers['catalogue_items']} items, {numbers['torch_threads']} thread(s), "
        f"load average {numbers['load_average'][0]:.1f} on {numbers['cpu_count']} CPUs)",
        "",
        "| batch | non-DP s/step | DP s/step | DP / non-DP | non-DP CPU s | DP CPU s | DP / non-DP (CPU) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in numbers["steps"]:
        lines.append(
            f"| {r['batch_size']} | {r['nondp_median_s']:.4f} | {r['dp_median_s']:.4f} | {r['dp_over_nondp']:.2f} "
            f"| {r['nondp_median_cpu_s']:.4f} | {r['dp_median_cpu_s']:.4f} | {r['dp_over_nondp_cpu']:.2f} |"
        )
    lines += [
        "",
        f"trainable / total parameters: {numbers['trainable_parameters']:,} / {numbers['total_parameters']:,} "
        f"({numbers['trainable_parameters'] / numbers['total_parameters']:.4%}; encoder {numbers['encoder_parameters']:,})",
        f"one adapter update: {numbers['adapter_update_bytes']:,} bytes; all model parameters: "
        f"{numbers['model_parameter_bytes']:,} bytes ({numbers['model_parameter_bytes'] / numbers['adapter_update_bytes']:.0f}x)",
        f"peak RSS: {numbers['peak_rss_mib']:.0f} MiB; model build {numbers['build_s']:.1f} s; "
        f"lower-layer states {numbers['lower_states_cpu_s_per_1000_users']:.2f} CPU s per 1000 users",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--batch-sizes", default="32,64")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    numbers = run(sizes, args.steps, args.warmup, max(args.users, max(sizes) * (args.steps + args.warmup) // 4), args.threads)
    print(table(numbers))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(numbers, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
