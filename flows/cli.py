"""The ``lalora`` command line: ``run`` a lineage, ``sweep`` lambda and curvature, ``validate`` a config."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_LOCKED = 4


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lalora", description="Continual LoRA adaptation with a Laplace penalty (LaLoRA).")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="adapt the base model through every domain of CONFIG")
    run.add_argument("config", help="lineage YAML, e.g. configs/demo.yaml")
    run.add_argument("--out", default=None, help="output directory (default runs/<config name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set lalora.lambda=0 (repeatable)")
    run.add_argument("--wait", action="store_true",
                     help="if another run holds this lineage, wait for it instead of refusing")
    sw = sub.add_parser("sweep", help="run CONFIG's lineage per (curvature, lambda, seed); table and Pareto plot")
    sw.add_argument("config")
    sw.add_argument("--lambda", dest="lambdas", default="0,1,10,100", help="comma-separated lambdas; 0 is plain LoRA")
    sw.add_argument("--curvature", dest="curvatures", default="diag,identity",
                    help="comma-separated curvature kinds (diag, kfac, kfac-tri, identity)")
    sw.add_argument("--seeds", type=int, default=1, help="seeds per point (LoRA init and data order)")
    sw.add_argument("--stages", type=int, default=None,
                    help="use only the first N domains (1: one-stage transfer, forgetting measured on the source)")
    sw.add_argument("--out", default=None, help="output directory (default runs/<config name>-sweep)")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    val = sub.add_parser("validate", help="check CONFIG and report every error with its field path")
    val.add_argument("config")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"lalora: error: {message}", file=sys.stderr)
    return code


def _quiet_libraries() -> None:
    """Defaults for a local run; anything already set in the environment wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "lalora" / "torch_extensions"))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipelines").setLevel(logging.INFO)
    for noisy in ("DeepSpeed", "deepspeed", "mlflow", "alembic", "httpx", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="deepspeed")


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def cmd_validate(args: argparse.Namespace) -> int:
    from pipelines.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        for line in e.errors:
            print(f"{e.source}: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    probes = f"; probes: {', '.join(d.name for d in cfg.probes)}" if cfg.probes else ""
    print(f"{args.config}: OK ({len(cfg.domains)} stages: {', '.join(d.name for d in cfg.domains)}{probes}; "
          f"lambda {cfg.lalora.lam:g}, curvature {cfg.lalora.curvature.kind})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from lalora.checkpoint import CheckpointError
    from pipelines.config import ConfigError, load_config
    from pipelines.data import DataError
    from pipelines.engine import DivergenceError
    from pipelines.report import format_matrix, format_summary

    try:
        cfg = load_config(args.config, args.overrides)  # fail before anything heavy is imported or loaded
    except ConfigError as e:
        return _fail(f"{e.source}: {'; '.join(e.errors)}")
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    _quiet_libraries()
    from flows.lineage import lineage_flow
    from flows.lock import LockHeld, hold, lock_paths
    from lalora.checkpoint import NonFinitePrecision

    t0 = time.perf_counter()
    locks = lock_paths(out, cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI"),
                       cfg.tracking.registered_model)
    try:
        with hold(locks, wait=args.wait):  # one run per lineage: no duplicate versions, no interleaved stages
            result = lineage_flow(str(args.config), str(out), list(args.overrides))
    except LockHeld as e:
        return _fail(str(e), EXIT_LOCKED)
    except (DivergenceError, NonFinitePrecision) as e:
        return _fail(str(e), EXIT_DIVERGED)
    except (ConfigError, DataError, CheckpointError) as e:
        return _fail(str(e))
    except ValueError as e:  # our own checks (adapter / precision mismatch, unknown modules, ...)
        return _fail(str(e).splitlines()[0])
    seconds = time.perf_counter() - t0
    from pipelines.report import LineageReport

    report = LineageReport(result["domains"], result["R"], result["R_nll"], result)
    print()
    print(format_matrix(result["domains"], result["R"], scores=list(result.get("scores", {}).values())))
    print()
    print(format_summary(report))
    print()
    print(f"lineage {cfg.name!r}: {len(result['versions'])} stages in {seconds:.0f} s, lambda {cfg.lalora.lam:g}, "
          f"curvature {cfg.lalora.curvature.kind}")
    print(f"metrics:    {out / 'metrics.json'}   heatmap: {out / 'R.png'}")
    print(f"registered: {result['registered_model']} versions {', '.join(result['versions'])} "
          f"(alias {cfg.tracking.latest_alias!r} -> {result['versions'][-1]})")
    print(f"MLflow UI:  mlflow ui --backend-store-uri {result['mlflow_uri']} --host 127.0.0.1")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from lalora import CURVATURES
    from lalora.checkpoint import CheckpointError
    from pipelines.config import ConfigError, load_config
    from pipelines.data import DataError
    from pipelines.sweep import sweep_points

    try:
        cfg = load_config(args.config, args.overrides)
        lambdas = [float(v) for v in args.lambdas.split(",") if v.strip()]
        curvatures = [c.strip() for c in args.curvatures.split(",") if c.strip()]
        unknown = [c for c in curvatures if c not in CURVATURES]
        if unknown:
            return _fail(f"--curvature: unknown kind(s) {', '.join(unknown)}; choose from {', '.join(sorted(CURVATURES))}")
        points = sweep_points(lambdas, curvatures, args.seeds)
    except ConfigError as e:
        return _fail(f"{e.source}: {'; '.join(e.errors)}")
    except ValueError as e:
        return _fail(f"--lambda / --seeds: {e}" if "could not convert" in str(e) else str(e))
    out = Path(args.out or Path("runs") / f"{Path(args.config).stem}-sweep")
    _quiet_libraries()
    from flows.sweep import sweep_flow

    print(f"sweep {cfg.name!r}: {len(points)} lineages ({', '.join(p.label for p in points)})", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        summary = sweep_flow(str(args.config), str(out), lambdas, curvatures, args.seeds, list(args.overrides),
                             args.stages)
    except (ConfigError, DataError, CheckpointError) as e:
        return _fail(str(e))
    except ValueError as e:
        return _fail(str(e).splitlines()[0])
    print((out / "sweep.md").read_text())
    for f in summary["failed"]:
        print(f"left out (diverged): {f['point']}: {f['reason']}")
    print(f"sweep of {len(summary['points'])} lineages in {time.perf_counter() - t0:.0f} s")
    print(f"table: {out / 'sweep.md'}   plot: {out / 'pareto.png'}   all figures: {out / 'sweep.json'}")
    print(f"MLflow UI:  mlflow ui --backend-store-uri {summary['mlflow_uri']} --host 127.0.0.1")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return {"run": cmd_run, "validate": cmd_validate, "sweep": cmd_sweep}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
