"""Budget allocation: how many trainable parameters each target matrix gets.

`budget_scope: matrix` gives every matrix its own budget (`budget`, e.g. rank1 = d_in + d_out), the reading TASO
shipped with. `budget_scope: model` keeps the TOTAL of those per-matrix budgets (so the trainable count still equals
a rank-1 LoRA's on the same modules) and spreads it across matrices by their importance mass M_m (Σ of the
statistic over the matrix):

    weight_m = M_m          ("proportional")      or      sqrt(M_m)      ("sqrt": flatter, less winner-takes-all)
    share_m  = weight_m / Σ weight,  clamped to [floor · b_m, cap · b_m]  (b_m = the matrix's own budget)

The clamp is water-filling: matrices pinned at their floor or cap keep that amount, and the rest of the total is
re-spread over the others in proportion to their weights until nothing moves. Each allocation is then rounded DOWN
to a whole number of structure steps (a rank-r block spends r parameters per row or column, so its step is r; a
block also needs at least `minimum` parameters, below which it gets 0 and is not wrapped), and the rounding
remainder goes back one step at a time to the matrices with the largest fractional parts (ties: by name), never
past a cap nor to a matrix pinned at its floor. So Σ allocated ≤ total, short of it by less than one step in all, and a matrix with no signal (M = 0)
gets exactly its floor. Every quantity is a float64 function of the masses and the sorted names: the same masses give
the same allocation bitwise on every rank and for every world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCOPES = ("matrix", "model")
RULES = ("proportional", "sqrt")


@dataclass(frozen=True)
class BudgetPolicy:
    scope: str = "matrix"
    rule: str = "proportional"
    floor: float = 0.25  # fraction of the matrix's own budget it keeps at least (model scope)
    cap: float = 4.0  # most it can get, as a multiple of its own budget (model scope)

    def check(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"budget_scope={self.scope!r}: expected one of {list(SCOPES)}")
        if self.rule not in RULES:
            raise ValueError(f"budget_allocation={self.rule!r}: expected one of {list(RULES)}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"budget_floor={self.floor}: must be in [0, 1] (a fraction of the matrix's own budget)")
        if not self.cap >= 1.0:
            raise ValueError(f"budget_cap={self.cap}: must be at least 1 (a multiple of the matrix's own budget)")


def _water_fill(weights: dict[str, float], low: dict[str, float], high: dict[str, float],
                total: float) -> dict[str, float]:
    """Σ x = total with low ≤ x ≤ high and x ∝ weight among the matrices not pinned at a bound."""
    free = sorted(weights)
    fixed: dict[str, float] = {}
    while True:
        remaining = total - sum(fixed.values())
        mass = math.fsum(weights[n] for n in free)
        if mass <= 0:  # nothing left with signal: the free matrices share what is left in proportion to their floor
            base = math.fsum(low[n] for n in free)
            x = {n: (remaining * low[n] / base if base > 0 else remaining / max(1, len(free))) for n in free}
        else:
            x = {n: remaining * weights[n] / mass for n in free}
        over = [n for n in free if x[n] > high[n]]
        under = [n for n in free if x[n] < low[n]]
        if not over and not under:
            return {**fixed, **x}
        # Pin the side that violates most in total first; re-spread the rest (terminates: `free` shrinks).
        pin = over if sum(x[n] - high[n] for n in over) >= sum(low[n] - x[n] for n in under) else under
        for n in pin:
            fixed[n] = high[n] if n in over else low[n]
        free = [n for n in free if n not in fixed]
        if not free:
            return fixed


def allocate(own_budgets: dict[str, int], masses: dict[str, float], policy: BudgetPolicy, step: int = 1,
             minimum: int = 1) -> dict[str, int]:
    """Parameters per matrix. `own_budgets` are the per-matrix budgets; `masses` the importance mass per matrix."""
    policy.check()
    if policy.scope == "matrix":
        return dict(own_budgets)
    names = sorted(own_budgets)
    total = sum(own_budgets.values())
    mass = {n: max(0.0, float(masses.get(n, 0.0))) for n in names}
    weights = {n: (mass[n] if policy.rule == "proportional" else math.sqrt(mass[n])) for n in names}
    low = {n: policy.floor * own_budgets[n] for n in names}
    high = {n: policy.cap * own_budgets[n] for n in names}
    real = _water_fill(weights, low, high, float(total))

    def fit(value: float) -> int:  # whole steps, and nothing below what the structure can use
        n = int(math.floor(value / step + 1e-9)) * step
        return n if n >= minimum else 0

    out = {n: fit(real[n]) for n in names}
    leftover = total - sum(out.values())
    # Remainder, one step at a time, largest fractional part first (ties by name); never above the cap, and never to
    # a matrix pinned at its floor (one with no signal keeps exactly its floor).
    order = sorted((n for n in names if real[n] > low[n] * (1 + 1e-12) or low[n] == high[n]),
                   key=lambda n: (-(real[n] - out[n]), n))
    progress = True
    while leftover >= step and progress:
        progress = False
        for n in order:
            grown = out[n] + step if out[n] else max(minimum, step)
            if leftover >= grown - out[n] and grown <= high[n]:
                leftover -= grown - out[n]
                out[n] = grown
                progress = True
                if leftover < step:
                    break
    return out


def allocation_summary(allocated: dict[str, int], own_budgets: dict[str, int], masses: dict[str, float],
                       policy: BudgetPolicy) -> dict:
    """For metrics.json: the policy, the totals, and per module type (q_proj, ...) its share of params and mass."""
    by_type: dict[str, dict[str, float]] = {}
    for name, params in allocated.items():
        kind = by_type.setdefault(name.rsplit(".", 1)[-1], {"params": 0, "own_budget": 0, "mass": 0.0, "unwrapped": 0})
        kind["params"] += params
        kind["own_budget"] += own_budgets[name]
        kind["mass"] += float(masses.get(name, 0.0))
        kind["unwrapped"] += params == 0
    return {"scope": policy.scope, "rule": policy.rule, "floor": policy.floor, "cap": policy.cap,
            "total_budget": sum(own_budgets.values()), "allocated": sum(allocated.values()),
            "unwrapped": sorted(n for n, p in allocated.items() if p == 0), "by_module": by_type}


def allocate_by_threshold(below: dict[str, int], at: dict[str, int], total: int) -> dict[str, int]:
    """One GLOBAL threshold t over every matrix's scores (TaLoS): each matrix keeps its entries strictly below t, and
    the entries equal to t fill what is left of `total`, matrices in name order (within a matrix, by flat index:
    regions.choose_region's stable sort). `below`/`at` count each matrix's entries < t and == t, t being the
    total-th smallest score overall, so Σ below < total ≤ Σ below + Σ at and the allocation sums to `total` exactly.
    Integers and sorted names only: the same counts give the same allocation on every rank and world size."""
    out = {n: int(below[n]) for n in sorted(below)}
    left = total - sum(out.values())
    if left < 0 or left > sum(at.values()):
        raise ValueError(f"threshold allocation: {sum(out.values())} entries below and {sum(at.values())} at the "
                         f"threshold cannot make a total of {total}")
    for n in sorted(at):
        take = min(int(at[n]), left)
        out[n] += take
        left -= take
    return out
