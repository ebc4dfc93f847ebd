"""Results across machines (repro/portability.py): the emulation matrix and the bands it sets.

Fast: the comparison of checkpoints and the environment of each emulation. Slow (`make test-all`):
the smoke rows most exposed to rounding (Wanda's and SparseGPT's N:M rows, SparseGPT's unstructured
row) replayed under three emulated machines, each inside its band (`lpc repro` exits 0).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from repro import portability
from tests.conftest import REPO

REPLAYED = {"wanda": "dense,4of8,2of4", "sparsegpt": "dense,unstructured-0.5,4of8,2of4"}
EMULATED = ("aten-default", "avx2", "1-thread")


def test_each_emulation_forces_only_its_own_settings(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "AVX512")   # a setting of the caller's shell must not leak into another emulation
    native = portability.emulation_env("native")
    assert "MKL_CBWR" not in native and native["OMP_NUM_THREADS"] == portability.THREADS
    assert portability.emulation_env("mkl-compatible")["MKL_CBWR"] == "COMPATIBLE"
    assert portability.emulation_env("aten-default")["ATEN_CPU_CAPABILITY"] == "default"
    assert portability.emulation_env("1-thread")["OMP_NUM_THREADS"] == "1"
    with pytest.raises(SystemExit, match="unknown emulation 'sse2'"):
        portability.emulation_env("sse2")


def test_checkpoints_compare_by_values_zeros_and_shapes(tmp_path):
    weight = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    moved = weight.clone()
    moved[0, 1], moved[1, 1] = 0.0, 5.5           # one zero moved, one value changed
    folders = {}
    for name, tensor in (("a", weight), ("b", weight.clone()), ("c", moved), ("d", weight[:2])):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        save_file({"w": tensor.contiguous()}, str(folders[name] / "model.safetensors"))
    report = portability.compare_checkpoints(folders)
    assert report["b"]["identical"] and report["b"]["values_differing"] == 0
    assert not report["c"]["identical"] and report["c"]["values_differing"] == 2 / 16
    assert report["c"]["zeros_differing"] == 1 / 16
    assert report["d"] == {"identical": False, "same_shapes": False}


def test_every_smoke_band_cites_a_stored_spread_that_covers_it():
    """A widened smoke band names the spread file it comes from; the file is committed, and every
    value it holds for that cell lies inside the band (a band narrower than its own evidence fails)."""
    import json
    import re

    from repro.tables import load_profile
    from repro.tolerance import band as band_of

    spread_dir = REPO / "results" / "reference" / "smoke" / "spread"
    checked = 0
    for path in sorted((REPO / "repro" / "tables").glob("*.yaml")):
        table = load_profile(path.stem, "smoke")
        cited = re.findall(r"spread/([\w.-]+\.json)", path.read_text())
        for name in cited:
            assert (spread_dir / name).is_file(), f"{path.name} cites spread/{name}, which is not committed"
        for override in table.overrides:
            assert "spread/" in override.reason, f"{path.name}: the {override.row}/{override.metric} band cites no spread"
            name = re.search(r"spread/([\w.-]+\.json)", override.reason).group(1)
            cells = json.loads((spread_dir / name).read_text())["cells"]
            cell = cells.get(f"{override.row}/{override.metric}")
            if cell is None:   # a band carried over to a pattern not measured (its reason says so)
                continue
            reference = table.rows[override.row][override.metric].values["reference"]
            spec = table.metrics[override.metric]
            half_width = band_of(spec.kind, reference, n=getattr(spec, "n", None), override=override.band)
            for setting, value in cell["values"].items():
                assert abs(value - reference) <= half_width, (path.name, override.row, setting, value, half_width)
            checked += 1
    assert checked >= 3


@pytest.mark.slow
@pytest.mark.parametrize("emulation", EMULATED)
@pytest.mark.parametrize("method", sorted(REPLAYED))
def test_rows_exposed_to_rounding_stay_in_their_bands_on_emulated_machines(tmp_path, method, emulation):
    proc = subprocess.run([sys.executable, "-m", "repro.cli", "repro", method, "--profile", "smoke", "--rows",
                           REPLAYED[method], "--results-dir", str(tmp_path)], cwd=REPO,
                          env=portability.emulation_env(emulation), capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
