"""The command line's flags that come from declarations: each method's options (`lpc prune`), the train
options and each kind's settings (`lpc train`), and how a value typed on the command line is read."""
from __future__ import annotations

import argparse
import math
from typing import Any, Dict, List

from methods.core.errors import UsageError


# `lpc train` settings that `lpc prune` takes for a method whose pruning is a training run; the
# others are prune's own flags (--model, --out, --seed, --seqlen, --device) or fixed by the method.
NOT_PRUNE_TRAIN_FLAGS = ("model", "kind", "out", "teacher", "kd_temperature", "kd_alpha", "recipe", "seed", "seqlen",
                         "device")


def training_settings(args) -> dict:
    """The training run's settings of `lpc prune` for a method whose pruning is one: the training
    flags given, and --seqlen as its window length."""
    fields = train_fields()
    settings = {}
    for name in args.train_flags:
        value = getattr(args, name)
        if value is not None:
            settings[name] = value if isinstance(value, bool) else read_value(value, fields[name])
    if args.seqlen is not None:
        settings["seqlen"] = args.seqlen
    return settings


def add_method_flags(prune: argparse.ArgumentParser) -> None:
    """One flag per option that a registered method declares, its help from the declarations; and the
    training settings of the methods whose pruning is a training run."""
    import methods
    from methods.options import declared

    uses: Dict[str, list] = {}
    for method in methods.REGISTRY.values():
        for name, field in declared(method.options_type).items():
            uses.setdefault(name, []).append((method.name, field))
    group = prune.add_argument_group("method options", "each flag applies to the methods its help names; "
                                     "values are read as YAML")
    added = []
    for name, declarations in uses.items():
        if all(field.annotation is bool for _, field in declarations):
            kind: Dict[str, Any] = {"action": argparse.BooleanOptionalAction}
        else:
            kind = {"metavar": name.upper()}
        try:
            group.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                               help=_flag_help(declarations).replace("%", "%%"), **kind)
        except argparse.ArgumentError:
            continue  # a general flag owns the name (--seed); --option still reaches the method's option
        added.append(name)
    trained = [m.name for m in methods.REGISTRY.values() if m.trains]
    fields = {name: f for name, f in train_fields().items() if name not in NOT_PRUNE_TRAIN_FLAGS}
    add_fields(prune.add_argument_group(
        "training", f"for methods whose pruning is a training run ({', '.join(trained)}): the settings of that "
                    "run, as lpc train takes them; --seqlen is its window length"), fields, required=False)
    prune.set_defaults(method_flags=tuple(added), train_flags=tuple(fields))


def _flag_help(declarations) -> str:
    """`methods: description; {a,b}; > 0, < 1; default x`, one clause per distinct declaration."""
    from methods.options import bounds, choices

    texts: Dict[str, List[str]] = {}
    for method, field in declarations:
        parts = [field.description or ""]
        if choices(field):
            parts.append("{" + ",".join(map(str, choices(field))) + "}")
        if bounds(field):
            parts.append(", ".join(bounds(field)))
        if field.is_required():
            parts.append("required")
        elif field.default is not None:
            parts.append(f"default {field.default}")
        texts.setdefault("; ".join(p for p in parts if p), []).append(method)
    return " | ".join(f"{', '.join(names)}: {text}" for text, names in texts.items())


def method_options(args, method) -> dict:
    from methods.options import declared

    fields = declared(method.options_type)
    options = {}
    for name in args.method_flags:
        value = getattr(args, name)
        if value is not None:
            options[name] = value if isinstance(value, bool) else read_value(value, fields.get(name))
    for key, text in key_values(args.option):
        options[key] = read_value(text, fields.get(key))
    return options


def read_value(text: str, field) -> Any:
    """A method option's value from the command line: YAML, unless the declared type reads the text better.

    YAML 1.1 reads 2:4 and 4:30 as base-60 integers and 1e-3 as a string. Where the YAML value does
    not fit the option's declared type, a string option takes the text as it is, and text that YAML
    left a string is converted by pydantic (1e-3 for a float); anything else keeps its YAML value,
    to be refused with the declaration's message (1 stays an integer for a true/false option).
    """
    import yaml
    from pydantic import TypeAdapter, ValidationError

    from methods.options import STRICT

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if field is None:  # undeclared: a number if the text is one (YAML 1.1 leaves 1e-3 a string)
        if isinstance(value, str):
            try:
                number = float(text)
            except ValueError:
                return value
            return number if math.isfinite(number) else value
        return value
    strict = TypeAdapter(field.annotation, config=STRICT)
    for candidate in (value, text):
        try:
            strict.validate_python(candidate)
            return candidate
        except ValidationError:
            pass
    if isinstance(value, str):
        try:
            return TypeAdapter(field.annotation).validate_python(text)
        except ValidationError:
            pass
    return value


def train_fields():
    from training.options import TrainOptions

    return {name: f for name, f in TrainOptions.model_fields.items() if name != "recipe"}


def add_fields(parser: argparse.ArgumentParser, fields, *, required: bool = True) -> None:
    """One flag per declared field (pydantic FieldInfo): --name-with-dashes, its description as the help.

    The text is read as a method option's is (`_read_value`); booleans are flags of their own (--x / --no-x).
    `required=False` leaves even required fields optional for argparse (the model says what is missing)."""
    for name, info in fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = (info.description or "") + ("" if info.is_required() else f" (default: {info.default})")
        if info.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, required=required and info.is_required(),
                                help=help_text.replace("%", "%%"), metavar=name.upper())


def key_values(items: List[str]) -> List[tuple]:
    """--option KEY=VALUE items as (key, text) pairs, dashes in keys read as underscores."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        pairs.append((key.replace("-", "_"), value))
    return pairs
