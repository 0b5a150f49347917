"""Sparse adapters on frozen linear layers: `base(x) + update(x)`, with the update computed only on core
input columns and scattered into core output rows. The base layer is called, never read, so 4-bit, ZeRO-3 and
FSDP bases keep working. Structures are registered in `updates.UPDATES`."""

from .updates import UPDATES, delta_weight
from .wrap import SparseAdapterLinear, attach_updates, iter_adapters
from . import rank_dropout  # noqa: E402,F401  (registers DropLoRA's update in UPDATES: files load without the method)

__all__ = ["UPDATES", "delta_weight", "SparseAdapterLinear", "attach_updates", "iter_adapters"]
