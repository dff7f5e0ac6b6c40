"""Expert and tensor parallelism for ``FusedMoE`` on torch.distributed (gloo on CPU, NCCL on GPUs).

``ParallelConfig`` says how a layer is split, ``ParallelFusedMoE`` is the split layer, the placement
functions build the expert map, and the dispatch strategies move rows between ranks. See
docs/parallel.md.
"""

from .config import DispatchName, ParallelConfig, ParallelRanks, Placement
from .dispatch import AllGatherDispatch, AllToAllDispatch, Dispatch, Dispatched
from .layer import ParallelFusedMoE
from .placement import expert_counts, expert_map, expert_owners

__all__ = [
    "AllGatherDispatch",
    "AllToAllDispatch",
    "Dispatch",
    "DispatchName",
    "Dispatched",
    "ParallelConfig",
    "ParallelFusedMoE",
    "ParallelRanks",
    "Placement",
    "expert_counts",
    "expert_map",
    "expert_owners",
]
