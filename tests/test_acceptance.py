"""bench/compare_proxy/acceptance.py's "beyond seed noise" test: the exact permutation p-value against a brute-force
reference over every ordering of the pooled scores, and the checks it feeds."""

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from script_loader import ROOT, load_script  # noqa: E402


@pytest.fixture(scope="module")
def acceptance():
    return load_script("bench/compare_proxy/acceptance.py", "proxy_acceptance")


def _reference_p(better, worse):
    """Every ordering of the pooled scores (not splits): the first len(better) go to the first group."""
    pooled, n = better + worse, len(better)
    observed = sum(better) / n - sum(worse) / len(worse)
    hits = total = 0
    for order in itertools.permutations(pooled):
        total += 1
        hits += sum(order[:n]) / n - sum(order[n:]) / len(worse) >= observed - 1e-12
    return hits / total


@pytest.mark.parametrize("better, worse", [
    ([0.6, 0.7, 0.8], [0.1, 0.2, 0.3]),          # ranges apart: the smallest p of 3 vs 3
    ([0.3, 0.5, 0.6], [0.1, 0.2, 0.4]),          # overlapping
    ([0.2, 0.2, 0.5], [0.2, 0.5, 0.2]),          # ties, no difference
    ([0.9, 0.1, 0.5, 0.4], [0.3, 0.2, 0.35]),    # unequal sizes
])
def test_p_value_matches_every_ordering(acceptance, better, worse):
    assert acceptance.permutation_p_value(better, worse) == pytest.approx(_reference_p(better, worse))


def test_p_value_extremes(acceptance):
    assert acceptance.permutation_p_value([0.6, 0.7, 0.8], [0.1, 0.2, 0.3]) == pytest.approx(1 / 20)
    assert acceptance.permutation_p_value([0.1, 0.2, 0.3], [0.6, 0.7, 0.8]) == 1.0
    seven = acceptance.permutation_p_value([0.5 + i / 100 for i in range(7)], [0.1 + i / 100 for i in range(7)])
    assert seven == pytest.approx(1 / 3432)  # C(14, 7) splits, only the observed one as extreme


def _method(em, nll):
    return {"seeds": list(range(len(em))), "exact_match": em, "exact_match_min": min(em), "exact_match_max": max(em),
            "exact_match_mean": sum(em) / len(em), "answer_nll": nll, "answer_nll_mean": sum(nll) / len(nll),
            "lr_interior": True}


def test_checks_use_the_permutation_bar(acceptance):
    base = {"metrics": {"strict_match": 0.0}}
    methods = {"taso": _method([0.5, 0.6, 0.7], [0.2, 0.3, 0.25]),
               "lora_r1": _method([0.1, 0.2, 0.55], [0.31, 0.35, 0.4]),
               "lora_r16": _method([0.6, 0.7, 0.8], [0.1, 0.2, 0.15])}
    verdict = acceptance.checks(base, methods)
    # 3 vs 3: p <= 0.05 exactly when the ranges are apart
    assert verdict["lora_r16_above_lora_r1_no_overlap"] and verdict["lora_r16_above_lora_r1_exact_match_p<=0.05"]
    assert not verdict["taso_above_lora_r1_no_overlap"]
    assert not verdict["taso_above_lora_r1_exact_match_p<=0.05"]
    rows = {(c["better"], c["than"]): c for c in acceptance.comparisons(methods)}
    assert rows[("taso", "lora_r1")]["answer_nll_p"] == pytest.approx(1 / 20)  # lower NLL on every seed
    assert rows[("taso", "lora_r16")]["exact_match_diff"] == pytest.approx(-0.1)


def test_ablation_rows_both_ways(acceptance):
    methods = {"taso": _method([0.5, 0.6, 0.7], [0.2, 0.3, 0.25]),
               "taso_rank8": _method([0.1, 0.2, 0.3], [0.4, 0.5, 0.45]),   # worse on every seed
               "lora_r1": _method([0.1, 0.2, 0.55], [0.31, 0.35, 0.4])}
    [row] = acceptance.ablation(methods)  # only taso_* variants, against the default
    assert row["variant"] == "taso_rank8" and row["exact_match_diff"] == pytest.approx(-0.4)
    assert row["default_better_exact_match_p"] == pytest.approx(1 / 20)
    assert row["variant_better_exact_match_p"] == 1.0
    assert row["default_better_answer_nll_p"] == pytest.approx(1 / 20)


def test_base_score_is_reused_only_for_the_same_test_rows_and_settings(acceptance, tmp_path, monkeypatch):
    from taso_llm.compare import load_compare_config
    from taso_llm.compare.runs import data_file

    scored = []
    monkeypatch.setattr(acceptance, "score_base", lambda config, task: scored.append(task) or {"metrics": {"n": 1}})
    config = load_compare_config(ROOT / "recipes/configs/compare/tiny.yaml")
    config.output_dir = str(tmp_path / "runs")
    out = tmp_path / "base_eval.json"
    first = acceptance.evaluate_base(config, "math", out)
    assert scored == ["math"] and first["key"]["test_sha256"]
    assert acceptance.evaluate_base(config, "math", out) == first and scored == ["math"]  # same key: cached
    config.eval.max_new_tokens += 1                                                      # another setting
    acceptance.evaluate_base(config, "math", out)
    assert len(scored) == 2
    data_file(config, "math", "test").write_text(data_file(config, "math", "train").read_text())  # other rows
    acceptance.evaluate_base(config, "math", out)
    assert len(scored) == 3 and acceptance.evaluate_base(config, "math", out)["key"] == acceptance.base_eval_key(
        config, "math")


def test_seeds_needed_is_the_two_sample_normal_formula(acceptance):
    better, worse = [0.9, 0.5, 0.7, 0.6], [0.5, 0.4, 0.7, 0.2]
    diff = sum(better) / 4 - sum(worse) / 4                                    # 0.225
    var = (sum((x - 0.675) ** 2 for x in better) + sum((x - 0.45) ** 2 for x in worse)) / 6
    by_hand = 2 * ((1.6449 + 0.8416) ** 2) * var / diff ** 2                  # z_0.95 + z_0.8, tabulated
    assert acceptance.seeds_needed(better, worse) == int(by_hand) + 1
    assert acceptance.seeds_needed(worse, better) is None                      # the claim points the other way
    closer = [x - diff / 2 for x in better]                                    # half the difference, same spread
    assert acceptance.seeds_needed(closer, worse) in range(4 * int(by_hand), 4 * int(by_hand) + 5)
