"""DropLoRA: a LoRA whose rank activation is masked during training steps only.

References: the update written out by hand as ΔW = (α/r)·B diag(m) A with autograd through that dense formula
(gradients of A and B), masks re-drawn from their documented definition, PEFT loading the exported adapter, and a
real Trainer driving the step callback. The 2-process checks (same mask on every rank) are in
tests/test_distributed_training.py.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from taso_llm.adapters import SparseAdapterLinear, iter_adapters
from taso_llm.config import MethodArguments
from taso_llm.methods import RunContext, get_method

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 51, 52, 53, 54, 55, 56]])


def _module():
    """Imported when used: importing it registers the structure in adapters.UPDATES, which the structure-generic
    tests of the fused sparse updates enumerate when they are collected."""
    from taso_llm.adapters import rank_dropout

    return rank_dropout


def _layer(p=0.5, mode="step", rescale=True, r=6, d_out=12, d_in=10, seed=0):
    rd = _module()
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, dtype=torch.float64).requires_grad_(False)
    update = rd.RankDropoutUpdate(rd.full_region((d_out, d_in), r), alpha=2.0 * r, dtype=torch.float64)
    nn.init.normal_(update.lora_B)
    update.schedule, update.key = rd.RankDropout(p=p, mode=mode, seed=seed, rescale=rescale), "m.q_proj"
    return SparseAdapterLinear(base, update), update


def _prepared(model, tmp_path, **own_kw):
    method = get_method("droplora")
    shared = MethodArguments(method="droplora")
    own = method.args_class(**own_kw)
    ctx = RunContext(output_dir=tmp_path, model_id="taso-tiny", show_progress=False, seed=11)
    return method, shared, own, method.prepare(model, shared, own, ctx)


def _dense_reference(layer, update, x, mask):
    """y = base(x) + x ΔWᵀ, ΔW = (α/r)·B diag(mask) A per token, through autograd on fresh copies of A and B."""
    a = update.lora_A.detach().clone().requires_grad_(True)
    b = update.lora_B.detach().clone().requires_grad_(True)
    scale = update.alpha / update.rank
    mask = mask.expand(*x.shape[:-1], update.rank)
    delta = torch.einsum("or,...r,ri->...oi", b, mask, a) * scale  # a dense ΔW per token
    return layer.base(x) + torch.einsum("...oi,...i->...o", delta, x), a, b


@pytest.mark.parametrize("rescale", [True, False])
def test_step_mask_forward_and_grads_equal_dense_reference(rescale):
    layer, update = _layer(rescale=rescale)
    layer.train()
    update.schedule.begin(3)
    x = torch.randn(2, 5, 10, dtype=torch.float64)
    y = layer(x)
    mask = update.schedule.step_mask("m.q_proj", 6, 3).double()
    assert set(mask.tolist()) <= {0.0, 2.0 if rescale else 1.0} and mask.any() and not mask.all()
    y_ref, a, b = _dense_reference(layer, update, x, mask)
    torch.testing.assert_close(y, y_ref)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(update.lora_A.grad, a.grad)
    torch.testing.assert_close(update.lora_B.grad, b.grad)
    dropped = mask == 0
    assert not update.lora_A.grad[dropped].any() and not update.lora_B.grad[:, dropped].any()


@pytest.mark.parametrize("rescale", [True, False])
def test_token_mode_drops_per_token_like_dropout(rescale):
    layer, update = _layer(p=0.5, mode="token", rescale=rescale)
    layer.train()
    update.schedule.begin(0)
    x = torch.randn(4, 7, 10, dtype=torch.float64)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)  # the same draw, as dropout on a ones tensor of the rank activation's shape
    mask = torch.nn.functional.dropout(torch.ones(4, 7, 6, dtype=torch.float64), 0.5, training=True)
    mask = mask if rescale else mask * 0.5
    y_ref, _, _ = _dense_reference(layer, update, x, mask)
    torch.testing.assert_close(y, y_ref)
    kept = (mask != 0).reshape(-1, 6)
    assert len({tuple(k.tolist()) for k in kept}) > 1  # tokens get different masks


def test_masks_are_seeded_per_step_and_matrix_and_absent_outside_steps():
    rd = _module()
    schedule = rd.RankDropout(p=0.5, seed=4)
    masks = [schedule.step_mask("m.q_proj", 32, step) for step in range(8)]
    assert torch.equal(masks[2], rd.RankDropout(p=0.5, seed=4).step_mask("m.q_proj", 32, 2))  # any process
    assert len({tuple(m.tolist()) for m in masks}) == 8  # a new mask every step
    assert not torch.equal(masks[0], schedule.step_mask("m.k_proj", 32, 0))  # matrices are independent
    assert not torch.equal(masks[0], rd.RankDropout(p=0.5, seed=5).step_mask("m.q_proj", 32, 0))
    kept = torch.stack([schedule.step_mask(f"m{i}", 64, 0) for i in range(200)]) > 0
    assert abs(kept.double().mean() - 0.5) < 0.02  # Bernoulli(1 - p)

    layer, update = _layer()
    x = torch.randn(3, 10, dtype=torch.float64)
    plain = layer.base(x) + x @ (update.lora_B @ update.lora_A).T * update.scaling
    layer.train()
    torch.testing.assert_close(layer(x), plain)  # training mode, but no step in progress
    update.schedule.begin(0)
    assert not torch.allclose(layer(x), plain)
    layer.eval()
    torch.testing.assert_close(layer(x), plain)  # evaluation: no mask, deterministic
    update.schedule.end()
    layer.train()
    torch.testing.assert_close(layer(x), plain)


def test_callback_opens_each_optimizer_step(tiny_model, tmp_path):
    method, shared, own, _ = _prepared(tiny_model, tmp_path)
    (callback,) = method.callbacks(tiny_model, shared, own)
    schedule = callback.schedule
    assert all(w.update.schedule is schedule for _, w in iter_adapters(tiny_model))
    assert schedule.seed == 11 and schedule.step is None
    state = SimpleNamespace(global_step=7)
    callback.on_step_begin(None, state, None)
    assert schedule.step == 7
    callback.on_step_end(None, state, None)
    assert schedule.step is None


def test_forward_reads_every_input_column_without_gathering(tiny_model, tmp_path):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    layer, _ = _layer()
    with Ops() as ops:
        layer(torch.randn(3, 10, dtype=torch.float64))
    assert "index_select" not in ops.names and "mm" in ops.names


def test_count_init_and_exact_peft_export(tiny_model, tiny_path, tmp_path):
    from peft import PeftModel

    with torch.no_grad():
        base_logits = tiny_model(input_ids=IDS).logits
    method, shared, own, report = _prepared(tiny_model, tmp_path, droplora_r=4, droplora_alpha=8.0)
    shapes = [w.update.shape for _, w in iter_adapters(tiny_model)]
    assert report.trainable_params == sum(4 * (a + b) for a, b in shapes) == sum(
        p.numel() for p in tiny_model.parameters() if p.requires_grad)
    # A drawn from (seed, matrix name): the same on every rank whatever the global RNG did before
    other = AutoModelForCausalLM.from_pretrained(tiny_path)
    torch.manual_seed(999)
    _prepared(other, tmp_path, droplora_r=4, droplora_alpha=8.0)
    for (_, w1), (_, w2) in zip(iter_adapters(tiny_model), iter_adapters(other)):
        assert torch.equal(w1.update.lora_A, w2.update.lora_A)
        bound = 1 / math.sqrt(w1.update.shape[1])  # PEFT's LoRA A: kaiming_uniform(a=√5) = U(±1/√d_in)
        assert w1.update.lora_A.abs().max() <= bound and not w1.update.lora_B.any()
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(input_ids=IDS).logits, base_logits, rtol=0, atol=0)  # B = 0
        for _, w in iter_adapters(tiny_model):
            w.update.lora_B.normal_(0, 0.1)
        trained = tiny_model.eval()(input_ids=IDS).logits
    info = method.export_peft(tiny_model, tmp_path / "peft", "taso-tiny")
    assert info["r"] == 4
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=IDS).logits, trained, rtol=1e-5, atol=1e-5)


def test_validate_names_the_field():
    method = get_method("droplora")
    for own, message in [(dict(droplora_r=0), "droplora_r=0"), (dict(droplora_p=1.0), "droplora_p=1.0"),
                         (dict(droplora_mode="layer"), "droplora_mode='layer'"),
                         (dict(droplora_alpha=0.0), "droplora_alpha=0.0")]:
        with pytest.raises(ValueError, match=message):
            method.validate(MethodArguments(method="droplora"), method.args_class(**own), {"m.q_proj": (64, 64)})
    for shared, message in [(dict(budget="rank4"), "budget='rank4'"), (dict(budget_scope="model"), "budget_scope"),
                            (dict(masks_path="masks.safetensors"), "masks_path")]:
        with pytest.raises(ValueError, match=message):
            method.validate(MethodArguments(method="droplora", **shared), method.args_class(), {"m.q_proj": (64, 64)})


@pytest.mark.slow
def test_trainer_resamples_the_mask_every_step(tiny_path, tmp_path):
    """Through the real recipe: the callback drives the masks (recorded by a spy on the schedule), one per step."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "spy.py"
    script.write_text(
        "import json, runpy, sys\n"
        "from taso_llm.adapters import rank_dropout as rd\n"
        "seen = []\n"
        "begin = rd.RankDropout.begin\n"
        "def spy(self, step):\n"
        "    seen.append([step, self.step_mask('model.layers.0.self_attn.q_proj', 4, step).tolist()])\n"
        "    begin(self, step)\n"
        "rd.RankDropout.begin = spy\n"
        f"sys.argv = ['sft_taso.py'] + sys.argv[1:]\n"
        f"runpy.run_path({str(root / 'recipes' / 'sft_taso.py')!r}, run_name='__main__')\n"
        f"json.dump(seen, open({str(tmp_path / 'seen.json')!r}, 'w'))\n")
    cmd = [sys.executable, str(script), "--method", "droplora", "--droplora_r", "4", "--droplora_alpha", "8",
           "--max_steps", "4", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
           "--max_length", "64", "--max_train_samples", "32", "--validation_size", "0", "--logging_steps", "1",
           "--save_strategy", "no", "--output_dir", str(tmp_path / "run"), "--learning_rate", "1e-2"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert [step for step, _ in seen] == [0, 1, 2, 3]  # once per optimizer step, not per micro-batch
    assert len({tuple(mask) for _, mask in seen}) > 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == "droplora" and metrics["droplora_mode"] == "step"
