"""SpaRTA: seeded random entries through the selection pipeline, trained at their indices only.

References are independent of the code under test: the top-k of the statistic's own scores (torch.topk), a model
whose weights get ΔW added by hand, autograd's dense weight gradient G = gᵀx read at the indices, and a dispatch
mode that sees every tensor an op creates (a dense d_out × d_in gradient cannot hide from it).
"""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from taso_llm.adapters import SparseAdapterLinear, UPDATES, iter_adapters
from taso_llm.config import MethodArguments
from taso_llm.distributed.backend import Backend
from taso_llm.methods import RunContext, get_method
from taso_llm.methods.sparta import SpartaArguments, density_budget
from taso_llm.sparse.seeded import SeededRandomScore, derived_seed
from taso_llm.sparse.select import choose_regions, select_regions
from taso_llm.targets import DEFAULT_TARGETS, find_targets, layer_shape

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 51, 52, 53, 54, 55, 56]])


def _select(model, seed=0, targets=DEFAULT_TARGETS, **shared_kw):
    method = get_method("sparta")
    shared = MethodArguments(method="sparta", target_modules=list(targets),
                             **{k: v for k, v in shared_kw.items() if not k.startswith("sparta_")})
    own = SpartaArguments(**{k: v for k, v in shared_kw.items() if k.startswith("sparta_")})
    found = find_targets(model, shared.target_modules)
    return select_regions(model, found, SeededRandomScore(seed), method.spec(shared, own, seed), iter(()),
                          show_progress=False).regions


def _prepare(model, tmp_path, **own_kw):
    method = get_method("sparta")
    shared = MethodArguments(method="sparta")
    ctx = RunContext(output_dir=tmp_path, model_id="taso-tiny", show_progress=False, seed=5)
    return method.prepare(model, shared, SpartaArguments(**own_kw), ctx)


def test_derived_seed_is_a_stable_function_of_its_parts():
    assert derived_seed("a", 1, "m.q_proj") == derived_seed("a", 1, "m.q_proj")  # no per-process hash salt
    assert derived_seed("a", 1, "m.q_proj") == 7495969580806094205  # pinned: masks must not change between versions
    assert len({derived_seed("a", s, "m") for s in range(100)}) == 100


def test_entries_are_the_top_scores_seeded_and_independent_of_the_other_targets(tiny_model):
    regions = _select(tiny_model, seed=3)
    statistic = SeededRandomScore(3)
    for name, region in regions.items():
        shape = region.shape
        assert len(region.rows) == shape[0] + shape[1]  # budget rank1, per matrix
        scores = statistic.matrix_scores(name, shape).flatten()
        expected = torch.sort(torch.topk(scores, len(region.rows)).indices).values
        assert torch.equal(region.rows * shape[1] + region.cols, expected)
    assert all(torch.equal(a.rows, b.rows) and torch.equal(a.cols, b.cols)
               for a, b in zip(regions.values(), _select(tiny_model, seed=3).values()))
    other = _select(tiny_model, seed=4)
    assert not any(torch.equal(regions[n].rows * 1000 + regions[n].cols, other[n].rows * 1000 + other[n].cols)
                   for n in regions)
    only_v = _select(tiny_model, seed=3, targets=("v_proj",))  # a pure function of (seed, name)
    for name, region in only_v.items():
        assert torch.equal(region.rows, regions[name].rows) and torch.equal(region.cols, regions[name].cols)


def test_owners_choose_the_same_entries_for_any_world_size(tiny_model):
    """Each rank draws only the matrices it owns; together they are exactly the one-process selection."""
    targets = find_targets(tiny_model, DEFAULT_TARGETS)
    statistic = SeededRandomScore(7)
    spec = get_method("sparta").spec(MethodArguments(method="sparta"), SpartaArguments(), 7)
    single = choose_regions(statistic.score(tiny_model, targets, [], 0, Backend()).stats, spec)
    union = {}
    for rank in range(3):
        scores = statistic.score(tiny_model, targets, [], 0, Backend(rank=rank, world=3))
        assert set(scores.stats) == {n for n, r in scores.owners.items() if r == rank}
        budgets = {n: layer_shape(targets[n])[0] + layer_shape(targets[n])[1] for n in scores.stats}
        union.update(choose_regions(scores.stats, spec, budgets))
    assert union.keys() == single.keys()
    for name in single:
        assert torch.equal(union[name].rows, single[name].rows) and torch.equal(union[name].cols, single[name].cols)


def test_density_exact_and_bernoulli_counts():
    shape = (64, 64)
    assert density_budget("m", shape, 0.01, "exact", 0) == round(0.01 * 4096)
    assert density_budget("m", shape, 1e-6, "exact", 0) == 1  # never an empty matrix at a positive density
    counts = torch.tensor([density_budget(f"m{i}", shape, 0.1, "bernoulli", 0) for i in range(400)], dtype=torch.float64)
    # Binomial(4096, 0.1): mean 409.6, sd 19.2; the mean of 400 draws has sd 0.96
    assert abs(counts.mean() - 409.6) < 5 and 14 < counts.std() < 25
    assert density_budget("m0", shape, 0.1, "bernoulli", 0) == counts[0]  # seeded


def test_density_and_model_wide_budget_through_the_pipeline(tiny_model):
    regions = _select(tiny_model, sparta_density=0.05)
    for region in regions.values():
        assert len(region.rows) == round(0.05 * region.shape[0] * region.shape[1])
    # model scope: the total of the per-matrix rank-1 budgets, spread in proportion to size (random mass ≈ n / 2),
    # i.e. about one density everywhere (the authors' global Bernoulli)
    spread = _select(tiny_model, budget_scope="model")
    shapes = {n: r.shape for n, r in spread.items()}
    total = sum(a + b for a, b in shapes.values())
    assert sum(len(r.rows) for r in spread.values()) == total  # entries are 1-parameter steps: nothing left over
    density = total / sum(a * b for a, b in shapes.values())
    for region in spread.values():
        assert len(region.rows) / (region.shape[0] * region.shape[1]) == pytest.approx(density, rel=0.05)


def test_forward_and_value_gradients_equal_the_dense_reference(tiny_model, tiny_path, tmp_path):
    """The adapted model = the base model with W += ΔW written by hand; ∂L/∂values = (gᵀx)[rows, cols], read from
    autograd's dense weight gradient of that reference model."""
    _prepare(tiny_model, tmp_path)
    g = torch.Generator().manual_seed(0)
    reference = AutoModelForCausalLM.from_pretrained(tiny_path)
    deltas = {}
    for name, wrapper in iter_adapters(tiny_model):
        u = wrapper.update
        with torch.no_grad():
            u.values.copy_(torch.randn(u.values.shape, generator=g) * 0.1)
        delta = torch.zeros(u.shape)
        delta[u.rows, u.cols] = u.values.detach()
        deltas[name] = (u, delta)
    for name, p in reference.named_parameters():
        p.requires_grad_(name.removesuffix(".weight") in deltas)
    with torch.no_grad():
        for name, (_, delta) in deltas.items():
            reference.get_submodule(name).weight.add_(delta)
    out = tiny_model(input_ids=IDS, labels=IDS)
    ref = reference(input_ids=IDS, labels=IDS)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for name, (u, _) in deltas.items():
        dense_grad = reference.get_submodule(name).weight.grad
        torch.testing.assert_close(u.values.grad, dense_grad[u.rows, u.cols], rtol=1e-4, atol=1e-6)


class _LargestTensor(TorchDispatchMode):
    """The most elements any op's newly allocated output had: every forward and backward temporary passes through
    here (views and in-place results share an input's storage and allocate nothing: they are skipped)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in [*args, *(kwargs or {}).values()]
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            fresh = isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
            if fresh and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def _largest_in_step(layer: nn.Module, x: torch.Tensor) -> int:
    with _LargestTensor() as probe:
        layer(x).square().sum().backward()
    return probe.largest


def test_a_large_layer_never_forms_a_dense_weight_or_gradient():
    """2048 × 2048 layer, 8 tokens, rank-1 budget (K = 4096 random entries): nothing the size of W is created in
    forward or backward, only token-sized tensors; a dense-delta implementation of the same update is caught."""
    d, tokens = 2048, 8
    base = nn.Linear(d, d, bias=False).requires_grad_(False)
    model = nn.Sequential()
    model.add_module("proj", base)
    region = next(iter(select_regions(model, {"proj": base}, SeededRandomScore(0),
                                      get_method("sparta").spec(MethodArguments(), SpartaArguments(), 0),
                                      iter(()), show_progress=False).regions.values()))
    update = UPDATES["entries"](region, alpha=1.0, dtype=torch.float32)
    layer = SparseAdapterLinear(base, update)
    x = torch.randn(tokens, d, requires_grad=True)
    largest = _largest_in_step(layer, x)
    assert largest <= tokens * len(update.values) < d * d // 100, largest  # at most the gathered N × K columns
    assert update.values.grad.shape == (2 * d,)

    def dense_delta(inp):  # the SHiRA-style implementation: scatter into a dense ΔW, then a dense matmul
        delta = torch.zeros(d, d).index_put((update.rows, update.cols), update.values)
        return base(inp) + inp @ delta.T

    assert _largest_in_step(dense_delta, x) == d * d  # the probe does see a dense matrix when there is one


def test_validate_names_the_field():
    method = get_method("sparta")
    shapes = {"m.v_proj": (64, 64)}
    cases = [(dict(sparta_density=1.5), {}, "sparta_density=1.5"),
             (dict(sparta_sampling="poisson"), {}, "sparta_sampling='poisson'"),
             (dict(sparta_sampling="bernoulli"), {}, "sparta_density > 0"),
             (dict(sparta_density=0.01), dict(budget="rank4"), "budget='rank4' both size")]
    for own, shared, message in cases:
        with pytest.raises(ValueError, match=message):
            method.validate(MethodArguments(method="sparta", **shared), SpartaArguments(**own), shapes)


def test_report_masks_and_adapter_file(tiny_model, tmp_path):
    from safetensors.torch import load_file

    from taso_llm.adapters.io import adapter_state
    from taso_llm.outputs import pending_path

    shapes = {n: layer_shape(m) for n, m in find_targets(tiny_model, DEFAULT_TARGETS).items()}
    report = _prepare(tiny_model, tmp_path, sparta_density=0.02)
    assert report.trainable_params == sum(round(0.02 * a * b) for a, b in shapes.values())
    masks_file = pending_path(tmp_path / "masks.safetensors")  # moved into place when the run commits
    assert report.details["sparta_seed"] == 5 and masks_file.is_file()
    masks = load_file(str(masks_file))
    state = adapter_state(tiny_model)
    for name in shapes:
        assert state[f"{name}.rows"].dtype == torch.int32 and state[f"{name}.values"].dtype == torch.float32
        assert torch.equal(masks[f"{name}.rows"], state[f"{name}.rows"])
        assert not state[f"{name}.values"].any()  # zero init


def test_masks_of_another_structure_are_refused(tiny_model, tmp_path):
    from taso_llm.sparse.masks import save_masks
    from taso_llm.sparse.regions import Region

    shapes = {n: layer_shape(m) for n, m in find_targets(tiny_model, DEFAULT_TARGETS).items()}
    blocks = {n: Region("lora_block", s, torch.arange(2), torch.arange(2), rank=1) for n, s in shapes.items()}
    save_masks(tmp_path / "blocks.safetensors", blocks, "taso-tiny")
    ctx = RunContext(output_dir=tmp_path, model_id="taso-tiny", show_progress=False)
    shared = MethodArguments(method="sparta", masks_path=str(tmp_path / "blocks.safetensors"))
    with pytest.raises(ValueError, match="holds \\['lora_block'\\] regions"):
        get_method("sparta").prepare(tiny_model, shared, SpartaArguments(), ctx)
