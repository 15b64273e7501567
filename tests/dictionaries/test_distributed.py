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
    ddp = torch.load(out, weights_only=True)

    x, y = ddp_worker.data()
    single = ddp_worker.make_trainer(ddp_worker.BATCH)
    single.fit(tensor_stream(x, y, name="tc", chunk=ddp_worker.BATCH), max_steps=ddp_worker.STEPS)
    assert any(m["auxk"] > 0 for m in single.metrics)  # the AuxK path ran too
    for name, value in single.coders["tc"].state_dict().items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(ddp["metrics"], single.metrics, strict=True):
        assert abs(a["fvu"] - b["fvu"]) < 1e-4 and a["l0"] == b["l0"]


def test_coders_split_across_two_ranks_match_one_process(tmp_path, tiny_olmoe_dir, corpus_jsonl):
    """`distribute: coders` under torchrun: rank r trains coders r, r+2, …, each on the full stream;
    the files equal those of one process training every coder."""
    import yaml

    from deepseemoe.dictionaries.formats import load_native

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(corpus_jsonl.read_text().splitlines() * 30) + "\n")

    def config(out, distribute):
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump({
            "model": str(tiny_olmoe_dir), "corpus": str(corpus), "out": str(tmp_path / out), "ctx_len": 32,
            "tokens": 768, "distribute": distribute, "formats": ["saelens"],
            "coders": [{"kind": "sae", "layers": [0], "k": 4, "expansion_factor": 2, "name": "a"},
                       {"kind": "transcoder", "layers": [1], "activation": "relu", "expansion_factor": 2, "name": "b"},
                       {"kind": "router_transcoder", "layers": [1], "k": 4, "expansion_factor": 2, "name": "c"}],
            "train": {"batch_size": 128, "buffer_size": 256, "lr": 3e-3}}))
        return str(path)

    root = Path(__file__).parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "deepseemoe.cli", "train", config("split", "coders")], env=env, capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained ") == 1  # the summary once, not once per rank
    single = subprocess.run([sys.executable, "-m", "deepseemoe.cli", "train", config("single", "data")], env=env,
                            capture_output=True, text=True, timeout=300, cwd=root)
    assert single.returncode == 0, single.stderr[-3000:]
    for name in "abc":
        x, _ = load_native(tmp_path / "split" / "dictionaries" / name)
        y, _ = load_native(tmp_path / "single" / "dictionaries" / name)
        for (k, u), (_, v) in zip(x.state_dict().items(), y.state_dict().items(), strict=True):
            torch.testing.assert_close(u, v, rtol=0, atol=0, msg=f"{name}.{k}")
    assert (tmp_path / "split" / "metrics.rank1.jsonl").exists()
    assert (tmp_path / "split" / "exports" / "saelens" / "b" / "cfg.json").exists()  # trained by rank 1
