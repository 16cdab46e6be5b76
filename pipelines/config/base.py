"""What every config model shares: forbidden extra keys, frozen values; the config's error type."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

from pipelines.errors import BadInput

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Names that also name directories, runs and registered models: no '/', no '..'."""


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


class ConfigError(BadInput):
    """A configuration that cannot be used; ``errors`` holds one line per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))
