#!/usr/bin/env python3
"""Read and update docker/images.lock.json, the record of the pushed images' digests.

Used by docker/container.sh (to push, pull and run images by digest) and by the release workflow
(.github/workflows/images.yml, to record what it pushed). Standard library only, Python >= 3.7.
The images are those of docker/images.py's table; each record names the registry it was pushed to,
so one image may be pushed to a fork's registry while the others still point to the original's.

  lockinfo.py get IMAGE FIELD               print the field, or "null" when it is unset
  lockinfo.py ref IMAGE [REGISTRY]          print REGISTRY/IMAGE@DIGEST (REGISTRY: a mirror of the
                                            recorded one); exit 3 when the digest is null
  lockinfo.py set IMAGE --digest D --tag T --git-sha S --registry R [--pushed-at ISO]
  lockinfo.py entry IMAGE                   the image's record as one JSON object (a push's artifact)
  lockinfo.py merge FILE...                 record the pushes of `entry` files (the release's last job)
  lockinfo.py valid-registry R              exit 0 when R is host[:port]/namespace in lower case
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
SCHEMA_VERSION = 2
FIELDS = ("registry", "tag", "digest", "git_sha", "pushed_at")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
REGISTRY_RE = re.compile(r"^[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)+$")


def families():
    """The images of docker/images.py's table."""
    sys.path.insert(0, HERE)
    try:
        import images
    finally:
        sys.path.remove(HERE)
    return list(images.IMAGES)


def load(path=LOCK):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def problems(data, names=None):
    """Every way `data` departs from the lock file's structure, as sentences."""
    out = []
    if not isinstance(data, dict):
        return ["the top level is not an object"]
    if data.get("schema_version") != SCHEMA_VERSION:
        out.append("schema_version must be %d" % SCHEMA_VERSION)
    images = data.get("images")
    if not isinstance(images, dict):
        return out + ["images must be an object"]
    extra = set(data) - {"schema_version", "images"}
    if extra:
        out.append("unknown top-level keys: %s" % ", ".join(sorted(extra)))
    for name, entry in sorted(images.items()):
        if not isinstance(entry, dict) or set(entry) != set(FIELDS):
            out.append("images.%s must have exactly the keys %s" % (name, ", ".join(FIELDS)))
            continue
        for key in FIELDS:
            if entry[key] is not None and not isinstance(entry[key], str):
                out.append("images.%s.%s must be null or a string" % (name, key))
        digest, registry = entry["digest"], entry["registry"]
        if digest is not None and not DIGEST_RE.match(str(digest)):
            out.append("images.%s.digest must be null or sha256:<64 hex>, got %r" % (name, digest))
        if registry is not None and not REGISTRY_RE.match(str(registry)):
            out.append("images.%s.registry must be null or a lower-case registry path, got %r" % (name, registry))
        if digest is not None and registry is None:
            out.append("images.%s has a digest but no registry" % name)
        if digest is None and any(entry[k] is not None for k in FIELDS):
            out.append("images.%s: registry/tag/git_sha/pushed_at are set but digest is null" % name)
    if names is not None and sorted(images) != sorted(names):
        out.append("images %s do not match docker/images.py's %s" % (sorted(images), sorted(names)))
    return out


def record(data, image, digest, tag, git_sha, registry, pushed_at=None):
    """`data` with the push of `image` recorded, or ValueError naming what is wrong with it."""
    if image not in data["images"]:
        raise ValueError("images.lock.json has no image %r (known: %s)" % (image, ", ".join(sorted(data["images"]))))
    data["images"][image] = {
        "registry": registry.lower().rstrip("/"),
        "tag": tag,
        "digest": digest,
        "git_sha": git_sha,
        "pushed_at": pushed_at or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    bad = problems(data)
    if bad:
        raise ValueError("; ".join(bad))
    return data


def save(data, path):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lock", default=LOCK, help="lock file (default: %(default)s)")
    sub = ap.add_subparsers(dest="cmd")
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
    e = sub.add_parser("entry")
    e.add_argument("image")
    m = sub.add_parser("merge")
    m.add_argument("files", nargs="+")
    v = sub.add_parser("valid-registry")
    v.add_argument("registry")
    args = ap.parse_args(argv)

    if args.cmd == "valid-registry":
        return 0 if REGISTRY_RE.match(args.registry) else 1
    data = load(args.lock)
    if args.cmd == "check":
        bad = problems(data, families())
        for line in bad:
            print("images.lock.json: " + line, file=sys.stderr)
        return 1 if bad else 0
    if args.cmd == "merge":
        try:
            for path in args.files:
                with open(path, encoding="utf-8") as fh:
                    pushed = json.load(fh)
                record(data, pushed["image"], pushed["digest"], pushed["tag"], pushed["git_sha"],
                       pushed["registry"], pushed["pushed_at"])
        except (ValueError, KeyError, TypeError) as exc:
            print("images.lock.json: %s: %s" % (path, exc), file=sys.stderr)
            return 1
        save(data, args.lock)
        return 0
    if args.cmd is None:
        ap.print_help()
        return 2
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
    if args.cmd == "entry":
        print(json.dumps(dict(entry, image=args.image), sort_keys=True))
        return 0
    if args.cmd == "ref":
        registry = args.registry or entry["registry"]
        if entry["digest"] is None or not registry:
            return 3
        print("%s/%s@%s" % (registry.rstrip("/"), args.image, entry["digest"]))
        return 0
    if args.cmd == "set":
        try:
            record(data, args.image, args.digest, args.tag, args.git_sha, args.registry, args.pushed_at)
        except ValueError as exc:
            print("images.lock.json: %s" % exc, file=sys.stderr)
            return 1
        save(data, args.lock)
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
