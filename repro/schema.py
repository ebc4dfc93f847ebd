"""How the kit reads its YAML data (tables, recipes): pydantic models, and a schema error as one line.

Every model derives from `Model`, which names unknown and missing keys with what the block takes.
`validate` is the one place where pydantic's ValidationError becomes a UsageError line:
`<file>:<profile>: <key path>: <problem>`, e.g. `wanda.yaml:paper: metrics.boolq: accuracy metric lacks n`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Callable, Tuple, Type, TypeVar, Union

import reprlib

import yaml
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, ValidationError, WrapValidator, model_validator

from methods.core.errors import UsageError

M = TypeVar("M", bound=BaseModel)


class SchemaError(ValueError):
    """A check across fields, raised by a model's validator, with the key path below that model:
    pydantic only knows where the validator sits, not which key inside it is wrong."""

    def __init__(self, loc: Tuple[Any, ...], message: str):
        super().__init__(message)
        self.loc = tuple(loc)


class Model(BaseModel):
    # Row and metric ids are names even where YAML reads them as numbers.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _named_keys(cls, data):
        if not isinstance(data, dict):
            raise ValueError(f"must be a mapping, got {shown(data)}")
        if cls.model_config.get("extra") == "forbid":
            unknown = [str(k) for k in data if k not in cls.model_fields]
            if unknown:
                raise ValueError(f"unknown key {', '.join(unknown)} (expected {', '.join(cls.model_fields)})")
        missing = [name for name, f in cls.model_fields.items() if f.is_required() and name not in data]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
        return data


def explained(message: str) -> WrapValidator:
    """One message instead of pydantic's: a union fails once per member, which reads poorly."""
    def wrap(value, handler: Callable):
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"{message}, got {shown(value)}") from None
    return WrapValidator(wrap)


# A number as YAML writes one: an int or a float, never a bool or a numeric string.
Num = Annotated[Union[StrictInt, StrictFloat], explained("must be a number")]


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 60


def shown(value) -> str:
    """The offending value, cut short: a whole block pasted into the error line would bury it."""
    return _SHOWN.repr(value)


def is_num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(model: Type[M], data, where: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UsageError(f"{where}: {describe(exc)}") from None


def describe(exc: ValidationError) -> str:
    """The first error as `key.path: problem` (the rest usually follow from it)."""
    error = exc.errors()[0]
    loc = tuple(error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, Exception):
        loc += getattr(cause, "loc", ())
        message = str(cause)
    elif error["type"] == "missing":
        loc, message = loc[:-1], f"lacks {loc[-1]}"
    elif error["type"] == "extra_forbidden":
        loc, message = loc[:-1], f"unknown key {loc[-1]}"
    else:
        message = f"{error['msg'][:1].lower()}{error['msg'][1:]}, got {shown(error['input'])}"
    path = ".".join(str(part) for part in loc)
    return " ".join((f"{path}: {message}" if path else message).split("\n"))


def read_yaml(path: Path, what: str):
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read {what} {path}: {exc}".splitlines()[0]) from None
