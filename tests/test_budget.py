"""Budget allocation (sparse/budget.py): per matrix, or one model-wide total spread by importance mass."""

import math
import random

import pytest
import torch

from taso_llm.sparse.budget import BudgetPolicy, allocate
from taso_llm.sparse.importance import LayerStats
from taso_llm.sparse.masks import check_masks_fit, load_masks, save_masks
from taso_llm.sparse.select import SelectionSpec, choose_regions

SHAPES = {f"model.layers.{i}.mlp.{k}": s for i in range(3)
          for k, s in (("up_proj", (96, 32)), ("down_proj", (32, 96)), ("q_proj", (32, 32)))}
OWN = {n: d_out + d_in for n, (d_out, d_in) in SHAPES.items()}  # rank1


def _masses(seed=0, zero=()):
    rng = random.Random(seed)
    return {n: 0.0 if n in zero else rng.uniform(0.1, 10.0) for n in SHAPES}


def test_matrix_scope_is_each_matrix_own_budget():
    assert allocate(OWN, _masses(), BudgetPolicy(scope="matrix"), step=4) == OWN


@pytest.mark.parametrize("rule", ["proportional", "sqrt"])
@pytest.mark.parametrize("step", [1, 4])
def test_model_scope_keeps_the_total_within_one_step(rule, step):
    policy = BudgetPolicy(scope="model", rule=rule, floor=0.25, cap=4.0)
    got = allocate(OWN, _masses(), policy, step=step, minimum=2 * step)
    total = sum(OWN.values())
    assert sum(got.values()) <= total and total - sum(got.values()) < step  # short by less than one structure step
    assert all(v % step == 0 for v in got.values())
    for n, v in got.items():
        assert math.floor(0.25 * OWN[n] / step) * step <= v <= 4.0 * OWN[n]
    assert allocate(OWN, _masses(), policy, step=step, minimum=2 * step) == got  # deterministic


def test_proportional_and_sqrt_follow_their_weights_when_nothing_is_clamped():
    own = {"a": 1000, "b": 1000}
    masses = {"a": 1.0, "b": 3.0}
    wide = dict(scope="model", floor=0.0, cap=10.0)
    assert allocate(own, masses, BudgetPolicy(rule="proportional", **wide)) == {"a": 500, "b": 1500}
    sqrt = allocate(own, masses, BudgetPolicy(rule="sqrt", **wide))
    assert sqrt["b"] / sqrt["a"] == pytest.approx(math.sqrt(3), rel=1e-2) and sum(sqrt.values()) == 2000


def test_caps_pass_the_excess_on_and_no_signal_gets_exactly_the_floor():
    silent = {"model.layers.0.mlp.q_proj", "model.layers.2.mlp.down_proj"}
    masses = _masses(zero=silent)
    masses["model.layers.1.mlp.up_proj"] = 1e6  # would take everything without its cap
    policy = BudgetPolicy(scope="model", floor=0.25, cap=2.0)
    got = allocate(OWN, masses, policy, step=4, minimum=8)
    assert got["model.layers.1.mlp.up_proj"] <= 2.0 * OWN["model.layers.1.mlp.up_proj"]
    for n in silent:
        assert got[n] == math.floor(0.25 * OWN[n] / 4) * 4
    assert sum(OWN.values()) - sum(got.values()) < 4


def test_bad_policy_values_name_the_field():
    for kwargs, field in ((dict(scope="layer"), "budget_scope"), (dict(rule="cubic"), "budget_allocation"),
                          (dict(floor=1.5), "budget_floor"), (dict(cap=0.5), "budget_cap")):
        with pytest.raises(ValueError, match=field):
            allocate(OWN, _masses(), BudgetPolicy(**{"scope": "model", **kwargs}))


def _stats(seed=0, silent=()):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, (d_out, d_in) in SHAPES.items():
        scale = 0.0 if n in silent else 1.0
        out[n] = LayerStats(shape=(d_out, d_in), row=torch.rand(d_out, generator=g, dtype=torch.float64) * scale,
                            col=torch.rand(d_in, generator=g, dtype=torch.float64) * scale)
    return out


def test_zero_budget_matrix_is_not_wrapped_and_its_masks_still_fit(tmp_path):
    silent = "model.layers.0.mlp.q_proj"
    spec = SelectionSpec("lora_block", rank=4, policy=BudgetPolicy(scope="model", floor=0.0, cap=4.0))
    regions = choose_regions(_stats(silent={silent}), spec)
    assert silent not in regions and len(regions) == len(SHAPES) - 1
    spent = sum(r.num_params() for r in regions.values())
    assert sum(OWN.values()) - 4 < spent <= sum(OWN.values())
    save_masks(tmp_path / "m.safetensors", regions, "toy", unwrapped=[silent])
    loaded, header = load_masks(tmp_path / "m.safetensors")
    check_masks_fit(loaded, SHAPES, "m", unwrapped=header["unwrapped"])
    with pytest.raises(ValueError, match="missing"):
        check_masks_fit(loaded, SHAPES, "m")


def test_budget_scope_defaults_to_the_methods_own():
    """TASO spreads one model-wide budget unless told otherwise; every other method keeps each matrix's own (TaLoS,
    SMoA and DropLoRA refuse a model scope), and an explicit value always wins, from the CLI as from code."""
    from trl import TrlParser

    from taso_llm.config import MethodArguments
    from taso_llm.methods import METHODS, get_method

    assert MethodArguments().budget_scope == "model"
    for name in METHODS:
        expected = "model" if name == "taso" else "matrix"
        assert MethodArguments(method=name).budget_scope == expected == get_method(name).default_budget_scope
    assert MethodArguments(method="taso", budget_scope="matrix").budget_scope == "matrix"
    (parsed,) = TrlParser((MethodArguments,)).parse_args_into_dataclasses(["--method", "sparta"])
    assert parsed.budget_scope == "matrix"
    (parsed,) = TrlParser((MethodArguments,)).parse_args_into_dataclasses(["--budget_scope", "matrix"])
    assert parsed.method == "taso" and parsed.budget_scope == "matrix"


def test_model_scope_budget_too_small_for_every_matrix_is_refused_naming_it():
    from taso_llm.config import MethodArguments
    from taso_llm.methods.taso import TasoArguments, TasoMethod

    shapes = {"a.q_proj": (32, 32), "a.k_proj": (16, 32)}
    own = TasoArguments()  # rank-4 block: one row and one column cost 8
    TasoMethod().validate(MethodArguments(budget="8"), own, shapes)  # 16 in all: 8 for each matrix
    with pytest.raises(ValueError, match=r"budget='7' gives 14 params over 2 matrices \(budget_scope=model\), below "
                                         r"the 16"):
        TasoMethod().validate(MethodArguments(budget="7"), own, shapes)
    # with floor 0 a matrix may go unwrapped: the total only has to afford one block
    TasoMethod().validate(MethodArguments(budget="4", budget_floor=0.0), own, shapes)
