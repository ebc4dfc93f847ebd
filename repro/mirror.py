"""`lpc mirror`: what a profile reads from the hub, and a stand-in of all of it.

`lpc mirror list --profile paper [--method M]` prints every hub object the profile's rows read: the
models (and KD teachers), the calibration, evaluation and training data, and the datasets of the lm-eval
tasks of its tables, each with its revision, the files the kit reads, and the folder it takes in a
mirror (methods/core/hub.py). A few inputs are not hub reads: data the user converts or keeps in a
bucket (the RedPajama domains, MaxText's DCLM ArrayRecord files); they are listed as `local`, with
where the kit expects them. `lpc mirror rehearsal --out DIR` writes a stand-in for every object of
every paper profile (repro/standin_models.py, repro/standin_data.py): what `make rehearse-<method>`
reads.

The catalogue below is derived from the recipes and tables, not written per profile: a new row that
reads a new dataset shows up here, and in the stand-in as soon as it has a writer.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from methods.core.errors import UsageError
from repro.hub_objects import MODEL_FILES, HubObject, data_objects, task_dataset, task_object

PAPER_PREFIX = "paper"


def profile_objects(method: str, profile: str) -> List[Tuple[HubObject, str]]:
    """(object, what reads it) for every hub read of a method's profile, duplicates kept out."""
    from methods.core.models import is_hub_id
    from repro.recipe import TEACHER_DENSE, load_recipe
    from repro.tables import load_profile

    recipe = load_recipe(method, profile)
    table = load_profile(recipe.method, profile, recipe.table)
    config = recipe.config
    found: List[Tuple[HubObject, str]] = []
    where = f"{method}/{profile}"
    if is_hub_id(config["model"]):
        found.append((HubObject("model", config["model"], config.get("revision"), MODEL_FILES), f"{where}: model"))
    calibration = config.get("calibration") or {}
    for obj in data_objects(str(calibration.get("spec", ""))):
        found.append((obj, f"{where}: calibration"))
    for name, spec in (config.get("training") or {}).items():
        for key in ("data", "eval_data"):
            for obj in data_objects(str(spec.get(key) or "")):
                found.append((obj, f"{where}: training {name}"))
        teacher = spec.get("teacher")
        if teacher and teacher != TEACHER_DENSE and is_hub_id(teacher):
            found.append((HubObject("model", teacher, None, MODEL_FILES), f"{where}: teacher of {name}"))
    tasks = set()
    for key, metric in table.metrics.items():
        if metric.kind == "perplexity":
            for obj in data_objects(str(metric.spec["data"])):
                found.append((obj, f"{where}: metric {key}"))
        elif metric.kind == "accuracy":
            tasks.add(metric.spec["task"])
    for row in recipe.rows:
        score = recipe.options(row).get("score")
        if score and score != "ppl":
            tasks.add(score)
    from methods.core.hub import is_hub_dataset

    for task in sorted(tasks):
        if is_hub_dataset(task_dataset(task)[0]):  # the kit's own tasks read shipped files (`json`)
            found.append((task_object(task), f"{where}: lm-eval {task}"))
    return found


def paper_profiles(method: Optional[str] = None, profile: str = PAPER_PREFIX) -> List[Tuple[str, str]]:
    """(method, profile) pairs: `paper` names every profile whose name starts with it (paper-llama2, ...)."""
    import yaml

    from methods.registry import REGISTRY
    from repro.recipe import RECIPES

    methods = [method] if method else list(REGISTRY)
    pairs = []
    for name in methods:
        path = RECIPES / f"{name}.yaml"
        if not path.is_file():
            raise UsageError(f"no recipe for method {name!r}")
        profiles = (yaml.safe_load(path.read_text()) or {}).get("profiles", {})
        pairs += [(name, p) for p in profiles
                  if p == profile or (profile == PAPER_PREFIX and p.startswith(PAPER_PREFIX + "-"))]
    if not pairs:
        raise UsageError(f"no recipe {'of ' + method + ' ' if method else ''}has a profile {profile!r}")
    return pairs


def catalogue(method: Optional[str] = None, profile: str = PAPER_PREFIX) -> Dict[HubObject, List[str]]:
    """Every object the chosen profiles read, merged per object (same repo, revision and files)."""
    merged: Dict[tuple, Tuple[HubObject, List[str]]] = {}
    for name, chosen in paper_profiles(method, profile):
        for obj, use in profile_objects(name, chosen):
            key = (obj.kind, obj.repo, obj.revision, obj.task)
            if key in merged:
                previous, uses = merged[key]
                files = tuple(dict.fromkeys(previous.files + obj.files))
                note = previous.note if obj.note in previous.note else "; ".join(n for n in (previous.note, obj.note) if n)
                merged[key] = (HubObject(obj.kind, obj.repo, obj.revision, files, note, obj.task), uses + [use])
            else:
                merged[key] = (obj, [use])
    return {obj: uses for obj, uses in merged.values()}


def render(objects: Dict[HubObject, List[str]]) -> str:
    from tabulate import tabulate

    rows = [[o.kind, o.repo, o.revision or "main", " ".join(o.files), o.folder,
             ", ".join(sorted({u.split(':')[0] for u in uses})), o.note]
            for o, uses in sorted(objects.items(), key=lambda item: (item[0].kind != "model", item[0].kind, item[0].repo))]
    return tabulate(rows, headers=["kind", "repo", "revision", "files", "mirror folder", "read by", "note"],
                    tablefmt="github")


# ----------------------------------------------------------------------------- the command

def add_parser(sub) -> None:
    mirror = sub.add_parser("mirror", help="the hub objects a profile reads; a stand-in mirror for the rehearsal")
    verbs = mirror.add_subparsers(dest="verb", parser_class=type(mirror))
    verbs.required = True
    listing = verbs.add_parser("list", help="every hub object a profile reads: repo, revision, files, mirror folder")
    listing.add_argument("--profile", default=PAPER_PREFIX,
                         help="a profile name; `paper` (default) also takes paper-llama2, paper-llama3, ...")
    listing.add_argument("--method", help="one method (default: every method with the profile)")
    standin = verbs.add_parser("rehearsal", help="write a stand-in of every object the paper profiles read")
    standin.add_argument("--out", required=True, type=Path, help="the mirror folder to write (LPC_HUB_MIRROR)")
    standin.add_argument("--method", help="only what this method's paper profiles read")


def main(args: argparse.Namespace) -> int:
    if args.verb == "list":
        objects = catalogue(args.method, args.profile)
        print(render(objects))
        print(f"\n{len(objects)} objects. With LPC_HUB_MIRROR=DIR the kit reads each from DIR/<mirror folder> "
              "(docs/rehearsal.md: how to fill it).")
        return 0
    from repro import standin_data, standin_models

    objects = catalogue(args.method, PAPER_PREFIX)
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = standin_models.write_all(out, [o for o in objects if o.kind == "model"])
    written += standin_data.write_all(out, [o for o in objects if o.kind != "model"])
    for line in written:
        print(line)
    print(f"stand-in mirror: {out} ({len(objects)} objects)")
    return 0
