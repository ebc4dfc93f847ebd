"""Sharded loading (training/loading.py): on two gloo processes each rank reads only its own rows of
every parameter, never a whole one, and the sharded model gathered back equals `load_model`'s, for a
checkpoint split over several files with uneven shards, a tied-embedding bf16 checkpoint, the kit's
per-layer-width format, and every declared architecture (biases, q/k norms, fused projections)."""
from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import ARCHITECTURES, tiny_llama, tiny_model

WORLD = 2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import transformers

    from methods import surgery

    root = tmp_path_factory.mktemp("loading")
    # Odd sizes: 131 vocabulary rows and 70 MLP rows split 66/65 and 35/35, the 1-row k/v of one head
    # unevenly (1/0: rank 1 holds no rows of it); several files and an index.
    odd = tiny_llama(num_kv_heads=1, vocab_size=131, hidden_size=36, intermediate_size=70, num_attention_heads=3,
                     head_dim=12)
    odd.save_pretrained(root / "split", max_shard_size="20KB")
    tied = tiny_llama(num_kv_heads=2, seed=1, vocab_size=131, tie_word_embeddings=True)
    tied.to(torch.bfloat16).save_pretrained(root / "tied_bf16")
    narrow = tiny_llama(num_kv_heads=2, seed=2)
    surgery.keep_heads(narrow.model.layers[0], [0, 1], [0])
    surgery.keep_mlp_channels(narrow.model.layers[1], list(range(40)))
    surgery.sync_config(narrow)
    narrow.save_pretrained(root / "per_layer")
    for arch in ARCHITECTURES:
        if arch != "qwen3" or hasattr(transformers, "Qwen3Config"):
            tiny_model(arch).save_pretrained(root / arch)
    return root


def _worker(rank: int, root: str, names) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from methods.core.models import load_model
    from training import loading
    from training.engine import Run, shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD)
    try:
        run = Run(rank, WORLD, torch.device("cpu"), owns_group=True)
        for name in names:
            path = f"{root}/{name}"
            model = loading.skeleton(path, run)
            assert all(p.is_meta for p in model.parameters())
            shard(model, run)
            stats = loading.fill(model, path, run)
            # What this rank should read: its torch.chunk rows of every parameter, in the stored dtype.
            stored = loading.Checkpoint(path)
            mine = largest_half = 0
            for key, param in model.named_parameters():
                _, dtype, shape, _ = stored.tensors[key]
                row = math.prod(shape[1:]) * loading.STORED[dtype].itemsize
                chunk = math.ceil(shape[0] / WORLD)
                mine += (min((rank + 1) * chunk, shape[0]) - min(rank * chunk, shape[0])) * row
                largest_half = max(largest_half, chunk * row)
            assert stats["bytes_read"] == mine, (name, stats, mine)
            assert 0 < stats["largest_read"] <= largest_half, (name, stats)
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            old, _ = load_model(path, load_tokenizer=False)
            if rank == 0:
                expected = old.state_dict()
                assert full.keys() == expected.keys(), name
                for key, value in expected.items():
                    assert full[key].dtype == value.dtype == torch.float32 and torch.equal(full[key], value), key
            for (a, x), (b, y) in zip(model.named_buffers(), old.named_buffers()):
                assert a == b and torch.equal(x, y), a     # rotary inv_freq: computed, not empty
            if old.config.tie_word_embeddings:
                assert model.lm_head.weight is model.model.embed_tokens.weight
            assert model.config.to_dict() == old.config.to_dict(), name
            assert model.generation_config.to_dict() == old.generation_config.to_dict(), name
    finally:
        dist.destroy_process_group()


def test_each_rank_reads_only_its_own_shards_and_the_result_is_the_full_load(checkpoints):
    import torch.multiprocessing as mp

    names = ["split", "tied_bf16", "per_layer"] + [a for a in ARCHITECTURES if (checkpoints / a).is_dir()]
    mp.spawn(_worker, args=(str(checkpoints), names), nprocs=WORLD, join=True)


def test_one_process_on_the_cpu_loads_as_before(checkpoints):
    from methods.core.models import load_model
    from training import loading
    from training.engine import Run

    run = Run(0, 1, torch.device("cpu"), owns_group=False)
    path = str(checkpoints / "tied_bf16")
    model = loading.skeleton(path, run)
    assert not any(p.is_meta for p in model.parameters())
    assert loading.fill(model, path, run) == {"bytes_read": 0, "largest_read": 0}
    old, _ = load_model(path, load_tokenizer=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), old.state_dict().values()))


def test_a_checkpoint_that_disagrees_with_its_config_is_one_line(checkpoints, tmp_path):
    import json
    import shutil

    from methods.core.errors import UsageError
    from training import loading

    shutil.copytree(checkpoints / "tied_bf16", tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    stored = loading.Checkpoint(str(tmp_path / "bad"))
    with pytest.raises(UsageError, match="model.norm.weight has shape"):
        stored.read_rows("model.norm.weight", 0, 2, torch.empty(2, config["hidden_size"] + 1))
