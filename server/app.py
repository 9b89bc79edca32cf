"""fedenc ServerApp: FedAvg over the sites' adapters, central evaluation after every
round, per-site ε tracking, a checkpoint per round, results in ``out-dir``.

A run that cannot go on (too few sites, ``max-failed-rounds`` skipped rounds in a row,
no site trained at all) writes its one-line reason to ``failure.json`` and fails."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.config import Settings
from common.evaluation import CentralEvaluator, set_server_threads
from common.prior import log_prior
from common.progress import ROUND_RECORDED, ProgressLog
from common.transport import from_array_record, to_array_record
from server import central_dp
from server.checks import derived_update_bound
from server.grid import PromptGrid
from server.recorder import RunRecorder
from server.strategy import BudgetAwareFedAvg, RunFailed, ScreenedRounds, SiteRoster, collect_counts
from server.warm_start import warm_start

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = Settings.from_config(context.run_config)
    set_server_threads()
    recorder = RunRecorder.open(settings.run.out_dir or "runs/latest", settings)
    try:
        federate(PromptGrid(grid), settings, recorder)
    except RunFailed as err:
        recorder.fail(str(err))
        log(logging.ERROR, "fedenc run failed: %s", err)
        raise


def federate(grid: Grid, settings: Settings, recorder: RunRecorder) -> None:
    events = ProgressLog(recorder.out, "server")  # what fedenc simulate shows while the run starts
    evaluator = CentralEvaluator(settings, on_phase=events.note)
    catalogue = evaluator.data.catalogue
    identity = {"run-token": recorder.run_token, "catalogue": catalogue.fingerprint()}
    roster = SiteRoster(settings.num_sites, settings.server.min_sites, settings.server.wait_for_sites)
    prior, prior_round = None, None  # the prior must be in place before the state that travels is taken
    if settings.prior.share > 0:
        prior = recorder.saved_prior()
        if prior is None:
            events.note("popularity prior: the sites release their item counts")
            query = ConfigRecord({"task": "popularity-prior"} | identity)
            with ThreadPoolExecutor(1) as asking:  # the server encodes its evaluation rows while the sites count
                asked = asking.submit(collect_counts, grid, roster, query, len(catalogue), settings.server.round_timeout)
                evaluator.encode()
                counts, reports, prior_round = asked.result()
            recorder.record_sites([r | {"stage": "prior"} for r in reports])
            prior = log_prior(counts)
            recorder.save_prior(prior)
        evaluator.model.set_prior(prior)

    state = recorder.resume_state()
    if state is None:
        state = evaluator.initial_state()
        if settings.run.warm_start:
            events.note(f"public warm start: {settings.run.warm_start_steps} steps on {settings.run.warm_start}")
            state.update(warm_start(settings))
    bound = settings.server.max_update_norm or derived_update_bound(
        settings.train.learning_rate, settings.train.local_steps, sum(v.size for v in state.values()))
    sites = BudgetAwareFedAvg(
        fraction_train=settings.server.fraction_train,
        fraction_evaluate=settings.server.fraction_evaluate,
        min_available_nodes=settings.server.min_sites,
        roster=roster,
        seed=settings.run.seed,
        start_round=recorder.start_round,
    )
    sites.prior = prior
    # checks first, then central DP's clipping and noise (if set), then the average
    trainer = central_dp.wrap(sites, settings, recorder.releases)
    rounds = ScreenedRounds(trainer, roster, bound, settings.server.max_failed_rounds)

    def central_evaluation(server_round: int, arrays) -> MetricRecord:
        rnd = recorder.start_round + server_round
        events.note("central evaluation", round=rnd)
        current = from_array_record(arrays)
        recorder.releases = list(getattr(trainer, "releases", []))  # kept by the checkpoint for --resume
        metrics = evaluator(current) | {"central_epsilon": central_dp.central_epsilon(settings, recorder.releases)}
        if server_round == 0 and recorder.start_round > 0:  # resumed: this round was recorded before
            if rnd < settings.rounds:
                events.note("sites training", round=rnd + 1)
            return MetricRecord({k: float(v) for k, v in metrics.items()})
        recorder.record_sites(rounds.site_reports)
        rounds.site_reports = []
        taken = rounds.last_round if server_round else prior_round
        took_part = taken.line() if taken else {}
        if server_round and rounds.last_evaluation is not None:
            took_part["evaluation"] = rounds.last_evaluation.as_dict()
            rounds.last_evaluation = None
        line = recorder.round_done(rnd, metrics, took_part, evaluator.model, current)
        events.note(ROUND_RECORDED, round=rnd)  # its line is in metrics.jsonl now
        progress = {k: line[k] for k in ("round", "ndcg@10", "hr@10", "epsilon", "train_loss", "sites", "seconds")}
        log(logging.INFO, "fedenc %s", json.dumps({"progress": progress}))
        if server_round:
            rounds.check_progress(rnd)
        if rnd < settings.rounds:
            events.note("sites training", round=rnd + 1)
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    result = rounds.start(
        grid=grid,
        initial_arrays=to_array_record(state, fp16=settings.server.transport_fp16),
        num_rounds=settings.rounds - recorder.start_round,
        timeout=settings.server.round_timeout,
        train_config=ConfigRecord({"num-rounds": settings.rounds} | identity),
        evaluate_config=ConfigRecord(dict(identity)),
        evaluate_fn=central_evaluation,
    )
    if not recorder.trained_any():
        r = rounds.last_round
        why = "; ".join(f"site {s}: {w}" for s, w in (r.failed | r.rejected | r.refused).items()) or r.skipped
        raise RunFailed(f"no site trained in any round (last round: {why or 'no site was sampled'})")
    final = from_array_record(result.arrays) if result.arrays is not None and len(result.arrays) else state
    recorder.finish(evaluator.model, final)
    log(logging.INFO, "fedenc results in %s", Path(recorder.out).resolve())
