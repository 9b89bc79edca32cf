"""``fedenc bench``: what privacy, communication and the framework cost, measured side by
side in one run on one machine.

1. DP step / non-DP step: same model, same fixed batch, same settings; median of
   ``steps`` timed steps after warm-up. Also per Opacus grad-sample mode and with the
   frozen-lower-layer cache off, so the speed-ups are measured, not assumed.
2. Bytes a site sends per round / bytes of the full model's parameters (fp32, fp16).
3. ``fedenc simulate`` wall time / a bare loop doing the same local training,
   aggregation, evaluation and outputs in one process without Flower; each arm a fresh
   interpreter, timed from its start to its exit (imports included).
4. Peak memory (PSS of the whole process tree) of that simulation; full-ranking
   evaluation throughput.
5. Scale: the largest number of virtual sites a simulation completes (tiny model,
   one round, no DP: it measures the framework, not the model).

The parts (:data:`PARTS`: ``steps`` = 1 and 2, ``eval``, ``overhead`` = 3 and 4, ``scale``)
can be run alone; ``bench.json`` is written after each, so an interrupted or timed-out bench
keeps what finished and says which parts ran.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import tomli_w
import torch

from common.adapter import load_trainable_state
from common.config import ConfigError, Settings
from common.evaluation import CentralEvaluator
from common.examples import training_rows
from common.files import atomic_write_json
from common.ledger import PrivacyLedger
from common.model import Recommender
from common.site import Site, SiteHost, dataset
from common.training import with_lower_states
from deploy.processes import interrupt_on_signals, stop_tree
from simulations.step_numbers import measure_step, parameter_counts


def step_table(settings: Settings, batch_sizes, users: int = 256) -> dict:
    """Median step times per batch size: non-DP vs DP (hooks, functorch), cache on and off.

    Each arm runs on the same fixed batches (``step_numbers.measure_step``); CPU time is
    recorded too, as it is robust to other load on the machine.
    """
    data, split = dataset(settings.data)
    m = settings.model
    table: dict = {}
    for cache in (True, False):
        torch.manual_seed(settings.run.seed)
        model = Recommender.build(replace(m, cache_lower_layers=cache), list(data.catalogue.texts))
        rows = training_rows(data.catalogue, split, np.arange(users), model.tokenizer, m.max_tokens, m.max_history,
                             settings.train.targets_per_user)
        if cache:
            rows = with_lower_states(model, rows)
        arms = [("non_dp", False, "hooks"), ("dp_hooks", True, "hooks")]
        if cache:
            arms.append(("dp_functorch", True, "functorch"))
        for b in batch_sizes:
            row = table.setdefault(str(b), {})
            for name, private, mode in arms:
                r = measure_step(model, rows, b, private, train=replace(settings.train, grad_sample_mode=mode),
                                 privacy=settings.privacy)
                row[name if cache else f"{name}_no_cache"] = {"median_s": r["median_s"], "median_cpu_s": r["median_cpu_s"]}
        if cache:
            table["parameters"] = parameter_counts(model)
    return table


def bare_loop(settings: Settings, out: Path) -> None:
    """The same work as the Flower arm, without Flower: the sites' count release for the
    popularity prior, then the same rounds, steps, unweighted averaging and central evaluation,
    and the same outputs in ``out`` (metrics.jsonl, a checkpoint per round, adapter/, summary,
    model card and plot)."""
    from common.prior import log_prior
    from server.recorder import RunRecorder
    from simulations.report import write_report

    evaluator = CentralEvaluator(settings)
    recorder = RunRecorder.open(out, settings)
    host = SiteHost()  # as one ClientApp actor serves them
    sites = [host.open(settings, i, settings.num_sites) for i in range(settings.num_sites)]
    p = settings.privacy
    with tempfile.TemporaryDirectory() as folder:

        def ledger(site: Site) -> PrivacyLedger:
            path = Path(folder) / f"{site.name}.json"
            return PrivacyLedger.open(path, site.name, p.epsilon, p.delta_for(len(site.users)), p.accountant)

        def done(rnd: int, state: dict, reports: list[dict]) -> None:
            recorder.record_sites(reports)
            recorder.round_done(rnd, evaluator(state), {"sites": len(reports)}, evaluator.model, state)

        if settings.prior.share > 0:  # the count query the ServerApp sends first
            prior = log_prior(sum(site.release_counts(ledger(site), p) for site in sites))
            recorder.save_prior(prior)
            evaluator.model.set_prior(prior)
            for site in sites:
                site.set_prior(prior)
        state = evaluator.initial_state()
        done(0, state, [])
        for rnd in range(1, settings.rounds + 1):
            updates = [site.train(state, ledger(site), p, planned_rounds=settings.rounds - rnd + 1)[0] for site in sites]
            state = {k: sum(u[k] for u in updates) / len(updates) for k in state}  # sites weigh 1, as in the strategy
            if settings.server.fraction_evaluate > 0 and not settings.private:  # sites evaluate only without DP
                for site in sites:
                    site.evaluate(state)
            done(rnd, state, [{"site": site.name, "epsilon": ledger(site).epsilon()} for site in sites])
        recorder.finish(evaluator.model, state)
    write_report(out)


class TreeMemory:
    """Samples the summed memory of this process and its descendants (SuperLink, ServerApp,
    Ray workers), each process once, as PSS: shared pages (torch's libraries, Ray's object
    store) are split between the processes that map them instead of counted in each.

    A PSS read walks the process's page tables (~20 ms per GB-sized process) and, every 2 s
    over a dozen processes, slowed the simulation it measured by 4% (223 vs 214 s, 3 runs
    each; a one-process bare loop by nothing). So each sample reads only the RSS (a counter)
    and re-reads a process's PSS when its RSS moved by more than :attr:`REREAD` since the
    last read, or that read is older than :attr:`STALE` seconds (sharing changes as others
    start or exit); the total is the sum of the latest PSS values."""

    REREAD = 0.02  # of the RSS at the last read: growing processes are re-read every sample
    STALE = 30.0  # seconds: a steady process's PSS still follows what others share with it

    def __init__(self, root: int | None = None, interval: float = 2.0):
        """``root``: the process whose tree is measured (default: this one)."""
        self.peak = 0
        self.at_peak: dict[str, int] = {}  # the largest processes at the peak, MB
        self._root = psutil.Process(root)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        read: dict[int, tuple[int, int, float, str]] = {}  # pid -> RSS at the last PSS read, that PSS, when, label
        while not self._stop.is_set():
            try:
                tree = [self._root] + self._root.children(recursive=True)
            except psutil.Error:
                tree = []
            procs = {p.pid: p for p in tree + _orphans()}
            now = time.monotonic()
            parts = []
            for p in procs.values():
                try:
                    rss = p.memory_info().rss
                    last = read.get(p.pid)
                    if last is None or abs(rss - last[0]) > self.REREAD * last[0] or now - last[2] > self.STALE:
                        last = read[p.pid] = (rss, p.memory_full_info().pss, now, _label(p))
                    _, pss, _, label = last
                    parts.append((pss, label))
                except psutil.Error:
                    continue
            total = sum(pss for pss, _ in parts)
            if total > self.peak:
                self.peak = total
                self.at_peak = {name: round(pss / 2**20) for pss, name in sorted(parts, reverse=True)[:8]}
            self._stop.wait(interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _label(p: psutil.Process) -> str:
    """A process's name in the memory breakdown: the program and its pid."""
    words = [Path(w).name for w in p.cmdline()[:4] if not w.startswith("-")] or [p.name()]
    words = [w.strip() for w in words if not w.startswith("python")] or words
    words = ["fedenc" if w == "cli" else w for w in words]  # `python -m cli` is the fedenc command
    return f"{' '.join(words[: 2 if words[0] in ('flwr', 'fedenc') else 1])}[{p.pid}]"  # flwr run, fedenc simulate


def _orphans() -> list[psutil.Process]:
    """Flower's simulation runtime detaches from its parent; count it and its Ray workers."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "flwr-simulation" in cmd or "ClientAppActor" in cmd:
            out.append(p)
            try:
                out += p.children(recursive=True)
            except psutil.Error:
                pass
    return out


def eval_throughput(settings: Settings) -> float:
    """Users per second of full-ranking evaluation (top layers over cached lower states)."""
    evaluator = CentralEvaluator(settings)
    state = evaluator.initial_state()
    load_trainable_state(evaluator.model, state)
    evaluator.encode()  # now, outside the timing
    start = time.perf_counter()
    evaluator(state)
    return 2 * len(evaluator.users) / (time.perf_counter() - start)  # valid + test


def scale(config: dict, out: Path, site_counts: tuple[int, ...], tiny_model: str, left=lambda: None) -> list[dict]:
    """Complete a one-round simulation with each number of sites; stop at the first failure.
    ``left()``: seconds left to the bench (None: no limit); a count that does not finish in
    them is recorded as not completed (``time_limit``) and the next is not tried."""
    from simulations.simulate import SimulationFailed, simulate

    results = []
    for n in site_counts:
        if left() is not None and left() <= 0:
            break
        cfg = config | {
            "model": tiny_model, "num-sites": n, "num-server-rounds": 1, "epsilon": math.inf,
            "expected-batch": 2, "local-steps": 1, "eval-users": 200, "max-tokens": 16,
            "fraction-evaluate": 0.0, "popularity-prior": 0.0,  # one train message per site and round
        }
        with TreeMemory() as mem:
            start = time.perf_counter()
            timeout = left()
            try:
                simulate(cfg, out / f"scale-{n}", overwrite=True, timeout=None if timeout is None else max(1.0, timeout))
                ok = True
            except SimulationFailed:
                ok = False
        seconds = time.perf_counter() - start
        results.append({"sites": n, "completed": ok, "seconds": seconds, "peak_pss_mb": mem.peak / 2**20}
                       | ({"time_limit": True} if not ok and timeout is not None and seconds >= timeout else {}))
        if not ok:
            break
    return results


def tiny_encoder(directory: Path) -> str:
    """A 2-layer random BERT with the MiniLM tokenizer, saved to ``directory``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from common.encoder import resolve_model_path

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve_model_path("default")).save_pretrained(directory)
    return str(directory)


PARTS = ("steps", "eval", "overhead", "scale")  # in the order they run


@interrupt_on_signals()  # SIGTERM, like Ctrl-C, raises: the part it stops is recorded in bench.json
def bench(config: dict, out: str | Path, site_counts=(100, 1000), step_batches=(32, 64), progress=print,
          parts=PARTS, time_limit: float | None = None) -> dict:
    """Run the measurements in ``parts`` (of :data:`PARTS`), write ``out/bench.json`` and return it.

    ``bench.json`` is rewritten after every part and when a signal or a failure stops one, so an
    interrupted bench leaves what finished; its ``parts`` entry says which parts ran (``done``),
    which were left out for ``time_limit`` (seconds for the whole bench: a part starts only while
    time is left, and the part running when it runs out is stopped), which one stopped and why
    (``stopped``), and whether every requested part ran (``complete``).

    Example::

        bench({"num-sites": 3}, "runs/bench", parts=("steps",))["dp_step_ratio"]
    """
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ConfigError(f"bench parts: {', '.join(unknown) or 'none given'}; choose from {', '.join(PARTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_config(config)
    deadline = time.monotonic() + time_limit if time_limit else None
    ran = {"requested": [p for p in PARTS if p in parts], "done": [], "skipped": [], "stopped": None, "complete": False}
    result: dict = {"config": settings.as_dict(), "machine": _machine(), "time_limit_s": time_limit, "parts": ran}

    def left() -> float | None:
        return None if deadline is None else deadline - time.monotonic()

    measure = {
        "steps": lambda: _steps(settings, result, step_batches, progress, left()),
        "eval": lambda: _evaluation(settings, result, progress, left()),
        "overhead": lambda: _overhead(config, settings, out, result, progress, left()),
        "scale": lambda: _scale(config, out, result, tuple(site_counts), progress, left),
    }

    def save() -> None:
        atomic_write_json(out / "bench.json", result, indent=1)

    for name in ran["requested"]:
        if left() is not None and left() <= 0:
            ran["skipped"].append(name)
            progress(f"{name}: left out, the time limit ({time_limit:g} s) is spent")
            continue
        try:
            measure[name]()
        except TimeLimit:  # the parts after it are left out
            ran["stopped"] = f"{name}: the time limit ({time_limit:g} s) ran out"
            progress(ran["stopped"])
            save()
            continue
        except BaseException as err:  # a signal or a failure: keep what finished, then let it end the run
            ran["stopped"] = f"{name}: {type(err).__name__}" + (f": {err}" if str(err) else "")
            result["machine"]["load_average_end"] = list(os.getloadavg())
            save()
            raise
        ran["done"].append(name)
        save()
    ran["complete"] = ran["done"] == ran["requested"]
    result["machine"]["load_average_end"] = list(os.getloadavg())
    save()
    return result


def _machine() -> dict:
    """What the numbers depend on besides the code: cores, load, versions."""
    return {"cpu_count": os.cpu_count(), "load_average_start": list(os.getloadavg()), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}


class TimeLimit(Exception):
    """The bench's time limit ran out inside a part."""


@contextlib.contextmanager
def _within(seconds: float | None) -> Iterator[None]:
    """Raise :class:`TimeLimit` in the block once ``seconds`` have passed (None: never). For
    in-process work only: a simulation gets a timeout instead, so that it stops its processes."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(*_) -> None:
        raise TimeLimit

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _steps(settings: Settings, result: dict, step_batches, progress, time_left: float | None) -> None:
    torch.set_num_threads(1)  # as a simulated site runs
    with _within(time_left):
        steps = step_table(settings, step_batches)
    params = steps.pop("parameters")
    result["steps"] = steps
    for b, row in steps.items():
        progress(f"step (batch {b}): " + ", ".join(f"{k} {v['median_s'] * 1000:.0f} ms" for k, v in row.items()))
    main = steps[str(step_batches[-1])]
    result["dp_step_ratio"] = main["dp_hooks"]["median_cpu_s"] / main["non_dp"]["median_cpu_s"]
    update, full = params["adapter_update_bytes"], params["model_parameter_bytes"]
    result |= params | {"bytes_ratio": update / full, "bytes_ratio_fp16": update / 2 / full}
    progress(f"bytes: update {update:,} / full model {full:,} = 1/{full / update:.0f} (fp16 1/{2 * full / update:.0f})")


def _evaluation(settings: Settings, result: dict, progress, time_left: float | None) -> None:
    torch.set_num_threads(1)  # as a simulated site runs
    with _within(time_left):
        result["eval_users_per_s"] = eval_throughput(settings)
    progress(f"evaluation: {result['eval_users_per_s']:.0f} users/s")


def _overhead(config: dict, settings: Settings, out: Path, result: dict, progress, time_left: float | None) -> None:
    config_file = out / "simulate.toml"
    config_file.write_text(tomli_w.dumps(config))
    bare = [sys.executable, "-c", "import sys; from simulations.bench import bare_command; bare_command(*sys.argv[1:])",
            str(config_file), str(out / "bare")]
    bare_seconds, bare_mem, bare_summary = _command("the bare loop", bare, out / "bare", time_left)
    result |= {"bare_loop_seconds": bare_seconds, "bare_loop_ndcg@10": bare_summary["final"]["ndcg@10"],
               "bare_loop_peak_pss_mb": bare_mem.peak / 2**20}
    progress(f"bare loop: {bare_seconds:.1f} s, NDCG@10 {result['bare_loop_ndcg@10']:.4f}")
    timeout = None if time_left is None else max(1.0, time_left - bare_seconds)
    simulate = [sys.executable, "-m", "cli", "simulate", "--out", str(out / "simulate"), "--overwrite",
                "--config", str(config_file)]
    sim_seconds, mem, summary = _command("fedenc simulate", simulate, out / "simulate", timeout)
    result |= {
        "simulate_seconds": sim_seconds,
        "framework_overhead_ratio": sim_seconds / bare_seconds,
        "peak_pss_mb": mem.peak / 2**20,
        "peak_pss_by_process_mb": mem.at_peak,
        "simulate_ndcg@10": summary["final"]["ndcg@10"],
    }
    progress(f"simulate: {sim_seconds:.1f} s (x{result['framework_overhead_ratio']:.2f} the bare loop), "
             f"peak PSS {result['peak_pss_mb']:.0f} MB")


def bare_command(config_file: str, out: str) -> None:
    """The bare arm's process (``python -c``): reads the same run config as ``fedenc simulate``
    and runs :func:`bare_loop` into ``out``.

    Example::

        bare_command("runs/bench/simulate.toml", "runs/bench/bare")   # then runs/bench/bare/summary.json
    """
    settings = Settings.from_config(tomllib.loads(Path(config_file).read_text()))
    bare_loop(settings, Path(out))


def _command(name: str, cmd: list[str], out: Path, timeout: float | None) -> tuple[float, TreeMemory, dict]:
    """One arm of the overhead part as a user runs it: a fresh interpreter of its own (not this
    one, which holds torch and the earlier parts' leftovers), timed from its start to its
    exit, imports included, with its whole tree's memory: seconds, memory, ``out``'s summary."""
    start = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    try:
        with TreeMemory(proc.pid) as mem:
            proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TimeLimit from None
    finally:
        if proc.poll() is None:  # the time limit or a signal: fedenc simulate stops its Flower tree on SIGTERM
            stop_tree(proc)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        from simulations.simulate import SimulationFailed

        raise SimulationFailed(f"{name} failed (exit {proc.returncode}); see {out.with_suffix('.log')}")
    return seconds, mem, json.loads((out / "summary.json").read_text())


def _scale(config: dict, out: Path, result: dict, site_counts: tuple[int, ...], progress, left) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result["scale"] = scale(config, out, site_counts, tiny_encoder(Path(tmp) / "tiny"), left)
    done = [r["sites"] for r in result["scale"] if r["completed"]]
    result["max_sites"] = max(done, default=0)
    progress(f"scale: {result['scale']}")
