"""What docs/extending.md promises: the registry, the recipes, the tables, the images and the README's
methods table agree, so that a half-added method fails here rather than in a user's first run."""
from __future__ import annotations

import re
import subprocess

from methods.registry import REGISTRY
from repro.recipe import RECIPES, load_recipe
from repro.tables import TABLES, load_profile
from tests.conftest import REPO


def test_every_method_has_a_recipe_and_a_table_with_the_same_profiles_and_rows():
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(REGISTRY)
    assert sorted(p.stem for p in TABLES.glob("*.yaml")) == sorted(REGISTRY)
    for name in REGISTRY:
        for profile in ("paper", "smoke"):
            recipe = load_recipe(name, profile)
            assert recipe.method == name
            assert set(load_profile(name, profile, recipe.table).rows) == set(recipe.rows), (name, profile)


def test_every_smoke_profile_prunes_in_float64_unless_its_pruning_is_a_training_run():
    for name, method in REGISTRY.items():
        recipe = load_recipe(name, "smoke")
        assert recipe.config.get("compute_dtype") == (None if method.trains else "float64"), name


def test_every_image_runs_the_whole_smoke_profile_of_each_method_it_serves():
    proc = subprocess.run(["python3", str(REPO / "docker" / "images.py"), "check"], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_the_readme_methods_table_lists_every_method_once():
    text = (REPO / "README.md").read_text()
    table = text[text.index("## Methods"):text.index("\n\n", text.index("| method |"))]
    flags = re.findall(r"^\|[^|]+\| `([a-z-]+)`", table, re.M)
    assert sorted(flags) == sorted(REGISTRY)
