"""The ``lalora`` command line: ``run`` a lineage (resuming it), ``sweep`` lambda and curvature, ``validate`` a
config, ``serve`` it on a schedule, ``export`` a registered version, start the ``ui`` servers; ``init`` a starter
config, pretrain a config's tiny ``base``, report the ``env`` for a bug report, ``--version``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from flows import version
from flows.console import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    EXIT_LOCKED,
    fail,
    prepare_environment,
    report,
    start_local_api,
)
from pipelines.errors import BadInput

__all__ = ["EXIT_BAD_INPUT", "EXIT_DIVERGED", "EXIT_LOCKED", "main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lalora", description="Continual LoRA adaptation with a Laplace penalty (LaLoRA).")
    p.add_argument("--version", action="version", version=f"lalora {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="adapt the base model through every domain of CONFIG")
    run.add_argument(
        "config", help="lineage YAML, e.g. the one `lalora init DIR` writes (configs/demo.yaml in a checkout)"
    )
    run.add_argument("--out", default=None, help="output directory (default runs/<config name>)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set lalora.lambda=0 (repeatable)",
    )
    run.add_argument(
        "--fork",
        default=None,
        metavar="NAME",
        help="start a new lineage (registered model NAME) from the first stage whose config changed",
    )
    run.add_argument(
        "--wait", action="store_true", help="if another run holds this lineage, wait for it instead of refusing"
    )
    sw = sub.add_parser(
        "sweep", help="run CONFIG's lineage per point of a grid of config fields (and seed); table and Pareto plot"
    )
    sw.add_argument("config")
    sw.add_argument(
        "--lambda",
        dest="lambdas",
        default=None,
        help="comma-separated lambdas; 0 is plain LoRA, auto searches each stage's within the forgetting "
        "budget (default 0,1,10,100 unless only --grid is given)",
    )
    sw.add_argument(
        "--curvature",
        dest="curvatures",
        default=None,
        help="comma-separated curvature kinds (diag, kfac, kfac-tri, identity; default diag,identity "
        "unless only --grid is given)",
    )
    sw.add_argument(
        "--grid",
        dest="grid",
        action="append",
        default=[],
        metavar="FIELD=v1,v2",
        help="sweep any config field too, e.g. --grid training.replay.fraction=0,0.25 (repeatable)",
    )
    sw.add_argument("--seeds", type=int, default=1, help="seeds per point (LoRA init and data order)")
    sw.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="the first seed: --seeds 1 --first-seed 2 runs seed 2 alone (adds a seed to a sweep)",
    )
    sw.add_argument(
        "--stages",
        type=int,
        default=None,
        help="use only the first N domains (1: one-stage transfer, forgetting measured on the source)",
    )
    sw.add_argument(
        "--forgetting-on",
        dest="forgetting_on",
        default=None,
        metavar="NAMES",
        help="comma-separated columns the forgetting axis averages (default: every accuracy-like earlier "
        "column: the source, earlier domains, probes)",
    )
    sw.add_argument("--out", default=None, help="output directory (default runs/<config name>-sweep)")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    val = sub.add_parser("validate", help="check each CONFIG and report every error with its field path")
    val.add_argument("configs", nargs="+", metavar="config")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    srv = sub.add_parser(
        "serve",
        help="serve the lineage as a Prefect deployment on a cron schedule "
        "(needs PREFECT_API_URL: a Prefect server, e.g. from `lalora ui`)",
    )
    srv.add_argument("config")
    srv.add_argument("--cron", required=True, help='schedule, e.g. "0 3 * * 1" (Mondays 03:00)')
    srv.add_argument("--timezone", default="UTC", help="time zone of the cron schedule")
    srv.add_argument("--out", default=None, help="output directory (default runs/<config name>)")
    srv.add_argument("--name", default=None, help="deployment name (default: the config's file name)")
    srv.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    dep = sub.add_parser(
        "deploy",
        help="register the lineage as a deployment on a Prefect work pool (created if "
        "missing, type process), run by `prefect worker start --pool NAME` on any host with this "
        "package; needs PREFECT_API_URL",
    )
    dep.add_argument("config")
    dep.add_argument("--pool", required=True, help="the work pool's name")
    dep.add_argument("--cron", default=None, help='optional schedule, e.g. "0 3 * * 1" (Mondays 03:00)')
    dep.add_argument("--timezone", default="UTC", help="time zone of the cron schedule")
    dep.add_argument("--name", default=None, help="deployment name (default: the config's file name)")
    dep.add_argument("--out", default=None, help="output directory on the worker's host (default runs/<config name>)")
    dep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    exp = sub.add_parser(
        "export",
        help="write a registered version as a peft adapter folder (or, with --merge, "
        "a standalone transformers model) that other tools load without MLflow",
    )
    exp.add_argument("model_uri", metavar="MODEL_URI", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    exp.add_argument("--out", required=True, help="a new (or empty) directory")
    exp.add_argument("--merge", action="store_true", help="merge the adapter into the base weights (merge_and_unload)")
    exp.add_argument("--tracking-uri", default=None, help="the MLflow store (default $MLFLOW_TRACKING_URI)")
    ui = sub.add_parser("ui", help="start the MLflow UI and a Prefect server on 127.0.0.1 until interrupted")
    ui.add_argument("--out", default="runs/demo", help="run directory whose mlflow.db the UI shows")
    ui.add_argument("--backend-store-uri", default=None, help="MLflow store (default sqlite:///OUT/mlflow.db)")
    ui.add_argument("--mlflow-port", type=int, default=5000)
    ui.add_argument("--prefect-port", type=int, default=4200)
    ui.add_argument("--no-prefect", action="store_true", help="only the MLflow UI")
    init = sub.add_parser("init", help="write a starter config (the demo's, with its comments) as DIR/lalora.yaml")
    init.add_argument("dir", metavar="DIR", help="directory to write it in (created if missing)")
    init.add_argument(
        "--force", action="store_true", help="overwrite an existing starter (DIR/lalora.yaml, its schema, demo-base)"
    )
    sub.add_parser("env", help="print the versions and platform a bug report needs, one line each")
    sch = sub.add_parser(
        "schema",
        help="print the JSON Schema of a lineage config (what lalora.schema.json holds; "
        "editors validate a config with it as it is typed)",
    )
    sch.add_argument("--out", default=None, metavar="FILE", help="write it to FILE instead")
    base = sub.add_parser(
        "base",
        help="pretrain CONFIG's tiny base (model.tiny, model.pretrain, the source) into DIR "
        "and print its sha256, for a config's model.path and model.sha256 (make demo-base)",
    )
    base.add_argument("config")
    base.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) directory")
    base.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def out_problem(path: Path, flag: str = "--out", file: bool = False) -> str | None:
    """Why ``path`` cannot be the directory (or, with ``file``, the file) a command writes, or None: it is a
    file (a directory), or the nearest existing folder above it is a file or not writable."""
    if path.exists():
        if file and path.is_dir():
            return f"{flag} {path}: is a directory; give a file path"
        if not file and not path.is_dir():
            return f"{flag} {path}: is a file; give a directory (new, or one of this command's earlier outputs)"
        return None
    above = path.absolute().parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        return f"{flag} {path}: {above} is a file, so nothing can be made under it; give another path"
    if not os.access(above, os.W_OK | os.X_OK):
        return f"{flag} {path}: {above} is not writable here; give a path you can write"
    return None


def cmd_init(args: argparse.Namespace) -> int:
    from flows.starter import write_starter

    try:
        starter = write_starter(Path(args.dir), force=args.force)
    except BadInput as e:
        return fail(str(e))
    print(f"wrote {starter.config} (the demo's config: a tiny Llama, nothing downloaded; edit it for your data)")
    print("check it, then run it:")
    for command in starter.commands():
        print(f"    {command}")
    return 0


def cmd_base(args: argparse.Namespace) -> int:
    """The config's tiny base, pretrained as a lineage with an empty model.path would, written to ``--out``."""
    import shutil
    import tempfile

    from pipelines.config import ConfigError, load_config
    from pipelines.runtime.models import WEIGHTS_FILE, file_sha256
    from pipelines.runtime.threads import torch_threads
    from pipelines.stages.pretrain import BaseInputs
    from pipelines.stages.steps import PRETRAIN
    from pipelines.tracker import NullTracker

    try:
        cfg = load_config(args.config, [*args.overrides, "model.path=null", "model.sha256=null"])
    except ConfigError as e:
        return fail(f"{e.source}: {e.errors[0]}")
    out = Path(args.out)
    problem = out_problem(out)
    if problem:
        return fail(problem)
    if out.exists() and any(out.iterdir()):
        return fail(f"{out}: exists and is not an empty directory (give a new one, or remove it first)")
    with tempfile.TemporaryDirectory(prefix="lalora-base-") as tmp, torch_threads(cfg.runtime.threads):
        try:
            result = PRETRAIN.run(BaseInputs.from_config(cfg, tmp), NullTracker())
        except BadInput as e:
            return fail(str(e))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(result.path, out, dirs_exist_ok=True)
    loss = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    print(
        f"wrote {out}: a tiny Llama pretrained {cfg.model.pretrain.steps} steps on {cfg.source.name} and "
        f"{len(cfg.model.pretrain.extra_data)} extra data sets in {result.seconds:.0f} s{loss}"
    )
    print(f"model.sha256: {file_sha256(out / WEIGHTS_FILE)}")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from flows.about import environment_lines

    print("\n".join(environment_lines()))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from pipelines.config import config_schema

    text = config_schema()
    if args.out is None:
        print(text, end="")
        return 0
    problem = out_problem(Path(args.out), file=True)
    if problem:
        return fail(problem)
    try:
        Path(args.out).write_text(text)
    except OSError as e:
        return fail(f"--out {args.out}: cannot be written ({e.strerror or e}); give a file path you can write")
    print(f"wrote the lineage config's JSON Schema to {args.out}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Every problem each config has that can be known without training, one line each, every file checked;
    exit 2 if any has one."""
    codes = [_validate_one(config, args.overrides) for config in args.configs]
    return max(codes)


def _validate_one(config: str, overrides: list[str]) -> int:
    from pipelines.config import ConfigError, load_config
    from pipelines.lineage.preflight import budget_line, memory_line, preflight

    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        for line in e.errors:
            print(f"{e.source}: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    problems = preflight(cfg)
    for line in problems:
        print(f"{config}: {line}", file=sys.stderr)
    if problems:
        return EXIT_BAD_INPUT
    probes = f"; probes: {', '.join(d.name for d in cfg.probes)}" if cfg.probes else ""
    print(
        f"{config}: OK ({len(cfg.domains)} stages: {', '.join(d.name for d in cfg.domains)}{probes}; "
        f"lambda {_lambda(cfg.lalora.lam)}, curvature {cfg.lalora.curvature.kind})"
    )
    for info in (memory_line(cfg), budget_line(cfg)):
        if info:
            print(f"{config}: {info}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.config import ConfigError, TrackingConfig, load_config

    try:
        cfg = load_config(args.config, args.overrides)  # fail before anything heavy is imported or loaded
    except ConfigError as e:
        return fail(f"{e.source}: {'; '.join(e.errors)}")
    if args.fork is not None:
        try:
            TrackingConfig(registered_model=args.fork)
        except ValueError:
            return fail(f"--fork {args.fork!r}: not a usable registered model name")
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    problem = out_problem(out)
    if problem:
        return fail(problem)
    prepare_environment()
    return report(lambda: _run(args, cfg, out))


def _run(args: argparse.Namespace, cfg: Any, out: Path) -> int:
    from flows.console import keep_run_failures_off_the_console

    keep_run_failures_off_the_console()
    from flows.lineage_flow import lineage_flow, lineage_locks
    from flows.lock import hold

    t0 = time.perf_counter()
    # one writer per lineage: see flows/lease.py
    with hold(lineage_locks(cfg, out, args.fork), wait=args.wait, timeout=cfg.orchestration.lock_timeout_seconds):
        start_local_api()
        result = lineage_flow(str(args.config), str(out), list(args.overrides), fork=args.fork)
    _print_result(result, cfg, out / "forks" / args.fork if args.fork else out, out, time.perf_counter() - t0)
    return 0


def _print_result(result: Any, cfg: Any, where: Path, out: Path, seconds: float) -> None:
    """What `lalora run` prints last: R, the metrics, what ran, the promotions, where everything is."""
    from pipelines.lineage.report import format_matrix, format_summary

    report = result.report
    print()
    print(format_matrix(report.domains, report.R, scores=report.scores))
    print()
    print(format_summary(report))
    print()
    ran, skipped = result.stages_run, result.stages_skipped
    if not ran:
        print(f"lineage {result.registered_model!r} is up to date: {len(skipped)} stages recorded, nothing run")
    else:
        print(
            f"lineage {result.registered_model!r}: ran stage(s) {', '.join(map(str, ran))} in {seconds:.0f} s"
            + (f", skipped finished stage(s) {', '.join(map(str, skipped))}" if skipped else "")
            + f"; lambda {_lambda(cfg.lalora.lam)}, curvature {cfg.lalora.curvature.kind}"
        )
    for number, p in result.promotion.items():
        if p.promoted:
            print(f"promotion:  version {number} (stage {p.stage}) -> alias {cfg.promotion.alias!r}")
        else:
            print(f"promotion:  version {number} (stage {p.stage}) NOT promoted: {p.reason}")
    print(f"metrics:    {where / 'metrics.json'}   heatmap: {where / 'R.png'}")
    print(
        f"registered: {result.registered_model} versions {', '.join(result.versions)} "
        f"(aliases: {', '.join(f'{a} -> {v}' for a, v in result.aliases.items())})"
    )
    print(ui_hint(result.mlflow_uri, out))


def ui_hint(uri: str, out: Path) -> str:
    """How to look at the runs: a tracking server has its own UI; a local store needs one started."""
    if uri.startswith(("http://", "https://")):
        return f"MLflow UI:  {uri}   (the tracking server's own UI)"
    if uri == f"sqlite:///{(out / 'mlflow.db').resolve()}":
        return f"MLflow UI:  lalora ui --out {out}   (or: mlflow ui --backend-store-uri {uri} --host 127.0.0.1)"
    return f"MLflow UI:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1"


def build_deployment(config: str, out: str, overrides: list[str], cron: str, name: str, timezone: str = "UTC"):
    """The lineage flow as a Prefect deployment on a cron schedule; every run adapts to the domains
    of the config (and its catalogue) that the lineage has not seen."""
    from prefect.schedules import Cron

    from flows.lineage_flow import lineage_flow

    return lineage_flow.to_deployment(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        parameters={
            "config_path": str(Path(config).resolve()),
            "out_dir": str(Path(out).resolve()),
            "overrides": list(overrides),
        },
        description="LaLoRA lineage: adapts to any new domain of the config on every scheduled run",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from pipelines.config import ConfigError, load_config

    try:
        load_config(args.config, args.overrides)
    except ConfigError as e:
        return fail(f"{e.source}: {'; '.join(e.errors)}")
    from flows.deploy import check_schedule

    try:
        check_schedule(args.cron, args.timezone)
    except BadInput as e:
        return fail(str(e))
    if not os.environ.get("PREFECT_API_URL"):
        return fail(
            "lalora serve needs a Prefect server: start one (lalora ui, or prefect server start --host "
            "127.0.0.1) and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    prepare_environment()
    from prefect import serve

    out = args.out or str(Path("runs") / Path(args.config).stem)
    deployment = build_deployment(
        args.config, out, args.overrides, args.cron, args.name or Path(args.config).stem, args.timezone
    )
    print(f"serving lalora-lineage/{deployment.name} on {args.cron!r} ({args.timezone}); Ctrl-C stops")
    serve(deployment, print_starting_message=False)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from pipelines.config import ConfigError, load_config

    try:
        load_config(args.config, args.overrides)
    except ConfigError as e:
        return fail(f"{e.source}: {'; '.join(e.errors)}")
    prepare_environment()

    def run() -> int:
        from flows.deploy import deploy

        out = args.out or str(Path("runs") / Path(args.config).stem)
        done = deploy(
            args.config,
            args.pool,
            out,
            list(args.overrides),
            name=args.name or Path(args.config).stem,
            cron=args.cron,
            timezone=args.timezone,
        )
        pool = f"work pool {done.pool!r} ({'created, ' if done.pool_created else ''}type process)"
        when = f"on {done.schedule!r} ({args.timezone})" if done.schedule else "on demand"
        print(f"deployed {done.name} to {pool}, {when}, one run at a time (id {done.deployment_id})")
        print("run it now:        " + done.commands()[0])
        print("start a worker:    " + done.commands()[1] + "   (on any host with lalora installed)")
        return 0

    return report(run)


def cmd_ui(args: argparse.Namespace) -> int:
    """MLflow UI and Prefect server as child processes bound to 127.0.0.1; Ctrl-C (or SIGTERM) stops both."""
    import signal
    import subprocess

    store = args.backend_store_uri or f"sqlite:///{Path(args.out).resolve() / 'mlflow.db'}"
    if store.startswith("sqlite:///"):
        Path(store.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        PREFECT_SERVER_ANALYTICS_ENABLED=os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION=os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
    )
    mlflow = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store]
    cmds = {"mlflow": [*mlflow, "--host", "127.0.0.1", "--port", str(args.mlflow_port)]}
    if not args.no_prefect:
        prefect = [sys.executable, "-m", "prefect", "server", "start"]
        cmds["prefect"] = [*prefect, "--host", "127.0.0.1", "--port", str(args.prefect_port)]
    procs = {name: subprocess.Popen(cmd, env=env, start_new_session=True) for name, cmd in cmds.items()}
    print(f"MLflow UI:      http://127.0.0.1:{args.mlflow_port}   (store {store})", flush=True)
    if "prefect" in procs:
        print(f"Prefect server: http://127.0.0.1:{args.prefect_port}", flush=True)
        print(
            f"use them:       export PREFECT_API_URL=http://127.0.0.1:{args.prefect_port}/api "
            f"MLFLOW_TRACKING_URI=http://127.0.0.1:{args.mlflow_port}",
            flush=True,
        )

    stopping = []

    def stop(signum: int, frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    try:
        while not stopping:
            exited = [(n, p.returncode) for n, p in procs.items() if p.poll() is not None]
            if exited:
                name, code = exited[0]
                print(f"lalora: error: {name} exited with {code}", file=sys.stderr)
                code = code or 1
                break
            time.sleep(0.2)
    finally:
        _stop_servers(procs)
    return code


def _stop_servers(procs: dict[str, Any]) -> None:
    """Each server runs in its own session: signal the whole group (SIGINT, then SIGTERM, then SIGKILL, each given
    its time), so its workers stop too."""
    import contextlib
    import signal

    for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
        deadline = time.time() + wait
        while time.time() < deadline and any(p.poll() is None for p in procs.values()):
            time.sleep(0.2)
        if all(p.poll() is not None for p in procs.values()):
            break
    for p in procs.values():  # anything left in the servers' own groups (worker processes)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)


def _sweep_axes(args: argparse.Namespace) -> list[Any]:
    """--curvature, --lambda and every --grid as the sweep's axes (one-line errors for bad values)."""
    from lalora import CURVATURES
    from pipelines.lineage.sweep import AUTO, CURVATURE, LAMBDA, Axis, parse_axis

    grid = [parse_axis(g) for g in args.grid]
    if grid and args.lambdas is None and args.curvatures is None:
        return grid
    given = "0,1,10,100" if args.lambdas is None else args.lambdas
    try:
        lambdas = tuple(AUTO if v.strip() == AUTO else float(v) for v in given.split(",") if v.strip())
    except ValueError:
        lambdas = ()
    if not lambdas:
        raise BadInput(
            f"--lambda {args.lambdas!r}: expected comma-separated numbers or auto, e.g. --lambda 0,1,10 "
            "or --lambda 0,auto"
        )
    given = "diag,identity" if args.curvatures is None else args.curvatures
    curvatures = tuple(c.strip() for c in given.split(",") if c.strip())
    if not curvatures:
        raise BadInput(f"--curvature {args.curvatures!r}: no kind given; e.g. --curvature diag,kfac")
    unknown = [c for c in curvatures if c not in CURVATURES]
    if unknown:
        raise BadInput(
            f"--curvature: unknown kind(s) {', '.join(unknown)}; choose from {', '.join(sorted(CURVATURES))}"
        )
    return [Axis(CURVATURE, curvatures), Axis(LAMBDA, lambdas), *grid]


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipelines.config import ConfigError, load_config
    from pipelines.lineage.sweep import forgetting_columns, point_config, sweep_points

    try:
        cfg = load_config(args.config, args.overrides)
        axes = _sweep_axes(args)
        points = sweep_points(axes, args.seeds, args.first_seed)
        for point in points:  # every point's config is valid before any lineage starts
            point_config(cfg, point, "sqlite:///check.db", args.stages)
        forgetting_on = [n.strip() for n in args.forgetting_on.split(",") if n.strip()] if args.forgetting_on else None
        allowed = forgetting_columns(cfg, args.stages)
        if forgetting_on and set(forgetting_on) - set(allowed):
            raise BadInput(
                f"--forgetting-on: {', '.join(sorted(set(forgetting_on) - set(allowed)))} is not an earlier "
                f"column of this sweep; choose from {', '.join(allowed)}"
            )
    except ConfigError as e:
        return fail(f"{e.source}: {'; '.join(e.errors)}")
    except BadInput as e:
        return fail(str(e))
    out = Path(args.out or Path("runs") / f"{Path(args.config).stem}-sweep")
    problem = out_problem(out)
    if problem:
        return fail(problem)
    prepare_environment()
    return report(lambda: _sweep(args, cfg, out, axes, points, forgetting_on))


def _sweep(
    args: argparse.Namespace, cfg: Any, out: Path, axes: list[Any], points: list[Any], forgetting_on: list[str] | None
) -> int:
    from flows.console import keep_run_failures_off_the_console

    keep_run_failures_off_the_console()
    from flows.sweep_flow import sweep_flow

    print(f"sweep {cfg.name!r}: {len(points)} lineages ({', '.join(p.label for p in points)})", file=sys.stderr)
    start_local_api()
    t0 = time.perf_counter()
    summary = sweep_flow(
        str(args.config),
        str(out),
        [(a.field, list(a.values)) for a in axes],
        args.seeds,
        list(args.overrides),
        args.stages,
        forgetting_on,
        args.first_seed,
    )
    print((out / "sweep.md").read_text())
    for f in summary["failed"]:
        print(f"left out (diverged): {f['point']}: {f['reason']}")
    print(f"sweep of {len(summary['points'])} lineages in {time.perf_counter() - t0:.0f} s")
    print(f"table: {out / 'sweep.md'}   plot: {out / 'pareto.png'}   all figures: {out / 'sweep.json'}")
    print(ui_hint(summary["mlflow_uri"], out))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return fail(
            "export needs the tracking store: set MLFLOW_TRACKING_URI or pass --tracking-uri "
            "(e.g. sqlite:///runs/demo/mlflow.db)"
        )
    problem = out_problem(Path(args.out))
    if problem:
        return fail(problem)
    prepare_environment()

    def run() -> int:
        from flows.export import export

        done = export(uri, args.model_uri, Path(args.out), merge=args.merge)
        what = "merged transformers model" if done.merged else "peft adapter folder"
        print(
            f"exported {done.model} version {done.version} (stage {done.record.stage}: {done.record.domain}) as a "
            f"{what}: {done.out}"
        )
        return 0

    return report(run)


def _lambda(lam: float | str) -> str:
    return lam if isinstance(lam, str) else f"{lam:g}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return {
        "run": cmd_run,
        "validate": cmd_validate,
        "sweep": cmd_sweep,
        "serve": cmd_serve,
        "deploy": cmd_deploy,
        "export": cmd_export,
        "ui": cmd_ui,
        "init": cmd_init,
        "env": cmd_env,
        "base": cmd_base,
        "schema": cmd_schema,
    }[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
