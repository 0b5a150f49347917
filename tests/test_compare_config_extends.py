"""A compare config's `extends:`: the merged values are written out by hand, errors name the files."""

import copy
from pathlib import Path

import pytest
import yaml

from taso_llm.compare import CompareConfigError, load_compare_config
from taso_llm.compare.config import merge_over, read_compare_values

ROOT = Path(__file__).resolve().parents[1]
COMPARE = ROOT / "recipes" / "configs" / "compare"

PARENT = {
    "name": "parent", "base_model": "taso-tiny", "recipes": "tiny", "output_dir": "out/parent", "seeds": [0, 1],
    "max_steps": 10, "overrides": {"warmup_steps": 2, "logging_steps": 5},
    "methods": {"taso": {"lr_grid": [1e-3]}, "lora_r1": {"lr_grid": [1e-2, 3e-2]}},
    "tasks": {"math": {"train": {"generate": 20, "seed": 1}, "test": {"generate": 8, "seed": 2}, "eval_limit": 8}},
}


def _write(path: Path, values: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))
    return path


def test_child_merges_over_parent_key_by_key(tmp_path):
    _write(tmp_path / "base" / "parent.yaml", PARENT)
    # the parent's path is relative to the extending file, not to the working directory
    child = _write(tmp_path / "child.yaml", {
        "extends": "base/parent.yaml", "name": "child", "seeds": [5], "overrides": {"warmup_steps": 4},
        "methods": {"lora_r1": None, "lora_r16": {"recipe": "lora_r1", "lr_grid": [1e-3]}},
        "tasks": {"math": {"train": {"generate": 40}}}})
    assert read_compare_values(child) == {
        "name": "child", "base_model": "taso-tiny", "recipes": "tiny", "output_dir": "out/parent", "seeds": [5],
        "max_steps": 10, "overrides": {"warmup_steps": 4, "logging_steps": 5},
        "methods": {"taso": {"lr_grid": [1e-3]}, "lora_r16": {"recipe": "lora_r1", "lr_grid": [1e-3]}},
        "tasks": {"math": {"train": {"generate": 40, "seed": 1}, "test": {"generate": 8, "seed": 2}, "eval_limit": 8}},
    }
    parent = copy.deepcopy(PARENT)
    merge_over(parent, {"methods": {"lora_r1": None, "taso": {"lr_grid": [5e-3]}}, "overrides": {"warmup_steps": 4}})
    assert parent == PARENT  # a merge copies: the parent's mappings are not edited in place
    config = load_compare_config(child)
    assert list(config.methods) == ["taso", "lora_r16"] and config.tasks["math"].train.generate == 40


def test_chains_resolve_in_order(tmp_path):
    _write(tmp_path / "a.yaml", PARENT)
    _write(tmp_path / "b.yaml", {"extends": "a.yaml", "max_steps": 20, "seeds": [3]})
    c = _write(tmp_path / "c.yaml", {"extends": "b.yaml", "max_steps": 30})
    config = load_compare_config(c)
    assert (config.max_steps, config.seeds, config.name) == (30, [3], "parent")


def test_extends_errors_name_the_files(tmp_path):
    child = _write(tmp_path / "child.yaml", {**PARENT, "extends": "missing.yaml"})
    with pytest.raises(CompareConfigError, match=r"missing\.yaml: no such compare config \(extends: in .*child\.yaml\)"):
        load_compare_config(child)
    _write(tmp_path / "x.yaml", {"extends": "y.yaml"})
    _write(tmp_path / "y.yaml", {"extends": "x.yaml"})
    with pytest.raises(CompareConfigError, match=r"extends: cycle .*x\.yaml -> .*y\.yaml -> .*x\.yaml"):
        load_compare_config(tmp_path / "x.yaml")
    bad = _write(tmp_path / "bad.yaml", {**PARENT, "extends": ["a.yaml"]})
    with pytest.raises(CompareConfigError, match=r"bad\.yaml: extends: expected the path"):
        load_compare_config(bad)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(CompareConfigError, match=r"list\.yaml: expected a mapping"):
        load_compare_config(_write(tmp_path / "top.yaml", {"extends": "list.yaml"}))


def test_committed_extensions_differ_from_their_parent_only_where_they_say():
    """The 7-seed 1200-step protocol reuses the 1200-step run directories and rates: only the seeds, name, report and
    the dropped per-matrix TASO differ, so its seeds 0-2 are the very runs of bench/compare_proxy/plain_1200/."""
    parent = read_compare_values(COMPARE / "proxy_math_plain_1200.yaml")
    child = read_compare_values(COMPARE / "proxy_math_plain_1200_7seeds.yaml")
    changed = {k for k in parent.keys() | child.keys() if parent.get(k) != child.get(k)}
    assert changed == {"name", "report_dir", "seeds", "methods"}
    assert child["seeds"][:3] == parent["seeds"] and set(parent["methods"]) - set(child["methods"]) == {"taso_matrix"}
    assert all(child["methods"][m] == parent["methods"][m] for m in child["methods"])
