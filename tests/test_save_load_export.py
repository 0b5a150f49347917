"""Save → load is exact; merge and the PEFT LoRA export reproduce the adapter's outputs; masks reuse."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from taso_llm.adapters import attach_updates, iter_adapters
from taso_llm.adapters.io import load_adapter, save_adapter
from taso_llm.adapters.export import export_peft_lora, merge_adapters
from taso_llm.sparse.importance import estimate_importance
from taso_llm.sparse.masks import check_masks_fit, load_masks, save_masks
from taso_llm.methods.taso import TasoArguments
from taso_llm.sparse.select import SelectionSpec, choose_regions
from taso_llm.targets import DEFAULT_TARGETS, find_targets, layer_shape

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 51, 52, 53, 54, 55, 56]])


def _trained_like(model, structure="lora_block", rank=4, seed=0):
    """Attach adapters chosen from real importance and give them non-zero values, as training would."""
    targets = find_targets(model, DEFAULT_TARGETS)
    labels = IDS.clone()
    labels[:, :3] = -100
    stats = estimate_importance(model, targets, [{"input_ids": IDS, "labels": labels}],
                                keep="full" if structure == "entries" else "rowcol", show_progress=False).stats
    args = TasoArguments(taso_structure=structure, taso_adapter_rank=rank)
    regions = choose_regions(stats, SelectionSpec(structure, rank=rank))
    attach_updates(model, regions, alpha=args.alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, w in iter_adapters(model):
            for p in w.update.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return regions, args


@pytest.mark.parametrize("structure", ["lora_block", "dense_block", "entries"])
def test_save_load_merge_export_agree(tiny_model, tiny_path, tmp_path, structure):
    regions, args = _trained_like(tiny_model, structure)
    with torch.no_grad():
        expected = tiny_model(IDS).logits
        base_out = AutoModelForCausalLM.from_pretrained(tiny_path)(IDS).logits
    assert (expected - base_out).abs().max() > 1e-3  # the adapter does something

    save_adapter(tiny_model, tmp_path / "adapter", base_model=str(tiny_path))
    loaded = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_path), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected)  # exact, not approximate

    export_peft_lora(tiny_model, tmp_path / "peft", str(tiny_path))
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] >= 1

    merged = merge_adapters(tiny_model)
    assert not list(iter_adapters(merged))
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_lora_block_export_is_zero_outside_core(tiny_model, tiny_path, tmp_path):
    regions, _ = _trained_like(tiny_model)
    export_peft_lora(tiny_model, tmp_path / "peft", str(tiny_path))
    from safetensors.torch import load_file

    state = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    a = state[f"base_model.model.{name}.lora_A.weight"]
    b = state[f"base_model.model.{name}.lora_B.weight"]
    off_cols = torch.ones(a.shape[1], dtype=torch.bool)
    off_cols[regions[name].cols] = False
    off_rows = torch.ones(b.shape[0], dtype=torch.bool)
    off_rows[regions[name].rows] = False
    assert a[:, off_cols].abs().max() == 0 and b[off_rows].abs().max() == 0
    assert a[:, ~off_cols].abs().max() > 0


def test_masks_roundtrip_and_reuse(tiny_model, tiny_path, tmp_path):
    regions, args = _trained_like(tiny_model)
    save_masks(tmp_path / "masks.safetensors", regions, "taso-tiny", extra={"budget": "rank1"})
    loaded, header = load_masks(tmp_path / "masks.safetensors")
    assert header["model"] == "taso-tiny" and header["budget"] == "rank1"
    for name, region in regions.items():
        assert torch.equal(loaded[name].rows, region.rows) and torch.equal(loaded[name].cols, region.cols)
        assert loaded[name].rank == region.rank and loaded[name].shape == region.shape
    fresh = AutoModelForCausalLM.from_pretrained(tiny_path)
    attach_updates(fresh, loaded, alpha=args.alpha)
    shapes = {n: tuple(w.update.lora_A.shape) + tuple(w.update.lora_B.shape) for n, w in iter_adapters(fresh)}
    assert shapes == {n: tuple(w.update.lora_A.shape) + tuple(w.update.lora_B.shape)
                      for n, w in iter_adapters(tiny_model)}


def test_masks_that_do_not_fit_name_the_matrix(tiny_model, tmp_path):
    regions, _ = _trained_like(tiny_model)
    shapes = {n: r.shape for n, r in regions.items()}
    shapes["model.layers.0.mlp.up_proj"] = (999, 64)
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj"):
        check_masks_fit(regions, shapes, "masks.safetensors")
    del shapes["model.layers.0.mlp.up_proj"]
    with pytest.raises(ValueError, match="missing"):
        check_masks_fit(regions, shapes, "masks.safetensors")


def test_trainable_params_within_budget(tiny_model):
    regions, _ = _trained_like(tiny_model)
    for name, wrapper in iter_adapters(tiny_model):
        d_out, d_in = layer_shape(wrapper.base)
        n = sum(p.numel() for p in wrapper.update.parameters())
        assert n == regions[name].num_params() <= d_in + d_out
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all(".update." in n for n in trainable)
