"""`lpc`: prune a model, reproduce a table, diff results against the papers.

Bad input prints one line (`lpc: error: ...`) and exits 2; a failed diff exits 1.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

from methods.errors import UsageError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line, like every other bad input."""

    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lpc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub.required = True

    prune = sub.add_parser("prune", help="prune one model and save it as a Hugging Face checkpoint")
    prune.add_argument("--model", required=True, help="local directory, hub id, or 'smoke'")
    prune.add_argument("--revision", help="hub revision (commit sha) of --model")
    prune.add_argument("--method", required=True)
    prune.add_argument("--sparsity-ratio", type=float)
    prune.add_argument("--sparsity-type", default="unstructured", help="unstructured or N:M (e.g. 2:4)")
    prune.add_argument("--exact-count", action="store_true", default=None,
                       help="magnitude: prune exactly int(ratio*numel) instead of the original's threshold rule")
    prune.add_argument("--blocksize", type=int, help="sparsegpt column block (default 128)")
    prune.add_argument("--percdamp", type=float, help="sparsegpt dampening fraction (default 0.01)")
    width = prune.add_argument_group("structured methods (wanda-sp, flap, llm-pruner, minitron-*, shortgpt, shortened)")
    width.add_argument("--pruning-ratio", type=float, help="wanda-sp, flap, llm-pruner: fraction of units to remove")
    width.add_argument("--metrics", help="flap: WIFV | IFV | WIFN")
    width.add_argument("--structure", help="flap: AL-AM | UL-UM")
    width.add_argument("--no-bias-compensation", dest="bias_compensation", action="store_false", default=None,
                       help="flap: do not add the removed channels' mean contribution as a bias")
    width.add_argument("--importance", help="llm-pruner: element1 | element2 | vector | l2 | random")
    width.add_argument("--layers", help="llm-pruner: START:END, the decoder layers to prune (end exclusive)")
    width.add_argument("--mode", help="llm-pruner: block | channel")
    width.add_argument("--hidden-size", type=int, help="minitron-width: target hidden size")
    width.add_argument("--ffn-hidden-size", type=int, help="minitron-width: target MLP size per layer")
    width.add_argument("--aggregation", help="minitron-width: collection | nvidia")
    width.add_argument("--remove-layers", type=int, help="shortgpt, minitron-depth, shortened: layers to remove")
    width.add_argument("--score", help="minitron-depth: ppl | <lm-eval task>")
    width.add_argument("--num-fewshot", type=int, help="minitron-depth: shots of the scoring task")
    width.add_argument("--select", help="minitron-depth: closest | best")
    width.add_argument("--criterion", help="shortened: ppl | taylor")
    width.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="any other option of the method (YAML value), e.g. --option head_weight=literal")
    prune.add_argument("--calib", help="c4 | wikitext2 | bookcorpus | pg19 | wikitext103-train | windows:PATH | text file or dir | token ids (.pt/.npy)")
    prune.add_argument("--nsamples", type=int, help="default: 128, or the rows of a token file")
    prune.add_argument("--seqlen", type=int, help="default: the model context (max 8192), or a token file's width")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16")
    prune.add_argument("--device", help="compute device for layers (default: cuda if available)")
    prune.add_argument("--out", required=True, type=Path)
    prune.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    repro = sub.add_parser("repro", help="run a method's recipe and diff it against its table")
    repro.add_argument("method")
    repro.add_argument("--profile", default="smoke", help="paper | smoke")
    repro.add_argument("--rows", help="comma-separated row ids (default: all)")
    repro.add_argument("--results-dir", type=Path, default=Path("results/local"))
    repro.add_argument("--recipe", type=Path, help="a recipe file instead of repro/recipes/<method>.yaml")
    repro.add_argument("--no-dense-gate", action="store_true", help="continue even if the dense model is off")

    train = sub.add_parser("train", help="train a checkpoint: continued pre-training, distillation, sparse or LoRA",
                           description="Options not given keep their defaults (the collection's settings). "
                                       "Rerunning the same command resumes an interrupted run.")
    add_fields(train, _train_fields())
    train.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="lora: a field of the LoRA recipe (YAML value), e.g. --option r=8")
    train.add_argument("--overwrite", action="store_true", help="discard whatever --out holds and start afresh")

    diff = sub.add_parser("diff", help="print paper | collection | ours | delta | tolerance | status")
    diff.add_argument("method", nargs="?", help="a method, or omit with --all")
    diff.add_argument("--all", action="store_true", help="every method and profile that has results")
    diff.add_argument("--profile", default="smoke")
    diff.add_argument("--results-dir", type=Path, default=Path("results/local"))
    diff.add_argument("--no-plots", action="store_true",
                      help="compare the figures but write no PNG (default: <results>/<profile>/<method>/figures/)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command in ("prune", "repro", "train"):
            from repro.models import quiet_transformers

            quiet_transformers()
        return {"prune": cmd_prune, "repro": cmd_repro, "diff": cmd_diff, "train": cmd_train}[args.command](args)
    except UsageError as exc:
        print(f"lpc: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lpc: interrupted", file=sys.stderr)
        return 130


def cmd_prune(args) -> int:
    import methods
    from repro import data
    from repro.evaluate import model_seqlen
    from repro.models import load_model, save_checkpoint
    from repro.provenance import provenance
    from repro.results import write_json_atomic
    from repro.runner import seed_everything

    method = methods.get(args.method)
    options = _method_options(args, method)
    methods.make_options(method, options)  # validate before any slow loading
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise UsageError(f"{args.out} exists and is not empty; pass --overwrite to replace it")
    if method.needs_calibration and not args.calib:
        raise UsageError(f"method {args.method!r} needs --calib")
    if args.calib and Path(args.calib).suffix in data.TOKEN_FILE_SUFFIXES:
        tokens = data.load_token_file(args.calib)  # validate the file before loading the model
    else:
        tokens = None

    seed_everything(args.seed)
    timings = {}
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, revision=args.revision)
    timings["load"] = time.perf_counter() - start

    calib = None
    calib_info = None
    if method.needs_calibration:
        start = time.perf_counter()
        if tokens is not None:
            nsamples = args.nsamples or tokens.shape[0]
            seqlen = args.seqlen or tokens.shape[1]
        else:
            nsamples = args.nsamples or 128
            seqlen = args.seqlen or model_seqlen(model)
        calib = data.calibration(args.calib, tokenizer=tokenizer, nsamples=nsamples, seqlen=seqlen,
                                 seed=args.seed)
        timings["calibration"] = time.perf_counter() - start
        calib_info = {"spec": args.calib, "shape": list(calib.shape), "seed": args.seed}

    report = methods.prune(model, args.method, calib, device=args.device, tokenizer=tokenizer, **options)
    timings["prune"] = report.pop("seconds")
    start = time.perf_counter()
    save_checkpoint(model, tokenizer, args.out)
    timings["save"] = time.perf_counter() - start
    write_json_atomic(args.out / "prune.json", {
        **report, "model": args.model, "revision": args.revision, "dtype": args.dtype,
        "calibration": calib_info, "seed": args.seed, "timings_seconds": timings, **provenance(),
    })
    if "parameters" in report:
        summary = "{pruned:,} of {dense:,} parameters kept".format(**report["parameters"])
    else:
        summary = f"overall sparsity {report['overall_sparsity']:.4f}"
    print(f"pruned {args.model} with {args.method}: {summary} -> {args.out}")
    return 0


# Flags of `lpc prune` that are method options, by option name.
OPTION_FLAGS = ("sparsity_ratio", "exact_count", "blocksize", "percdamp", "pruning_ratio", "metrics",
                "structure", "bias_compensation", "importance", "layers", "mode", "hidden_size",
                "ffn_hidden_size", "aggregation", "remove_layers", "score", "num_fewshot", "select", "criterion")


def _method_options(args, method) -> dict:
    import yaml

    options = {name: getattr(args, name) for name in OPTION_FLAGS if getattr(args, name) is not None}
    if not method.structured:  # the sparse methods' pattern flag has a default
        options["sparsity_type"] = args.sparsity_type
    elif args.sparsity_type != "unstructured":
        options["sparsity_type"] = args.sparsity_type
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        options[key.replace("-", "_")] = yaml.safe_load(value)
    return options


def _train_fields():
    from training.options import TrainOptions

    return {name: f for name, f in TrainOptions.model_fields.items() if name != "recipe"}


def add_fields(parser: argparse.ArgumentParser, fields) -> None:
    """One flag per declared field (pydantic FieldInfo): --name-with-dashes, its description as the help.

    Values are read as YAML scalars, so the declarations' strict types see numbers, booleans and
    strings as the user meant them; booleans are also flags of their own (--x / --no-x)."""
    for name, info in fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = (info.description or "") + ("" if info.is_required() else f" (default: {info.default})")
        if info.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=_yaml_value, default=None, required=info.is_required(),
                                help=help_text, metavar=name.upper())


def _yaml_value(text: str):
    """A command-line value as a number, boolean or string (YAML, but "1e-4" is a number here too)."""
    import yaml

    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (bool, str)) else text


def cmd_train(args) -> int:
    from repro import stages
    from training.options import parse_options

    values = {name: getattr(args, name) for name in _train_fields() if getattr(args, name) is not None}
    for name in ("model", "data", "out", "teacher"):  # names, never numbers: "1" is a directory
        if name in values:
            values[name] = str(values[name])
    values["recipe"] = _key_values(args.option)
    return stages.train(parse_options(values), overwrite=args.overwrite)


def _key_values(items) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        out[key.replace("-", "_")] = yaml.safe_load(value)
    return out


def cmd_repro(args) -> int:
    from repro import runner

    rows = [r for r in args.rows.split(",") if r] if args.rows else None
    try:
        ok = runner.run(args.method, args.profile, results_root=args.results_dir, rows=rows,
                        recipe_path=args.recipe, dense_gate=not args.no_dense_gate)
    except runner.DenseGateFailed as exc:
        print(f"lpc: dense gate failed: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def cmd_diff(args) -> int:
    from repro import diff as differ
    from repro.figures import report_figures
    from repro.tables import available_methods, load_profile, table_path

    if args.all == bool(args.method):
        raise UsageError("give a method or --all (not both)")
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
        table = load_profile(method, profile)
        results = differ.load_results(args.results_dir, profile, method)
        cells = differ.diff_cells(table, results)
        claims = differ.diff_claims(table, args.results_dir, method)
        print(differ.render(method, table, cells, claims) + "\n")
        failed |= differ.failed(cells, claims)
        failed |= report_figures(method, profile, args.results_dir, table_path(method), plots=not args.no_plots)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
