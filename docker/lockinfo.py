#!/usr/bin/env python3
"""Read and update docker/images.lock.json, the record of the pushed images' digests.

Used by docker/images.mk (to pull and run images by digest) and by the release workflow
(.github/workflows/images.yml, to record what it pushed). Standard library only, Python >= 3.6.

  lockinfo.py families                      JSON list of image folders (docker/<name>/Dockerfile)
  lockinfo.py get IMAGE FIELD               print the field, or "null" when it is unset
  lockinfo.py registry                      print the registry the images were pushed to, or "null"
  lockinfo.py ref IMAGE [REGISTRY]          print REGISTRY/IMAGE@DIGEST; exit 3 when the digest is null
  lockinfo.py set IMAGE --digest D --tag T --git-sha S --registry R [--pushed-at ISO]
  lockinfo.py check                         validate the file's structure (exit 1 with the reasons)
"""
import argparse
import datetime
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
LOCK = os.environ.get("LPC_IMAGES_LOCK") or os.path.join(HERE, "images.lock.json")
FIELDS = ("tag", "digest", "git_sha", "pushed_at")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
REGISTRY_RE = re.compile(r"^[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)+$")


def families():
    return sorted(
        name
        for name in os.listdir(HERE)
        if os.path.isfile(os.path.join(HERE, name, "Dockerfile"))
    )


def load(path=LOCK):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def problems(data, folders=None):
    """Every way `data` departs from the lock file's structure, as sentences."""
    out = []
    if not isinstance(data, dict):
        return ["the top level is not an object"]
    if data.get("schema_version") != 1:
        out.append("schema_version must be 1")
    reg = data.get("registry")
    if reg is not None and not (isinstance(reg, str) and REGISTRY_RE.match(reg)):
        out.append("registry must be null or a lower-case registry path, got %r" % (reg,))
    images = data.get("images")
    if not isinstance(images, dict):
        return out + ["images must be an object"]
    extra = set(data) - {"schema_version", "registry", "images"}
    if extra:
        out.append("unknown top-level keys: %s" % ", ".join(sorted(extra)))
    for name, entry in sorted(images.items()):
        if not isinstance(entry, dict) or set(entry) != set(FIELDS):
            out.append("images.%s must have exactly the keys %s" % (name, ", ".join(FIELDS)))
            continue
        for key in FIELDS:
            if entry[key] is not None and not isinstance(entry[key], str):
                out.append("images.%s.%s must be null or a string" % (name, key))
        digest = entry["digest"]
        if digest is not None and not DIGEST_RE.match(str(digest)):
            out.append("images.%s.digest must be null or sha256:<64 hex>, got %r" % (name, digest))
        if digest is not None and reg is None:
            out.append("images.%s has a digest but the registry is null" % name)
        if digest is None and any(entry[k] is not None for k in FIELDS):
            out.append("images.%s: tag/git_sha/pushed_at are set but digest is null" % name)
    if folders is not None and sorted(images) != sorted(folders):
        out.append(
            "images %s do not match the image folders %s" % (sorted(images), sorted(folders))
        )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lock", default=LOCK, help="lock file (default: %(default)s)")
    sub = ap.add_subparsers(dest="cmd")
    sub.add_parser("families")
    sub.add_parser("registry")
    sub.add_parser("check")
    g = sub.add_parser("get")
    g.add_argument("image")
    g.add_argument("field", choices=FIELDS)
    r = sub.add_parser("ref")
    r.add_argument("image")
    r.add_argument("registry", nargs="?", default="")
    s = sub.add_parser("set")
    s.add_argument("image")
    s.add_argument("--digest", required=True)
    s.add_argument("--tag", required=True)
    s.add_argument("--git-sha", required=True)
    s.add_argument("--registry", required=True)
    s.add_argument("--pushed-at", default=None)
    args = ap.parse_args(argv)

    if args.cmd == "families":
        print(json.dumps(families()))
        return 0
    data = load(args.lock)
    if args.cmd == "check":
        bad = problems(data, families())
        for line in bad:
            print("images.lock.json: " + line, file=sys.stderr)
        return 1 if bad else 0
    if args.cmd == "registry":
        print(data.get("registry") or "null")
        return 0
    images = data["images"]
    if args.image not in images:
        print("images.lock.json has no image %r (known: %s)" % (args.image, ", ".join(sorted(images))),
              file=sys.stderr)
        return 2
    entry = images[args.image]
    if args.cmd == "get":
        value = entry[args.field]
        print("null" if value is None else value)
        return 0
    if args.cmd == "ref":
        registry = args.registry or data.get("registry")
        if entry["digest"] is None or not registry:
            return 3
        print("%s/%s@%s" % (registry.rstrip("/"), args.image, entry["digest"]))
        return 0
    if args.cmd == "set":
        entry.update(
            digest=args.digest,
            tag=args.tag,
            git_sha=args.git_sha,
            pushed_at=args.pushed_at
            or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        data["registry"] = args.registry.lower()
        bad = problems(data)
        if bad:
            for line in bad:
                print("images.lock.json: " + line, file=sys.stderr)
            return 1
        tmp = args.lock + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, args.lock)
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
