"""`lpc`: prune, train and evaluate a model, reproduce a table, diff results against the papers.

Bad input prints one line (`lpc: error: ...`) and exits 2; a failed diff exits 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, List, Optional

from methods.core.errors import UsageError

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
                           deferred=_method_flags)
    prune.add_argument("--request", type=Path, help="a prune request file (the plan's); then no other flag")
    prune.add_argument("--model", help="local directory, hub id, or 'smoke' (required)")
    prune.add_argument("--revision", help="hub revision (commit sha) of --model")
    prune.add_argument("--method", help="(required)")
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
    prune.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16: the model's, and the saved checkpoint's")
    prune.add_argument("--compute-dtype", help="float64 | ...: compute the pruning in this dtype (scores, statistics, "
                                               "weight updates), then save in --dtype (default: --dtype)")
    prune.add_argument("--device", help="compute device for layers (default: cuda if available)")
    prune.add_argument("--out", type=Path, help="(required)")
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
    repro.add_argument("--rehearse", action="store_true",
                       help="a rehearsal: the profile on the CPU against the stand-in hub mirror (LPC_HUB_MIRROR), "
                            "sample counts and steps cut (docs/rehearsal.md); its cells show as REHEARSED")
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
    evaluate.add_argument("--request", type=Path, help="an eval request file (the plan's); then no other flag")
    evaluate.add_argument("--model", help="the row's last stage output (a pruned or trained checkpoint); the profile's "
                                          "model for the dense row (required)")
    evaluate.add_argument("--method", help="(required)")
    evaluate.add_argument("--profile", default="smoke", help="paper | smoke")
    evaluate.add_argument("--row", help="(required)")
    evaluate.add_argument("--results-dir", type=Path, default=Path("results/local"))
    evaluate.add_argument("--recipe", type=Path, help="a recipe file instead of repro/recipes/<method>.yaml")
    evaluate.add_argument("--eval-batch-size", metavar="N|auto", help=EVAL_BATCH_HELP)
    evaluate.add_argument("--backend", default="hf", help="how the checkpoint is loaded (default: hf)")
    evaluate.add_argument("--rehearse", action="store_true", help="the row as a rehearsal runs it (lpc repro --rehearse)")
    evaluate.add_argument("--gate", action="store_true",
                          help="dense row: exit 1 when it is off its reference (what gates the other rows' jobs)")

    train = sub.add_parser("train", help="train a checkpoint: continued pre-training, distillation, sparse, LoRA, "
                                         "Sheared LLaMA's pruning run",
                           description="Options not given keep their defaults (the collection's settings). "
                                       "Rerunning the same command resumes an interrupted run.",
                           deferred=_train_flags)
    train.add_argument("--request", type=Path, help="a train request file (the plan's); then no other flag")
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

    from repro import mirror

    mirror.add_parser(sub)

    diff = sub.add_parser("diff", help="print paper | collection | ours | delta | tolerance | status")
    diff.add_argument("method", nargs="?", help="a method, or omit with --all")
    diff.add_argument("--all", action="store_true", help="every method and profile that has results")
    diff.add_argument("--profile", default="smoke")
    diff.add_argument("--results-dir", type=Path, default=Path("results/local"))
    diff.add_argument("--table", type=Path, help="with a method: a table file instead of repro/tables/<method>.yaml")
    diff.add_argument("--rows", help="with a method: comma-separated row ids to compare (default: all)")
    diff.add_argument("--complete", action="store_true",
                      help="fail on a cell still waiting for another method's result (PENDING) too")
    diff.add_argument("--no-plots", action="store_true",
                      help="compare the figures but write no PNG (default: <results>/<profile>/<method>/figures/)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command in ("prune", "repro", "train", "eval"):
            from methods.core.models import quiet_transformers

            quiet_transformers()  # without importing transformers: a refused command stays fast
        return {"prune": cmd_prune, "repro": cmd_repro, "diff": cmd_diff, "train": cmd_train,
                "eval": cmd_eval, "convert": cmd_convert, "mirror": cmd_mirror}[args.command](args)
    except UsageError as exc:
        print(f"lpc: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lpc: interrupted", file=sys.stderr)
        return 130


def _method_flags(parser: argparse.ArgumentParser) -> None:
    from repro.flags import add_method_flags

    add_method_flags(parser)


def _train_flags(parser: argparse.ArgumentParser) -> None:
    from repro.flags import add_fields, train_fields

    add_fields(parser, train_fields(), required=False)


def _request_or_flags(args, command: str, required):
    """`--request FILE` alone, or the command's own flags with every required one given: the request
    read from the file, or None."""
    if args.request is None:
        missing = [name for name in required if getattr(args, name) is None]
        if missing:
            raise UsageError("the following arguments are required: " + ", ".join(
                "--" + name.replace("_", "-") for name in missing))
        return None
    defaults = vars(build_parser().parse_args([command]))
    given = [name for name, value in vars(args).items()
             if name in defaults and name != "request" and value != defaults[name]]
    if given:
        raise UsageError(f"lpc {command} --request takes no other flag, got --{given[0].replace('_', '-')}")
    from repro.requests import read_request

    return read_request(args.request, command)


def cmd_prune(args) -> int:
    from repro import prune_stage

    request = _request_or_flags(args, "prune", ("model", "method", "out"))
    if request is None:
        request = _prune_request(args)
    prune_stage.prune(request, overwrite=args.overwrite or args.request is not None)
    return 0


def _prune_request(args):
    import methods
    from methods.core.batching import parse_batch_size
    from repro.flags import method_options, training_settings
    from repro.requests import PruneRequest

    method = methods.get(args.method)
    options = method_options(args, method)
    parsed = methods.make_options(method, options)  # validate before any slow loading
    training = training_settings(args) if method.prunes_by_training(parsed) else None
    given = [name for name in args.train_flags if getattr(args, name) is not None]
    if training is None and given:
        raise UsageError(f"--{given[0].replace('_', '-')} is a training setting; method {args.method!r} does not train")
    return PruneRequest(model=args.model, method=args.method, out=args.out, options=options, calib=args.calib,
                        nsamples=args.nsamples, calib_batch=parse_batch_size("calibration batch", args.calib_batch),
                        seqlen=None if training is not None else args.seqlen, seed=args.seed, dtype=args.dtype,
                        compute_dtype=args.compute_dtype, revision=args.revision, device=args.device,
                        training=training)


def cmd_eval(args) -> int:
    from repro import eval_stage, plan, runner
    from repro.recipe import load_recipe
    from repro.requests import EvalRequest

    request = _request_or_flags(args, "eval", ("model", "method", "row"))
    if request is None:
        request = EvalRequest(method=args.method, profile=args.profile, row=args.row, model=args.model,
                              results_dir=args.results_dir, recipe=args.recipe, eval_batch_size=args.eval_batch_size,
                              backend=args.backend, gate=args.gate, rehearsal=args.rehearse)
    recipe = load_recipe(request.method, request.profile, request.recipe, eval_batch_size=request.eval_batch_size,
                         rehearsal=request.rehearsal)
    table = runner.load_table(recipe)
    if request.row not in recipe.rows:
        raise UsageError(f"unknown row {request.row}; recipe rows: {', '.join(recipe.rows)}")
    plan.check_device(recipe)
    result = eval_stage.evaluate(recipe, table, request.row, model=request.model, results_root=request.results_dir,
                                 backend=request.backend)
    if request.gate and request.row == plan.DENSE:
        try:
            plan.check_dense(table, result)
        except plan.DenseGateFailed as exc:
            print(f"lpc: dense gate failed: {exc}", file=sys.stderr)
            return 1
    return 0


def cmd_train(args) -> int:
    from repro.flags import key_values, read_value, train_fields
    from training import stage
    from training.options import parse_options

    fields = train_fields()
    options = _request_or_flags(args, "train", [n for n, f in fields.items() if f.is_required()])
    if options is None:
        values = {name: getattr(args, name) if isinstance(getattr(args, name), bool)
                  else read_value(getattr(args, name), field)
                  for name, field in fields.items() if getattr(args, name) is not None}
        values["recipe"] = {key: read_value(text, None) for key, text in key_values(args.option)}
        options = parse_options(values)
    return stage.train(options, overwrite=args.overwrite)


def cmd_convert(args) -> int:
    from training.maxtext import config as mtconfig

    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise UsageError(f"{args.out} exists and is not empty; pass --overwrite to replace it")
    model = Path(args.model)
    if args.to == "maxtext":
        if args.model == "smoke":
            from methods.core.models import resolve

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


def cmd_mirror(args) -> int:
    from repro import mirror

    return mirror.main(args)


def cmd_repro(args) -> int:
    rows = [r for r in args.rows.split(",") if r] if args.rows else None
    if args.submit is None and (args.gpus or args.nodes != 1 or args.image or args.tpu):
        raise UsageError("--gpus, --nodes, --tpu and --image are for the jobs of --submit; without it, a train "
                         "spec's nproc sets the processes on this machine")
    if args.all == bool(args.method):
        raise UsageError("give a method or --all (not both)")
    if args.methods and not args.all:
        raise UsageError("--methods goes with --all")
    if args.rehearse:
        _rehearsal_environment(args)
    if not args.all:
        return _repro_one(args, args.method, rows)
    if args.recipe:
        raise UsageError("--recipe goes with one method, not --all")
    targets = _all_targets(args.methods, args.profile, rows)
    return max([_repro_one(args, method, method_rows) for method, method_rows in targets] or [0])


def _rehearsal_environment(args) -> None:
    """A rehearsal reads nothing but the stand-in mirror: the hub switched off before anything imports it."""
    import os

    from repro import rehearsal

    if args.submit:
        raise UsageError("--rehearse runs here, on the CPU; it is not submitted")
    os.environ.update(rehearsal.environment(rehearsal.mirror_root()))


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
                        keep=args.keep_stages, eval_batch_size=args.eval_batch_size, rehearsal=args.rehearse)
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
        failed |= differ.report(method, table, args.results_dir, rows=rows, plots=not args.no_plots,
                                complete=args.complete)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
