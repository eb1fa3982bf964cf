"""Sequence parallelism (Ulysses): one image made by several GPUs, each holding every weight and a
slice of the tokens (`group.py`: the process group; `attention.py`: the all-to-alls around attention;
`denoiser.py`: the sharded forward; `serve.py`: how the ranks share each pipeline call)."""

from .denoiser import SequenceShardedDenoiser, shard_engine
from .group import (ParallelGroup, SequenceParallelError, check_degree, check_launch, join, padded_heads,
                    valid_degrees)
from .serve import Coordinator, start

__all__ = ["Coordinator", "ParallelGroup", "SequenceParallelError", "SequenceShardedDenoiser", "check_degree",
           "check_launch", "join", "padded_heads", "shard_engine", "start", "valid_degrees"]
