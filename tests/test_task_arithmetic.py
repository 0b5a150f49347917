"""Task vectors of every kind of training output, their sums on a base, the α choices, the config, and the command
end to end: TaLoS task vectors of two generated tasks on the tiny model, added and negated, asserted on measured
accuracies (slow)."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import ModelConfig

from taso_llm.adapters import iter_adapters
from taso_llm.adapters.io import adapter_state
from taso_llm.adapters.task_vector import SparseDelta, TaskArithmetic, load_task_vector
from taso_llm.adapters.updates import delta_weight
from taso_llm.config import MethodArguments
from taso_llm.methods import RunContext, get_method
from taso_llm.task_arithmetic import (TaskArithmeticConfigError, choose_addition, choose_negation, parse_config,
                                      run_task_arithmetic)
from taso_llm.targets import DEFAULT_TARGETS

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 51, 52, 53, 54, 55, 56]])


def _calibration():
    labels = IDS.clone()
    labels[:, :3] = -100
    return [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": labels}]


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def fake_run(name, tiny_path, out: Path, seed=0, **own_kw):
    """A training output as the recipe writes it, with perturbed ("trained") values instead of training."""
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    method = get_method(name)
    shared = MethodArguments(method=name, calibration_samples=2, calibration_batch_size=2)
    own = method.args_class(**own_kw) if method.args_class else None
    model_args = ModelConfig(model_name_or_path=str(tiny_path), lora_r=2, lora_alpha=4, lora_dropout=0.0,
                             lora_target_modules=list(DEFAULT_TARGETS))
    ctx = RunContext(output_dir=out, model_id=str(tiny_path), model_args=model_args, show_progress=False,
                     calibration=_calibration, num_calibration_batches=1)
    method.prepare(model, shared, own, ctx)
    _perturb(model, seed)
    if method.own_adapter_format:
        method.save(model, out, shared, own, str(tiny_path), state=adapter_state(model))
    else:
        model.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps({"method": name, "model": str(tiny_path)}))
    return model


def _loader(tiny_path):
    return lambda path=None: AutoModelForCausalLM.from_pretrained(path or tiny_path)


@pytest.mark.parametrize("name, own", [("talos", {}), ("taso", {}), ("taso", {"taso_structure": "entries"}),
                                       ("sparta", {}), ("smoa", {}), ("droplora", {}), ("lora", {}), ("full", {})])
def test_task_vector_reproduces_the_trained_model(name, own, tiny_path, tmp_path):
    """θ_pre + 1·τ gives the trained model's logits, for every kind of output; 0·τ is θ_pre bitwise."""
    trained = fake_run(name, tiny_path, tmp_path / name, **own)
    vector = load_task_vector(tmp_path / name, _loader(tiny_path))
    assert vector.method == name and vector.base_model == str(tiny_path) and vector.num_nonzero() > 0
    sparse = name in ("talos", "sparta") or own.get("taso_structure") == "entries"
    assert all(isinstance(d, SparseDelta) == sparse for d in vector.deltas.values())
    if get_method(name).own_adapter_format:  # τ is the update itself, exactly
        for module, wrapper in iter_adapters(trained):
            delta = vector.deltas[f"{module}.weight"]
            if sparse:
                assert torch.equal(delta.values, wrapper.update.values.detach())
                assert torch.equal(delta.rows, wrapper.update.rows) and torch.equal(delta.cols, wrapper.update.cols)
            else:
                assert torch.equal(delta, delta_weight(wrapper.update))
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    merger = TaskArithmetic(base, {name: vector})
    torch.testing.assert_close(_logits(merger.set({name: 1.0})), _logits(trained), rtol=1e-4, atol=1e-4)
    merger.reset()
    for key, value in AutoModelForCausalLM.from_pretrained(tiny_path).state_dict().items():
        assert torch.equal(base.state_dict()[key], value), key


def test_weighted_sum_equals_explicit_dense_arithmetic(tiny_path, tmp_path):
    fake_run("talos", tiny_path, tmp_path / "a", seed=1, talos_density=0.05)
    fake_run("lora", tiny_path, tmp_path / "b", seed=2)
    vectors = {t: load_task_vector(tmp_path / t, _loader(tiny_path)) for t in ("a", "b")}
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    TaskArithmetic(base, vectors).set({"a": 0.7, "b": -0.3})
    for key, value in base.state_dict().items():
        want = original[key].clone()
        for task, c in (("a", 0.7), ("b", -0.3)):
            delta = vectors[task].deltas.get(key)
            if delta is not None:
                want += c * (delta.dense() if isinstance(delta, SparseDelta) else delta)
        torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-7, msg=key)


def test_task_vector_refuses_another_base(tiny_path, tmp_path):
    fake_run("talos", tiny_path, tmp_path / "a")
    vector = load_task_vector(tmp_path / "a", _loader(tiny_path))
    vector.deltas["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="q_proj.weight has shape"):
        TaskArithmetic(AutoModelForCausalLM.from_pretrained(tiny_path), {"a": vector})


# ------------------------------------------------------------------------------------------- the α choices

def _curve(points):
    return [{"alpha": a, "accuracy": acc, "mean_normalized": m} for a, acc, m in points]


def test_addition_takes_the_best_mean_normalized_accuracy_smallest_alpha_on_ties():
    curve = _curve([(0.0, {}, 0.2), (0.5, {}, 0.8), (0.6, {}, 0.8), (1.0, {}, 0.5)])
    assert choose_addition(curve)["alpha"] == 0.5


def test_negation_minimises_the_target_while_the_control_holds():
    curve = _curve([(0.0, {"t": 0.6, "c": 0.5}, 0), (0.3, {"t": 0.4, "c": 0.49}, 0),
                    (0.6, {"t": 0.2, "c": 0.47}, 0), (0.9, {"t": 0.0, "c": 0.1}, 0), (1.0, {"t": 0.0, "c": 0.2}, 0)])
    assert choose_negation(curve, "t", "c", floor=0.95 * 0.5)["alpha"] == 0.3  # 0.47 < 0.475: not allowed
    assert choose_negation(curve, "t", "c", floor=0.0)["alpha"] == 0.9  # ties: the smaller α
    assert choose_negation(curve, "t", "c", floor=0.5)["alpha"] == 0.0  # floor ≤ the base accuracy: α = 0 qualifies


# ------------------------------------------------------------------------------------------- config

def _config(tmp_path, **top):
    for task in ("a", "b"):
        (tmp_path / task).mkdir(exist_ok=True)
        (tmp_path / task / "metrics.json").write_text("{}")
    data = {"dataset_name": "x.jsonl"}
    values = {"base_model": "taso-tiny", "output_dir": str(tmp_path / "out"),
              "tasks": {t: {"run": str(tmp_path / t), "kind": "instruct", "data": data} for t in ("a", "b")}}
    return {**values, **top}


@pytest.mark.parametrize("change, message", [
    (lambda v: v["tasks"]["a"].update(kind="poetry"), r"tasks.a.kind: expected one of"),
    (lambda v: v["tasks"]["a"].pop("run"), r"tasks.a: missing field\(s\) \['run'\]"),
    (lambda v: v["tasks"]["a"].update(run="/nonexistent"), "tasks.a.run: /nonexistent is not a training output"),
    (lambda v: v["tasks"]["b"].update(data={"format": "x"}), "tasks.b.data: expected a mapping with dataset_name"),
    (lambda v: v["tasks"]["b"].update(limit=0), "tasks.b.limit"),
    (lambda v: v["tasks"]["b"].update(metric="flexible"), "tasks.b.metric: 'flexible'"),
    (lambda v: v.update(addition=["a", "c"]), "addition: expected task names"),
    (lambda v: v.update(negation={"target": "a", "control": "a"}), "target and control must be different"),
    (lambda v: v.update(negation={"target": "z", "control": "a"}), "negation.target: 'z'"),
    (lambda v: v.update(alpha_step=0), "alpha_step=0"),
    (lambda v: v.update(colour="red"), r"unknown field\(s\) \['colour'\]"),
])
def test_config_errors_name_the_field(tmp_path, change, message):
    values = _config(tmp_path)
    change(values)
    with pytest.raises(TaskArithmeticConfigError, match=message):
        parse_config(values)


def test_alpha_grid_defaults_to_0_to_1_step_0_05(tmp_path):
    config = parse_config(_config(tmp_path))
    assert config.alphas() == [round(0.05 * i, 10) for i in range(21)] and config.addition == ["a", "b"]


# ------------------------------------------------------------------------------------------- the command, small

def _instruct_rows(prefix: str, n: int, offset: int = 0) -> list[dict]:
    from taso_llm.data.synthetic import instruct_tasks

    rows = [r for r in instruct_tasks(8000, 0) if r["prompt"][0]["content"].startswith(prefix)]
    assert len(rows) >= offset + n, f"the generator no longer writes enough {prefix!r} rows"
    return rows[offset:offset + n]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_command_writes_merged_models_and_report(tiny_path, tmp_path):
    """Mechanics on perturbed runs (accuracies of a random model mean nothing): the merged models are
    θ_pre + α*·Στ and θ_pre − α*·τ_target, in HF format, and the report holds every α evaluated."""
    fake_run("talos", tiny_path, tmp_path / "run_a", seed=1)
    fake_run("sparta", tiny_path, tmp_path / "run_b", seed=2)
    for task, prefix in (("a", "Reply with the word"), ("b", "Return a JSON")):
        _write_jsonl(tmp_path / f"{task}.jsonl", _instruct_rows(prefix, 12))
    values = {"base_model": str(tiny_path), "output_dir": str(tmp_path / "out"), "alpha_step": 0.5,
              "eval": {"batch_size": 4, "max_new_tokens": 4},
              "negation": {"target": "a", "control": "b"},
              "tasks": {t: {"run": str(tmp_path / f"run_{t}"), "kind": "instruct", "limit": 3,
                            "data": {"dataset_name": str(tmp_path / f"{t}.jsonl"),
                                     "dataset_format": "prompt_completion", "validation_size": 4}}
                        for t in ("a", "b")}}
    report = run_task_arithmetic(parse_config(values))
    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert "Negation of a" in (out / "report.md").read_text()
    assert [p["alpha"] for p in report["addition"]["curve"]] == [0.0, 0.5, 1.0]
    assert report["tasks"]["a"]["method"] == "talos" and report["tasks"]["b"]["method"] == "sparta"
    vectors = {t: load_task_vector(tmp_path / f"run_{t}", _loader(tiny_path)) for t in ("a", "b")}
    for kind, coefficients in (("addition", {t: report["addition"]["chosen"]["alpha"] for t in ("a", "b")}),
                               ("negation", {"a": -report["negation"]["chosen"]["alpha"]})):
        want = TaskArithmetic(AutoModelForCausalLM.from_pretrained(tiny_path), vectors).set(coefficients)
        merged = AutoModelForCausalLM.from_pretrained(out / kind)
        for key, value in want.state_dict().items():
            assert torch.equal(merged.state_dict()[key], value), (kind, key)
        assert (out / kind / "tokenizer_config.json").is_file()


def test_command_refuses_a_run_on_another_base(tiny_path, tmp_path):
    fake_run("talos", tiny_path, tmp_path / "a")
    metrics = tmp_path / "a" / "metrics.json"
    metrics.write_text(json.dumps({"method": "talos", "model": "meta-llama/Llama-3.1-8B"}))
    values = {"base_model": str(tiny_path), "output_dir": str(tmp_path / "out"),
              "tasks": {"a": {"run": str(tmp_path / "a"), "kind": "instruct", "data": {"dataset_name": "x"}}}}
    with pytest.raises(TaskArithmeticConfigError, match="was trained on 'meta-llama/Llama-3.1-8B'"):
        run_task_arithmetic(parse_config(values))


# ------------------------------------------------------------------------------------------- end to end (slow)

RECIPE = ROOT / "recipes" / "sft_taso.py"
TINY = ROOT / "recipes" / "configs" / "tiny"
TASKS = {"upper": "Reply with the word", "json": "Return a JSON"}  # two generated instruct families


def _train(config: Path, out: Path, *args):
    cmd = [sys.executable, str(RECIPE), "--config", str(config), "--output_dir", str(out), "--save_strategy", "no",
           "--logging_steps", "25", "--seed", "42", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_talos_task_arithmetic_end_to_end(tiny_path, tmp_path):
    """The random tiny model scores 0 on every generated task, so negation could not lower anything: θ_pre is the
    tiny model after 90 full fine-tuning steps on a mixture of both tasks (partial skill on each). Then, through the
    real recipe, one TaLoS run per task (its 400 rows; 20% of the target weights, 100 steps), and the command.
    Measured on this setup (seeds 42, 1, 2): addition lifts each task by 0.11 to 0.18 over θ_pre; negating `upper`
    takes it from ~0.6 to ~0.3 with `json` held. The assertions keep some margin below those."""
    data = {}
    for task, prefix in TASKS.items():
        rows = _instruct_rows(prefix, 600)
        data[task] = _write_jsonl(tmp_path / f"{task}.jsonl", rows[:400])
        data[f"{task}_base"] = rows[400:600]
    mix = data["upper_base"] + data["json_base"]
    random.Random(0).shuffle(mix)
    _write_jsonl(tmp_path / "mix.jsonl", mix)
    base = tmp_path / "base"
    _train(TINY / "instruct_full.yaml", base, "--dataset_name", str(tmp_path / "mix.jsonl"), "--dataset_format",
           "prompt_completion", "--validation_size", "0", "--max_steps", "90", "--learning_rate", "3e-3")
    tasks = {}
    for task in TASKS:
        run = tmp_path / f"talos_{task}"
        metrics = _train(TINY / "instruct_talos.yaml", run, "--model_name_or_path", str(base), "--dataset_name",
                         str(data[task]), "--dataset_format", "prompt_completion", "--validation_size", "0.25",
                         "--max_steps", "100", "--learning_rate", "3e-3", "--talos_density", "0.2",
                         "--calibration_samples", "256", "--calibration_batch_size", "8")
        assert metrics["method"] == "talos" and metrics["trainable_params"] == round(0.2 * 92160)
        tasks[task] = {"run": str(run), "kind": "instruct",
                       "data": {"dataset_name": str(data[task]), "dataset_format": "prompt_completion",
                                "validation_size": 0.25}}
    config = tmp_path / "task_arithmetic.yaml"
    config.write_text(json.dumps({"base_model": str(base), "output_dir": str(tmp_path / "out"), "alpha_step": 0.1,
                                  "tasks": tasks, "negation": {"target": "upper", "control": "json"},
                                  "eval": {"batch_size": 50, "max_new_tokens": 12}}))
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "task_arithmetic.py"), "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    base_acc = {t: v["base_accuracy"] for t, v in report["tasks"].items()}
    finetuned = {t: v["finetuned_accuracy"] for t, v in report["tasks"].items()}
    assert all(0 < base_acc[t] < 0.8 for t in TASKS), base_acc  # partial skill to add to and to take away
    assert all(finetuned[t] >= base_acc[t] + 0.05 for t in TASKS), (finetuned, base_acc)
    added = report["addition"]["chosen"]
    assert added["alpha"] > 0
    for task in TASKS:  # the merged model keeps each task well above θ_pre
        assert added["accuracy"][task] >= base_acc[task] + 0.07, (task, added, base_acc)
    negated = report["negation"]["chosen"]
    assert negated["alpha"] > 0
    assert negated["accuracy"]["upper"] <= base_acc["upper"] - 0.15, (negated, base_acc)
    assert negated["accuracy"]["json"] >= 0.95 * base_acc["json"], (negated, base_acc)
    for kind in ("addition", "negation"):
        assert (tmp_path / "out" / kind / "model.safetensors").is_file()
