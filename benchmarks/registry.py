"""What the registry's delivery costs: loading a version through pyfunc against loading base + adapter
with peft, the bytes a version adds to the artifact store against the adapter's own, and the
served model's first response.

    python benchmarks/registry.py                  # the demo's champion (run `make demo` first)
    python benchmarks/registry.py --json --reps 5

Two models, each side by side in this one process, repetitions interleaved, minimum reported:
the demo's champion (models:/lalora-demo@champion in runs/demo/mlflow.db), and a version with a
SmolLM2-135M-shaped base (random weights, 135 M parameters, fp32, LoRA r 8 on q/v) registered
by the project's own packaging into a temporary store. Then `mlflow models serve` on the demo's
champion: seconds from starting the process to its first answer, and the latency of later
requests (median of 10).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _timed_loads(model_uri: str, tracking_uri: str, base: str, adapter: str, reps: int) -> dict[str, float]:
    import mlflow

    from pipelines.runtime.models import load_for_inference

    mlflow.set_tracking_uri(tracking_uri)
    pyfunc, direct = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        load_for_inference(base, adapter)
        direct.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mlflow.pyfunc.load_model(model_uri)
        pyfunc.append(time.perf_counter() - t0)
    mlflow.set_tracking_uri(None)
    return {"pyfunc_seconds": min(pyfunc), "peft_seconds": min(direct), "ratio": min(pyfunc) / min(direct)}


def _version_bytes(tracking_uri: str, model: str, version: str) -> dict[str, float]:
    from mlflow import MlflowClient

    v = MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version(model, version)
    model_dir = Path(v.source.removeprefix("file://"))
    adapter = sum(
        (model_dir / "artifacts" / "adapter" / n).stat().st_size
        for n in ("adapter_config.json", "adapter_model.safetensors")
    )
    return {"version_bytes": _bytes(model_dir), "adapter_bytes": adapter, "bytes_ratio": _bytes(model_dir) / adapter}


def demo(store: Path, reps: int) -> dict[str, object]:
    from mlflow import MlflowClient

    from pipelines.lineage.record import VersionRecord

    uri = f"sqlite:///{store.resolve()}"
    v = MlflowClient(uri, registry_uri=uri).get_model_version_by_alias("lalora-demo", "champion")
    record = VersionRecord.from_tags(dict(v.tags))
    if record is None or record.format < 2:
        raise SystemExit(f"{store}: the demo's champion is not a python_function model; rerun make demo")
    model_dir = Path(v.source.removeprefix("file://"))
    return {
        "model_uri": "models:/lalora-demo@champion",
        "version": v.version,
        **_timed_loads(
            "models:/lalora-demo@champion",
            uri,
            str(store.parent / "base"),
            str(model_dir / "artifacts" / "adapter"),
            reps,
        ),
        **_version_bytes(uri, "lalora-demo", str(v.version)),
    }


def smollm_shaped(work: Path, reps: int) -> dict[str, object]:
    """A 135 M-parameter base registered the project's way (base logged once, version refers to it)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from flows import generator
    from flows.registry import LineageRegistry
    from flows.runs import start_run
    from pipelines.lineage.record import VersionRecord
    from pipelines.runtime.models import char_tokenizer

    base_dir, adapter_dir = work / "base", work / "adapter"
    torch.manual_seed(0)
    tok = char_tokenizer()
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    net = LlamaForCausalLM(config)
    net.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    params = sum(p.numel() for p in net.parameters())
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    get_peft_model(net, lora).save_pretrained(adapter_dir)
    del net
    uri = f"sqlite:///{work / 'mlflow.db'}"
    registry = LineageRegistry(uri, "shaped", work / "cache")
    parent = start_run(uri, "bench", work / "mlartifacts", "lineage")
    base_uri = registry.shared_base(parent, "bench", str(base_dir))
    stage = start_run(uri, "bench", work / "mlartifacts", "stage 1", parent=parent.run_id)
    model_dir = generator.save(
        work / "model",
        adapter_dir,
        generator.ArtifactBase(uri=base_uri, location=registry.location(base_uri)),
        dtype="float32",
        max_new_tokens=8,
        stop=[],
        batch_size=8,
    )
    registry.describe("benchmark")
    record = VersionRecord(
        "shaped",
        1,
        "d",
        "c",
        "d",
        adapter_uri=f"runs:/{stage.run_id}/model/artifacts/adapter",
        rows_uri="",
        config_uri="",
        base_uri=base_uri,
    )
    version = registry.register(stage, model_dir, record, "benchmark", ["champion"])
    stored = registry.location(base_uri).removeprefix("file://")
    return {
        "model_uri": "models:/shaped@champion",
        "base_params": params,
        "base_bytes": _bytes(Path(stored)),
        **_timed_loads("models:/shaped@champion", uri, stored, str(adapter_dir), reps),
        **_version_bytes(uri, "shaped", version),
    }


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def served(store: Path, prompt: str) -> dict[str, float]:
    from pipelines.runtime.distributed import free_port

    uri = f"sqlite:///{store.resolve()}"
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/lalora-demo@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while not _up(f"http://127.0.0.1:{port}/ping"):
            if proc.poll() is not None:
                raise SystemExit("mlflow models serve exited before answering")
            time.sleep(0.05)
        ready = time.perf_counter() - t0
        body = json.dumps({"inputs": [prompt], "params": {"max_new_tokens": 8}}).encode()

        def ask() -> float:
            start = time.perf_counter()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=120) as r:
                r.read()
            return time.perf_counter() - start

        first = ask()
        later = [ask() for _ in range(10)]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    return {
        "ready_seconds": ready,
        "first_request_seconds": first,
        "first_response_seconds": ready + first,
        "later_request_median_seconds": statistics.median(later),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=str(ROOT / "runs" / "demo" / "mlflow.db"), help="the demo's SQLite store")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    store = Path(args.store)
    if not store.is_file():
        print(f"registry.py: {store} not found; run `make demo` first (or give --store)", file=sys.stderr)
        return 2
    from flows.console import prepare_environment

    prepare_environment()
    out: dict[str, object] = {"threads": __import__("torch").get_num_threads(), "reps": args.reps}
    out["demo"] = demo(store, args.reps)
    with tempfile.TemporaryDirectory(prefix="lalora-registry-bench-") as work:
        out["smollm2_shaped"] = smollm_shaped(Path(work), args.reps)
    out["served_demo"] = served(store, "rotate tlpko=")
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for name in ("demo", "smollm2_shaped"):
            r = out[name]
            print(
                f"{name}: load through pyfunc {r['pyfunc_seconds']:.3f} s, base + adapter with peft "
                f"{r['peft_seconds']:.3f} s, ratio {r['ratio']:.2f}; version {r['version_bytes']:,} bytes for an "
                f"adapter of {r['adapter_bytes']:,} ({r['bytes_ratio']:.3f}x)"
            )
        s = out["served_demo"]
        print(
            f"served demo: ready after {s['ready_seconds']:.2f} s, first answer {s['first_response_seconds']:.2f} s "
            f"after start ({s['first_request_seconds'] * 1000:.0f} ms request), later requests "
            f"{s['later_request_median_seconds'] * 1000:.0f} ms (median of 10)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
