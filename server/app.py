"""fedenc ServerApp: FedAvg over the sites' adapters, central evaluation after every
round, per-site ε tracking, a checkpoint per round, results in ``out-dir``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.central import CentralEvaluator, RunRecorder, set_server_threads, warm_start
from common.config import Settings
from common.transport import from_array_record, to_array_record
from server import central_dp
from common.prior import log_prior
from server.strategy import BudgetAwareFedAvg, collect_counts

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = Settings.from_config(context.run_config)
    set_server_threads()
    recorder = RunRecorder.open(settings["out-dir"] or "runs/latest", settings)
    evaluator = CentralEvaluator(settings)
    prior = None  # the popularity prior must be in place before the state that travels is taken
    if settings["popularity-prior"] > 0:
        prior = recorder.saved_prior()
        if prior is None:
            counts, reports = collect_counts(grid, settings.num_sites)
            recorder.record_sites([r | {"stage": "prior"} for r in reports])
            prior = log_prior(counts)
            recorder.save_prior(prior)
        evaluator.model.set_prior(prior)

    state = recorder.resume_state()
    if state is None:
        state = evaluator.initial_state()
        if settings["warm-start"]:
            state.update(warm_start(settings))
    remaining = settings.rounds - recorder.start_round
    num_sites = settings.num_sites
    strategy = BudgetAwareFedAvg(
        fraction_train=settings["fraction-train"],
        fraction_evaluate=settings["fraction-evaluate"],
        min_train_nodes=1,
        min_evaluate_nodes=1 if settings["fraction-evaluate"] > 0 else 0,
        min_available_nodes=num_sites,
        seed=settings["seed"] + recorder.start_round,
    )
    strategy.prior = prior

    def central_evaluation(server_round: int, arrays) -> MetricRecord:
        rnd = recorder.start_round + server_round
        current = from_array_record(arrays)
        metrics = evaluator(current) | {"central_epsilon": central_dp.central_epsilon(settings, rnd)}
        if server_round == 0 and recorder.start_round > 0:
            return MetricRecord({k: float(v) for k, v in metrics.items()})
        recorder.record_sites(strategy.site_reports)
        strategy.site_reports = []
        line = recorder.round_done(rnd, metrics, strategy.last_round if server_round else {}, evaluator.model, current)
        log(logging.INFO, "fedenc %s", json.dumps({"progress": {k: line[k] for k in ("round", "ndcg@10", "hr@10", "epsilon", "train_loss", "sites", "seconds")}}))
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    trainer = central_dp.wrap(strategy, settings)  # the strategy itself unless central-dp is set
    result = trainer.start(
        grid=grid,
        initial_arrays=to_array_record(state, fp16=settings["transport-fp16"]),
        num_rounds=remaining,
        train_config=ConfigRecord({"num-rounds": settings.rounds}),
        evaluate_fn=central_evaluation,
    )
    final = from_array_record(result.arrays) if result.arrays is not None and len(result.arrays) else state
    recorder.finish(evaluator.model, final)
    log(logging.INFO, "fedenc results in %s", Path(recorder.out).resolve())
