"""How a method's options are declared and how a bad value is reported.

Every method declares its options once, as a frozen pydantic dataclass whose fields carry their
constraints (`Annotated[int, Field(ge=1, description=...)]`, `Literal[...]` for choices) and whose
model validators hold the rules between fields. `methods.make_options` builds them; a value the
declaration refuses becomes one `UsageError` line naming the method, the option and the value.
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, get_args, get_origin

import pydantic.dataclasses
from pydantic import ConfigDict, ValidationError
from pydantic.fields import FieldInfo

# Strict, so that a bool is not taken for an int nor a string for a number (recipes and
# --option values are YAML, which already gives real types); an int still fills a float field.
# Unknown keyword arguments are refused rather than ignored (pydantic's default for dataclasses).
STRICT = ConfigDict(strict=True, extra="forbid")

# The decorator of every method's `Options` (and of a subclass, which pydantic needs decorated too).
method_options = pydantic.dataclasses.dataclass(frozen=True, config=STRICT)

_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
           "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}
_KINDS = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
          "string_type": "a string"}


def declared(options_type: type) -> Dict[str, FieldInfo]:
    """The declared fields of an options class, by name, in declaration order."""
    return dict(options_type.__pydantic_fields__)


def one_line(error: ValidationError, fields: Dict[str, FieldInfo]) -> str:
    """pydantic's errors as one line: `option pruning_ratio must be < 1, got 1.5` (several joined by '; ')."""
    return "; ".join(dict.fromkeys(_say(e, fields) for e in error.errors(include_url=False)))


def _say(error: dict, fields: Dict[str, FieldInfo]) -> str:
    kind, context = error["type"], error.get("ctx", {})
    name = str(error["loc"][0]) if error["loc"] else None
    got = f", got {error.get('input')!r}"
    if kind in ("value_error", "assertion_error") or name is None:
        # A model validator's own sentence; it names its options itself.
        reason = str(context.get("error", error["msg"]))
        return reason if name is None else f"option {name}: {reason}"
    if kind in ("missing_argument", "missing"):
        return f"option {name} is required{_about(fields.get(name))}"
    if kind in _BOUNDS:
        key, sign = _BOUNDS[kind]
        return f"option {name} must be {sign} {_number(context[key])}{got}"
    if kind == "literal_error":
        return f"option {name} must be {context['expected']}{got}"
    if kind == "string_too_short":
        length = context["min_length"]
        need = "not be empty" if length == 1 else f"have at least {length} characters"
        return f"option {name} must {need}{got}"
    if kind in _KINDS:
        return f"option {name} must be {_KINDS[kind]}{got}{_about(fields.get(name))}"
    message = error["msg"][:1].lower() + error["msg"][1:]
    return f"option {name}: {message}{got}"


def _about(field) -> str:
    return f" ({field.description})" if field is not None and field.description else ""


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def choices(field: FieldInfo) -> List[Any]:
    """The values a `Literal` field accepts (empty for any other field)."""
    return list(get_args(field.annotation)) if get_origin(field.annotation) is Literal else []


def bounds(field: FieldInfo) -> List[str]:
    """The field's numeric constraints as text, e.g. ['> 0', '< 1']."""
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    return [f"{sign} {_number(getattr(m, key))}" for m in field.metadata
            for key, sign in signs.items() if getattr(m, key, None) is not None]
