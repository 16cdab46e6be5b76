"""Guards on what leaves a run: secrets never reach the tracker, config values never escape the output dir."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipelines.errors import BadInput

REDACTED = "***"
_SECRET_KEY = re.compile(r"pass(word|wd)?|secret|token|api[_-]?key|private[_-]?key|credential|auth", re.I)
_KEY_WORD = re.compile(r"(^|[._-])key$", re.I)
_MIN_SECRET_LEN = 4  # shorter env values ("1", "yes") would redact ordinary numbers


class PathEscape(BadInput):
    """A path built from configuration that leaves the directory it belongs in."""


def is_secret_name(name: str) -> bool:
    """True for names like MLFLOW_TRACKING_PASSWORD, hf_token, aws.secret, api-key, tracking.key."""
    last = re.split(r"[./]", name)[-1]
    return bool(_SECRET_KEY.search(last) or _KEY_WORD.search(last))


def secret_values(environ: dict[str, str] | None = None) -> set[str]:
    """Values of environment variables whose names look secret (MLFLOW_TRACKING_PASSWORD, HF_TOKEN, ...)."""
    env = os.environ if environ is None else environ
    return {v for k, v in env.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_LEN}


def redact_url(value: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host``; anything else unchanged."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if parts.password is None:
        return value
    netloc = f"{parts.username or ''}:{REDACTED}@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def redact_params(params: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Flat params with secrets removed: a secret-looking key loses its value, a value containing a secret
    environment variable's value loses it, and passwords in URLs are masked."""
    secrets = secret_values(environ)
    out: dict[str, Any] = {}
    for k, v in params.items():
        if is_secret_name(k):
            out[k] = REDACTED
            continue
        if isinstance(v, str):
            for s in secrets:
                v = v.replace(s, REDACTED)
            v = redact_url(v)
        out[k] = v
    return out


def contained(root: str | os.PathLike[str], *parts: str) -> Path:
    """``root / parts`` resolved, refusing anything that would land outside ``root`` ('..', absolute parts, links)."""
    base = Path(root).resolve()
    target = base.joinpath(*parts).resolve()
    if target != base and base not in target.parents:
        raise PathEscape(f"path {'/'.join(parts)!r} leaves the output directory {base}")
    return target
