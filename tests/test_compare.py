"""The comparison runner: config errors name the field, the table agrees with results.json, runs resume."""

import json
import re
from pathlib import Path

import pytest
import yaml

from taso_llm.compare import CompareConfigError, load_compare_config, parse_compare_config, run_comparison
from taso_llm.compare.report import COLUMNS, build_results, report_markdown
from taso_llm.compare.runs import Run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "configs" / "compare" / "tiny.yaml"
HEADERS = ["task", "method", "lr"] + [title for _, title, _ in COLUMNS]


def tiny_values() -> dict:
    return yaml.safe_load(TINY.read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda v: v["methods"]["taso"].update(lr_grid=[]), "methods.taso.lr_grid"),
    (lambda v: v["methods"]["taso"].update(lr_grid=["fast"]), "methods.taso.lr_grid"),
    (lambda v: v["methods"]["taso"].update(rank=4), r"methods.taso: unknown field\(s\) \['rank'\]"),
    (lambda v: v["tasks"].update(poetry=v["tasks"]["math"]), "tasks.poetry: unknown task"),
    (lambda v: v["tasks"]["math"]["test"].update(split="test", dataset_name="x"), "tasks.math.test: give exactly one"),
    (lambda v: v["tasks"]["math"]["test"].update(format="csv"), "tasks.math.test.format"),
    (lambda v: v["tasks"]["math"]["test"].update(generator="code"), "tasks.math.test.generator: .*math_composed"),
    (lambda v: v["tasks"]["math"].pop("test"), "tasks.math.test: missing"),
    (lambda v: v.update(seeds=[0, 0]), "seeds: repeated"),
    (lambda v: v.update(max_steps=0), "max_steps"),
    (lambda v: v.pop("base_model"), "missing field.*base_model"),
    (lambda v: v["eval"].update(batch_size=-1), "eval.batch_size"),
    (lambda v: v.update(stepz=3), r"unknown field\(s\) \['stepz'\]"),
])
def test_config_errors_name_the_field(edit, message):
    values = tiny_values()
    edit(values)
    with pytest.raises(CompareConfigError, match=message):
        parse_compare_config(values)


def test_missing_recipe_or_unknown_method_is_caught_before_running(tmp_path):
    from taso_llm.compare.config import check_recipes

    values = tiny_values()
    values["methods"]["dora"] = {"lr_grid": [1e-3]}
    with pytest.raises(CompareConfigError, match="methods.dora.recipe: .*math_dora.yaml does not exist"):
        check_recipes(parse_compare_config(values), ROOT)
    values = tiny_values()
    values["methods"]["taso"]["overrides"] = {"method": "no_such_method"}
    with pytest.raises(CompareConfigError, match="method='no_such_method' is not in the registry"):
        check_recipes(parse_compare_config(values), ROOT)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", text.replace(" ", "").replace("±", " "))]


def check_table(report: str, results: dict) -> None:
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    assert _cells(lines[0]) == HEADERS
    rows = [_cells(line) for line in lines[1:1 + len(results["table"])]]
    assert [(r[0], r[1]) for r in rows] == [(t["task"], t["method"]) for t in results["table"]]
    for cells, row in zip(rows, results["table"]):
        assert float(cells[2]) == pytest.approx(row["lr"])
        for cell, (key, _, _) in zip(cells[3:], COLUMNS):
            expected = [row[key], row[f"{key}_spread"]] if row["seeds"] > 1 else [row[key]]
            assert _numbers(cell) == pytest.approx(expected, abs=0), (key, cell, expected)


def test_spread_over_seeds_and_table_numbers_equal_json(tmp_path):
    """Two seeds per method from fabricated runs: mean ± half range, and report.md shows exactly results.json."""
    config = parse_compare_config({**tiny_values(), "seeds": [0, 1], "output_dir": str(tmp_path)})
    grid, final = {}, {}
    for method, lr in (("taso", 1e-2), ("lora_r1", 3e-3)):
        for seed, (loss, score) in enumerate(((1.25, 0.5), (1.75, 0.7))):
            run = Run("math", method, lr, seed)
            metrics = {"method": "taso" if method == "taso" else "lora", "trainable_params": 2336,
                       "peak_rss_bytes": (600 + seed) * 2**20, "tokens_per_second": 1000.0 + 10 * seed,
                       "last_train_loss": loss, "eval_loss": loss, "loss_curve": [[1, 2.0], [2, loss]]}
            evaluation = {"metrics": {"answer_nll": loss + 0.1, "score": score, "strict_match": score,
                                      "score_name": "strict_match"}}
            run.dir(config).mkdir(parents=True)
            (run.dir(config) / "adapter_model.safetensors").write_bytes(b"x" * 2**20)
            grid[run] = metrics
            final[run] = (metrics, evaluation)
    outcome = {"grid": {r: m for r, m in grid.items() if r.seed == 0}, "final": final,
               "chosen": {("math", "taso"): (1e-2, "eval_loss"), ("math", "lora_r1"): (3e-3, "eval_loss")}}
    results = build_results(config, outcome)
    row = results["table"][0]
    assert row["train_loss"] == 1.5 and row["train_loss_spread"] == 0.25
    assert row["score"] == 0.6 and row["score_spread"] == 0.1 and row["adapter_mb"] == 1.0
    assert row["peak_memory_mb"] == 600 and row["peak_memory_mb_spread"] == 0  # rounded to whole MB (600.5)
    check_table(report_markdown(config, results, []), results)


@pytest.mark.slow
def test_compare_end_to_end_tiny(tmp_path, tiny_path, monkeypatch):
    config = load_compare_config(TINY)
    config.output_dir = str(tmp_path / "runs")
    config.report_dir = str(tmp_path / "report")
    results = run_comparison(config)

    report_dir = Path(config.report_dir)
    report = (report_dir / "report.md").read_text()
    on_disk = json.loads((report_dir / "results.json").read_text())
    assert on_disk["table"] == results["table"]
    assert [(r["task"], r["method"]) for r in on_disk["table"]] == [("math", "taso"), ("math", "lora_r1")]
    check_table(report, on_disk)
    for row in on_disk["table"]:
        assert row["trainable_params"] > 0 and row["adapter_mb"] > 0 and row["peak_memory_mb"] > 0
        assert row["tokens_per_second"] > 0 and row["train_loss"] > 0 and row["answer_nll"] > 0
        assert 0 <= row["score"] <= 1
    taso, lora = on_disk["table"]
    assert taso["trainable_params"] <= lora["trainable_params"]  # both at the rank-1 budget; TASO never above
    for png in ("loss_curves.png", "cost_and_score.png"):
        assert (report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report

    # Resumable: every run has its metrics and eval, so a second call starts no subprocess at all.
    import taso_llm.compare.runs as runs

    def no_subprocess(*a, **k):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(runs, "_run_logged", no_subprocess)
    again = run_comparison(config)
    assert again["table"] == on_disk["table"]


@pytest.mark.slow
def test_plain_text_runs_are_evaluated_in_their_own_layout(tmp_path, tiny_path):
    """prompt_format: standard in the overrides reaches evaluation: test rows are read as plain text and prompted as
    the run trained (no chat template), not through the tokenizer's template."""
    values = tiny_values()
    values["methods"] = {"lora_r1": values["methods"]["lora_r1"]}
    values["overrides"]["prompt_format"] = "standard"
    config = parse_compare_config(values)
    config.output_dir, config.report_dir = str(tmp_path / "runs"), str(tmp_path / "report")
    run_comparison(config)
    run_dir = Run("math", "lora_r1", 3e-3, 0).dir(config)
    assert json.loads((run_dir / "eval_spec.json").read_text())["prompt_format"] == "standard"
    records = json.loads((run_dir / "eval.json").read_text())["records"]
    test_rows = [json.loads(line) for line in (tmp_path / "runs" / "data" / "math_test.jsonl").open()]
    assert [r["prompt"] for r in records] == [row["prompt"][0]["content"] + "\n" for row in test_rows][:len(records)]


def test_proxy_tokenizer_digits_and_cached_pretraining(tmp_path, monkeypatch):
    """One token per digit; the proxy is written atomically with its log, cached, and the alias names the command."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from taso_llm import proxy
    from taso_llm.tiny import build_tokenizer, resolve_model_path

    tok = proxy.build_proxy_tokenizer()
    pieces = [tok.decode([i]) for i in tok("He has 4821 apples", add_special_tokens=False)["input_ids"]]
    assert [p for p in pieces if p.strip().isdigit()] == ["4", "8", "2", "1"]
    default = build_tokenizer()  # the tiny default keeps its merges and its number tokens
    assert default.get_vocab() == tok.get_vocab() and len(default("4821", add_special_tokens=False)["input_ids"]) < 4

    monkeypatch.setenv("TASO_LLM_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="recipes/pretrain_proxy.py"):
        resolve_model_path("taso-proxy")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    out = proxy.pretrain(config=small, pretrain=dict(steps=3, batch_size=2, seq_len=32, n_docs=20, warmup=1))
    assert out.parent == tmp_path and out.name.startswith("taso-proxy-")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left behind
    log = json.loads((out / "pretrain_log.json").read_text())
    assert log["steps_done"] == 3 and log["params"] > 0
    assert proxy.pretrain(config=small, pretrain=dict(steps=3, batch_size=2, seq_len=32, n_docs=20, warmup=1)) == out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 32 and AutoTokenizer.from_pretrained(out)("12")["input_ids"][-2:] == tok("12")[
        "input_ids"][-2:]


def test_generated_task_files_are_deterministic(tmp_path):
    from taso_llm.proxy import write_task_data

    a = write_task_data(tmp_path / "a.jsonl", "math", 5, seed=3)
    b = write_task_data(tmp_path / "b.jsonl", "math", 5, seed=3)
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert a.read_bytes() == b.read_bytes() and len(rows) == 5
    assert all(r["task"] == "math" and r["answer"] for r in rows)
    with pytest.raises(ValueError, match="task='poetry'"):
        write_task_data(tmp_path / "c.jsonl", "poetry", 5, seed=3)


def test_generated_test_rows_never_repeat_a_training_row(tmp_path):
    """Composed math on small numbers repeats now and then across seeds; the test file skips those rows and the
    generator's next rows take their place (same count, same order otherwise)."""
    from taso_llm.proxy import task_rows, write_task_data

    train = write_task_data(tmp_path / "train.jsonl", "math_composed", 2000, seed=1)
    plain = task_rows("math_composed", 200, seed=2)
    seen = {json.dumps(json.loads(line), sort_keys=True) for line in train.read_text().splitlines()}
    repeats = [r for r in plain if json.dumps(r, sort_keys=True) in seen]
    assert repeats, "the seeds chosen here must collide, or this test checks nothing"
    test = write_task_data(tmp_path / "test.jsonl", "math_composed", 200, seed=2, exclude=train)
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    assert len(rows) == 200 and not any(json.dumps(r, sort_keys=True) in seen for r in rows)
    assert rows[:len(plain) - len(repeats)] == [r for r in plain if r not in repeats]


def test_tiny_imports_nothing_of_the_package():
    """proxy.py builds on tiny.py (identity, tokenizer, cache dir), never the reverse: no import cycle."""
    import ast

    from taso_llm import tiny

    tree = ast.parse(Path(tiny.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(node.level for node in ast.walk(tree) if isinstance(node, ast.ImportFrom))
    assert not any((name or "").startswith("taso_llm") for name in imported), imported


def test_composed_math_is_generated_for_the_math_task(tmp_path):
    from taso_llm.compare.runs import prepare_data

    values = tiny_values()
    values["tasks"]["math"]["train"]["generator"] = "math_composed"
    config = parse_compare_config({**values, "output_dir": str(tmp_path)})
    prepare_data(config)
    train = [json.loads(line) for line in (tmp_path / "data" / "math_train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "data" / "math_test.jsonl").read_text().splitlines()]
    assert len(train) == 48 and all(r["task"] == "math" for r in train)
    assert any("How many more" in r["prompt"][0]["content"] for r in train)   # the composed family
    assert not any("How many more" in r["prompt"][0]["content"] for r in test)  # the test keeps the task's own
