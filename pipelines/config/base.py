"""What every config model shares: forbidden extra keys, frozen values; the config's error type."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from pipelines.errors import BadInput

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Names that also name directories, runs and registered models: no '/', no '..'."""


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


NOT_IDENTITY: dict[str, Any] = {"identity": False}
"""A field's ``json_schema_extra``: it cannot change what a stage produces (bookkeeping, resources, how the same
update is computed), so it is left out of the stage's identity (its hash); the schema says so too."""
WHEN_SET: dict[str, Any] = {"identity": "when set"}
"""A field's ``json_schema_extra``: part of the stage's identity only when set (left out when None, so configs
from before the field keep their hashes)."""


def identity_fields(model: type[BaseModel], mark: dict[str, Any]) -> tuple[str, ...]:
    """The fields of ``model`` (by their names in the dump, aliases included) whose schema carries ``mark``."""
    return tuple(
        f.alias or name
        for name, f in model.model_fields.items()
        if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("identity") == mark["identity"]
    )


def _lambda_value(value: Any) -> Any:
    """A lambda: 'auto' or a finite number >= 0, refused in one line (not one line per member of the union)."""
    if value == "auto":
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number >= 0 or 'auto', got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError("Input should be a finite number")
    if number < 0:
        raise ValueError("Input should be greater than or equal to 0")
    return number


Lambda = Annotated[Annotated[float, Field(ge=0)] | Literal["auto"], BeforeValidator(_lambda_value)]
"""A penalty strength: a number >= 0, or ``auto`` (searched per stage within a forgetting budget)."""


class ConfigError(BadInput):
    """A configuration that cannot be used; ``errors`` holds one line per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))
