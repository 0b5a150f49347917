"""One test matrix over every registered method (as PEFT runs one over its tuners): the contract of methods/base.py.

In-process on the tiny model: validate rejects a bad field before any loading; prepare gives the base model's outputs
at initialisation where the method has a zero init; the trainable count equals the method's formula; save → load
gives identical logits; merge agrees with the unmerged model. Slow, through the real recipe: resume after a stop
equals an uninterrupted run; the method trains under 2-process DDP and ZeRO-3.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from trl import ModelConfig

from taso_llm.adapters.io import adapter_state
from taso_llm.config import MethodArguments
from taso_llm.methods import METHODS, RunContext, get_method
from taso_llm.sparse.regions import lora_params
from taso_llm.targets import DEFAULT_TARGETS, find_targets, layer_shape

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 51, 52, 53, 54, 55, 56]])
LORA_R = 2

# A field each method must refuse in validate (shared args, own args, model args → message).
BAD = {
    "taso": (dict(), dict(taso_structure="diagonal"), dict(), "taso_structure='diagonal'"),
    "lora": (dict(), None, dict(lora_r=0), "lora_r=0"),
    "full": (dict(), None, dict(load_in_4bit=True), "4-bit"),
    "talos": (dict(), dict(talos_rounds=0), dict(), "talos_rounds=0"),
    "sparta": (dict(), dict(sparta_density=2.0), dict(), "sparta_density=2.0"),
    "droplora": (dict(), dict(droplora_p=1.0), dict(), "droplora_p=1.0"),
    "smoa": (dict(), dict(smoa_subspaces=0), dict(), "smoa_subspaces=0"),
}


def _calibration():
    labels = IDS.clone()
    labels[:, :3] = -100
    return [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": labels}]


def _prepared(name, model, tmp_path):
    method = get_method(name)
    shared = MethodArguments(method=name, calibration_samples=2, calibration_batch_size=2)
    own = method.args_class() if method.args_class else None
    model_args = ModelConfig(model_name_or_path="taso-tiny", lora_r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0,
                             lora_target_modules=list(DEFAULT_TARGETS))
    ctx = RunContext(output_dir=tmp_path, model_id="taso-tiny", model_args=model_args, show_progress=False,
                     calibration=_calibration, num_calibration_batches=1)
    report = method.prepare(model, shared, own, ctx)
    return method, shared, own, report


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _perturb(model, seed=0):
    """Non-zero values in every trainable parameter, as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_every_registered_method_is_in_the_matrix():
    assert set(BAD) == set(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_validate_rejects_bad_fields(name):
    shared_kw, own_kw, model_kw, message = BAD[name]
    method = get_method(name)
    own = method.args_class(**own_kw) if method.args_class else None
    with pytest.raises(ValueError, match=message):
        method.validate(MethodArguments(method=name, **shared_kw), own, {"m.q_proj": (64, 64)},
                        ModelConfig(model_name_or_path="x", **model_kw))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_prepare_identity_count_save_load_merge(name, tiny_model, tiny_path, tmp_path):
    base_logits = _logits(tiny_model)
    shapes = [layer_shape(m) for m in find_targets(tiny_model, DEFAULT_TARGETS).values()]
    method, shared, own, report = _prepared(name, tiny_model, tmp_path)
    trainable = sum(p.numel() for p in tiny_model.parameters() if p.requires_grad)
    assert report.trainable_params == trainable
    assert report.lora_r1_params == sum(lora_params(s) for s in shapes)
    if name == "taso":  # rank-r blocks within each matrix's rank-1 budget
        assert 0 < trainable <= report.lora_r1_params
        assert trainable == sum(lay["params"] for lay in report.layers.values())
    elif name == "lora":
        assert trainable == sum(lora_params(s, LORA_R) for s in shapes)
    elif name == "talos":  # one global threshold spends exactly the rank-1 budget's total, in single entries
        assert trainable == report.lora_r1_params == sum(lay["params"] for lay in report.layers.values())
    elif name == "sparta":  # random single entries, rank-1 budget (d_in + d_out) of each matrix
        assert trainable == report.lora_r1_params == sum(lay["params"] for lay in report.layers.values())
    elif name == "droplora":  # a rank-r LoRA on every target matrix
        assert trainable == sum(lora_params(s, own.droplora_r) for s in shapes)
    elif name == "smoa":  # rank r split over K diagonal blocks: (r/K)(d_in + d_out) per matrix (dims divisible by K)
        assert trainable == sum(lora_params(s, own.smoa_rank // own.smoa_subspaces) for s in shapes)
    else:
        assert trainable == sum(p.numel() for p in tiny_model.parameters())
    # zero init (taso: B = 0; lora: B = 0; full: nothing changed yet): the base model's function
    torch.testing.assert_close(_logits(tiny_model), base_logits, rtol=0, atol=0)

    _perturb(tiny_model)
    trained = _logits(tiny_model)
    assert (trained - base_logits).abs().max() > 1e-4
    run_dir = tmp_path / "run"
    if method.own_adapter_format:
        method.save(tiny_model, run_dir, shared, own, "taso-tiny", state=adapter_state(tiny_model))
    else:
        tiny_model.save_pretrained(run_dir)  # what the Trainer's save_model writes for these methods
    (run_dir / "metrics.json").write_text(json.dumps({"method": name}))
    loaded = method.load_for_eval(run_dir, lambda path=None: AutoModelForCausalLM.from_pretrained(path or tiny_path))
    torch.testing.assert_close(_logits(loaded), trained, rtol=0, atol=0)
    if method.mergeable:
        torch.testing.assert_close(_logits(method.merge(loaded)), trained, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- through the recipe

RECIPE = ROOT / "recipes" / "sft_taso.py"
STEPS = ["--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "4",
         "--max_length", "128", "--validation_size", "0", "--calibration_samples", "16", "--calibration_batch_size",
         "8", "--export_peft", "false", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--seed", "3",
         "--max_train_samples", "64", "--lora_r", str(LORA_R), "--lora_alpha", str(2 * LORA_R),
         "--lora_target_modules", *DEFAULT_TARGETS]
LR = {"taso": "1e-2", "lora": "1e-2", "full": "1e-4", "talos": "1e-2", "sparta": "1e-2", "droplora": "1e-2",
      "smoa": "1e-2"}


def _recipe(name, out, *extra):
    cmd = [sys.executable, str(RECIPE), "--method", name, "--learning_rate", LR[name], "--output_dir", str(out),
           *STEPS, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


def _weights(out: Path) -> dict:
    files = [f for f in ("adapter_model.safetensors", "model.safetensors") if (out / f).is_file()]
    assert files, f"no weights in {out}"
    return load_file(str(out / files[0]))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_resume_equals_uninterrupted(name, tmp_path, tiny_path):
    full = tmp_path / "full"
    _recipe(name, full)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    if (full / "masks.safetensors").is_file():  # the structure the first run chose
        shutil.copy(full / "masks.safetensors", resumed)
    metrics = _recipe(name, resumed, "--resume_from_checkpoint", "true")
    expected = json.loads((full / "metrics.json").read_text())["loss_curve"]
    assert [s for s, _ in metrics["loss_curve"]][-2:] == [3, 4]  # trained on from step 2 (earlier history carried)
    assert metrics["loss_curve"][-2:] == expected[-2:]
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("structure, scope", [("entries", "matrix"), ("dense_block", "model"), ("lora_block", "model")])
def test_every_taso_structure_and_budget_scope_runs_through_the_recipe(structure, scope, tmp_path, tiny_path):
    metrics = _recipe("taso", tmp_path / "run", "--taso_structure", structure, "--budget_scope", scope,
                      "--max_steps", "2")
    step = 4 if structure == "lora_block" else 1  # taso_adapter_rank 4
    allocation = metrics["budget_allocation"]
    assert allocation["scope"] == scope and metrics["trainable_params"] <= allocation["allocated"]
    assert allocation["allocated"] <= metrics["lora_r1_params"] == allocation["total_budget"]
    if scope == "model":
        assert metrics["lora_r1_params"] - allocation["allocated"] < step
    if structure != "dense_block":  # a dense |R| x |C| block cannot always spend its budget exactly
        assert allocation["allocated"] - step * len(metrics["layers"]) < metrics["trainable_params"]
    assert (tmp_path / "run" / "training.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_torch_compile_gives_the_eager_step(name, tiny_path, tmp_path):
    """`torch_compile: true` works with every method: the compiled model's loss and trainable-parameter gradients
    equal eager mode's (aot_eager: dynamo + AOTAutograd, the graph capture inductor builds on, without C++ builds)."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)  # the same random init (LoRA A) in both copies
        model = AutoModelForCausalLM.from_pretrained(tiny_path)
        _prepared(name, model, tmp_path)
        _perturb(model)
        models.append(model)
    eager, compiled = models[0], torch.compile(models[1], backend="aot_eager")
    labels = IDS.clone()
    results = []
    for model in (eager, compiled):
        loss = model(input_ids=IDS, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert len(results[0][1]) == len(results[1][1]) > 0
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
