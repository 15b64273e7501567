"""Run under `torchrun --nproc_per_node N`: each rank trains on its slice of every global batch and
rank 0 saves the final coder state to argv[1]. Used by test_distributed.py."""

import os
import sys

import torch
import torch.distributed as dist

from deepseemoe.dictionaries.coder import CoderConfig, build_coder
from deepseemoe.dictionaries.stream import tensor_stream
from deepseemoe.dictionaries.trainer import CoderTrainer, TrainConfig

STEPS, BATCH = 12, 64


def data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(STEPS * BATCH, 16, generator=g) * 3 + 1
    return x, x @ torch.randn(16, 16, generator=g)


def make_trainer(batch_size: int):
    torch.manual_seed(0)
    coder = build_coder(CoderConfig(d_in=16, d_out=16, n_latents=48, activation="topk", k=4, skip=True))
    # dead_after_tokens small so AuxK runs too; the buffer holds exactly one (local) batch
    return CoderTrainer({"tc": coder}, TrainConfig(batch_size=BATCH, buffer_size=batch_size, lr=1e-2,
                                                   dead_after_tokens=2 * BATCH))


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = data()
    local = BATCH // world
    rows = torch.cat([torch.arange(s * BATCH + rank * local, s * BATCH + (rank + 1) * local) for s in range(STEPS)])
    trainer = make_trainer(local)
    trainer.fit(tensor_stream(x[rows], y[rows], name="tc", chunk=local), max_steps=STEPS)
    if rank == 0:
        torch.save({"state": trainer.coders["tc"].state_dict(), "metrics": trainer.metrics}, sys.argv[1])
    dist.barrier()  # no rank tears the group down while another is still in a collective
    dist.destroy_process_group()
    # leave without running C++ destructors: gloo's threads at interpreter exit now and then abort
    # a rank ("terminate called without an active exception") after all the work is done and saved
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
