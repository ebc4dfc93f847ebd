"""The training stage (`lpc train`, training/engine.py) on a tiny Llama, CPU and gloo.

Distributed equivalence (2 processes = 1 with the same global batch), gradient accumulation
(4 x 1 = 1 x 4), kill -9 and resume = an uninterrupted run, distillation from an identical teacher
has zero KL, sparse training keeps every zero, a per-layer-width checkpoint trains and reloads, and
bad input stops with one line before any step.
"""
from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from repro.cli import main
from tests.conftest import kill_lpc_at, lpc, lpc_env, tiny_llama
from training import data as train_data
from training.engine import lr_at
from training.options import TrainOptions

pytestmark = pytest.mark.usefixtures("one_thread")

SEQLEN = 16


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny checkpoint and a learnable token file: rotations of one random sequence."""
    root = tmp_path_factory.mktemp("train")
    tiny_llama(num_kv_heads=2, vocab_size=128, max_position_embeddings=64).save_pretrained(root / "tiny")
    base = np.random.default_rng(0).integers(0, 128, size=64)
    stream = np.concatenate([np.roll(base, k) for k in range(40)])
    np.save(root / "tokens.npy", stream[: len(stream) // SEQLEN * SEQLEN].reshape(-1, SEQLEN))
    return root


def train_args(workspace: Path, out: Path, *extra: str, steps: int = 6, global_batch: int = 8,
               micro_batch: int = 2, kind: str = "cpt", model: str = "tiny"):
    return ["train", "--model", str(workspace / model), "--kind", kind, "--data", str(workspace / "tokens.npy"),
            "--steps", str(steps), "--global-batch", str(global_batch), "--micro-batch", str(micro_batch),
            "--seqlen", str(SEQLEN), "--lr", "1e-2", "--warmup-fraction", "0.34", "--out", str(out), *extra]


def losses(out: Path):
    return [record["loss"] for record in json.loads((out / "train.json").read_text())["log"]]


def test_schedule_is_the_collections_formula():
    options = TrainOptions(model="m", kind="cpt", data="d", steps=1000, global_batch=8, micro_batch=2, seqlen=16,
                           lr=3e-4, out="o", warmup_fraction=0.05, final_lr_fraction=0.1)
    warmup = 50
    for step in (0, 1, 10, 49, 50, 51, 500, 999, 1000):
        warm = 1 - (1 - min(step, warmup) / warmup) ** 2
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / 1000))
        assert lr_at(step, options) == pytest.approx(3e-4 * min(warm, cosine), rel=1e-12)
    assert lr_at(0, options) == 0.0                      # the first step only fills AdamW's moments
    assert lr_at(1000, options) == pytest.approx(3e-5)   # ends at the final fraction
    capped = options.model_copy(update={"steps": 100_000})
    assert lr_at(2000, capped) == pytest.approx(3e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.02))))


def test_two_processes_equal_one_with_the_same_global_batch(workspace, tmp_path):
    steps = 10
    assert main(train_args(workspace, tmp_path / "one", steps=steps)) == 0
    proc = lpc(*train_args(workspace, tmp_path / "two", "--nproc", "2", steps=steps))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == steps
    assert np.allclose(two, one, rtol=1e-4, atol=0), (one, two)
    assert one[-1] < one[0]
    report = json.loads((tmp_path / "two" / "train.json").read_text())
    assert report["world"] == 2 and report["accumulation"] == 2


def test_accumulating_four_micro_batches_equals_one_batch_of_four(workspace, tmp_path):
    assert main(train_args(workspace, tmp_path / "acc", global_batch=4, micro_batch=1)) == 0
    assert main(train_args(workspace, tmp_path / "big", global_batch=4, micro_batch=4)) == 0
    assert json.loads((tmp_path / "acc" / "train.json").read_text())["accumulation"] == 4
    assert np.allclose(losses(tmp_path / "acc"), losses(tmp_path / "big"), rtol=1e-5, atol=0)


def test_kill_minus_nine_and_rerun_continues_like_an_uninterrupted_run(workspace, tmp_path):
    steps = 8
    assert main(train_args(workspace, tmp_path / "whole", "--save-every", "2", steps=steps)) == 0
    args = train_args(workspace, tmp_path / "cut", "--save-every", "2", steps=steps)
    kill_lpc_at(args, f"step 5/{steps}")   # after the step-4 checkpoint, mid-way to the next
    assert not (tmp_path / "cut" / "train.json").exists()
    proc = lpc(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at step 4 of 8" in proc.stdout
    report = json.loads((tmp_path / "cut" / "train.json").read_text())
    assert report["resumed_from"] == 4
    assert [r["step"] for r in report["log"]] == list(range(1, steps + 1))
    assert np.allclose(losses(tmp_path / "cut"), losses(tmp_path / "whole"), rtol=1e-5, atol=0)
    assert not (tmp_path / "cut" / "checkpoints").exists()  # discarded once train.json was written
    # The exported weights are the uninterrupted run's.
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # Done means done: the same command again trains nothing.
    again = lpc(*args)
    assert again.returncode == 0 and "trained already" in again.stdout


def test_a_save_killed_half_way_is_ignored_on_resume(workspace, tmp_path):
    args = train_args(workspace, tmp_path / "out", "--save-every", "2", steps=4)
    # The first save (step 2) dies after writing its shards, before it is marked complete.
    proc = lpc(*args, env=lpc_env(LPC_TRAIN_TEST_KILL="checkpoint-written"))
    assert proc.returncode == -signal.SIGKILL
    partial = list((tmp_path / "out" / "checkpoints").iterdir())
    assert [p.name for p in partial] == ["step_00000002.partial"]
    rerun = lpc(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" not in rerun.stdout  # nothing complete to resume: it started over
    assert json.loads((tmp_path / "out" / "train.json").read_text())["resumed_from"] is None


def test_distilling_from_an_identical_teacher_has_zero_kl(workspace, tmp_path):
    teacher = str(workspace / "tiny")
    assert main(train_args(workspace, tmp_path / "kd", "--teacher", teacher, kind="kd", steps=1)) == 0
    assert losses(tmp_path / "kd") == [0.0]


def test_sparse_training_keeps_every_zero_and_the_two_of_four_pattern(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    from methods import prune

    model = AutoModelForCausalLM.from_pretrained(workspace / "tiny")
    prune(model, "magnitude", sparsity_type="2:4")
    model.save_pretrained(tmp_path / "pruned")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert main(train_args(workspace, tmp_path / "out", kind="sparse", model=str(tmp_path / "pruned"),
                           steps=4, global_batch=4)) == 0
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    changed = 0
    for name, p in after.named_parameters():
        if name.endswith("_proj.weight"):
            zeros = before[name] == 0
            assert torch.all(p[zeros] == 0), name
            blocks = (p.reshape(p.shape[0], -1, 4) == 0).sum(-1)
            assert torch.all(blocks >= 2), name      # every group of 4 inputs still has 2 zeros
            changed += int((p[~zeros] != before[name][~zeros]).sum())
    assert changed > 0  # the kept weights did train
    report = json.loads((tmp_path / "out" / "train.json").read_text())
    assert report["sparsity"]["checked_every_step"] and report["sparsity"]["zero_fraction"] == 0.5


def test_a_per_layer_width_checkpoint_trains_saves_and_reloads(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    from methods import surgery
    from methods.modeling_lpc import register

    model = tiny_llama(num_kv_heads=2, vocab_size=128, max_position_embeddings=64)
    surgery.keep_heads(model.model.layers[0], [0, 1], [0])
    surgery.keep_mlp_channels(model.model.layers[1], list(range(40)))
    surgery.sync_config(model)
    assert model.config.model_type == "lpc_llama"
    model.save_pretrained(tmp_path / "pruned")
    assert main(train_args(workspace, tmp_path / "out", model=str(tmp_path / "pruned"), steps=3,
                           global_batch=4)) == 0
    register()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert trained.config.model_type == "lpc_llama"
    assert trained.config.layer_intermediate_size == [64, 40, 64]
    assert trained.model.layers[0].self_attn.q_proj.weight.shape[0] == 2 * 8
    ids = torch.as_tensor(np.load(workspace / "tokens.npy")[:2])
    assert torch.isfinite(trained(input_ids=ids).logits).all()
    assert not torch.equal(trained.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)


@pytest.mark.parametrize("change, message", [
    ({"--kind": "kd"}, "kind kd needs --teacher"),
    ({"--kind": "kd", "--teacher": "smoke"}, "vocabulary"),
    ({"--global-batch": "6", "--micro-batch": "4"}, "not divisible"),
    ({"--kind": "sparse"}, "zeros in its decoder weights"),
    ({"--data": "no-such-data"}, "unknown data spec"),
    ({"--steps": "0"}, "steps"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_step(workspace, tmp_path, change, message):
    args = train_args(workspace, tmp_path / "out")
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    proc = lpc(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lpc: error:") and message in lines[0], proc.stderr
    assert "step" not in proc.stdout and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- data

def test_packing_and_global_batches_do_not_depend_on_the_world_size():
    windows = train_data.Windows(train_data.pack_documents([[5, 6, 7], [8, 9]], bos=1, eos=2, seqlen=3), 3,
                                 origin="test")
    assert windows.data.tolist() == [[1, 5, 6], [7, 2, 1], [8, 9, 2]]
    stream = torch.arange(40 * 4).reshape(40, 4)
    source = train_data.Windows(stream, 4, origin="test")

    def global_batch(world, micro, step):
        layout = train_data.Layout(8, micro, world)
        parts = [train_data.GlobalStream(source, layout, rank=r, seed=3).micro_batches(step) for r in range(world)]
        return sorted(row[0].item() for rank in parts for batch in rank for row in batch)

    for step in (0, 4, 7):  # step 5 starts a second epoch (40 windows / 8 per step)
        assert global_batch(1, 8, step) == global_batch(2, 2, step) == global_batch(4, 1, step)
    first_epoch = [x for step in range(5) for x in global_batch(1, 8, step)]
    assert sorted(first_epoch) == list(range(0, 160, 4))  # every window once per epoch


def test_flat_token_files_and_shape_checks(tmp_path):
    ids = np.arange(100, dtype=np.uint32)
    ids.tofile(tmp_path / "t.bin")
    windows = train_data.Windows.from_file(tmp_path / "t.bin", 16)
    assert len(windows) == 6 and windows[5].tolist() == list(range(80, 96))
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 7)
    with pytest.raises(Exception, match="whole number"):
        train_data.Windows.from_file(tmp_path / "odd.bin", 16)
    np.save(tmp_path / "w.npy", np.zeros((3, 8), dtype=np.int64))
    with pytest.raises(Exception, match="windows of 8 tokens"):
        train_data.Windows.from_file(tmp_path / "w.npy", 16)


def test_fms_arrow_shards_are_strided_over_ranks_and_resume_exactly(tmp_path):
    for k in range(4):
        train_data.write_arrow(tmp_path / f"rank_{k}.arrow", [[100 * k + d] * (d + 2) for d in range(5)])
    layout = train_data.Layout(4, 1, 2)
    rank1 = train_data.ArrowShards(tmp_path, layout, rank=1, seqlen=4, bos=1, eos=2)
    assert [p.name for p in rank1.files] == ["rank_1.arrow", "rank_3.arrow"]
    first = rank1.micro_batches(0)
    assert first[0].tolist() == [[1, 100, 100, 2]] and first[1].tolist() == [[1, 101, 101, 101]]
    state = rank1.state(1)
    expected = [b.tolist() for step in (1, 2, 3) for b in rank1.micro_batches(step)]
    resumed = train_data.ArrowShards(tmp_path, layout, rank=1, seqlen=4, bos=1, eos=2)
    resumed.restore(json.loads(json.dumps(state)))
    assert [b.tolist() for step in (1, 2, 3) for b in resumed.micro_batches(step)] == expected
    with pytest.raises(Exception, match="--nproc 2"):
        train_data.ArrowShards(tmp_path, train_data.Layout(4, 1, 1), rank=0, seqlen=4, bos=1, eos=2).restore(state)
