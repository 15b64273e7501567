"""torchrun with 2 CPU processes (gloo) ends with the same weights as one process on the same
global batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from deepseemoe.dictionaries.stream import tensor_stream
from tests.dictionaries import ddp_worker


def test_two_rank_torchrun_matches_one_process(tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tests.dictionaries.ddp_worker", str(out)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out)

    x, y = ddp_worker.data()
    single = ddp_worker.make_trainer(ddp_worker.BATCH)
    single.fit(tensor_stream(x, y, name="tc", chunk=ddp_worker.BATCH), max_steps=ddp_worker.STEPS)
    assert any(m["auxk"] > 0 for m in single.metrics)  # the AuxK path ran too
    for name, value in single.coders["tc"].state_dict().items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(ddp["metrics"], single.metrics, strict=True):
        assert abs(a["fvu"] - b["fvu"]) < 1e-4 and a["l0"] == b["l0"]
