"""Routing runs cannot lie: damaged files are refused in one line naming them, a second writer is
refused, a killed writer leaves the old complete run or the new one (never a mix), and statistics
computed from other data are detected as stale.

Independent evidence: files are damaged by the test itself (bit flips, truncation), processes are
killed with SIGKILL from outside, and "old or new" is decided by the sha256 of manifest.json and
by re-reading every shard through pyarrow directly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from deepseemoe.runs.lock import run_lock
from deepseemoe.runs.manifest import sha256_file
from tests.faults.conftest import assert_refused

ROUTE = ["--domain-field", "domain", "--ctx-len", "16", "--batch-size", "2", "--shard-tokens", "40"]


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory, corpus_jsonl) -> Path:
    path = tmp_path_factory.mktemp("long_corpus") / "docs.jsonl"
    path.write_text(corpus_jsonl.read_text() * 60)
    return path


@pytest.fixture(scope="module")
def routed(tmp_path_factory, tiny_olmoe_dir, corpus_jsonl) -> Path:
    out = tmp_path_factory.mktemp("routed") / "run"
    cmd = [sys.executable, "-m", "deepseemoe.cli", "route", str(tiny_olmoe_dir), "--data", str(corpus_jsonl),
           "--out", str(out), "--logits", *ROUTE]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(list((out / "routing").glob("part-*.parquet"))) >= 3  # several shards
    return out


@pytest.fixture
def run_dir(routed, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(routed, dst)
    return dst


def flip_bit(path: Path, at: float) -> None:
    data = bytearray(path.read_bytes())
    i = int(at * (len(data) - 1))
    data[i] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rel", ["tokens/part-00001.parquet", "routing/part-00000.parquet",
                                 "matrix/part-00002.safetensors", "logits/part-00001.parquet", "run.json"])
@pytest.mark.parametrize("at", [0.1, 0.5, 0.9])
def test_a_bit_flip_is_refused_naming_the_file(cli, run_dir, rel, at):
    flip_bit(run_dir / rel, at)
    name = rel.split("/")[-1]
    assert_refused(cli("verify", run_dir), name, "damaged")
    # statistics check the whole run, not only the files they read (the matrix, not routing/ or logits/)
    assert_refused(cli("stats", run_dir, "--no-figures"), name, "damaged")
    assert not (run_dir / "analyses").exists()


@pytest.mark.parametrize("rel", ["routing/part-00000.parquet", "logits/part-00001.parquet"])
def test_derived_results_refuse_a_damaged_shard_they_do_not_read(cli, run_dir, rel):
    """A bit flip in a shard that neither `stats` nor `report` reads: both refuse it, naming it;
    `--trust` skips the whole-run check for a run one knows to be whole."""
    assert cli("stats", run_dir, "--no-figures").code == 0
    flip_bit(run_dir / rel, 0.5)
    name = rel.split("/")[-1]
    assert_refused(cli("report", run_dir), name, "damaged")
    assert_refused(cli("stats", run_dir, "--no-figures"), name, "damaged")
    assert cli("stats", run_dir, "--no-figures", "--trust").code == 0
    assert cli("report", run_dir, "--trust").code == 0


def test_verify_passes_on_a_whole_run(cli, run_dir):
    result = cli("verify", run_dir)
    assert result.code == 0 and "match the manifest" in result.out


@pytest.mark.parametrize("rel", ["tokens/part-00000.parquet", "routing/part-00001.parquet",
                                 "matrix/part-00000.safetensors", "logits/part-00000.parquet", "run.json",
                                 "manifest.json"])
def test_a_truncated_file_is_refused_naming_it(cli, run_dir, rel):
    path = run_dir / rel
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_refused(cli("stats", run_dir, "--no-figures"), path.name)


def test_a_missing_file_or_manifest_is_refused(cli, run_dir):
    (run_dir / "routing" / "part-00001.parquet").unlink()
    assert_refused(cli("stats", run_dir), "part-00001.parquet", "missing")
    (run_dir / "manifest.json").unlink()
    assert_refused(cli("stats", run_dir), "manifest.json", "incomplete")


def test_a_second_writer_is_refused(cli, run_dir, tiny_olmoe_dir, corpus_jsonl):
    before = sha256_file(run_dir / "manifest.json")
    with run_lock(run_dir):  # another writer holds the run
        result = cli("route", tiny_olmoe_dir, "--data", corpus_jsonl, "--out", run_dir, "--overwrite", *ROUTE)
    assert_refused(result, "being written")
    assert sha256_file(run_dir / "manifest.json") == before


def test_route_never_replaces_silently(cli, run_dir, tiny_olmoe_dir, corpus_jsonl, tmp_path):
    before = sha256_file(run_dir / "manifest.json")
    assert_refused(cli("route", tiny_olmoe_dir, "--data", corpus_jsonl, "--out", run_dir, *ROUTE), "--overwrite")
    assert sha256_file(run_dir / "manifest.json") == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")
    result = cli("route", tiny_olmoe_dir, "--data", corpus_jsonl, "--out", other, "--overwrite", *ROUTE)
    assert_refused(result, "not a routing run")
    assert (other / "thesis.tex").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_refused(cli("route", tiny_olmoe_dir, "--data", corpus_jsonl, "--out", afile, *ROUTE), "is a file")


def _complete_shards(run: Path) -> bool:
    """Independent of our reader: every file the manifest lists has its sha256 and parquet row count."""
    manifest = json.loads((run / "manifest.json").read_text())
    assert {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "analyses" not in p.parts} \
        == set(manifest["files"]) | {"manifest.json"}, "files beside the manifest's"
    for rel, entry in manifest["files"].items():
        assert sha256_file(run / rel) == entry["sha256"], rel
        if rel.endswith(".parquet"):
            assert pq.ParquetFile(run / rel).metadata.num_rows == entry["rows"], rel
    return True


def _kill_route_after(args: list[str], out: Path, shards: int) -> int:
    """Start `route`, SIGKILL it once its staging folder holds `shards` routing shards (or let it
    finish first); returns its exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deepseemoe.cli", "route", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = out.parent / f".{out.name}.staging" / "routing"

    def written() -> int:
        try:
            return len(list(staging.glob("part-*.parquet")))
        except FileNotFoundError:  # removed while listed: the new route clearing the staging folder an earlier
            return 0  # killed one left (or swapping it in as the run)

    deadline = time.monotonic() + 120
    while proc.poll() is None and written() < shards:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    return proc.wait()


def test_kill_9_during_a_first_route_leaves_no_run_or_a_complete_one(cli, tiny_olmoe_dir, long_corpus, tmp_path):
    out = tmp_path / "run"
    args = [str(tiny_olmoe_dir), "--data", str(long_corpus), "--out", str(out), "--overwrite", *ROUTE]
    for shards in (1, 4, 9):
        assert _kill_route_after(args, out, shards) == -signal.SIGKILL
        assert not out.exists()  # killed mid-run: no run at all, never a partial one
        assert_refused(cli("stats", out), "not a routing run")
    assert cli("route", *args).code == 0  # the lock died with the process; staging is cleaned up
    assert _complete_shards(out)
    assert not (tmp_path / ".run.staging").exists()


def test_kill_9_during_a_rerun_leaves_the_old_run_or_the_new_one(cli, run_dir, tiny_olmoe_dir, long_corpus):
    old = sha256_file(run_dir / "manifest.json")
    args = [str(tiny_olmoe_dir), "--data", str(long_corpus), "--out", str(run_dir), "--overwrite", *ROUTE]
    for shards in (1, 5):
        assert _kill_route_after(args, run_dir, shards) == -signal.SIGKILL
        assert sha256_file(run_dir / "manifest.json") == old and _complete_shards(run_dir)
        assert cli("stats", run_dir, "--no-figures").code == 0
    assert cli("route", *args).code == 0
    new = sha256_file(run_dir / "manifest.json")
    assert new != old and _complete_shards(run_dir)


def test_a_writer_killed_between_the_two_renames_is_recovered(cli, run_dir, tiny_olmoe_dir, corpus_jsonl,
                                                               monkeypatch):
    """Where the kernel cannot exchange two folders atomically, the old run is moved aside first;
    a death right then leaves it at .NAME.old, which readers point to and the next writer restores."""
    import deepseemoe.runs.lock as lock

    old = sha256_file(run_dir / "manifest.json")
    monkeypatch.setattr(lock, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def die_on_second(src, dst):
        if Path(src).name.endswith(".staging"):
            raise KeyboardInterrupt  # the process "dies" after moving the old run aside
        real_rename(src, dst)

    monkeypatch.setattr(lock.os, "rename", die_on_second)
    with pytest.raises(KeyboardInterrupt):
        from deepseemoe.data.sources import TextSource
        from deepseemoe.models.load import load_model
        from deepseemoe.routing.route import route_corpus

        route_corpus(load_model(str(tiny_olmoe_dir)), TextSource(str(corpus_jsonl)), run_dir, ctx_len=16,
                     progress=False, overwrite=True)
    monkeypatch.setattr(lock.os, "rename", real_rename)
    assert not run_dir.exists()
    assert_refused(cli("stats", run_dir), ".run.old")
    with lock.run_lock(run_dir):
        lock.recover(run_dir)
    assert sha256_file(run_dir / "manifest.json") == old and _complete_shards(run_dir)


def test_statistics_from_other_data_are_stale(cli, run_dir, tiny_olmoe_dir, long_corpus, tmp_path):
    assert cli("stats", run_dir, "--no-figures").code == 0
    kept = tmp_path / "old_analyses"
    shutil.copytree(run_dir / "analyses", kept)
    assert cli("route", tiny_olmoe_dir, "--data", long_corpus, "--out", run_dir, "--overwrite", *ROUTE).code == 0
    assert not (run_dir / "analyses").exists()  # the rerun replaced the whole run, analyses included
    shutil.copytree(kept, run_dir / "analyses")
    from deepseemoe.errors import DeepSeeMoEError
    from deepseemoe.report.html import build_report

    with pytest.raises(DeepSeeMoEError, match="stale"):
        build_report(run_dir, tmp_path / "report.html")
    assert not (tmp_path / "report.html").exists()


def test_evaluations_and_maps_of_a_retrained_dictionary_are_stale(cli, run_copy):
    """Derived results of a dictionary run name the coders they came from (sha256); a coder trained
    again in the same folder makes them stale, and readers say so instead of showing old numbers."""
    import torch

    from deepseemoe.dictionaries.formats import load_native, save_native
    from deepseemoe.errors import DeepSeeMoEError
    from deepseemoe.runs.dictionary import DictionaryRun

    name = next((run_copy / "dictionaries").iterdir()).name
    assert cli("evaluate", run_copy, "--tokens", "64").code == 0
    assert cli("map", run_copy, "--dictionary", name, "--tokens", "64").code == 0
    run = DictionaryRun.open(run_copy)
    assert run.evaluation()["coders"][name] and name in run.map_summaries()
    coder, meta = load_native(run.coder_dir(name))
    with torch.no_grad():
        coder.W_dec.mul_(1.5)  # "trained again"
    save_native(coder, run.coder_dir(name), meta=meta)
    for read in (run.evaluation, run.map_summaries):
        with pytest.raises(DeepSeeMoEError, match="stale"):
            read()
