"""The ``genco`` command line (docs/contract.md, "Command line")."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from contract.jsonl import BadLines, parse_line, read_records, readable_request_id
from contract.settings import Settings
from genco.status import MAX_FETCH_AGE_S, MAX_RESTARTS


def _emit(summary: dict, as_json: bool, lines: list[str]) -> None:
    """Human lines, or with --json the summary as the last stdout line."""
    if as_json:
        print(json.dumps(summary))
    else:
        print("\n".join(lines))


def cmd_train(args: argparse.Namespace) -> int:
    from learner.offline import ProgressiveLogLoss, file_batches
    from learner.snapshots import SnapshotStore
    from learner.trainer import Learner, preset

    store = SnapshotStore(args.snapshot_dir)
    resumed = store.latest_version()
    curve_before = None  # the resumed snapshot's learning curve, which this training continues
    if resumed:
        snapshot = store.load(with_optimizer=True)
        m = snapshot.manifest
        learner = Learner.resume(snapshot.model, m.train_config, snapshot.optimizer_state, m.bags_seen, m.steps)
        curve_before = m.progressive_logloss
    else:
        learner = Learner(preset(args.preset, train={"batch_size": args.batch_size} if args.batch_size else None))
    bags_before = learner.bags_seen
    bad = BadLines()
    progressive = ProgressiveLogLoss()  # each bag is scored before the step that learns from it
    start, trained = time.perf_counter(), 0
    for batch in file_batches(args.bags, learner.featurizer, learner.preset.train.batch_size, bad):
        progressive.update(batch.requests.clicked, learner.step_batch(batch).predicted.numpy())
        trained += batch.size
    elapsed = time.perf_counter() - start
    manifest = store.save(learner.model, version=resumed + 1, bags_seen=learner.bags_seen, steps=learner.steps,
                          train_config=learner.preset.train.to_dict(), optimizer_state=learner.optimizer_state(),
                          progressive_logloss=progressive.curve(curve_before, bags_before))
    summary = {"trained": trained, "bad_lines": bad.count, "steps": learner.steps, "bags_seen": learner.bags_seen,
               "version": manifest.version, "seconds": round(elapsed, 3),
               "bags_per_s": round(trained / elapsed, 1) if elapsed else None,
               "progressive_logloss": round(progressive.model.get(), 5),
               "running_mean_logloss": round(progressive.running_mean.get(), 5),
               "snapshot_dir": str(Path(args.snapshot_dir).resolve()), "preset": args.preset}
    _emit(summary, args.json, [
        f"trained on {trained} bags ({bad.count} bad lines skipped) in {elapsed:.1f} s "
        f"({summary['bags_per_s']} bags/s)",
        f"progressive log loss {summary['progressive_logloss']:.5f} "
        f"(predicting the running mean CTR: {summary['running_mean_logloss']:.5f})",
        f"snapshot v{manifest.version} written to {args.snapshot_dir} ({learner.bags_seen} bags seen in all)",
    ])
    return 0


def _bag_model():  # imported lazily: pydantic models cost start-up time the CLI's --help need not pay
    from contract.events import Bag

    return Bag


def _read_bags(path: str) -> tuple[list, BadLines]:
    """Every valid bag of a JSON-lines file, and the lines skipped as bad."""
    bad = BadLines()
    with open(path, "rb") as lines:
        return [bag for _, bag in read_records(lines, _bag_model(), bad)], bad


def _snapshot(snapshot_dir: str):
    """The newest snapshot of ``snapshot_dir``, None where there is none."""
    from learner.snapshots import SnapshotStore

    store = SnapshotStore(snapshot_dir)
    return store.load() if store.latest_version() else None


def cmd_select(args: argparse.Namespace) -> int:
    from contract.events import BATCH_WORK_CELLS, SelectionRequest
    from learner.policy import ServingPolicy

    snapshot = _snapshot(args.snapshot_dir)
    if snapshot is None:
        print(f"no snapshot in {args.snapshot_dir}: serving the uniform fallback", file=sys.stderr)
        policy = ServingPolicy(None, explore=args.explore)
    else:  # the readout the snapshot names serves (learner/referee.py), as in the selector agent
        policy = ServingPolicy(snapshot.model, snapshot.manifest.version, explore=args.explore, k=args.k,
                               threads=args.threads, readout=snapshot.manifest.serving)
    bad = BadLines()
    out = sys.stdout
    batch: list = []
    cells = 0  # the batch's work (contract.events.work_cells): a batch of large requests goes out early

    def flush() -> None:
        nonlocal cells
        for response in policy.respond(batch):
            out.write(json.dumps(response) + "\n")
        batch.clear()
        cells = 0

    answered = 0
    for lineno, raw in enumerate(sys.stdin.buffer, 1):
        if not raw.strip():
            continue
        try:
            request = parse_line(raw, SelectionRequest)
        except ValueError as error:
            bad.add(lineno, str(error))
            request_id = readable_request_id(raw)
            if request_id is not None:
                flush()  # keep responses in input order
                out.write(json.dumps({"request_id": request_id, "error": str(error)}) + "\n")
            continue
        if batch and cells + request.work_cells > BATCH_WORK_CELLS:
            flush()
        batch.append(request)
        cells += request.work_cells
        answered += 1
        if len(batch) >= args.batch_size * args.threads:  # a batch for each thread
            flush()
    flush()
    out.flush()
    summary = {"answered": answered, "bad_lines": bad.count, "model_version": policy.version}
    print(json.dumps(summary) if args.json else f"answered {answered} requests, {bad.count} bad lines",
          file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Algorithm 1 of the readout the snapshot serves (``policy``, as ``genco select`` answers), and of each of
    its readouts (``readouts``), on the log."""
    from learner.evaluate import snapshot_sctr

    snapshot = _snapshot(args.snapshot_dir)
    if snapshot is None:
        print(f"no snapshot in {args.snapshot_dir}", file=sys.stderr)
        return 2
    bags, bad = _read_bags(args.bags)
    serving, version = snapshot.manifest.serving, snapshot.manifest.version
    result, _ = snapshot_sctr(snapshot.model, serving, bags, args.k, args.threads)
    result["bad_lines"] = bad.count
    result["model_version"] = version
    pol, uni = result["policy"], result["uniform"]

    def fmt(x: float | None) -> str:
        return "   -   " if x is None else f"{x:.5f}"

    lines = [f"calibrated sCTR (Algorithm 1) on {len(bags)} bags, snapshot v{version}",
             f"{'component':<22}{serving:>10}{'uniform':>10}{'lift':>9}"]
    for component, value in pol["per_component"].items():
        base = uni["per_component"][component]
        lift = f"{value / base - 1:+.1%}" if value is not None and base else "-"
        lines.append(f"{component:<22}{fmt(value):>10}{fmt(base):>10}{lift:>9}")
    lift = f"{pol['pooled'] / uni['pooled'] - 1:+.1%}" if pol["pooled"] and uni["pooled"] else "-"
    lines.append(f"{'pooled':<22}{fmt(pol['pooled']):>10}{fmt(uni['pooled']):>10}{lift:>9}")
    lines.append("each readout, pooled: " + ", ".join(f"{name} {fmt(sctr['pooled'])}"
                                                      for name, sctr in result["readouts"].items())
                 + f"; the snapshot serves {serving}")
    _emit(result, args.json, lines)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from genco.report import build
    from learner.snapshots import SnapshotStore

    if not SnapshotStore(args.snapshot_dir).latest_version():
        print(f"no snapshot in {args.snapshot_dir}", file=sys.stderr)
        return 2
    bags, bad = _read_bags(args.bags)
    if not bags:
        print(f"no valid bag in {args.bags}", file=sys.stderr)
        return 2
    summary = build(bags, args.snapshot_dir, Path(args.out), k=args.k, threads=args.threads)
    summary["bad_lines"] = bad.count
    importance = summary["component_importance"]
    lines = [f"report on {len(bags)} bags ({bad.count} bad lines skipped), snapshot v{summary['model_version']}, "
             f"in {summary['seconds']:.1f} s",
             "component importance (predicted CTR gain of the best element over a random one, pp): "
             + ", ".join(f"{c} {100 * importance[c]:.2f}" for c in sorted(importance, key=importance.get,
                                                                          reverse=True)),
             f"calibrated sCTR pooled {summary['sctr']['policy']['pooled']:.5f} "
             f"(uniform {summary['sctr']['uniform']['pooled']:.5f})",
             f"written: {summary['report']} and {len(summary['figures'])} figures"]
    lines += [f"not drawn: {name}: {why}" for name, why in summary["skipped"].items()]
    _emit(summary, args.json, lines)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from genco.demo import run_demo

    return run_demo(Settings(), rate=args.rate, seconds=args.seconds)


def cmd_serve(args: argparse.Namespace) -> int:
    from stream.serve import serve

    return serve(Settings(), broker=args.broker, agents=args.agents)


def cmd_status(args: argparse.Namespace) -> int:
    from genco.status import collect, render

    settings = Settings()
    url = args.metrics_url or f"http://127.0.0.1:{settings.metrics_port}/metrics"
    status = collect(url, settings.state_dir, max_restarts=args.max_restarts, max_fetch_age_s=args.max_fetch_age)
    _emit(status, args.json, render(status))
    if not status["running"]:
        return 1
    return 0 if status["healthy"] else 2


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.log is None:
        return _simulate_ad_server(args)
    if args.out is None:
        print("genco simulate: --log needs --out BAGS.jsonl", file=sys.stderr)
        return 2
    return _write_uniform_log(args)


def _simulate_ad_server(args: argparse.Namespace) -> int:
    import asyncio

    from sim.adserver import AdServer
    from sim.world import World, WorldConfig
    from stream.kafka import Connection, Topics

    settings = Settings()
    connection = Connection.from_settings(settings, args.broker)
    topics = Topics(settings.topic_prefix)
    connection.ensure_genco_topics(topics, settings.request_partitions)
    world = World(WorldConfig(seed=args.seed, n_ads=args.ads or AD_SERVER_ADS))
    server = AdServer(world, connection, topics, rate=args.rate, requests=args.requests,
                      window_s=min(settings.click_window_s, 30.0))
    server.on_window = lambda row: print(json.dumps(row), flush=True)
    report = asyncio.run(server.run())
    print(json.dumps({"sent": report.sent, "answered": report.answered, "invalid": len(report.invalid),
                      "p99_ms": round(report.latency_percentile(0.99), 1), "policies": report.policies}))
    return 0


def _write_uniform_log(args: argparse.Namespace) -> int:
    """A log as a uniform-random policy would have gathered it: what ``genco train`` learns from and what
    ``genco evaluate``'s Algorithm 1 needs. Written a chunk at a time, so memory does not grow with the log."""
    import dataclasses

    from sim.zoo import ZooWorld, draw_config

    config = draw_config(args.family, args.seed)
    if args.ads:
        config = dataclasses.replace(config, n_ads=args.ads)
    world = ZooWorld(config)
    clicks = 0
    with open(args.out, "w") as out:
        for start in range(0, args.log, LOG_CHUNK):
            bags = world.uniform_log(min(LOG_CHUNK, args.log - start), start=start)
            out.writelines(json.dumps(bag) + "\n" for bag in bags)
            clicks += sum(bag["clicked"] for bag in bags)
    print(f"wrote {args.log} bags ({clicks / args.log:.2%} clicked) to {args.out}: world {args.family}, seed "
          f"{args.seed}, {config.n_ads} ads at the start")
    return 0


AD_SERVER_ADS = 200
LOG_CHUNK = 10_000  # bags generated and written at a time by simulate --log
THREADS_HELP = "batches scored at once (numpy releases the GIL, so a thread per free core adds throughput)"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _agent_list(text: str) -> tuple[str, ...]:
    """``joiner,selector`` as the roles to run, each once, in the order given; an unknown role is an error."""
    from contract.settings import AGENTS

    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in AGENTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or 'no role'}: the roles are {', '.join(AGENTS)}")
    return names


def _family(name: str) -> str:
    from sim.zoo import FAMILIES  # imported only when --family is given: numpy is not for every command's start

    if name not in FAMILIES:
        raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(FAMILIES)}")
    return name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genco", description="GenCO creative optimisation")
    parser.set_defaults(numeric=True)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train offline on a BAGS.jsonl file, in file order, and write a snapshot")
    train.add_argument("bags")
    train.add_argument("--snapshot-dir", required=True)
    train.add_argument("--preset", default="default", choices=["default", "fast", "paper"])
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--json", action="store_true")
    train.set_defaults(run=cmd_train)

    select = sub.add_parser("select", help="answer SelectionRequest lines on stdin with SelectionResponse lines")
    select.add_argument("--snapshot-dir", required=True)
    select.add_argument("--explore", type=float, default=0.0)
    select.add_argument("--k", type=int, default=16, help="combinations sampled per request")
    select.add_argument("--batch-size", type=int, default=1024)
    select.add_argument("--threads", type=_positive, default=1, help=THREADS_HELP)
    select.add_argument("--json", action="store_true")
    select.set_defaults(run=cmd_select)

    evaluate = sub.add_parser("evaluate", help="calibrated sCTR (Algorithm 1) of a snapshot on a uniform log")
    evaluate.add_argument("bags")
    evaluate.add_argument("--snapshot-dir", required=True)
    evaluate.add_argument("--k", type=int, default=16)
    evaluate.add_argument("--threads", type=_positive, default=1, help=THREADS_HELP)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(run=cmd_evaluate)

    report = sub.add_parser("report", help="what a snapshot learned, on a uniform-random log: component importance, "
                            "MIL weights, lift by number of candidates, calibrated sCTR; OUTDIR/report.md and PNGs")
    report.add_argument("bags")
    report.add_argument("--snapshot-dir", required=True)
    report.add_argument("--out", required=True, metavar="OUTDIR")
    report.add_argument("--k", type=int, default=16, help="combinations sampled per request")
    report.add_argument("--threads", type=_positive, default=1, help=THREADS_HELP)
    report.add_argument("--json", action="store_true")
    report.set_defaults(run=cmd_report)

    serve = sub.add_parser("serve", help="run the agents (joiner, learner, selector; all by default) until SIGTERM")
    serve.add_argument("--broker", default=None, help="kafka://host:port[,host:port] (default: GENCO_BROKER, "
                       "else an embedded broker)")
    serve.add_argument("--agents", type=_agent_list, default=None,
                       help="comma-separated roles this process runs (default: all of them)")
    serve.set_defaults(run=cmd_serve)

    status = sub.add_parser("status", help="a running genco serve's health, agent restarts and errors, lag, pending "
                            "bags, dead letters, duplicates and model version (from its metrics endpoint and the "
                            "state dir); exit status 1: not running, 2: unhealthy")
    status.add_argument("--metrics-url", default=None,
                        help="default: http://127.0.0.1:$GENCO_METRICS_PORT/metrics")
    status.add_argument("--max-restarts", type=_positive, default=MAX_RESTARTS,
                        help="restarts of one agent in 10 minutes that make it unhealthy (exit status 2)")
    status.add_argument("--max-fetch-age", type=float, default=MAX_FETCH_AGE_S,
                        help="seconds without a fetch that make an agent unhealthy (exit status 2)")
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=cmd_status, numeric=False)

    simulate = sub.add_parser("simulate", help="a simulated ad server on a broker (requests, impressions, clicks); "
                              "with --log, a uniform-random log of bags written to a file instead")
    simulate.add_argument("--broker", default=None, help="kafka://host:port (default: GENCO_BROKER)")
    simulate.add_argument("--rate", type=float, default=200.0, help="selection requests per second")
    simulate.add_argument("--requests", type=int, default=10**9, help="stop after this many requests")
    simulate.add_argument("--ads", type=_positive, default=None,
                          help=f"ads in the world (default: {AD_SERVER_ADS} for the ad server; with --log, the "
                          "number the family draws for the seed)")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--log", type=_positive, default=None, metavar="N",
                          help="write N bags of a uniform-random log to --out, one JSON line each, and stop")
    simulate.add_argument("--out", default=None, metavar="BAGS.jsonl", help="where --log writes")
    simulate.add_argument("--family", type=_family, default="paper",
                          help="with --log: the family of worlds (sim/zoo.py: paper, synergy, context, churn, mixed)")
    simulate.set_defaults(run=cmd_simulate)

    demo = sub.add_parser("demo", help="embedded broker + every agent + a simulated ad server: watch it learn")
    demo.add_argument("--rate", type=float, default=300.0, help="selection requests per second")
    demo.add_argument("--seconds", type=float, default=60.0, help="how long the simulated traffic runs")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from learner.compute import configure_compute

    args = build_parser().parse_args(argv)
    if args.numeric:  # not for status: a frequent healthcheck should not pay for importing torch
        configure_compute()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
