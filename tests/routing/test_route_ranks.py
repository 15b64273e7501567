"""`route` under torchrun (2 CPU processes, gloo): the same run as one process, one `error:` line for
a failure on any rank, nothing that looks complete when it is not, and `--resume` after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

ROOT = Path(__file__).parents[2]
ROUTE = ["--domain-field", "domain", "--ctx-len", "16", "--batch-size", "2", "--shard-tokens", "60"]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _torchrun_cmd(args: list, n: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
            "-m", "tests.routing.rank_cli", "route", *map(str, args)]


def _torchrun(args: list, n: int = 2, **env) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_cmd(args, n), env=_env(**env), capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def _errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def _rows(run: Path) -> list[tuple]:
    return duckdb.sql(f"SELECT doc, pos, layer, rank, expert, weight FROM read_parquet('{run}/routing/*.parquet') "
                      "ORDER BY doc, pos, layer, rank").fetchall()


def _tokens(run: Path) -> list[tuple]:
    return duckdb.sql(f"SELECT doc, pos, token_id, token, domain, piece FROM read_parquet('{run}/tokens/*.parquet') "
                      "ORDER BY doc, pos").fetchall()


@pytest.fixture(scope="module")
def corpus(corpus_jsonl, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ranks") / "docs.jsonl"
    path.write_text("".join(corpus_jsonl.read_text().splitlines(keepends=True) * 6))
    return path


@pytest.fixture(scope="module")
def single(tiny_olmoe_dir, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    proc = subprocess.run([sys.executable, "-m", "deepseemoe.cli", "route", str(tiny_olmoe_dir), "--data", str(corpus),
                           "--out", str(out), *ROUTE], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def test_two_ranks_write_the_run_one_process_writes(cli, tiny_olmoe_dir, corpus, single, tmp_path):
    """Every forward pass of the two ranks is one the single process ran (the same packed batches),
    so tokens, experts and weights are equal per (doc, pos) — exactly — and so are the statistics."""
    from deepseemoe.routing.stats import compute_routing_stats

    out = tmp_path / "run"
    proc = _torchrun([tiny_olmoe_dir, "--data", corpus, "--out", out, *ROUTE])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("routed ") == 1 and "on 2 ranks" in proc.stdout  # rank 0 reports, once
    names = sorted(p.name for p in (out / "tokens").iterdir())
    assert {n.rsplit("-", 1)[1] for n in names} == {"r000.parquet", "r001.parquet"} and len(names) > 4
    assert _tokens(out) == _tokens(single)
    assert _rows(out) == _rows(single)
    meta = json.loads((out / "run.json").read_text())
    assert meta["world_size"] == 2 and meta["tokens"] == json.loads((single / "run.json").read_text())["tokens"]
    assert not (out / "progress").exists()
    assert cli("verify", out).code == 0

    mine, theirs = compute_routing_stats(out, min_count=1), compute_routing_stats(single, min_count=1)
    assert mine.summary["layers"] == theirs.summary["layers"]
    assert mine.summary["layers"]["0"]["repetition"]["pairs"] == duckdb.sql(
        f"SELECT count(*) FROM read_parquet('{out}/tokens/*.parquet') a JOIN read_parquet('{out}/tokens/*.parquet') b "
        "ON a.doc = b.doc AND b.pos = a.pos + 1").fetchall()[0][0]
    for name, table in theirs.tables.items():
        keys = [c for c in table.columns if table[c].dtype == object or c in ("layer", "expert", "token_id", "rank")]
        a = table.sort_values(keys).reset_index(drop=True)
        b = mine.tables[name].sort_values(keys).reset_index(drop=True)
        import pandas as pd

        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-12)


def test_ranks_started_with_other_settings_are_refused(tiny_olmoe_dir, corpus, tmp_path):
    proc = _torchrun([tiny_olmoe_dir, "--data", corpus, "--out", tmp_path / "run{rank}", *ROUTE])
    assert proc.returncode != 0
    lines = _errors(proc)
    assert len(lines) == 1 and "rank 1 was started with other settings than rank 0" in lines[0], proc.stderr[-2000:]
    assert "out:" in lines[0] and "same command" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written, not even a lock or a staging folder


def test_more_ranks_than_batches_is_refused(tiny_olmoe_dir, corpus_jsonl, tmp_path):
    out = tmp_path / "run"
    proc = _torchrun([tiny_olmoe_dir, "--data", corpus_jsonl, "--out", out, "--ctx-len", "64", "--batch-size", "64"])
    assert proc.returncode != 0
    lines = _errors(proc)
    assert len(lines) == 1 and "2 ranks were started but the data fills only 1 batch" in lines[0], proc.stderr[-2000:]
    assert "--nproc-per-node" in lines[0]
    assert not any(tmp_path.iterdir())


def test_a_failure_on_one_rank_is_named_and_nothing_is_kept(tiny_olmoe_dir, corpus, single, tmp_path):
    out = tmp_path / "run"
    proc = _torchrun([tiny_olmoe_dir, "--data", corpus, "--out", out, *ROUTE], FAIL_RANK="1")
    assert proc.returncode != 0
    lines = _errors(proc)
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 of 2: cannot use") and "No space left" in lines[0], \
        proc.stderr[-2000:]
    assert not any(tmp_path.iterdir())

    # the same fault on a rerun that replaces a complete run: the old run stays, whole
    import shutil

    shutil.copytree(single, out)
    before = (out / "manifest.json").read_bytes()
    proc = _torchrun([tiny_olmoe_dir, "--data", corpus, "--out", out, "--overwrite", *ROUTE], FAIL_RANK="0")
    assert len(_errors(proc)) == 1 and "rank 0 of 2" in _errors(proc)[0]
    assert (out / "manifest.json").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _pid_of_rank(parent: int, rank: int) -> int | None:
    """The worker process of torchrun `parent` whose RANK is `rank`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def test_a_killed_rank_leaves_no_run_and_resume_routes_only_the_rest(cli, tiny_olmoe_dir, corpus, single, tmp_path):
    out = tmp_path / "run"
    args = [tiny_olmoe_dir, "--data", corpus, "--out", out, *ROUTE]
    staging = tmp_path / ".run.staging"
    proc = subprocess.Popen(_torchrun_cmd(args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    deadline = time.monotonic() + 120
    while len(list((staging / "progress").glob("rank-001.json"))) == 0 or \
            json.loads((staging / "progress" / "rank-001.json").read_text())["shard"] < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "rank 1 finished before it could be killed"
        time.sleep(0.01)
    victim = _pid_of_rank(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    # rank 0 either meets the broken collective (one line, pointing to --resume) or is stopped by torchrun
    assert all("another rank stopped" in line and "--resume" in line
               for line in err.splitlines() if line.startswith("error:")), err[-2000:]
    assert not out.exists()  # not complete, so not there
    assert cli("stats", out).code == 2

    kept = {p.name: p.stat().st_ino for p in (staging / "matrix").iterdir() if not p.name.startswith(".")}
    recorded = {Path(rel).name for r in (0, 1) if (staging / "progress" / f"rank-{r:03d}.json").exists()
                for rel in json.loads((staging / "progress" / f"rank-{r:03d}.json").read_text())["files"]
                if rel.startswith("matrix/")}
    assert len(recorded) >= 2

    resumed = _torchrun([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "kept from the interrupted run" in resumed.stdout
    # the finished shards were kept as they were (the same files), the rest routed anew
    assert all((out / "matrix" / name).stat().st_ino == kept[name] for name in recorded)
    assert _tokens(out) == _tokens(single) and _rows(out) == _rows(single)
    assert cli("verify", out).code == 0


def test_resume_in_one_process_and_its_refusals(cli, tiny_olmoe_dir, corpus, single, tmp_path):
    out = tmp_path / "run"
    base = [str(tiny_olmoe_dir), "--data", str(corpus)]
    args = [*base, "--out", str(out), *ROUTE]
    staging = tmp_path / ".run.staging"
    proc = subprocess.Popen([sys.executable, "-m", "deepseemoe.cli", "route", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    progress = staging / "progress" / "rank-000.json"
    while not progress.exists() or json.loads(progress.read_text())["shard"] < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and staging.is_dir()

    other = cli("route", *base, "--out", str(out), "--domain-field", "domain", "--ctx-len", "16", "--batch-size", "3",
                "--shard-tokens", "60", "--resume")
    assert other.code == 2 and len(other.error_lines) == 1
    assert "other settings" in other.error_lines[0] and "batch_size: 2 then, 3 now" in other.error_lines[0]
    assert staging.is_dir() and not out.exists()  # refused: what was kept is still there

    # in a process of its own, as `single` was routed: torch's thread count changes the last bits
    done = subprocess.run([sys.executable, "-m", "deepseemoe.cli", "route", *args, "--resume"], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kept from the interrupted run" in done.stdout
    assert _tokens(out) == _tokens(single) and _rows(out) == _rows(single)
    assert cli("verify", out).code == 0
    # nothing to resume: a plain route from the start
    again = cli("route", *base, "--out", str(tmp_path / "fresh"), *ROUTE, "--resume")
    assert again.code == 0 and "kept" not in again.out


def test_documents_split_reads_each_document_once(tiny_olmoe_dir, corpus, single, tmp_path):
    """--rank-split documents: each rank packs only its own documents. The run holds every document
    once, with the ids and tokens one process gives; the routing differs only through the contexts."""
    out = tmp_path / "run"
    proc = _torchrun([tiny_olmoe_dir, "--data", corpus, "--out", out, *ROUTE, "--rank-split", "documents"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _tokens(out) == _tokens(single)
    assert len(_rows(out)) == len(_rows(single))
    by_rank = duckdb.sql(f"SELECT DISTINCT doc, regexp_extract(filename, '-r(\\d+)', 1) AS rank "
                         f"FROM read_parquet('{out}/tokens/*.parquet', filename = true)").fetchall()
    assert all(doc % 2 == int(rank) for doc, rank in by_rank)  # rank r read documents r, r + 2, …
    assert json.loads((out / "run.json").read_text())["rank_split"] == "documents"


def test_a_streamed_source_is_split_by_datasets(tmp_path):
    """`hf:` sources: datasets' own split of the stream — disjoint shares that together are the whole
    stream, unique ids, no rank reading another's share."""
    from deepseemoe.data.sources import TextSource, iter_documents

    files = []
    for f in range(4):  # four files: whole files per rank when the ranks divide them
        path = tmp_path / f"shard_{f}.jsonl"
        path.write_text("".join(json.dumps({"text": f"file {f} doc {d}"}) + "\n" for d in range(5)))
        files.append(str(path))
    for data_files in (",".join(files[:4]), files[0]):  # 4 files over 2 ranks, and 1 file (every 2nd record)
        source = TextSource("hf:json", data_files=data_files.split(",") if "," in data_files else data_files)
        whole = [d.text for d in iter_documents(source)]
        parts = [list(iter_documents(source, part=(r, 2))) for r in range(2)]
        texts = [d.text for p in parts for d in p]
        assert sorted(texts) == sorted(whole) and len(texts) == len(set(texts)) and all(parts)
        ids = [d.doc_id for p in parts for d in p]
        assert len(set(ids)) == len(ids) and all(d.doc_id % 2 == r for r, p in enumerate(parts) for d in p)
