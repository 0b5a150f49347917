"""Everything distributed, in one folder, so that methods/ and sparse/ never branch on the world size:

    process_group.py  the process group's lifecycle (init before the training arguments, barrier + teardown at the end)
    backend.py        the one object that knows ZeRO-3 / FSDP2 / 4-bit weights (gathers, forward context); a no-op
                      on one process with whole weights
    reduce.py         owners, reductions to owners, all-gathers of masks and small reports
"""

from .backend import Backend, gathered_weight, is_sharded
from .process_group import (broadcast_from_main, configured_state_defaults, finish_distributed, init_distributed,
                            process_group_timeout, rank_and_world)

__all__ = ["Backend", "gathered_weight", "is_sharded", "broadcast_from_main",
           "configured_state_defaults", "finish_distributed", "init_distributed", "process_group_timeout",
           "rank_and_world"]
