"""Hook-based importance against an autograd reference |W ⊙ W.grad|."""

import pytest
import torch

from taso_llm.sparse.importance import estimate_importance
from taso_llm.targets import DEFAULT_TARGETS, find_targets


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 700, (2, 12), generator=g)
        labels = ids.clone()
        labels[:, :4] = -100  # prompt tokens: no loss
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0  # right padding on the second row
        labels[1, -3:] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _autograd_reference(model, batches, per_batch_abs=True):
    targets = find_targets(model, DEFAULT_TARGETS)
    for p in model.parameters():
        p.requires_grad_(True)
    total = {n: torch.zeros_like(m.weight) for n, m in targets.items()}
    model.eval()
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        for n, m in targets.items():
            total[n] += (m.weight * m.weight.grad).abs() if per_batch_abs else m.weight.grad
    if not per_batch_abs:
        total = {n: (targets[n].weight * g).abs() for n, g in total.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    return {n: t.detach() for n, t in total.items()}


@pytest.mark.parametrize("abs_mode", ["per_batch", "after_sum"])
def test_hooks_match_autograd(tiny_model, abs_mode):
    batches = _batches()
    ref = _autograd_reference(tiny_model, batches, per_batch_abs=abs_mode == "per_batch")
    targets = find_targets(tiny_model, DEFAULT_TARGETS)
    assert not any(p.requires_grad for p in tiny_model.parameters())  # hooks need no weight grads
    result = estimate_importance(tiny_model, targets, batches, keep="full", abs_per_batch=abs_mode == "per_batch",
                                 show_progress=False)
    assert result.batches == 3
    assert result.tokens == sum(int((b["labels"] != -100).sum()) for b in batches)
    assert set(result.stats) == set(ref) and len(ref) == 14
    for name, expected in ref.items():
        s = result.stats[name]
        assert expected.abs().sum() > 0
        torch.testing.assert_close(s.full, expected, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(s.row.float(), expected.sum(1), rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(s.col.float(), expected.sum(0), rtol=1e-4, atol=1e-8)


def test_rowcol_mode_keeps_no_full_matrix(tiny_model):
    batches = _batches(2)
    ref = _autograd_reference(tiny_model, batches)
    targets = find_targets(tiny_model, DEFAULT_TARGETS)
    result = estimate_importance(tiny_model, targets, batches, keep="rowcol", show_progress=False)
    for name, expected in ref.items():
        assert result.stats[name].full is None
        torch.testing.assert_close(result.stats[name].row.float(), expected.sum(1), rtol=1e-4, atol=1e-8)


def test_hooks_are_removed_and_model_restored(tiny_model):
    targets = find_targets(tiny_model, DEFAULT_TARGETS)
    tiny_model.train()
    estimate_importance(tiny_model, targets, _batches(1), show_progress=False)
    assert tiny_model.training
    assert all(not m._forward_hooks for m in targets.values())
    assert not tiny_model.get_input_embeddings()._forward_hooks


def test_unknown_target_module_is_named(tiny_model):
    with pytest.raises(ValueError, match="qq_proj"):
        find_targets(tiny_model, ["q_proj", "qq_proj"])


def test_checkpointed_scoring_equals_plain_and_really_recomputes(tiny_model):
    """Reentrant checkpointing (the default) recomputes each decoder layer in backward, yet the hooks score every
    layer once, giving the same statistics as a run that keeps all activations."""
    batches = _batches(2)
    targets = find_targets(tiny_model, DEFAULT_TARGETS)
    calls = []
    handle = tiny_model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *a: calls.append(1))
    with_ckpt = estimate_importance(tiny_model, targets, batches, checkpointing=True, show_progress=False)
    assert len(calls) == 4  # forward + recompute, per batch
    calls.clear()
    plain = estimate_importance(tiny_model, targets, batches, checkpointing=False, show_progress=False)
    assert len(calls) == 2
    handle.remove()
    for name in targets:
        torch.testing.assert_close(with_ckpt.stats[name].row, plain.stats[name].row, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(with_ckpt.stats[name].col, plain.stats[name].col, rtol=1e-6, atol=1e-12)
    layer = tiny_model.model.layers[0]
    assert not layer.gradient_checkpointing and not tiny_model.model.training  # restored
