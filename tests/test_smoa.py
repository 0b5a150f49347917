"""SMoA: the singular-index order and its groups, the modulated-blocks update against an explicit dense reference
(forward, every gradient, merge), its parameter count, the 4-bit base, and the same groups and frozen blocks on
1 and 2 processes (ZeRO-3, FSDP2). The method contract (validate, zero init, save → load, merge, DDP/ZeRO-3 training
through the recipe) is tests/test_method_contract.py and tests/test_distributed_training.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from taso_llm.adapters import attach_updates
from taso_llm.adapters.export import merge_adapters
from taso_llm.adapters.io import adapter_state, index_names, load_adapter, save_adapter
from taso_llm.adapters.modulated import ModulatedBlockFn
from taso_llm.config import MethodArguments
from taso_llm.methods.smoa import SmoaArguments, SmoaMethod
from taso_llm.outputs import pending_path
from taso_llm.sparse.svd_order import (diagonal_energy_share, group_offsets, modulated_params, modulated_region,
                                       singular_index_scores, split_rank)

ROOT = Path(__file__).resolve().parents[1]


def _weight_with_known_svd(d_out=6, d_in=5, seed=0):
    """W = U diag(σ) Vᵀ with orthonormal U, V and distinct σ (descending)."""
    g = torch.Generator().manual_seed(seed)
    k = min(d_out, d_in)
    u = torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=torch.float64))[0]
    sigma = torch.linspace(3.0, 0.5, k, dtype=torch.float64)
    return u, sigma, v, (u * sigma) @ v.T


def test_scores_are_the_energy_weighted_mean_singular_index():
    u, sigma, v, w = _weight_with_known_svd()
    rows, cols = singular_index_scores(w.float())
    for vectors, got in ((u, rows), (v, cols)):
        for i in range(vectors.shape[0]):
            energy = [(vectors[i, j] * sigma[j]) ** 2 for j in range(len(sigma))]
            expected = sum(j * e for j, e in enumerate(energy)) / sum(energy)
            assert abs(float(got[i]) - float(expected)) < 1e-4
    # a row on exactly one singular direction scores that direction's index; a zero row sorts last (score = k)
    w = torch.zeros(4, 3)
    w[0, 2], w[1, 0], w[3, 1] = 1.0, 5.0, 2.0  # singular values 5 (row 1), 2 (row 3), 1 (row 0); row 2 is empty
    rows, cols = singular_index_scores(w)
    assert rows.tolist() == pytest.approx([2.0, 0.0, 3.0, 1.0]) and cols.tolist() == pytest.approx([0.0, 1.0, 2.0])


def test_groups_partition_rows_and_columns_in_score_order():
    assert group_offsets(7, 3).tolist() == [0, 3, 5, 7] and group_offsets(4, 4).tolist() == [0, 1, 2, 3, 4]
    assert split_rank(8, 2) == [4, 4] and split_rank(5, 3) == [2, 2, 1]
    row_scores = torch.tensor([0.5, 3.0, 1.0, 0.5, 2.0, 9.0, 0.1], dtype=torch.float64)
    col_scores = torch.tensor([4.0, 0.0, 2.0, 1.0, 3.0], dtype=torch.float64)
    region = modulated_region(row_scores, col_scores, (7, 5), groups=3, rank=5)
    # ascending score, ties by index (rows 0 and 3), each group then sorted by index
    assert region.rows.tolist() == [0, 3, 6, 2, 4, 1, 5] and region.cols.tolist() == [1, 3, 2, 4, 0]
    assert region.extra["row_offsets"].tolist() == [0, 3, 5, 7] and region.extra["col_offsets"].tolist() == [0, 2, 4, 5]
    assert modulated_params(region) == 2 * (3 + 2) + 2 * (2 + 2) + 1 * (2 + 1)
    with pytest.raises(ValueError, match="6 subspaces do not fit a 7 x 5"):
        modulated_region(row_scores, col_scores, (7, 5), groups=6, rank=6)


def test_the_order_finds_a_hidden_block_diagonal_structure():
    """A permuted diagonal W = P diag(σ) Qᵀ: row and column of σ_j both score j, so the K = 2 groups put every non-zero
    in a diagonal block (energy share 1), where a random matrix keeps about 1/K."""
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.randperm(8, generator=g), torch.randperm(8, generator=g)
    w = torch.zeros(8, 8)
    w[rows, cols] = torch.linspace(8.0, 1.0, 8)
    region = modulated_region(*singular_index_scores(w), (8, 8), groups=2, rank=2)
    assert set(region.rows[:4].tolist()) == set(rows[:4].tolist())  # the rows and columns of the 4 largest σ
    assert set(region.cols[:4].tolist()) == set(cols[:4].tolist())
    assert diagonal_energy_share(w, region) == pytest.approx(1.0)
    noise = torch.randn(64, 64, generator=g)
    assert 0.4 < diagonal_energy_share(noise, modulated_region(*singular_index_scores(noise), (64, 64), 2, 2)) < 0.6


class _Net(nn.Module):
    def __init__(self, d_out, d_in, dtype=torch.float64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(d_in, d_out, dtype=dtype)


def _attach(d_out=13, d_in=10, groups=3, rank=5, alpha=3.0, seed=0):
    net = _Net(d_out, d_in, seed=seed)
    weight = net.proj.weight.detach().clone()
    rows, cols = singular_index_scores(weight)
    region = modulated_region(rows, cols, (d_out, d_in), groups, rank)
    update = attach_updates(net, {"proj": region}, alpha=alpha)["proj"].update
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in update.parameters():  # B away from its zero init, as training leaves it
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net, weight, region, update


def _dense_delta(weight, region, update) -> torch.Tensor:
    """ΔW written out entry by entry: block k is s·(B_k A_k)[i, j]·W[R_k[i], C_k[j]]; everything else 0."""
    delta = torch.zeros_like(weight)
    ro, co = region.extra["row_offsets"].tolist(), region.extra["col_offsets"].tolist()
    for k in range(len(ro) - 1):
        ba = getattr(update, f"lora_B_{k}") @ getattr(update, f"lora_A_{k}")
        for i, row in enumerate(region.rows[ro[k]:ro[k + 1]].tolist()):
            for j, col in enumerate(region.cols[co[k]:co[k + 1]].tolist()):
                delta[row, col] = update.scaling * ba[i, j] * weight[row, col]
    return delta


def test_forward_and_every_gradient_equal_the_dense_reference():
    net, weight, region, update = _attach()
    assert update.scaling == 3.0 / 5 and [getattr(update, f"lora_A_{k}").shape[0] for k in range(3)] == [2, 2, 1]
    x = torch.randn(2, 4, 10, dtype=torch.float64, requires_grad=True)
    y = net.proj(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    params = dict(update.named_parameters())
    got = {n: p.grad.clone() for n, p in params.items()}

    ref_params = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}  # the same A_k, B_k
    x_ref = x.detach().clone().requires_grad_(True)
    delta = torch.zeros_like(weight)
    ro, co = region.extra["row_offsets"].tolist(), region.extra["col_offsets"].tolist()
    for k in range(3):
        rows, cols = region.rows[ro[k]:ro[k + 1]], region.cols[co[k]:co[k + 1]]
        block = (ref_params[f"lora_B_{k}"] @ ref_params[f"lora_A_{k}"]) * weight[rows][:, cols] * update.scaling
        delta = delta.index_put((rows.unsqueeze(1), cols.unsqueeze(0)), block)
    y_ref = x_ref @ (weight + delta).T + net.proj.base.bias.detach()
    y_ref.backward(grad_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    for n in params:
        torch.testing.assert_close(got[n], ref_params[n].grad, rtol=1e-12, atol=1e-12, msg=n)
    # merge form: the update's own dense ΔW, and the loops above
    torch.testing.assert_close(update.delta_weight().double(), delta.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(delta.detach(), _dense_delta(weight, region, update).detach(), rtol=1e-12, atol=1e-12)
    assert torch.linalg.matrix_rank(delta.detach()) > update.rank  # high rank from rank-5 factors


def test_no_weight_sized_tensor_is_kept_for_backward():
    """Autograd keeps x's gathered columns, A_k, B_k and the stored frozen blocks: never a formed block M_k, ΔW or W."""
    net, weight, region, update = _attach(d_out=40, d_in=30, groups=2, rank=4)
    frozen = {b.data_ptr() for n, b in update.named_buffers() if n.startswith("frozen_")}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(3, 7, 30, dtype=torch.float64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net.proj.update(x)
    weight_shaped = [t for t in saved if tuple(t.shape) in ((20, 15), (40, 30), (30, 40))]
    assert len(weight_shaped) == 2 and {t.data_ptr() for t in weight_shaped} == frozen  # the stored W_kk only


def test_zero_init_is_the_base_and_count_is_the_formula():
    net = _Net(12, 8)
    x = torch.randn(5, 8, dtype=torch.float64)
    base = net.proj(x)
    rows, cols = singular_index_scores(net.proj.weight.detach())
    region = modulated_region(rows, cols, (12, 8), groups=2, rank=8)
    attach_updates(net, {"proj": region}, alpha=8.0)
    assert torch.equal(net.proj(x), base)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert trainable == modulated_params(region) == (8 // 2) * (12 + 8)  # (r/K)(d_in + d_out)


def test_frozen_blocks_are_never_saved_and_reload_exactly(tmp_path):
    net, weight, region, update = _attach()
    assert index_names(update) == ["rows", "cols", "col_offsets", "row_offsets"]
    state = adapter_state(net)
    assert not any("frozen" in k for k in state) and state["proj.row_offsets"].dtype == torch.int32
    save_adapter(net, tmp_path, base_model="toy", extra={"method": "smoa"})
    x = torch.randn(3, 10, dtype=torch.float64)
    fresh = _Net(13, 10)  # same seed: the same base weight
    loaded = load_adapter(fresh, tmp_path, dtype=torch.float64)
    assert torch.equal(loaded.proj(x), net.proj(x))
    with torch.no_grad():
        merged = merge_adapters(loaded)
        assert isinstance(merged.proj, nn.Linear)  # wrappers gone: a plain layer holding W + ΔW
        torch.testing.assert_close(merged.proj(x), net.proj(x), rtol=1e-10, atol=1e-10)


def test_method_validate_names_the_field():
    method, shared = SmoaMethod(), MethodArguments(method="smoa")
    shapes = {"m.q_proj": (64, 64)}
    for own, message in ((SmoaArguments(smoa_subspaces=0), "smoa_subspaces=0"),
                         (SmoaArguments(smoa_rank=2, smoa_subspaces=3), "smoa_rank=2"),
                         (SmoaArguments(smoa_alpha=0.0), "smoa_alpha=0.0"),
                         (SmoaArguments(smoa_subspaces=65, smoa_rank=65), "m.q_proj")):
        with pytest.raises(ValueError, match=message):
            method.validate(shared, own, shapes)
    with pytest.raises(ValueError, match="budget_scope='model'"):
        method.validate(MethodArguments(method="smoa", budget_scope="model"), SmoaArguments(), shapes)


def test_ddp_does_not_broadcast_the_frozen_blocks(tiny_model, tmp_path):
    from taso_llm.methods import RunContext

    report = SmoaMethod().prepare(tiny_model, MethodArguments(method="smoa"), SmoaArguments(),
                                  RunContext(output_dir=tmp_path, model_id="taso-tiny", show_progress=False))
    ignored = set(tiny_model._ddp_params_and_buffers_to_ignore)
    frozen = {n for n, _ in tiny_model.named_buffers() if n.rsplit(".", 1)[-1].startswith("frozen_")}
    assert frozen and frozen == ignored
    assert report.details["frozen_blocks"] == "dense"
    assert report.details["frozen_block_bytes"] == sum(b.numel() * 4 for n, b in tiny_model.named_buffers()
                                                       if n in frozen)
    assert pending_path(tmp_path / "masks.safetensors").is_file()  # moved into place when training starts


def test_block_function_equals_autograd_of_its_expression():
    """ModulatedBlockFn's hand-written backward against autograd of x_k ((B A) ⊙ W · s)ᵀ, leading batch dims kept."""
    g = torch.Generator().manual_seed(3)
    xk, a, b, w = (torch.randn(*s, generator=g, requires_grad=i < 3) for i, s in
                   enumerate([(2, 5, 6), (3, 6), (4, 3), (4, 6)]))
    y = ModulatedBlockFn.apply(xk, a, b, w, None, 0.5)
    ref = xk @ ((b @ a) * w * 0.5).T
    torch.testing.assert_close(y, ref)
    grads = torch.autograd.grad(y.square().sum(), (xk, a, b))
    for got, want in zip(grads, torch.autograd.grad(ref.square().sum(), (xk, a, b))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _linear_4bit(d_out=40, d_in=64, seed=0):
    """An nf4 bitsandbytes layer (quantized on .to("cpu")), as a 4-bit base model holds its projections."""
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    dense = nn.Linear(d_in, d_out)
    layer = bnb.nn.Linear4bit(d_in, d_out, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    layer = layer.to("cpu")
    layer.support_avx512bf16_for_cpu = False  # the plain dequantize path, as loading.py sets it
    return nn.ModuleDict({"proj": layer})


def test_4bit_base_keeps_nf4_blocks_dequantized_per_step(tmp_path):
    import bitsandbytes.functional as bnbf

    from taso_llm.targets import dense_weight

    net = _linear_4bit()
    weight = dense_weight(net["proj"]).float()
    rows, cols = singular_index_scores(weight)
    region = modulated_region(rows, cols, (40, 64), groups=2, rank=4)
    update = attach_updates(net, {"proj": region}, alpha=4.0)["proj"].update
    assert update.quantized and update.frozen_0.dtype == torch.uint8 and update.frozen_absmax_0.dtype == torch.int32
    assert update.lora_A_0.dtype == torch.float32  # the compute dtype, not the 4-bit storage
    assert sum(b.numel() for n, b in update.named_buffers() if n.startswith("frozen_")) < 40 * 64 / 2 * 0.6
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in update.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    x = torch.randn(3, 5, 64)
    y = net["proj"](x)
    y.square().sum().backward()

    ref = {n: p.detach().clone().requires_grad_(True) for n, p in update.named_parameters()}
    delta = torch.zeros_like(weight)
    ro, co = region.extra["row_offsets"].tolist(), region.extra["col_offsets"].tolist()
    for k in range(2):
        r, c = region.rows[ro[k]:ro[k + 1]], region.cols[co[k]:co[k + 1]]
        # the block of the dequantized base, quantized to nf4 in its own order, as the update stores it
        packed, state = bnbf.quantize_4bit(weight[r][:, c].contiguous(), blocksize=64, quant_type="nf4")
        block = (ref[f"lora_B_{k}"] @ ref[f"lora_A_{k}"]) * bnbf.dequantize_4bit(packed, state) * update.scaling
        delta = delta.index_put((r.unsqueeze(1), c.unsqueeze(0)), block)
    y_ref = net["proj"].base(x) + x @ delta.T
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for n, p in update.named_parameters():
        torch.testing.assert_close(p.grad, ref[n].grad, rtol=1e-4, atol=1e-4, msg=n)

    save_adapter(net, tmp_path, base_model="toy")
    loaded = load_adapter(_linear_4bit(), tmp_path)  # a fresh 4-bit base: the same blocks again
    with torch.no_grad():
        assert torch.equal(loaded["proj"](x), y)
        merged = merge_adapters(loaded)["proj"]
        assert isinstance(merged, nn.Linear) and not hasattr(merged.weight, "quant_state")
        torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- 2 processes

SCRIPT = ROOT / "tests" / "dist" / "smoa_run.py"


def _launch(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]


@pytest.fixture(scope="module")
def single_smoa(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("smoa_single")
    _launch([str(SCRIPT), "--engine", "single", "--out", str(out)])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero3", "fsdp"])
def test_sharded_weights_give_the_single_process_groups_and_blocks(single_smoa, tmp_path, engine):
    """ZeRO-3 partitions / FSDP2 shards: each SVD on its owner (a gather every rank joins, one matrix at a time),
    groups shared, frozen blocks gathered at attach: masks and every rank's blocks bitwise equal to one process."""
    _launch(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT), "--engine", engine,
             "--out", str(tmp_path)])
    expected, got = load_file(single_smoa / "masks.safetensors"), load_file(tmp_path / "masks.safetensors")
    assert expected.keys() == got.keys() and len(expected) == 14 * 4  # rows, cols, row/col offsets per matrix
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    reference = load_file(single_smoa / "rank0.safetensors")
    assert sum("frozen_" in k for k in reference) == 14 * 3  # K = 3 dense blocks per matrix
    for rank in range(2):
        buffers = load_file(tmp_path / f"rank{rank}.safetensors")
        assert buffers.keys() == reference.keys()
        assert all(torch.equal(buffers[k], reference[k]) for k in reference), rank
    report = json.loads((tmp_path / "report0.json").read_text())
    assert report["svd_world_size"] == 2 and len(report["layers"]) == 14
