"""Kernels on single matrices, checked against brute-force restatements of the original rules."""
from __future__ import annotations

import pytest
import torch

import methods
from methods.core.errors import UsageError
from methods.sparsity import (Hessian, InputSquaredNorm, SparsityPattern, magnitude_mask, nm_mask,
                              sparsegpt_prune, wanda_mask)


def tied_weights(rows=16, cols=32, levels=4, seed=0):
    """Weights on a coarse grid, like dequantized 4-bit weights: many exact ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-levels, levels + 1, (rows, cols), generator=g).float() / levels


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_matches_columnwise_topk_with_ties(n, m):
    scores = tied_weights(cols=8 * m).abs()
    # The original: one topk over each [rows, M] column slice, scattered into a mask.
    want = torch.zeros_like(scores, dtype=torch.bool)
    for start in range(0, scores.shape[1], m):
        lowest = torch.topk(scores[:, start:start + m].float(), n, dim=1, largest=False)[1]
        want.scatter_(1, start + lowest, True)
    got = nm_mask(scores, n, m)
    assert torch.equal(got, want)
    assert (got.reshape(scores.shape[0], -1, m).sum(-1) == n).all()


def test_magnitude_unstructured_threshold_prunes_ties_and_one_extra():
    w = tied_weights()
    pattern = SparsityPattern.parse("unstructured", 0.5)
    mask = magnitude_mask(w, pattern)
    k = int(w.numel() * 0.5)
    threshold = torch.sort(w.abs().flatten())[0][k]
    assert torch.equal(mask, w.abs() <= threshold)
    assert int(mask.sum()) >= k + 1
    exact = magnitude_mask(w, pattern, exact_count=True)
    assert int(exact.sum()) == k
    # Exact count keeps the lowest scores: everything pruned is <= everything kept.
    assert w.abs()[exact].max() <= w.abs()[~exact].min()


def test_wanda_rows_stable_sort_prunes_lowest_index_among_ties():
    w = tied_weights(rows=8, cols=16)
    norms = torch.ones(16)
    mask = wanda_mask(w, norms, SparsityPattern.parse("unstructured", 0.5))
    assert (mask.sum(1) == 8).all()
    for r in range(w.shape[0]):
        order = sorted(range(16), key=lambda j: (abs(float(w[r, j])), j))
        assert set(torch.nonzero(mask[r]).flatten().tolist()) == set(order[:8])


def test_wanda_score_uses_input_norm():
    w = torch.ones(2, 4)
    norms = torch.tensor([4.0, 1.0, 9.0, 0.25])
    mask = wanda_mask(w, norms, SparsityPattern.parse("unstructured", 0.5))
    assert mask[0].tolist() == [False, True, False, True]


def test_running_statistics_equal_closed_forms():
    torch.manual_seed(0)
    xs = [torch.randn(1, 5, 3) for _ in range(4)]
    norm, hessian = InputSquaredNorm(3, torch.device("cpu")), Hessian(3, torch.device("cpu"))
    for x in xs:
        norm.add(x)
        hessian.add(x)
    flat = torch.cat([x[0] for x in xs])
    torch.testing.assert_close(norm.value, (flat ** 2).sum(0) / 4)
    torch.testing.assert_close(hessian.value, 2 * flat.t() @ flat / 4)


def test_sparsegpt_with_diagonal_hessian_is_plain_masking():
    # With uncorrelated inputs the OBS update has nothing to propagate: SparseGPT reduces to
    # masking by w²/[H⁻¹]_jj², i.e. by w² · H_jj (the damping scales every column alike).
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    h = torch.diag(torch.rand(8) + 0.5)
    out = sparsegpt_prune(w, h, SparsityPattern.parse("unstructured", 0.5))
    scores = w ** 2 * torch.diag(h)
    threshold = torch.sort(scores.flatten())[0][24]
    torch.testing.assert_close(out, torch.where(scores <= threshold, torch.zeros_like(w), w))


def test_sparsegpt_nm_structure_and_update():
    torch.manual_seed(1)
    w = torch.randn(8, 16)
    x = torch.randn(64, 16)
    out = sparsegpt_prune(w, 2 * x.t() @ x / 64, SparsityPattern.parse("2:4", None))
    assert ((out == 0).reshape(8, 4, 4).sum(-1) == 2).all()
    kept = out != 0
    assert not torch.allclose(out[kept], w[kept])  # the OBS update moved the surviving weights
    # ...and reduced the reconstruction error relative to plain masking.
    plain = w * kept
    assert ((x @ (out - w).t()) ** 2).sum() < ((x @ (plain - w).t()) ** 2).sum()


def test_dead_inputs_are_zeroed():
    w = torch.randn(4, 8)
    x = torch.randn(32, 8)
    x[:, 3] = 0
    out = sparsegpt_prune(w, 2 * x.t() @ x / 32, SparsityPattern.parse("unstructured", 0.25))
    assert (out[:, 3] == 0).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("kind,ratio,message", [
    ("unstructured", 1.0, "option sparsity_ratio must be < 1, got 1.0"),
    ("unstructured", -0.1, "option sparsity_ratio must be >= 0, got -0.1"),
    ("unstructured", float("nan"), "option sparsity_ratio must be .*, got nan"),
    ("unstructured", "0.5", "option sparsity_ratio must be a number, got '0.5'"),
    ("unstructured", True, "option sparsity_ratio must be a number, got True"),
    ("4:4", None, "N:M sparsity needs 0 < N < M, got 4:4"), ("5:4", None, "N:M .* got 5:4"), ("0:4", None, "N:M .* got 0:4"),
    ("2:4", 0.3, "sparsity ratio 0.3 contradicts 2:4"), ("two:four", None, "sparsity type must be 'unstructured' or N:M"),
    (124, None, "option sparsity_type must be a string, got 124"),   # YAML's reading of an unquoted 2:4
    ("unstructured", None, "sparsity_ratio is required"),
])
def test_bad_patterns_are_one_line_naming_method_and_value(method, kind, ratio, message):
    values = {"sparsity_type": kind} if ratio is None else {"sparsity_type": kind, "sparsity_ratio": ratio}
    with pytest.raises(UsageError, match=f"^method '{method}': {message}"):
        methods.make_options(methods.get(method), values)


def test_an_int_ratio_is_a_float_ratio():
    options = methods.make_options(methods.get("wanda"), {"sparsity_ratio": 0})
    assert options.sparsity_ratio == 0.0 and options.pattern() == SparsityPattern(0.0)


def test_width_not_divisible_by_m():
    with pytest.raises(UsageError, match="not divisible by M=8"):
        SparsityPattern.parse("4:8", None).check_width("layer.q_proj", 12)


@pytest.mark.parametrize("seed", range(6))
def test_kth_smallest_is_the_sorted_threshold(seed):
    from methods.sparsity import kth_smallest

    values = tied_weights(rows=37, cols=53, seed=seed).abs().flatten() if seed % 2 else torch.randn(1999).abs()
    for k in (0, values.numel() // 2, values.numel() - 1):
        assert torch.equal(kth_smallest(values, k), torch.sort(values)[0][k])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.9])
def test_row_selection_equals_the_stable_sort(seed, ratio):
    """Wanda's rows: the first int(in*ratio) entries of a stable sort, here found by selection."""
    scores = tied_weights(rows=9, cols=40, levels=2 + seed, seed=seed).abs()
    k = int(scores.shape[1] * ratio)
    want = torch.zeros_like(scores, dtype=torch.bool)
    want.scatter_(1, torch.sort(scores, dim=-1, stable=True)[1][:, :k], True)
    assert torch.equal(wanda_mask(scores, torch.ones(40), SparsityPattern.parse("unstructured", ratio)), want)
