"""SkyPilot task generation, validated by SkyPilot's own task loader (real package, no cloud).

No test here contacts a cloud or an API server: tasks are loaded with ``sky.Task.from_yaml_config``
and launches go to a stand-in for ``sky.jobs.launch`` / ``sky.get``.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from jobman.backends.skypilot import STATE_MAP, SkyPilotBackend, load_task, run_script, task_config, to_yaml
from jobman.errors import UsageError
from jobman.spec import build_spec, merge_options, parse_directives


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    home = tmp_path_factory.mktemp("skyhome")
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(home)  # SkyPilot writes ~/.sky; keep it out of the real home
    removed = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(("GOOGLE_", "AWS_", "SKYPILOT_"))}
    try:
        yield pytest.importorskip("sky")
    finally:
        os.environ.update(removed)
        if old is not None:
            os.environ["HOME"] = old


MAXTEXT = textwrap.dedent("""\
    #!/bin/bash
    #JOBMAN -J llama-pruned-cpt --tpu v5p-16 --spot --retries 3
    #JOBMAN --image us-docker.pkg.dev/my-proj/lpc/maxtext@sha256:0123abcd
    #JOBMAN --env RUN_NAME=cpt-wanda-50 --secret HF_TOKEN
    set -euo pipefail
    python3 -m MaxText.train MaxText/configs/base.yml \\
      run_name="$RUN_NAME" base_output_directory=gs://my-bucket/runs \\
      load_parameters_path=gs://my-bucket/pruned/llama-2-7b-wanda50/0/items \\
      steps=20000 per_device_batch_size=4 "$@"
    """)


def _spec_from_script(text, *args, cli=None):
    d = parse_directives(text, "train.sh")
    return build_spec(merge_options(d, cli or {}), ["train.sh"] + list(args), script=text, script_name="train.sh")


def test_v5p16_maxtext_task_validates_with_skypilots_loader(sky):
    spec = _spec_from_script(MAXTEXT, "async_checkpointing=true")
    cfg = task_config(spec, job_id=41, name=spec.name)
    task = load_task(cfg)
    assert isinstance(task, sky.Task)
    (res,) = list(task.resources)
    assert res.accelerators == {"tpu-v5p-16": 1}
    assert res.accelerator_args["runtime_version"] == "v2-alpha-tpuv5"
    assert res.use_spot is True
    assert res.job_recovery["max_restarts_on_errors"] == 3
    assert "maxtext@sha256:0123abcd" in str(res.image_id)
    assert task.num_nodes == 1  # the pod's 2 hosts all run `run`; SkyPilot fans out
    assert task.envs["RUN_NAME"] == "cpt-wanda-50" and task.envs["JOBMAN_JOB_ID"] == "41"
    assert "SKYPILOT_NODE_RANK" in task.run and "MaxText.train" in task.run
    assert cfg["secrets"] == {"HF_TOKEN": None}
    # the YAML we print for --dry-run loads the same way
    import yaml

    again = load_task(yaml.safe_load(to_yaml(cfg)))
    assert list(again.resources)[0].accelerators == {"tpu-v5p-16": 1}


def test_v4_32_queued_and_gpu_multinode(sky):
    spec = build_spec({"accelerator": "v4-32", "queued": True, "name": "cpt"}, ["python3", "train.py"])
    (res,) = list(load_task(task_config(spec, 1)).resources)
    assert res.accelerators == {"tpu-v4-32": 1}
    assert res.accelerator_args.get("gcp_queued_resource") is True
    spec = build_spec({"accelerator": "H100:8", "nodes": 2, "infra": "gcp"}, ["torchrun", "train.py"])
    task = load_task(task_config(spec, 2))
    assert task.num_nodes == 2 and list(task.resources)[0].accelerators == {"H100": 8}


def test_secret_values_go_to_skypilot_only_at_launch(sky):
    spec = build_spec({"secrets": ["HF_TOKEN"]}, ["true"])
    cfg = task_config(spec, 3)
    task = load_task(cfg, {"HF_TOKEN": "hf_value"})
    assert "hf_value" not in to_yaml(cfg)
    assert "HF_TOKEN" in task.secrets


def test_bad_skypilot_requests():
    with pytest.raises(UsageError):
        task_config(build_spec({"accelerator": "v4-32", "nodes": 2}, ["x"]))
    b = SkyPilotBackend()
    for image in ("maxtext", "maxtext:latest", "gcr.io/p/maxtext:latest"):
        with pytest.raises(UsageError):
            b.validate(build_spec({"accelerator": "v4-8", "image": image}, ["x"]))
    b.validate(build_spec({"accelerator": "v4-8", "image": "gcr.io/p/maxtext:2026.1"}, ["x"]))


def _run_on_host(run_text, rank, ips, tmp_path):
    env = dict(os.environ, SKYPILOT_NODE_RANK=str(rank), SKYPILOT_NODE_IPS=ips, TMPDIR=str(tmp_path))
    env.pop("MASTER_ADDR", None)
    return subprocess.run(["bash", "-c", run_text], capture_output=True, text=True, env=env, timeout=30)


def test_run_section_maps_rank_and_hosts_and_keeps_argv(tmp_path):
    evil = "a b; $(touch %s) 'q' \"d\"" % (tmp_path / "pwn")
    spec = build_spec({}, ["python3", "-c", "import os,sys; print(os.environ['JOBMAN_NODE_RANK'], "
                       "os.environ['JOBMAN_NUM_NODES'], os.environ['MASTER_ADDR'], "
                       "os.environ['NODE_RANK'], repr(sys.argv[1]))", evil])
    p = _run_on_host(run_script(spec, 5, None), 1, "10.0.0.1\n10.0.0.2", tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "1 2 10.0.0.1 1 %r" % evil
    assert not (tmp_path / "pwn").exists()


def test_run_section_runs_a_script_with_args(tmp_path):
    script = "#!/bin/bash\n#JOBMAN --tpu v4-8\necho \"rank=$JOBMAN_NODE_RANK hosts=$JOBMAN_NUM_NODES args=$*\"\n" \
             "echo 'JOBMAN_SCRIPT_X EOF'\n"
    spec = build_spec({}, ["s.sh", "x", "y z"], script=script, script_name="s.sh")
    p = _run_on_host(run_script(spec, 9, 2), 0, "h0\nh1\nh2\nh3", tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["rank=0 hosts=4 args=x y z", "JOBMAN_SCRIPT_X EOF"]


def test_launch_refresh_cancel_through_the_python_api(sky, jm_home, monkeypatch):
    from jobman import api
    from jobman.store import Store

    calls = {}

    def fake_launch(task, name=None, **kw):
        calls["task"], calls["name"] = task, name
        return "req-1"

    def fake_get(req):
        if req == "req-1":
            return ([123], None)
        if req == "queue":
            return [{"job_id": 123, "status": sky.jobs.ManagedJobStatus.RECOVERING, "start_at": 1.0e9,
                     "end_at": None, "recovery_count": 2, "failure_reason": None}]
        return None

    monkeypatch.setattr(sky.jobs, "launch", fake_launch)
    monkeypatch.setattr(sky.jobs, "queue", lambda **kw: "queue")
    monkeypatch.setattr(sky.jobs, "cancel", lambda **kw: calls.setdefault("cancel", kw))
    monkeypatch.setattr(sky, "get", fake_get)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    spec = build_spec({"accelerator": "v5p-16", "secrets": ["HF_TOKEN"], "name": "cpt"}, ["python3", "t.py"])
    (jid,) = api.submit(spec)
    assert spec.backend == "skypilot"
    assert calls["name"] == "jm-%d-cpt" % jid
    assert list(calls["task"].resources)[0].accelerators == {"tpu-v5p-16": 1}
    s = Store()
    assert s.get(jid)["backend_id"] == "123"
    api.refresh(s)
    r = s.get(jid)
    assert r["state"] == "RECOVERING" and r["attempts"] == 3
    api.cancel([str(jid)], store=s)
    assert calls["cancel"] == {"job_ids": [123]} and s.get(jid)["state"] == "CANCELLED"
    s.close()
    for f in jm_home.rglob("*"):
        if f.is_file():
            assert b"hf_secret_value" not in f.read_bytes()


def test_state_map_covers_every_skypilot_status(sky):
    for status in sky.jobs.ManagedJobStatus:
        assert status.value in STATE_MAP, status


def test_readme_v4_32_worked_example_validates(sky):
    readme = (Path(__file__).resolve().parents[2] / "jobman" / "README.md").read_text()
    block = readme.split("`train_cpt_v4_32.sh`:", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    spec = _spec_from_script(block, "enable_checkpointing=true")
    (res,) = list(load_task(task_config(spec, 7, name=spec.name)).resources)
    assert res.accelerators == {"tpu-v4-32": 1} and res.use_spot
    assert spec.secrets == ["HF_TOKEN"] and spec.retries == 2
