"""What the user can fix, as one exception type.

``BadInput`` is input the user can fix: a config, data, a model path, a recorded artifact. The
command line reports it as one line and exit code 2. Anything else that escapes a stage is a bug
in the project and is reported with its traceback (exit code 1).
"""

from __future__ import annotations

from pathlib import Path


class BadInput(ValueError):
    """Input the user can fix; the message says what is wrong and how to fix it."""


class DivergenceError(RuntimeError):
    """The loss or the penalty stopped being finite (exit code 3: lower the learning rate or lambda)."""


def expand_user(path: str, field: str = "") -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded; one line (naming ``field``, the setting that holds
    it) where that user has no home directory."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        user = path.split("/", 1)[0]
        where = f"{field} " if field else ""
        raise BadInput(
            f"{where}{path}: {user} names no user's home directory here; write the path out in full"
        ) from None
