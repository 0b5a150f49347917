"""Gradient-aligned init (`taso_init: gradient`): the block gradient equals autograd's weight gradient restricted to
the block, A spans its top-r right singular vectors, and the initial model output is unchanged."""

import math

import torch

from taso_llm.distributed import Backend
from taso_llm.sparse.block_gradient import aligned_lora_a, block_gradients
from taso_llm.sparse.regions import Region
from taso_llm.targets import find_targets

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 51, 52, 53, 54, 55, 56]])


def _batches():
    labels = IDS.clone()
    labels[:, :3] = -100
    return [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": labels}] * 2


def _regions(model):
    targets = find_targets(model, ["q_proj", "down_proj"])
    g = torch.Generator().manual_seed(0)
    regions = {}
    for name, m in targets.items():
        rows = torch.sort(torch.randperm(m.out_features, generator=g)[:6]).values
        cols = torch.sort(torch.randperm(m.in_features, generator=g)[:5]).values
        regions[name] = Region("lora_block", (m.out_features, m.in_features), rows, cols, rank=2)
    return targets, regions


def test_block_gradient_is_autograd_weight_gradient_on_the_block(tiny_model):
    targets, regions = _regions(tiny_model)
    got = block_gradients(tiny_model, targets, regions, _batches(), Backend(), checkpointing=True)
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    for m in targets.values():
        m.weight.requires_grad_(True)
    for batch in _batches():  # the reference: autograd's dense weight gradient, summed over the same batches
        tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    for name, m in targets.items():
        r = regions[name]
        want = m.weight.grad[r.rows.unsqueeze(1), r.cols.unsqueeze(0)].double()
        assert want.abs().max() > 0
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-7)


def test_aligned_a_spans_the_top_singular_vectors():
    g = torch.randn(7, 5, dtype=torch.float64)
    a = aligned_lora_a(g, 2, torch.zeros(2, 5))
    _, _, vh = torch.linalg.svd(g)
    torch.testing.assert_close(a.double() @ a.double().T, torch.eye(2, dtype=torch.float64) / 3, atol=1e-6, rtol=0)
    projector = vh[:2].T @ vh[:2]
    torch.testing.assert_close(a.double() @ projector, a.double(), atol=1e-6, rtol=0)  # rows in span(V_2)
    assert torch.equal(aligned_lora_a(g, 2, torch.zeros(2, 5)), a)  # deterministic signs
    padded = aligned_lora_a(torch.randn(3, 1, dtype=torch.float64), 2, torch.zeros(2, 1))
    assert padded[1].abs().sum() == 0 and abs(abs(float(padded[0, 0])) - 1 / math.sqrt(3)) < 1e-6


def test_taso_gradient_init_keeps_the_output_and_aligns_a(tiny_model, tmp_path):
    from taso_llm.config import MethodArguments
    from taso_llm.methods import RunContext, get_method
    from taso_llm.methods.taso import TasoArguments

    with torch.no_grad():
        base = tiny_model(input_ids=IDS).logits
    shared = MethodArguments(target_modules=["q_proj", "down_proj"], calibration_samples=4, calibration_batch_size=2)
    ctx = RunContext(output_dir=tmp_path, model_id="tiny", show_progress=False, calibration=_batches,
                     num_calibration_batches=2)
    get_method("taso").prepare(tiny_model, shared, TasoArguments(taso_init="gradient"), ctx)
    with torch.no_grad():
        assert torch.equal(tiny_model(input_ids=IDS).logits, base)
    wrapper = tiny_model.get_submodule("model.layers.0.self_attn.q_proj")
    a = wrapper.update.lora_A.detach().double()
    torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64) / 3, atol=1e-5, rtol=0)
