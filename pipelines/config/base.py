"""What every config model shares: forbidden extra keys, frozen values; the config's error type."""

from __future__ import annotations

import math
import re
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from pipelines.errors import BadInput

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Names that also name directories, runs and registered models: no '/', no '..'."""


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_boolean_numbers(cls, data: Any) -> Any:
        """true/false (and YAML's yes/no/on/off) are not 1 and 0: a number field refuses them."""
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                key = field.alias if field.alias in data else name
                if isinstance(data.get(key), bool) and _numeric_only(field.annotation):
                    raise ValueError(
                        f"{key} must be a number, got {str(data[key]).lower()} (YAML reads true/false/yes/no as "
                        "booleans)"
                    )
        return data


def _numeric_only(annotation: Any) -> bool:
    """Whether a field of this type takes a number and no boolean (int, float, their optional or union forms)."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return any(_numeric_only(a) for a in members) and not any(a in (bool, Any) for a in members)
    return False


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
    if isinstance(value, bool):
        raise ValueError(f"must be a number >= 0 or 'auto', got {str(value).lower()}")
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
