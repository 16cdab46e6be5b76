"""What the user can fix, as one exception type.

``BadInput`` is input the user can fix: a config, data, a model path, a recorded artifact. The
command line reports it as one line and exit code 2. Anything else that escapes a stage is a bug
in the project and is reported with its traceback (exit code 1).
"""

from __future__ import annotations


class BadInput(ValueError):
    """Input the user can fix; the message says what is wrong and how to fix it."""


class DivergenceError(RuntimeError):
    """The loss or the penalty stopped being finite (exit code 3: lower the learning rate or lambda)."""
