"""TaLoS against explicit references: the sampled-label Fisher (per-example autograd on the plain and on a damped
model), the global threshold (a full sort), the rounds (a dense re-implementation), the trained entries (a dense
ΔW), the entry count, validation, and a 1- vs 2-process selection."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from taso_llm.config import MethodArguments
from taso_llm.methods.base import RunContext
from taso_llm.methods.talos import TalosArguments, TalosMethod
from taso_llm.sparse.budget import allocate_by_threshold
from taso_llm.sparse.fisher import batch_seed, sampled_fisher
from taso_llm.sparse.localize import round_targets, select_low_sensitivity
from taso_llm.sparse.regions import choose_region
from taso_llm.sparse.threshold import kth_smallest, lowest_entries, threshold_counts
from taso_llm.targets import DEFAULT_TARGETS, find_targets, layer_shape

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 50, 51, 52, 53, 54, 55, 56, 57],
                    [1, 60, 61, 62, 63, 64, 65, 66, 67]])


def _batch():
    labels = IDS.clone()
    labels[:, :4] = -100  # the "prompt"
    return {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": labels}


def _reference_fisher(model, targets, batch, seed, round_index, frozen=None, damping=0.1):
    """Per example: autograd of Σ_t log p(ŷ_t) w.r.t. each (effective) weight, squared and summed. The model's
    weights are replaced by W ⊙ (1 - (1 - damping)·frozen) explicitly; ŷ drawn as the statistic draws them."""
    frozen = frozen or {}
    weights = {n: m.weight for n, m in targets.items()}
    with torch.no_grad():
        for n, m in targets.items():
            if n in frozen:
                m.weight.mul_(1 - (1 - damping) * frozen[n].float())
    try:
        labels = batch["labels"]
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"]).logits
        where = labels[:, 1:] != -100
        g = torch.Generator().manual_seed(batch_seed(seed, round_index, 0))
        probs = torch.softmax(logits[:, :-1][where].float(), -1)
        sampled = torch.multinomial(probs, 1, generator=g).squeeze(1)
        per_row = where.sum(1).tolist()
        out = {n: torch.zeros(layer_shape(m)) for n, m in targets.items()}
        start = 0
        for e, count in enumerate(per_row):
            ys = sampled[start:start + count]
            start += count
            for p in weights.values():
                p.requires_grad_(True)
            logp = torch.log_softmax(model(input_ids=batch["input_ids"][e:e + 1]).logits[0, :-1][where[e]], -1)
            grads = torch.autograd.grad(logp.gather(1, ys[:, None]).sum(), list(weights.values()))
            for (n, _), grad in zip(weights.items(), grads):
                out[n] += grad.square()
        return out
    finally:
        for p in weights.values():
            p.requires_grad_(False)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("damped", [False, True])
def test_sampled_fisher_equals_per_example_autograd(tiny_path, checkpointing, damped):
    from transformers import AutoModelForCausalLM

    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_path)  # noqa: E731
    model, reference = load(), load()
    targets, ref_targets = (find_targets(m, DEFAULT_TARGETS) for m in (model, reference))
    g = torch.Generator().manual_seed(1)
    frozen = ({n: torch.rand(layer_shape(m), generator=g) < 0.5 for n, m in targets.items()} if damped else None)
    stats, info = sampled_fisher(model, targets, [_batch()], seed=5, round_index=2, frozen=frozen, damping=0.1,
                                 show_progress=False, checkpointing=checkpointing)
    want = _reference_fisher(reference, ref_targets, _batch(), seed=5, round_index=2, frozen=frozen)
    assert info["batches"] == 1 and info["tokens"] == int((_batch()["labels"][:, 1:] != -100).sum())
    for name, s in stats.items():
        assert float(want[name].sum()) > 0, name
        torch.testing.assert_close(s.full, want[name], rtol=2e-4, atol=1e-9, msg=name)
        torch.testing.assert_close(s.row, want[name].sum(1).double(), rtol=2e-4, atol=1e-9)
    # the damping is for scoring only: the model's weights are untouched afterwards
    for name, weight in load().state_dict().items():
        assert torch.equal(model.state_dict()[name], weight), name


def test_sampled_labels_depend_on_seed_and_round_not_on_rank(tiny_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    targets = find_targets(model, ["q_proj"])
    run = lambda **kw: sampled_fisher(model, targets, [_batch()], show_progress=False, **kw)[0]  # noqa: E731
    a, b, c = run(seed=1, round_index=0), run(seed=1, round_index=0), run(seed=1, round_index=1)
    name = next(iter(a))
    assert torch.equal(a[name].full, b[name].full)  # deterministic
    assert not torch.equal(a[name].full, c[name].full)  # a new round draws new pseudo-labels


# ------------------------------------------------------------------------------------------- threshold

def _score_set(seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {f"m{i}": (torch.rand(int(torch.randint(2, 9, (1,), generator=g)), 7, generator=g) * 4).round() / 4
               for i in range(4)}  # coarse values: many ties
    tensors["m1"][0, :3] = math.inf
    return tensors


@pytest.mark.parametrize("seed", range(6))
def test_global_threshold_equals_a_stable_sort(seed):
    scores = _score_set(seed)
    names = sorted(scores)
    flat = torch.cat([scores[n].flatten() for n in names])
    total = flat.numel()
    for k in (1, total // 3, total // 2 + 1, total - 3):
        t = kth_smallest([scores[n] for n in names], k)
        assert t == float(torch.sort(flat).values[k - 1])
        counts = {n: threshold_counts(scores[n], t) for n in names}
        allocated = allocate_by_threshold({n: c[0] for n, c in counts.items()}, {n: c[1] for n, c in counts.items()},
                                          k)
        assert sum(allocated.values()) == k
        # the reference: one stable ascending sort over all matrices in name order, the first k entries
        chosen = torch.zeros(total, dtype=torch.bool)
        chosen[torch.sort(flat, stable=True).indices[:k]] = True
        offset = 0
        for n in names:
            size = scores[n].numel()
            want = chosen[offset:offset + size].view(scores[n].shape)
            offset += size
            mask = lowest_entries(scores[n], allocated[n], t)
            assert torch.equal(mask, want), (n, k)
            if allocated[n]:  # the region the pipeline builds from the same scores and count
                region = choose_region(None, None, scores[n].shape, "entries", allocated[n], full=scores[n],
                                       keep="low")
                assert torch.equal(region.rows * scores[n].shape[1] + region.cols, want.flatten().nonzero()[:, 0])


def test_threshold_refuses_bad_scores():
    with pytest.raises(ValueError, match="non-negative"):
        kth_smallest([torch.tensor([1.0, -2.0])], 1)
    with pytest.raises(ValueError, match="k=5"):
        kth_smallest([torch.tensor([1.0, 2.0])], 5)
    with pytest.raises(ValueError, match="cannot make a total"):
        allocate_by_threshold({"a": 3}, {"a": 1}, 7)


def test_round_targets_shrink_geometrically_to_the_budget():
    assert round_targets(10_000, 100, 4) == [int(10_000 * 0.01 ** (r / 4)) for r in (1, 2, 3)] + [100]
    assert round_targets(50, 50, 4) == [50] * 4 and round_targets(7, 3, 1) == [3]
    with pytest.raises(ValueError, match="keep=0"):
        round_targets(10, 0, 4)


# ------------------------------------------------------------------------------------------- rounds

def _reference_rounds(model, targets, keep, rounds, seed, damping):
    """The TaLoS selection written out densely: per round the statistic on the damped model, frozen entries at +inf,
    ONE stable sort over every matrix (name order) keeps the k_r lowest."""
    names = sorted(targets)
    total = sum(layer_shape(targets[n])[0] * layer_shape(targets[n])[1] for n in names)
    frozen = {}
    for r, k in enumerate(round_targets(total, keep, rounds)):
        stats, _ = sampled_fisher(model, targets, [_batch()], seed=seed, round_index=r, frozen=frozen,
                                  damping=damping, show_progress=False)
        cand = [stats[n].full.masked_fill(frozen[n], math.inf) if n in frozen else stats[n].full for n in names]
        chosen = torch.zeros(total, dtype=torch.bool)
        chosen[torch.sort(torch.cat([c.flatten() for c in cand]), stable=True).indices[:k]] = True
        masks, offset = {}, 0
        for n, c in zip(names, cand):
            masks[n] = chosen[offset:offset + c.numel()].view(c.shape)
            offset += c.numel()
        frozen = {n: ~m for n, m in masks.items()}
    return masks


def test_rounds_match_a_dense_reference(tiny_model):
    targets = find_targets(tiny_model, DEFAULT_TARGETS)
    keep = 900
    selection = select_low_sensitivity(tiny_model, targets, keep, lambda: [_batch()], seed=3, rounds=4, damping=0.1,
                                       checkpointing=False, show_progress=False)
    want = _reference_rounds(tiny_model, targets, keep, rounds=4, seed=3, damping=0.1)
    assert sum(r.num_params() for r in selection.regions.values()) == keep
    for name, mask in want.items():
        region = selection.regions.get(name)
        got = torch.zeros_like(mask)
        if region is not None:
            got[region.rows, region.cols] = True
        assert torch.equal(got, mask), name
    rounds = selection.report["talos_rounds"]
    assert [r["trainable"] for r in rounds] == round_targets(92160, keep, 4) and rounds[-1]["trainable"] == keep
    assert [r["threshold"] for r in rounds] == sorted(r["threshold"] for r in rounds)[::-1]  # a smaller set each time
    assert selection.report["budget_allocation"]["allocated"] == keep


# ------------------------------------------------------------------------------------------- the method

def _prepare(model, tmp_path, **own):
    shared = MethodArguments(method="talos", calibration_samples=3, calibration_batch_size=3)
    args = TalosArguments(**own)
    ctx = RunContext(output_dir=tmp_path, model_id="taso-tiny", calibration=lambda: [_batch()],
                     num_calibration_batches=1, show_progress=False)
    return shared, args, TalosMethod().prepare(model, shared, args, ctx)


def test_trained_entries_equal_a_dense_update(tiny_model, tiny_path, tmp_path):
    """Logits and the values' gradients equal those of the base with W + ΔW written out densely."""
    from transformers import AutoModelForCausalLM

    from taso_llm.adapters import iter_adapters

    _, _, report = _prepare(tiny_model, tmp_path, talos_density=0.05)
    dense = AutoModelForCausalLM.from_pretrained(tiny_path)
    g = torch.Generator().manual_seed(0)
    deltas = {}
    for name, wrapper in iter_adapters(tiny_model):
        with torch.no_grad():
            wrapper.update.values.copy_(torch.randn(wrapper.update.values.shape, generator=g) * 0.1)
        layer = dense.get_submodule(name)
        with torch.no_grad():
            layer.weight.index_put_((wrapper.update.rows, wrapper.update.cols), wrapper.update.values.detach(),
                                    accumulate=True)
        layer.weight.requires_grad_(True)
        deltas[name] = wrapper
    batch = _batch()
    loss = tiny_model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    ref_loss = dense(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref_loss.backward()
    for name, wrapper in deltas.items():
        ref_grad = dense.get_submodule(name).weight.grad[wrapper.update.rows, wrapper.update.cols]
        torch.testing.assert_close(wrapper.update.values.grad, ref_grad, rtol=1e-4, atol=1e-7, msg=name)
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("update.values") for n in trainable)  # nothing else trains
    assert report.trainable_params == round(0.05 * 92160)


def test_masks_are_saved_and_reused(tiny_model, tiny_path, tmp_path):
    from transformers import AutoModelForCausalLM

    from taso_llm.adapters import iter_adapters

    from taso_llm.outputs import pending_path

    shared, own, report = _prepare(tiny_model, tmp_path)
    assert report.details["masks_file"] == str(tmp_path / "masks.safetensors")
    reused = AutoModelForCausalLM.from_pretrained(tiny_path)
    shared.masks_path = str(pending_path(tmp_path / "masks.safetensors"))  # moved into place when training starts
    TalosMethod().prepare(reused, shared, own, RunContext(output_dir=tmp_path / "again", model_id="taso-tiny",
                                                          show_progress=False))
    first, second = dict(iter_adapters(tiny_model)), dict(iter_adapters(reused))
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name].update.rows, second[name].update.rows)
        assert torch.equal(first[name].update.cols, second[name].update.cols)


@pytest.mark.parametrize("shared_kw, own_kw, message", [
    (dict(), dict(talos_density=-0.1), "talos_density=-0.1"),
    (dict(), dict(talos_density=1.5), "talos_density=1.5"),
    (dict(), dict(talos_rounds=0), "talos_rounds=0"),
    (dict(), dict(talos_damping=2.0), "talos_damping=2.0"),
    (dict(budget_scope="model"), dict(), "budget_scope='model'"),
    (dict(budget="5000"), dict(), "more than the 4096 weights"),
    (dict(budget="rank2"), dict(talos_density=0.1), "both size the update"),
])
def test_validate_names_the_bad_field(shared_kw, own_kw, message):
    with pytest.raises(ValueError, match=message):
        TalosMethod().validate(MethodArguments(method="talos", **shared_kw), TalosArguments(**own_kw),
                               {"m.q_proj": (64, 64)})


# ------------------------------------------------------------------------------------------- 2 processes

SCRIPT = ROOT / "tests" / "dist" / "talos_select_run.py"


def _launch(cmd, cache):
    env = {**os.environ, "TASO_LLM_CACHE": str(cache), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]


@pytest.mark.slow
def test_two_processes_select_the_same_entries(tmp_path, tiny_path):
    """DDP-style replicas and ZeRO-3 partitions: the same 4-round selection as one process (the Fisher is reduced in
    rank order, so scores agree to float tolerance; on this model the masks agree exactly)."""
    cache = os.environ["TASO_LLM_CACHE"]
    _launch([sys.executable, str(SCRIPT), "--engine", "single", "--out", str(tmp_path / "single")], cache)
    reference = load_file(tmp_path / "single" / "masks.safetensors")
    for engine in ("ddp", "zero3"):
        out = tmp_path / engine
        _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
                 "--engine", engine, "--out", str(out)], cache)
        got = load_file(out / "masks.safetensors")
        assert got.keys() == reference.keys()
        for key in reference:
            assert torch.equal(got[key], reference[key]), (engine, key)
        report = json.loads((out / "report.json").read_text())
        assert report["importance_world_size"] == 2 and report["budget_allocation"]["allocated"] == 2336
