"""Expert and tensor parallelism for ``FusedMoE`` on torch.distributed (gloo on CPU, NCCL on GPUs).

``ParallelConfig`` says how a layer is split, ``ParallelFusedMoE`` is the split layer, the placement
functions build the expert map, and the dispatch strategies move rows between ranks (``fixed``: with no
host synchronization, for CUDA graphs and ``torch.compile(fullgraph=True)``). See
docs/parallel.md.
"""

from .config import DispatchName, DispatchQuant, ParallelConfig, ParallelRanks, Placement
from .dispatch import AllGatherDispatch, AllToAllDispatch, Dispatch, Dispatched
from .fixed import FixedCapacityDispatch
from .layer import ParallelFusedMoE
from .placement import expert_counts, expert_map, expert_owners

__all__ = [
    "AllGatherDispatch",
    "AllToAllDispatch",
    "Dispatch",
    "DispatchName",
    "DispatchQuant",
    "Dispatched",
    "FixedCapacityDispatch",
    "ParallelConfig",
    "ParallelFusedMoE",
    "ParallelRanks",
    "Placement",
    "expert_counts",
    "expert_map",
    "expert_owners",
]
