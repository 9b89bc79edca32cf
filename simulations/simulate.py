"""``fedenc simulate``: one federated run through the real Flower path, in the foreground.

Flower's ``flwr run .`` leaves a detached SuperLink behind, exits 0 when the run
failed and installs dependencies at run time. This driver instead starts its own
SuperLink (simulation runtime, loopback, a free port, runtime installs off), keeps
Flower's home and Ray's temp folder inside the run, follows the run's progress in its
folder (``progress.jsonl``: phases and site steps, common/progress.py; ``metrics.jsonl``:
finished rounds) rather than Flower's log, stops the processes it started (and theirs) as
soon as the ServerApp has written its summary — the last thing a successful run does —
and exits non-zero unless it did.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tomli_w

from common.config import ConfigError, Settings
from common.progress import EVENTS, ROUND_RECORDED, Follower
from deploy.processes import (
    flower_env,
    free_port,
    interrupt_on_signals,
    last_error,
    staged_app,
    stop_tree,
    uninterrupted,
    wait_healthy,
)
from server.recorder import FAILURE
from simulations.outdir import RUN_FILES, Replaced, check_out_path, check_reuse, settle

PROJECT = Path(__file__).resolve().parents[1]  # the Flower app: pyproject.toml lives here
POLL_SECONDS = 0.5  # how often the run folder's progress files are read
STOP_GRACE = 15.0  # seconds Flower's processes get to stop on SIGTERM before SIGKILL
# Once the summary is written nothing Flower still does is ours; its graceful stop (Ray's
# shutdown) takes ~4 s, so it gets a second and is then killed (its temp folder is ours to remove).
FINISHED_GRACE = 1.0


class SimulationFailed(RuntimeError):
    """The run did not complete; the message says where to look."""


def check_inputs(settings: Settings, in_child: bool = True) -> None:
    """Fail fast, before Flower starts, on data or partition problems (clear messages).

    ``in_child``: check in a short-lived child process. Loading and partitioning the data
    imports pandas' and Flower Datasets' stacks and leaves ~250 MB that a driver, which only
    starts and follows Flower, would otherwise hold for the whole run.
    """
    if not in_child:
        problem = input_problem(settings)
    else:  # a fresh interpreter, not multiprocessing: that would re-run a caller's unguarded script
        child = subprocess.run(
            [sys.executable, "-c", "from simulations.simulate import _print_input_problem; _print_input_problem()"],
            input=json.dumps(settings.as_dict()), capture_output=True, text=True,
        )
        if child.returncode != 0:
            raise SimulationFailed(f"checking the inputs failed: {(child.stderr.strip().splitlines() or ['no output'])[-1]}")
        problem = child.stdout.strip()
    if problem:
        raise ConfigError(problem)


def input_problem(settings: Settings) -> str | None:
    """What is wrong with the data, partition or model of ``settings``, or None."""
    from common.data import DataError, load
    from common.partition import partition_users
    from common.settings import resolve_model_path

    try:
        data = load(settings.data)
        sites = partition_users(
            data, settings.num_sites, settings.split.partition, settings.split.partition_column,
            settings.split.dirichlet_alpha, settings.run.seed,
        )
    except DataError as err:
        return str(err)
    batch = settings.privacy.expected_batch
    if settings.private and all(len(s) < batch for s in sites):  # some may sit out, not all
        return (
            f"expected-batch: every site has fewer users (at most {max(len(s) for s in sites)}) than one "
            f"expected DP batch ({batch}), so no site could train; lower expected-batch or use fewer sites"
        )
    path = resolve_model_path(settings.model.model)
    if not Path(path).exists():
        return f"model: {settings.model.model!r} is not a folder on this machine (nothing is downloaded)"
    return None


def _print_input_problem() -> None:
    """:func:`check_inputs`' child: settings (``as_dict``) as JSON on stdin, the problem on stdout."""
    print(input_problem(Settings.from_config(json.loads(sys.stdin.read()))) or "")


@interrupt_on_signals()  # SIGTERM, like Ctrl-C, ends in the finally below that stops Flower's processes
def simulate(
    config: dict,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    on_progress: Callable[[dict], None] | None = None,
    timeout: float | None = None,
    app: str | Path = PROJECT,
    on_event: Callable[[dict], None] | None = None,
) -> dict:
    """Run one simulation with run-config ``config`` into ``out``; return its summary.

    Inputs (settings, data, model, the ``out`` path) are checked before ``out`` is
    touched; ``overwrite`` removes the previous run only once this one has started
    (simulations/outdir.py). ``app``: the Flower app folder (tests pass one whose sites
    misbehave). ``on_progress(line)``: each round's ``metrics.jsonl`` line once it is written;
    ``on_event(event)``: each phase as it starts (common/progress.py), from the first second.

    Example::

        summary = simulate({"num-sites": 2, "num-server-rounds": 2}, "runs/demo")
        summary["final"]["ndcg@10"]
    """
    out = Path(out).resolve()
    config = dict(config)
    config.setdefault("out-dir", str(out))
    config.setdefault("ledger-dir", str(out / "ledgers"))
    settings = Settings.from_config(config)  # validate before touching anything
    check_out_path(out)
    settle(out)
    check_reuse(out, resume, overwrite)
    check_inputs(settings)
    out.mkdir(parents=True, exist_ok=True)
    replaced = Replaced.move_aside(out) if overwrite and any(os.path.lexists(out / n) for n in RUN_FILES) else None
    (out / FAILURE).unlink(missing_ok=True)  # a reason left by an earlier attempt is not this run's
    summary_path = out / "summary.json"
    summary_before = _stamp(summary_path)  # a resumed finished run keeps its summary until replaced

    shown = {line["round"] for line in Follower(out / "metrics.jsonl")()} if resume else set()
    (out / EVENTS).unlink(missing_ok=True)  # the events of an earlier attempt are not this run's

    def tell(phase: str, **fields) -> None:
        if on_event:
            on_event({"t": time.time(), "source": "driver", "phase": phase} | fields)

    tell("starting Flower", rounds=settings.rounds, sites=settings.num_sites)
    home = out / ".flwr"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    gpus = 1 if settings.train.device != "cpu" and _cuda() else 0
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "superlink": {
                    "default": "fedenc",
                    "fedenc": {
                        "address": f"127.0.0.1:{port}",
                        "insecure": True,
                        "options": {
                            "num-supernodes": settings.num_sites,
                            "backend": {"client-resources": actor_resources(settings.num_sites, os.cpu_count() or 1, gpus)},
                        },
                    },
                }
            }
        )
    )
    run_config = out / "run_config.toml"
    run_config.write_text(tomli_w.dumps(settings.as_dict()))
    scratch = Path(tempfile.mkdtemp(prefix="fedenc-"))  # Ray's temp (short: its socket paths have a length limit), the staged app
    env = flower_env(home, str(scratch))
    log_path = out / "flower.log"
    link_log = home / "superlink.log"
    superlink = run = None
    finished = False  # the ServerApp wrote this run's summary
    try:
        superlink = subprocess.Popen(
            [
                "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
                "--host", "127.0.0.1", "--port", str(port),
                "--database", str(home / "state.db"), "--log-file", str(link_log),
                "--disable-runtime-dependency-installation",
            ],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", superlink)
        except (TimeoutError, ChildProcessError) as err:
            raise SimulationFailed(f"{err}; see {link_log}") from None
        tell("submitting the run to Flower")
        with open(log_path, "w") as log:
            run = subprocess.Popen(
                ["flwr", "run", str(staged_app(Path(app), scratch / "app")), "fedenc",
                 "--run-config", str(run_config), "--stream"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout if timeout else None
        follow_events, follow_rounds = Follower(out / EVENTS), Follower(out / "metrics.jsonl")
        while True:
            # Both looked at before the progress files are read: a run writes its last round's
            # line before its summary and both before it exits, so the reads below see them all.
            exited = run.poll() is not None
            finished = _stamp(summary_path) not in (None, summary_before)
            for event in follow_events():
                if event.get("phase") == ROUND_RECORDED:  # in order: the round's line comes among the events
                    replaced = _new_rounds(follow_rounds, shown, replaced, on_progress)
                elif on_event:
                    on_event(event)
            replaced = _new_rounds(follow_rounds, shown, replaced, on_progress)
            if exited or finished:  # finished: Flower's own wind-down (Ray's shutdown, ~4 s) holds nothing of ours
                break
            if deadline and time.monotonic() > deadline:
                stop_tree(run)
                raise SimulationFailed(f"the run took longer than {timeout:.0f}s; see {log_path}")
            try:
                run.wait(timeout=POLL_SECONDS)
            except subprocess.TimeoutExpired:
                pass
    finally:
        with uninterrupted():  # a second Ctrl-C must not leave half the tree running
            # an exited one's pid may be someone else's now
            stop_tree(*(proc for proc in (run, superlink) if proc is not None and proc.poll() is None),
                      grace=FINISHED_GRACE if finished else STOP_GRACE)
            shutil.rmtree(scratch, ignore_errors=True)
    if _stamp(summary_path) in (None, summary_before):  # this run wrote no summary
        why = _failure(out, log_path, run.returncode)  # read before the replaced run's files come back
        if replaced is not None:
            replaced.restore()
        raise SimulationFailed(f"the run failed: {why} (see {log_path})")
    return json.loads(summary_path.read_text())


def actor_resources(num_sites: int, cpus: int, gpus: int) -> dict:
    """Ray resources of one ClientApp actor; Flower starts as many actors as fit the machine.

    Few actors, each with several torch threads (the ClientApp takes as many as Ray gives
    it): every actor imports torch, builds the model and derives the rows of every site it
    serves (the pool sends any site's message to any free actor, so two actors derived
    3 of 5 sites' rows twice in two rounds). On 2 cores one actor with both used 0.9–1.3 GB
    less and its training round took as long when the machine was steady (docs/BENCH.md,
    "Simulation"). At most one actor per site; actors share the GPU.

    >>> actor_resources(5, 2, 0), actor_resources(5, 16, 0), actor_resources(2, 64, 1)
    ({'num-cpus': 2, 'num-gpus': 0.0}, {'num-cpus': 4, 'num-gpus': 0.0}, {'num-cpus': 32, 'num-gpus': 0.5})
    """
    actors = max(1, min(num_sites, cpus // 4))
    return {"num-cpus": cpus // actors, "num-gpus": gpus / actors}


def _new_rounds(follow: Follower, shown: set, replaced: Replaced | None, on_progress) -> Replaced | None:
    """Hand each newly recorded round's line to ``on_progress`` once; the first one of this run
    means it has started, so a run being replaced goes (returns what is still to replace)."""
    for line in follow():
        if line.get("round") in shown:  # a resumed run rewrites the rounds it keeps
            continue
        shown.add(line["round"])
        if replaced is not None:
            replaced.discard()
            replaced = None
        if on_progress:
            on_progress(line)
    return replaced


def _stamp(path: Path) -> tuple[int, int] | None:
    # a summary replaced atomically gets a new inode: tells "rewritten" from "left over"
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _failure(out: Path, log_path: Path, returncode: int | None) -> str:
    """The one-line reason of a failed run: the server's own (failure.json), else the log's."""
    path = out / FAILURE
    if path.exists():
        return json.loads(path.read_text())["reason"]
    return f"flwr exit code {returncode}; {last_error(log_path)}"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: fedenc simulate")
