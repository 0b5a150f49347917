"""The one place that knows how a model's weights may be held: whole (one process, DDP, ZeRO-1/2), partitioned by
DeepSpeed ZeRO-3, sharded as FSDP2 DTensors, or packed in 4 bits (bitsandbytes). Everything else asks a `Backend`.

`Backend.for_model(model)` looks once; on one process with whole weights every method here is a plain read or a
no-op context. Gathers are collectives when the weights are sharded: all ranks call them, in the same order.

Partitioned weights. `gathered_weight` reads ONE layer's full weight at the moment it is scored: a ZeRO-3 parameter
(it has `ds_id`) through `deepspeed.zero.GatheredParameters`, an FSDP2 DTensor through `full_tensor()`; anything
else as it is (dequantized if 4-bit). A model built under `zero.Init` cannot run forward by itself; `forward_context`
gives it DeepSpeed's fetch/release hooks through a temporary engine without optimizer, destroyed afterwards so the
Trainer builds its own.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..targets import dense_weight
from .process_group import rank_and_world



def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(t, DTensor)


def gathered_weight(module: nn.Module) -> torch.Tensor:
    """The full weight of one layer, gathered only for this call when it is sharded (a collective then)."""
    weight = module.weight
    if hasattr(weight, "ds_id"):  # DeepSpeed ZeRO-3
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters, ZeroParamStatus

        if weight.ds_status == ZeroParamStatus.AVAILABLE:  # DeepSpeed's own hooks fetched it for this module
            return weight.data.clone()
        if weight.ds_status == ZeroParamStatus.INFLIGHT:  # GatheredParameters would skip it and we'd read a part
            raise RuntimeError("ZeRO-3 weight is being prefetched; score with stage3_prefetch_bucket_size 0")
        with GatheredParameters([weight], modifier_rank=None):
            return weight.data.clone()
    if _is_dtensor(weight):  # FSDP2 while the layer is resharded
        return weight.full_tensor().detach()
    return dense_weight(module)


def is_zero3_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextmanager
def _temporary_zero3_engine(model: nn.Module):
    import deepspeed

    dtype = next(model.parameters()).dtype
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # persistence 0: no parameter is gathered for good, each is fetched per module and released; prefetch 0: no
        # weight is ever half-fetched (INFLIGHT) when the importance hook gathers it
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }
    engine, *_ = deepspeed.initialize(model=model, config=config)
    try:
        yield
    finally:
        engine.destroy()  # removes the fetch/release hooks; the model stays partitioned


def zero3_forward(model: nn.Module):
    """Context in which a zero.Init-partitioned model can run forward/backward (nothing to do otherwise)."""
    return _temporary_zero3_engine(model) if is_zero3_partitioned(model) else nullcontext()


def is_sharded(model: nn.Module) -> bool:
    """True when this rank holds only part of the weights (ZeRO-3 partitions or FSDP2 DTensors)."""
    return any(hasattr(p, "ds_id") or _is_dtensor(p) for p in model.parameters())


def is_quantized(model: nn.Module) -> bool:
    return any(getattr(p, "quant_state", None) is not None for p in model.parameters())


def gathered_params(params: list[nn.Parameter]):
    """Context in which ZeRO-3-partitioned `params` are whole on every rank (a collective); a no-op otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return nullcontext()


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """An FSDP2 DTensor made whole (a collective); any other tensor as it is."""
    return t.full_tensor() if _is_dtensor(t) else t


@dataclass(frozen=True)
class Backend:
    """Where this process runs and how the model's weights are held; the methods need nothing else."""

    rank: int = 0
    world: int = 1
    sharded: bool = False  # ZeRO-3 or FSDP2: a weight must be gathered before it is read
    quantized: bool = False  # 4-bit base: a weight must be dequantized before it is read

    @classmethod
    def for_model(cls, model: nn.Module) -> "Backend":
        rank, world = rank_and_world()
        return cls(rank=rank, world=world, sharded=is_sharded(model), quantized=is_quantized(model))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    gathered_weight = staticmethod(gathered_weight)

    @staticmethod
    def forward_context(model: nn.Module):
        return zero3_forward(model)

