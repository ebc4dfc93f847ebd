"""`lpc`: prune, train and evaluate a model, reproduce a table, diff results against the papers.

Bad input prints one line (`lpc: error: ...`) and exits 2; a failed diff exits 1.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from methods.errors import UsageError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line, like every other bad input.

    `deferred` adds arguments when this (sub)parser is first used: `lpc prune`'s method flags come
    from every method module, whose imports (transformers) cost seconds that `lpc diff` need not pay.
    """

    def __init__(self, *args, deferred: Optional[Callable[[argparse.ArgumentParser], None]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._deferred = deferred

    def _add_deferred(self) -> None:
        if self._deferred is not None:
            add, self._deferred = self._deferred, None
            add(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_deferred()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._add_deferred()
        return super().format_help()

    def error(self, message: str):
        raise UsageError(message)


EVAL_BATCH_HELP = ("evaluation batch (lm-eval requests, perplexity windows) instead of the recipe's "
                   "(paper profiles: 1, as the papers); changes float rounding only")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lpc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub.required = True

    prune = sub.add_parser("prune", help="prune one model and save it as a Hugging Face checkpoint",
                           deferred=_add_method_flags)
    prune.add_argument("--model", required=True, help="local directory, hub id, or 'smoke'")
    prune.add_argument("--revision", help="hub revision (commit sha) of --model")
    prune.add_argument("--method", required=True)
    prune.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="any option of the method, the value read as YAML (e.g. --option head_weight=literal); "
                            "also those without a flag of their own (shortgpt's seed)")
    prune.add_argument("--calib", help="c4 | wikitext2 | bookcorpus | pg19 | wikitext103-train | windows:PATH | text file or dir | token ids (.pt/.npy)")
    prune.add_argument("--nsamples", type=int, help="default: 128, or the rows of a token file")
    prune.add_argument("--seqlen", type=int, help="default: the model context (max 8192), or a token file's width")
    prune.add_argument("--calib-batch", default="1", metavar="N|auto",
                       help="calibration samples fed to each layer per call (wanda, sparsegpt, wanda-sp); "
                            "default 1 reproduces the originals bit for bit; auto: as many as fit a quarter of free memory")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16")
    prune.add_argument("--device", help="compute device for layers (default: cuda if available)")
    prune.add_argument("--out", required=True, type=Path)
    prune.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    repro = sub.add_parser("repro", help="run a method's recipe and diff it against its table")
    repro.add_argument("method", nargs="?")
    repro.add_argument("--all", action="store_true",
                       help="every method of methods/registry.py with the profile, one after the other, each as "
                            "`lpc repro METHOD` runs (or submits) it")
    repro.add_argument("--methods", help="with --all: only these methods (comma-separated)")
    repro.add_argument("--profile", default="smoke", help="paper | smoke")
    repro.add_argument("--rows",
                       help="comma-separated row ids (default: all); with --all, each method's own among them")
    repro.add_argument("--results-dir", type=Path, default=Path("results/local"))
    repro.add_argument("--recipe", type=Path, help="a recipe file instead of repro/recipes/<method>.yaml")
    repro.add_argument("--eval-batch-size", metavar="N|auto", help=EVAL_BATCH_HELP)
    repro.add_argument("--no-dense-gate", action="store_true", help="continue even if the dense model is off")
    repro.add_argument("--work-dir", type=Path,
                       help="where rows keep their stage checkpoints: WORK/<profile>/<method>/<row>/{pruned,trained} "
                            "(default: <results-dir>/<profile>/<method>/stages/<row>)")
    repro.add_argument("--keep-stages", choices=("all", "trained", "none"), default="trained",
                       help="stage checkpoints kept once a row's result is written (default: trained)")
    repro.add_argument("--submit", choices=("local", "slurm", "skypilot"),
                       help="submit each unfinished stage as a jobman job (an afterok chain per row, then a diff) "
                            "instead of running here")
    repro.add_argument("--gpus", metavar="N|TYPE:N",
                       help="--submit: GPUs per node for training (TYPE:N, e.g. H100:8, is also asked of the backend)")
    repro.add_argument("--nodes", type=int, default=1, help="--submit: nodes for training (torchrun rendezvous)")
    repro.add_argument("--tpu", metavar="TYPE",
                       help="--submit skypilot: the TPU slice (e.g. v4-32) for rows that train with engine maxtext; "
                            "every host of it runs MaxText's trainer")
    repro.add_argument("--image", help="--submit: the container image jobs run in (slurm with pyxis, skypilot)")

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint on a recipe row's table metrics and write its result",
                              description="Writes <results-dir>/<profile>/<method>/<row>.json, as lpc repro does.")
    evaluate.add_argument("--model", required=True,
                          help="the row's last stage output (a pruned or trained checkpoint); the profile's model "
                               "for the dense row")
    evaluate.add_argument("--method", required=True)
    evaluate.add_argument("--profile", default="smoke", help="paper | smoke")
    evaluate.add_argument("--row", required=True)
    evaluate.add_argument("--results-dir", type=Path, default=Path("results/local"))
    evaluate.add_argument("--recipe", type=Path, help="a recipe file instead of repro/recipes/<method>.yaml")
    evaluate.add_argument("--eval-batch-size", metavar="N|auto", help=EVAL_BATCH_HELP)
    evaluate.add_argument("--backend", default="hf", help="how the checkpoint is loaded (default: hf)")
    evaluate.add_argument("--gate", action="store_true",
                          help="dense row: exit 1 when it is off its reference (what gates the other rows' jobs)")

    train = sub.add_parser("train", help="train a checkpoint: continued pre-training, distillation, sparse or LoRA",
                           description="Options not given keep their defaults (the collection's settings). "
                                       "Rerunning the same command resumes an interrupted run.")
    add_fields(train, _train_fields())
    train.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="lora: a field of the LoRA recipe (YAML value), e.g. --option r=8")
    train.add_argument("--overwrite", action="store_true", help="discard whatever --out holds and start afresh")

    convert = sub.add_parser("convert", help="convert a checkpoint between Hugging Face and MaxText (TPU training)",
                             description="Runs MaxText's own conversion (needs the MaxText environment: "
                                         ".venv-maxtext or the maxtext image). Uniform Llama checkpoints only.")
    convert.add_argument("--to", required=True, choices=("maxtext", "hf"), help="the format to write")
    convert.add_argument("--model", required=True,
                         help="--to maxtext: a Hugging Face checkpoint directory or 'smoke'; "
                              "--to hf: a MaxText directory written by lpc convert or lpc train --engine maxtext")
    convert.add_argument("--out", required=True, type=Path)
    convert.add_argument("--no-scan-layers", dest="scan_layers", action="store_false",
                         help="--to maxtext: store layers unstacked (MaxText's scan_layers=false)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    diff = sub.add_parser("diff", help="print paper | collection | ours | delta | tolerance | status")
    diff.add_argument("method", nargs="?", help="a method, or omit with --all")
    diff.add_argument("--all", action="store_true", help="every method and profile that has results")
    diff.add_argument("--profile", default="smoke")
    diff.add_argument("--results-dir", type=Path, default=Path("results/local"))
    diff.add_argument("--table", type=Path, help="with a method: a table file instead of repro/tables/<method>.yaml")
    diff.add_argument("--rows", help="with a method: comma-separated row ids to compare (default: all)")
    diff.add_argument("--no-plots", action="store_true",
                      help="compare the figures but write no PNG (default: <results>/<profile>/<method>/figures/)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command in ("prune", "repro", "train", "eval"):
            from repro.models import quiet_transformers

            quiet_transformers()
        return {"prune": cmd_prune, "repro": cmd_repro, "diff": cmd_diff, "train": cmd_train,
                "eval": cmd_eval, "convert": cmd_convert}[args.command](args)
    except UsageError as exc:
        print(f"lpc: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lpc: interrupted", file=sys.stderr)
        return 130


def cmd_prune(args) -> int:
    import methods
    from methods import calibration
    from repro import stages

    method = methods.get(args.method)
    options = _method_options(args, method)
    parsed = methods.make_options(method, options)  # validate before any slow loading
    training = _training_settings(args) if method.trains and getattr(parsed, "trains", True) else None
    given = [name for name in args.train_flags if getattr(args, name) is not None]
    if training is None and given:
        raise UsageError(f"--{given[0].replace('_', '-')} is a training setting; method {args.method!r} does not train")
    request = stages.PruneRequest(model=args.model, method=args.method, out=args.out, options=options,
                                  calib=args.calib, nsamples=args.nsamples,
                                  calib_batch=calibration.parse_batch(args.calib_batch),
                                  seqlen=None if training is not None else args.seqlen, seed=args.seed,
                                  dtype=args.dtype, revision=args.revision, device=args.device, training=training)
    stages.prune(request, overwrite=args.overwrite)
    return 0


def cmd_eval(args) -> int:
    from repro import runner, stages
    from repro.recipe import load_recipe
    from repro.tables import load_profile

    recipe = load_recipe(args.method, args.profile, args.recipe, eval_batch_size=args.eval_batch_size)
    table = load_profile(recipe.method, args.profile, recipe.table)
    if args.row not in recipe.rows:
        raise UsageError(f"unknown row {args.row}; recipe rows: {', '.join(recipe.rows)}")
    runner.check_device(recipe)
    result = stages.evaluate(recipe, table, args.row, model=args.model, results_root=args.results_dir,
                             backend=args.backend)
    if args.gate and args.row == runner.DENSE:
        try:
            runner.check_dense(table, result)
        except runner.DenseGateFailed as exc:
            print(f"lpc: dense gate failed: {exc}", file=sys.stderr)
            return 1
    return 0


# `lpc train` settings that `lpc prune` takes for a method whose pruning is a training run; the
# others are prune's own flags (--model, --out, --seed, --seqlen, --device) or fixed by the method.
NOT_PRUNE_TRAIN_FLAGS = ("model", "kind", "out", "teacher", "kd_temperature", "kd_alpha", "recipe", "seed", "seqlen",
                         "device")


def _training_settings(args) -> dict:
    """The training run's settings of `lpc prune` for a method whose pruning is one: the training
    flags given, and --seqlen as its window length."""
    fields = _train_fields()
    settings = {}
    for name in args.train_flags:
        value = getattr(args, name)
        if value is not None:
            settings[name] = value if isinstance(value, bool) else _read_value(value, fields[name])
    if args.seqlen is not None:
        settings["seqlen"] = args.seqlen
    return settings


def _add_method_flags(prune: argparse.ArgumentParser) -> None:
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
    fields = {name: f for name, f in _train_fields().items() if name not in NOT_PRUNE_TRAIN_FLAGS}
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


def _method_options(args, method) -> dict:
    from methods.options import declared

    fields = declared(method.options_type)
    options = {}
    for name in args.method_flags:
        value = getattr(args, name)
        if value is not None:
            options[name] = value if isinstance(value, bool) else _read_value(value, fields.get(name))
    for key, text in _key_values(args.option):
        options[key] = _read_value(text, fields.get(key))
    return options


def _read_value(text: str, field) -> Any:
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


def _train_fields():
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


def cmd_train(args) -> int:
    from repro import stages
    from training.options import parse_options

    fields = _train_fields()
    values = {}
    for name, field in fields.items():
        value = getattr(args, name)
        if value is not None:
            values[name] = value if isinstance(value, bool) else _read_value(value, field)
    values["recipe"] = {key: _read_value(text, None) for key, text in _key_values(args.option)}
    return stages.train(parse_options(values), overwrite=args.overwrite)


def _key_values(items: List[str]) -> List[tuple]:
    """--option KEY=VALUE items as (key, text) pairs, dashes in keys read as underscores."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        pairs.append((key.replace("-", "_"), value))
    return pairs


def cmd_convert(args) -> int:
    from training.maxtext import config as mtconfig

    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise UsageError(f"{args.out} exists and is not empty; pass --overwrite to replace it")
    model = Path(args.model)
    if args.to == "maxtext":
        if args.model == "smoke":
            from repro.models import resolve

            model = Path(resolve("smoke"))
        if not model.is_dir():
            raise UsageError(f"model directory not found: {args.model}")
        mtconfig.model_overrides(mtconfig.read_hf_config(model))  # refuse before MaxText is imported
    from training.maxtext import convert

    if args.to == "maxtext":
        convert.to_maxtext(model, args.out, scan_layers=args.scan_layers)
    else:
        if not model.is_dir():
            raise UsageError(f"MaxText checkpoint directory not found: {args.model}")
        convert.to_hf(model, args.out)
    print(f"converted {args.model} -> {args.out} ({'MaxText' if args.to == 'maxtext' else 'Hugging Face'})")
    return 0


def cmd_repro(args) -> int:
    rows = [r for r in args.rows.split(",") if r] if args.rows else None
    if args.submit is None and (args.gpus or args.nodes != 1 or args.image or args.tpu):
        raise UsageError("--gpus, --nodes, --tpu and --image are for the jobs of --submit; without it, a train "
                         "spec's nproc sets the processes on this machine")
    if args.all == bool(args.method):
        raise UsageError("give a method or --all (not both)")
    if args.methods and not args.all:
        raise UsageError("--methods goes with --all")
    if not args.all:
        return _repro_one(args, args.method, rows)
    if args.recipe:
        raise UsageError("--recipe goes with one method, not --all")
    targets = _all_targets(args.methods, args.profile, rows)
    return max([_repro_one(args, method, method_rows) for method, method_rows in targets] or [0])


def _all_targets(methods: Optional[str], profile: str, rows: Optional[List[str]]):
    """(method, rows) for `--all`: each method (of --methods, else the registry) whose recipe has
    the profile, with its own rows among --rows; checked before anything runs."""
    from methods.registry import REGISTRY
    from repro.recipe import load_recipe

    names = [m for m in methods.split(",") if m] if methods else list(REGISTRY)
    unknown = [m for m in names if m not in REGISTRY]
    if unknown:
        raise UsageError(f"unknown method {', '.join(unknown)}; methods: {', '.join(REGISTRY)}")
    targets, seen = [], set()
    for method in names:
        try:
            recipe_rows = load_recipe(method, profile).rows
        except UsageError as exc:
            print(f"[{method}] skipped: {exc}")
            continue
        own = [r for r in rows if r in recipe_rows] if rows else None
        seen.update(own or ())
        if rows and not own:
            print(f"[{method}] skipped: none of the rows {', '.join(rows)}")
            continue
        targets.append((method, own))
    unknown = [r for r in rows or () if r not in seen]
    if unknown:
        raise UsageError(f"no method of --all has row {', '.join(unknown)}")
    return targets


def _repro_one(args, method: str, rows: Optional[List[str]]) -> int:
    from repro import runner

    try:
        if args.submit:
            from repro import submit

            submit.submit(method, args.profile, backend=args.submit, results_root=args.results_dir, rows=rows,
                          recipe_path=args.recipe, dense_gate=not args.no_dense_gate, work_root=args.work_dir,
                          gpus=args.gpus, nodes=args.nodes, tpu=args.tpu, image=args.image,
                          eval_batch_size=args.eval_batch_size)
            return 0
        ok = runner.run(method, args.profile, results_root=args.results_dir, rows=rows,
                        recipe_path=args.recipe, dense_gate=not args.no_dense_gate, work_root=args.work_dir,
                        keep=args.keep_stages, eval_batch_size=args.eval_batch_size)
    except runner.DenseGateFailed as exc:
        print(f"lpc: dense gate failed: {exc}", file=sys.stderr)
        return 1
    except runner.StageFailed as exc:
        print(f"lpc: stage failed: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def cmd_diff(args) -> int:
    from repro import diff as differ
    from repro.tables import available_methods, load_profile

    if args.all == bool(args.method):
        raise UsageError("give a method or --all (not both)")
    if args.all and (args.table or args.rows):
        raise UsageError("--table and --rows go with one method, not --all")
    rows = [r for r in args.rows.split(",") if r] if args.rows else None
    if args.method:
        targets = [(args.method, args.profile)]
    else:
        # Every (method, profile) whose results folder exists under --results-dir.
        targets = [(m, p.name) for m in available_methods()
                   for p in sorted(Path(args.results_dir).glob("*")) if (p / m).is_dir()]
        if not targets:
            raise UsageError(f"no results under {args.results_dir}")
    failed = False
    for method, profile in targets:
        table = load_profile(method, profile, args.table)
        unknown = [r for r in rows or () if r not in table.rows]
        if unknown:
            raise UsageError(f"unknown row {', '.join(unknown)}; table rows: {', '.join(table.rows)}")
        failed |= differ.report(method, table, args.results_dir, rows=rows, plots=not args.no_plots)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
