"""Every registered version is an MLflow ``python_function`` model: greedy completions of prompts by the
base model with the version's adapter, exactly as the pipeline's own scoring generates them.

A version's model holds the adapter (``artifacts/adapter``: adapter_config.json and the safetensors
weights) and refers to the base in its ``model_config``, never copying it: a hub id at a revision,
or the base artifact the lineage logged once, resolved when the model loads (a local file store
is read in place, anything else downloaded once to ``$LALORA_CACHE_DIR/bases``). MLflow loads the
class from ``flows/generator_code.py`` ("models from code"). The version is self-contained: the
project's three packages travel in its ``code/`` folder (MLflow's ``code_paths``, Python sources
only), and its requirements are real distributions pinned to the versions that logged it (torch
included), so it loads in a fresh environment built from its own ``requirements.txt``, where this
project is not installed.

Input: a column of prompts (``prompt``), a list of strings or one string. Params: ``max_new_tokens``
and ``stop`` (strings that end a completion). Output: one completion per prompt.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.pyfunc import PythonModel

from pipelines.workspace import move_into_place, sha256_text

CODE = Path(__file__).with_name("generator_code.py")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
EXAMPLE_PROMPT = "abc"


def cache_dir() -> Path:
    return Path(os.environ.get("LALORA_CACHE_DIR") or Path.home() / ".cache" / "lalora")


@dataclass(frozen=True, kw_only=True)
class HubBase:
    """A base on the Hugging Face hub, at the revision the lineage trained on."""

    id: str
    revision: str | None

    def as_json(self) -> dict[str, Any]:
        return {"kind": "hub", "id": self.id, "revision": self.revision}


@dataclass(frozen=True, kw_only=True)
class ArtifactBase:
    """A base the lineage logged once as a run artifact: its ``runs:/`` URI and where the store keeps it."""

    uri: str
    location: str

    def as_json(self) -> dict[str, Any]:
        return {"kind": "artifact", "uri": self.uri, "location": self.location}


BaseReference = HubBase | ArtifactBase
"""How a version's model finds its base (its ``model_config["base"]``, as ``as_json`` writes it)."""


def base_reference(data: dict[str, Any]) -> BaseReference:
    """The reference a version's ``model_config`` holds."""
    if data.get("kind") == "hub":
        return HubBase(id=data["id"], revision=data.get("revision"))
    if data.get("kind") == "artifact":
        return ArtifactBase(uri=data["uri"], location=data["location"])
    raise ValueError(f"unknown base reference {data!r}")


def resolve_base(ref: BaseReference) -> tuple[str, str | None]:
    """(from_pretrained path or hub id, revision) of a version's base reference."""
    if isinstance(ref, HubBase):
        return ref.id, ref.revision
    location = ref.location
    if location.startswith("file://") and Path(location.removeprefix("file://")).is_dir():
        return location.removeprefix("file://"), None
    from mlflow.artifacts import download_artifacts

    dest = cache_dir() / "bases" / sha256_text(location)[:24]
    if not (dest / "config.json").is_file():
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        got = Path(download_artifacts(artifact_uri=location, dst_path=str(tmp)))
        move_into_place(got, dest)
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest), None


def prompts_of(model_input: Any) -> list[str]:
    """The prompts of a pyfunc input: a DataFrame (column ``prompt``, else its first), a list, a string."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(p) for p in model_input[column].tolist()]
    if isinstance(model_input, dict):
        return [str(p) for p in model_input.get("prompt", next(iter(model_input.values())))]
    return [str(p) for p in list(model_input)]


# MLflow suggests type hints on predict when the class is defined (once, whatever the filters say); the
# signature is given explicitly instead, so the suggestion is recorded and dropped.
with warnings.catch_warnings(record=True):

    class LaLoRAGenerator(PythonModel):
        """Greedy completions from the base model and a LaLoRA adapter."""

        def load_context(self, context: Any) -> None:
            from pipelines.runtime.models import load_for_inference
            from pipelines.scoring.inference import merge_in_place

            config = context.model_config
            base, revision = resolve_base(base_reference(config["base"]))
            model, self.tokenizer = load_for_inference(base, context.artifacts["adapter"], config["dtype"], revision)
            self.model = merge_in_place(model)  # what scoring runs (a merged copy), without keeping a second one
            self.batch_size = int(config["batch_size"])
            self.defaults = {"max_new_tokens": int(config["max_new_tokens"]), "stop": list(config["stop"])}

        def predict(self, context, model_input, params=None):  # no type hints: MLflow would read a schema from them
            """One greedy completion per prompt of ``model_input``."""
            from pipelines.scoring.scorers import complete

            p = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
            return complete(
                self.model,
                self.tokenizer,
                prompts_of(model_input),
                batch_size=self.batch_size,
                max_new_tokens=int(p["max_new_tokens"]),
                stop=[str(s) for s in p["stop"]],
                desc="serve",
            )


CODE_PACKAGES = ("lalora", "pipelines", "flows")
"""The project's packages a version carries in its ``code/`` folder (loading imports from all three)."""

REQUIREMENTS = ("torch", "transformers", "peft", "safetensors", "tokenizers", "pydantic", "pyyaml", "tqdm", "mlflow")
"""The distributions loading and predicting import (given explicitly: MLflow's inference would ask for
torchvision, and would not see what the code in ``code/`` imports)."""


def pip_requirements() -> list[str]:
    """Every requirement pinned to the installed version. A local build label is dropped (``2.13.0+cpu``
    -> ``torch==2.13.0``, which a CPU wheel of that version satisfies too): a GPU host installs its own
    build of the same version."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in REQUIREMENTS]


def _code_tree(dest: Path) -> list[str]:
    """A copy of the project's packages under ``dest``, Python sources only (no caches); their paths."""
    root = Path(__file__).resolve().parents[1]
    paths = []
    for package in CODE_PACKAGES:
        for src in (root / package).rglob("*.py"):
            if "__pycache__" not in src.parts:
                target = dest / src.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
        paths.append(str(dest / package))
    return paths


def save(
    dest: Path,
    adapter_dir: str | Path,
    base: BaseReference,
    *,
    dtype: str,
    max_new_tokens: int,
    stop: list[str],
    batch_size: int,
    example: str = EXAMPLE_PROMPT,
) -> Path:
    """Write the version's model to ``dest``: MLmodel, the code, the adapter's two files, the environment;
    ``example`` is the input example (a prompt of the stage's domain)."""
    import tempfile

    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [ParamSpec("max_new_tokens", "long", max_new_tokens), ParamSpec("stop", "string", list(stop), shape=(-1,))]
        ),
    )
    shutil.rmtree(dest, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"  # peft's README model card is not part of the model
        adapter.mkdir()
        for name in ADAPTER_FILES:
            shutil.copy2(Path(adapter_dir) / name, adapter / name)
        code_paths = _code_tree(Path(tmp) / "code")
        with warnings.catch_warnings():  # MLflow suggests type hints on predict; the signature is explicit
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(
                path=str(dest),
                python_model=str(CODE),
                artifacts={"adapter": str(adapter)},
                model_config={
                    "base": base.as_json(),
                    "dtype": dtype,
                    "max_new_tokens": max_new_tokens,
                    "stop": list(stop),
                    "batch_size": batch_size,
                },
                signature=signature,
                input_example=([example], {"max_new_tokens": max_new_tokens}),
                pip_requirements=pip_requirements(),
                code_paths=code_paths,
            )
    return dest
