"""Processes started by torchrun: which one this is, and the few collectives the verbs need.

`route` and `train` run the same way under `torchrun --nproc-per-node N -m deepseemoe.cli VERB …`:
every rank runs the whole command, takes every N-th batch of the one packed stream, and rank 0
writes what belongs to the run as a whole. This module is the only place that reads torchrun's
environment (WORLD_SIZE, RANK, LOCAL_RANK) and starts or ends the process group.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from deepseemoe.errors import DeepSeeMoEError, RankLost, ReportedByRankZero


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, locks the run and commits it."""
        return self.rank == 0

    def mine(self, index: int) -> bool:
        """Item `index` of a stream every rank reads in the same order is this rank's to process."""
        return index % self.size == self.rank

    def gather(self, obj):
        """Every rank's `obj` (a small JSON value: what crosses is JSON, never a pickle — a list comes
        back for a tuple, string keys for int ones), on every rank, in rank order."""
        if self.size == 1:
            return [json.loads(json.dumps(obj))]
        import torch
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        data = json.dumps(obj).encode()
        try:
            sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.size)]
            dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.long, device=device))
            longest = max(int(n) for n in sizes)
            mine = torch.zeros(longest, dtype=torch.uint8, device=device)
            mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            bufs = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(self.size)]
            dist.all_gather(bufs, mine)
        except RuntimeError as exc:  # gloo/nccl: a peer's connection closed
            raise _lost(self, exc) from None
        return [json.loads(bytes(b[:int(n)].cpu().numpy())) for b, n in zip(bufs, sizes, strict=True)]

    def agree(self, failure: str | None) -> None:
        """A collective check: when any rank reports a failure, rank 0 raises it (naming the rank)
        and the others stop quietly with the same exit code, so the user reads one `error:` line."""
        failures = [(r, f) for r, f in enumerate(self.gather(failure)) if f]
        if not failures:
            return
        rank, message = failures[0]
        if not self.main:
            raise ReportedByRankZero(message)
        prefix = f"rank {rank} of {self.size}: " if self.size > 1 else ""
        raise DeepSeeMoEError(prefix + message)

    def close(self) -> None:
        """Leave the group together: a rank that tears it down mid-collective aborts the others."""
        if self.size == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.barrier()
            except RuntimeError as exc:
                raise _lost(self, exc) from None
            dist.destroy_process_group()


def _lost(world: World, exc: Exception) -> RankLost:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return RankLost(f"rank {world.rank} of {world.size}: another rank stopped (killed, out of memory, or its machine "
                    f"lost; {first})")


def join(backend: str | None = None) -> World:
    """This process's place among torchrun's ranks (rank 0 of 1 outside torchrun), starting the
    process group when there is more than one. `backend` defaults to nccl on CUDA machines, gloo
    elsewhere; verbs whose collectives carry only small Python objects ask for gloo."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def rank_device(device: str | None, world: World) -> str | None:
    """`--device cuda` under torchrun means each rank's own GPU (cuda:LOCAL_RANK)."""
    if world.size > 1 and device == "cuda":
        return f"cuda:{world.local_rank}"
    return device
