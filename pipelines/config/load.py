"""Loading a lineage config: YAML, ``--set`` overrides, local paths made absolute, a catalogue appended;
validated once, every problem reported with its field path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipelines.config.base import ConfigError
from pipelines.config.schema import LineageConfig
from pipelines.errors import BadInput, expand_user


def set_path(data: dict[str, Any], dotted: str, value: Any, flag: str = "--set") -> None:
    """Set the field at ``dotted`` (``a.b.0.c``) of a config's data; ConfigError naming a path that is not one."""
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(
                    flag, [f"{dotted}: {'.'.join(keys[: i + 1])} is not an index of a list of {len(node)}"]
                )
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(flag, [f"{dotted}: {'.'.join(keys[: i + 1])} is a value, not a section"])
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(flag, [f"{dotted}: {last} is not an index of a list of {len(node)}"])
        node[int(last)] = value
    else:
        node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", [f"{text!r}: expected KEY=VALUE, e.g. --set lalora.lambda=0"])
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError("--set", [f"{text!r}: value is not valid YAML ({e.__class__.__name__})"]) from None


def format_errors(e: ValidationError) -> list[str]:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see docs/reference/config.md or lalora schema)"
        elif err["type"] == "literal_error" and "expected" in err.get("ctx", {}):
            msg = f"must be one of {err['ctx']['expected']}"
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown kind {err['ctx'].get('tag')!r}; expected one of {err['ctx'].get('expected_tags')}"
        lines.append(f"{loc}: {msg}")
    return lines


def load_config(path: str | Path, overrides: list[str] | None = None) -> LineageConfig:
    """Read YAML, apply ``--set`` overrides, validate. Raises ConfigError listing every problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(path), ["file not found"])
    try:
        data = yaml.safe_load(_text(p)) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(str(path), [f"invalid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), ["top level must be a mapping of sections (model, lora, lalora, domains, ...)"])
    for text in overrides or []:
        key, value = parse_override(text)
        set_path(data, key, value)
    try:
        _resolve_local_paths(data, p.parent)
        if isinstance(data.get("catalogue"), str):
            _append_catalogue(data, p.parent)
    except ConfigError:
        raise
    except BadInput as e:  # a path that cannot be expanded
        raise ConfigError(str(path), [str(e)]) from None
    if isinstance(data.get("deepspeed"), dict) and isinstance(data["deepspeed"].get("hostfile"), str):
        data["deepspeed"]["hostfile"] = str((p.parent / data["deepspeed"]["hostfile"]).resolve())
    try:
        return LineageConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(str(path), format_errors(e)) from None


def _append_catalogue(data: dict[str, Any], base: Path) -> None:
    """Domains listed in the catalogue file join the config's own, after them."""
    path = (base / data["catalogue"]).resolve()
    data["catalogue"] = str(path)
    if not path.is_file():
        raise ConfigError(str(path), ["catalogue file not found"])
    try:
        listed = yaml.safe_load(_text(path)) or []
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [f"invalid YAML: {getattr(e, 'problem', e)}"]) from None
    if isinstance(listed, dict):
        listed = listed.get("domains") or []
    if not isinstance(listed, list):
        raise ConfigError(str(path), ["a catalogue is a list of domains or a mapping with 'domains'"])
    extra = {"domains": listed}
    _resolve_local_paths(extra, path.parent)
    data["domains"] = _listed(data, "domains") + extra["domains"]


def _text(path: Path) -> str:
    """A YAML file's text; one line where it is not UTF-8 text."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), [f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"]) from None


def _listed(data: dict[str, Any], key: str) -> list[Any]:
    """A section that must be a list (domains, probes), as one; any other value is named."""
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadInput(f"{key}: must be a list of domains, got {type(value).__name__} {value!r:.60}")
    return list(value)


def _resolve_local_paths(data: dict[str, Any], base: Path) -> None:
    """Local data files, and a local model directory, are relative to the config file."""
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        path = model["path"]
        # a directory beside the config is local; anything else stays as written (a hub id NAME or
        # NAMESPACE/NAME, or a path from the working directory as before)
        if not expand_user(path, "model.path").is_absolute() and (base / path).is_dir():
            model["path"] = str((base / path).resolve())
    domains = [data.get("source"), *_listed(data, "domains"), *_listed(data, "probes")]
    for section, key, field in (("model", "pretrain", "extra_data"), ("training", "replay", "data")):
        node = data.get(section)
        node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(field), list):
            domains += node[field]
    for d in domains:
        if not isinstance(d, dict):
            continue
        scoring = d.get("scoring")
        if (
            isinstance(scoring, dict)
            and isinstance(scoring.get("include_path"), str)  # an lm-eval task's YAMLs
            and not Path(scoring["include_path"]).is_absolute()
        ):
            scoring["include_path"] = str((base / scoring["include_path"]).resolve())
        eval_data = d.get("eval_data")
        for src in (d.get("data"), (eval_data or {}).get("data") if isinstance(eval_data, dict) else None):
            if (
                isinstance(src, dict)
                and src.get("kind") == "local"
                and isinstance(src.get("path"), str)
                and not Path(src["path"]).is_absolute()
            ):
                src["path"] = str((base / src["path"]).resolve())


def config_schema() -> str:
    """The lineage config's JSON Schema (pydantic's, field aliases as YAML spells them), as the text the repository
    ships in ``lalora.schema.json``."""
    import json

    from pipelines.config.schema import LineageConfig

    schema = LineageConfig.model_json_schema(by_alias=True)
    domains = schema["properties"]["domains"]  # the file's own list may be empty: a catalogue appends to it
    del domains["minItems"]
    domains["description"] += " May be empty in the file when catalogue lists them (at least one in all)."
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "lalora.schema.json", **schema}
    return json.dumps(schema, indent=1, sort_keys=True) + "\n"
