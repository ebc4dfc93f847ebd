"""Unit tests: directives, arrays, dependencies, the TPU table, state transitions, bad input."""

from __future__ import annotations

import sqlite3

import pytest

from jobman.accelerators import parse_accelerator, tpu_slice
from jobman.errors import UsageError
from jobman.spec import build_spec, merge_options, parse_array, parse_dependencies, parse_directives
from jobman import store as st
from jobman_testutil import jobman


# -- TPU table: (type, hosts, chips, chips per host) ----------------------------------------------
@pytest.mark.parametrize("name,hosts,chips,per_host", [
    ("v2-8", 1, 4, 4), ("v3-32", 4, 16, 4),
    ("v4-8", 1, 4, 4), ("v4-16", 2, 8, 4), ("v4-32", 4, 16, 4), ("v4-128", 16, 64, 4), ("v4-4096", 512, 2048, 4),
    ("v5p-8", 1, 4, 4), ("v5p-16", 2, 8, 4), ("v5p-128", 16, 64, 4),
    ("v5litepod-1", 1, 1, 1), ("v5litepod-4", 1, 4, 4), ("v5litepod-8", 1, 8, 8), ("v5litepod-16", 4, 16, 4),
    ("v5litepod-256", 64, 256, 4),
    ("v6e-1", 1, 1, 1), ("v6e-8", 1, 8, 8), ("v6e-16", 4, 16, 4), ("v6e-256", 64, 256, 4),
])
def test_tpu_table(name, hosts, chips, per_host):
    s = tpu_slice(name)
    assert (s.hosts, s.chips, s.chips_per_host) == (hosts, chips, per_host)
    assert s.sky_name == "tpu-" + name
    assert tpu_slice("tpu-" + name) == s


def test_tpu_aliases_and_unknown_types():
    assert tpu_slice("v5e-16").name == "v5litepod-16"
    for bad in ("v4-12", "v5p-4", "v6e-2", "v5litepod-512", "v7-8", "v3-16", "tpu-v9-8"):
        with pytest.raises(UsageError):
            parse_accelerator(bad)


def test_gpu_parsing():
    a = parse_accelerator("h100:8")
    assert (a.kind, a.name, a.count, str(a)) == ("gpu", "H100", 8, "H100:8")
    assert parse_accelerator("A100-80GB").count == 1
    assert parse_accelerator(None) is None
    for bad in ("Q9000:8", "H100:0", "H100:x"):
        with pytest.raises(UsageError):
            parse_accelerator(bad)


# -- directives -------------------------------------------------------------------------------------
SCRIPT = """#!/bin/bash
# a comment
#JOBMAN -J from-directive --tpu v4-32
#JOBMAN --env A=1 --env "B=two words"
#JOBMAN --retries 2 -d afterok:3
#JOBMANNOT --ignored
echo start
#JOBMAN --name after-first-command-is-ignored
"""


def test_directives_parse_and_stop_at_first_command():
    d = parse_directives(SCRIPT)
    assert d["name"] == "from-directive"
    assert d["accelerator"] == "v4-32"
    assert d["env"] == ["A=1", "B=two words"]
    assert d["retries"] == 2 and d["dependency"] == ["afterok:3"]


def test_command_line_overrides_directives():
    d = parse_directives(SCRIPT)
    merged = merge_options(d, {"name": "cli", "retries": None, "env": ["A=9"], "accelerator": None})
    spec = build_spec(merged, ["x.sh"], script=SCRIPT, script_name="x.sh")
    assert spec.name == "cli" and spec.retries == 2 and spec.accelerator == "v4-32"
    assert spec.env == {"A": "9", "B": "two words"}
    assert spec.dependencies == [("afterok", "3")]


@pytest.mark.parametrize("line,needle", [
    ('#JOBMAN --tpu "v4-8', "No closing quotation"),
    ("#JOBMAN --no-such-flag", "unexpected"),
    ("#JOBMAN --retries", "expected one argument"),
    ("#JOBMAN --retries two", "invalid int"),
    ("#JOBMAN stray-positional", "unexpected"),
    ("#JOBMAN", "empty"),
    ("#JOBMAN--tpu v4-8", "missing space"),
])
def test_malformed_directives(line, needle):
    with pytest.raises(UsageError) as e:
        parse_directives("#!/bin/sh\n%s\necho hi\n" % line, source="job.sh")
    assert str(e.value).startswith("job.sh:2: malformed #JOBMAN directive")
    assert needle in str(e.value)


def test_arrays():
    assert parse_array("0-3") == ([0, 1, 2, 3], None)
    assert parse_array("1,3,5") == ([1, 3, 5], None)
    assert parse_array("0-10:5") == ([0, 5, 10], None)
    assert parse_array("0-7%2") == (list(range(8)), 2)
    for bad in ("5-2", "a-b", "", "1-3%0", "1,1", "3-"):
        with pytest.raises(UsageError):
            parse_array(bad)


def test_dependencies():
    assert parse_dependencies(["afterok:1:2,afternotok:3_1", "afterany:4"]) == [
        ("afterok", "1"), ("afterok", "2"), ("afternotok", "3_1"), ("afterany", "4")]
    for bad in ("after:1", "afterok:", "afterok:x", "singleton"):
        with pytest.raises(UsageError):
            parse_dependencies([bad])


# -- state transitions ------------------------------------------------------------------------------
def test_transition_table():
    def can(src, dst):
        return src in st.TRANSITIONS[dst]

    assert can("PENDING", "RUNNING") and can("RUNNING", "COMPLETED")
    assert can("RUNNING", "RECOVERING") and can("RECOVERING", "RUNNING")
    assert can("COMPLETED", "PENDING") and can("NODE_FAIL", "PENDING")  # requeue
    assert {"TIMEOUT", "OUT_OF_MEMORY"} <= set(st.TERMINAL_STATES)
    for term in st.TERMINAL_STATES:
        assert not can(term, "RUNNING")
        for other in st.TERMINAL_STATES:
            assert not can(term, other)
    # every active state can reach a terminal state: nothing is stuck
    for s in st.ACTIVE_STATES:
        assert any(can(s, t) for t in st.TERMINAL_STATES)


def test_conditional_state_change(tmp_path):
    s = st.Store(tmp_path)
    with s.tx() as c:
        jid = s.insert_job(c, name="x", backend="local", spec={}, deps=[], max_retries=0)
    with s.tx() as c:
        assert s.set_state(c, jid, "RUNNING")
        assert s.set_state(c, jid, "CANCELLED", reason="user")
        assert not s.set_state(c, jid, "COMPLETED")  # the loser of a race changes nothing
        assert not s.set_state(c, jid, "RUNNING")
    r = s.get(jid)
    assert r["state"] == "CANCELLED" and r["reason"] == "user" and r["end_time"] is not None
    assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()


# -- bad input on the command line: one line, exit 2 -------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["submit", "--tpu", "v9-8", "--", "true"], "unknown accelerator type"),
    (["submit", "--gpus", "Z80:1", "--", "true"], "unknown accelerator type"),
    (["submit", "-d", "afterok:424242", "--", "true"], "does not exist"),
    (["submit", "--array", "5-2", "--", "true"], "invalid array range"),
    (["submit", "no-such-script.sh"], "script not found"),
    (["submit", "--bogus"], "unrecognized"),
    (["cancel", "77"], "no such job"),
    (["logs", "77"], "no such job"),
    (["queue", "-t", "WEIRD"], "unknown state"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2(jm_home, args, needle):
    p = jobman(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jobman: error:") and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_malformed_directive_via_cli(jm_home, tmp_path):
    f = tmp_path / "bad.sh"
    f.write_text("#!/bin/sh\n#JOBMAN --array\necho\n")
    p = jobman("submit", f)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "bad.sh:2: malformed #JOBMAN directive" in p.stderr
    assert not (jm_home / "jobman.db").exists() or sqlite3.connect(str(jm_home / "jobman.db")).execute(
        "SELECT COUNT(*) FROM jobs").fetchone()[0] == 0


def test_tpu_command(jm_home):
    out = jobman("tpu", "v5p-16", check=0).stdout
    assert "v5p-16" in out and "tpu-v5p-16" in out


# -- structure ---------------------------------------------------------------------------------------
def _jobman_import_graph():
    """module -> the jobman modules it imports, deferred (in-function) imports included; a package
    imported for one of its names counts as the submodule of that name when there is one."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "jobman"
    modules = {".".join(p.relative_to(root.parent).with_suffix("").parts).replace(".__init__", ""): p
               for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module in modules:
                subs = ["%s.%s" % (node.module, a.name) for a in node.names]
                edges.update([s for s in subs if s in modules] or [node.module])
        graph[name] = edges - {name}
    return graph


def test_jobman_has_no_import_cycle():
    graph = _jobman_import_graph()
    assert graph["jobman.api"] >= {"jobman.backends", "jobman.store"} and "jobman.backends.slurm" in graph
    cycles = []

    def visit(node, path):
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    done = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert not cycles, cycles
    # the engines never reach up to the shared layer
    for b in ("jobman.backends.local", "jobman.backends.slurm", "jobman.backends.skypilot"):
        assert not graph[b] & {"jobman.api", "jobman.runner", "jobman.cli"}, (b, graph[b])
