"""The explorer as a person uses it: `deepseemoe serve` started as a process on a free loopback port,
driven by a real headless Chromium (Playwright for Python with Debian's chromium package; Playwright
cannot download its own browsers here). The routing strip of a typed sentence is checked against
what `deepseemoe route` records for it, and a playground ablation against `deepseemoe ablate`.
Screenshots go to $DEEPSEEMOE_SCREENSHOTS (default: the test's tmp folder)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from tests.explore.conftest import TEXT, busiest_expert

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _browser_or_fail():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium (scripts/setup.sh --test installs it)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture(scope="module")
def server(study):
    proc = subprocess.Popen([sys.executable, "-m", "deepseemoe.cli", "serve", str(study), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", line), (line, proc.stderr.read() if proc.poll() else "")
        yield line.rstrip("/")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # WebGL in headless Chromium runs on SwiftShader, which it only enables when asked
        browser = p.chromium.launch(executable_path=_browser_or_fail(),
                                    args=["--no-sandbox", "--enable-unsafe-swiftshader"])
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        yield tab
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("DEEPSEEMOE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _strip(page, strip_id: str) -> dict[int, list[list[int]]]:
    cells = page.eval_on_selector_all(f"#{strip_id} td.cell", "els => els.map(e => [e.dataset.layer, e.dataset.token, "
                                                            "e.dataset.experts])")
    out: dict[int, list[list[int]]] = {}
    for layer, token, experts in cells:
        row = out.setdefault(int(layer), [])
        assert int(token) == len(row)
        row.append([int(e) for e in experts.split(",")])
    return out


def test_click_through_overview_expert_feature(server, page, shots):
    page.goto(server + "/")
    assert page.locator("h2", has_text="MoE layout").count() == 1
    page.screenshot(path=str(shots / "overview.png"), full_page=True)
    page.locator("#load a").first.click()
    page.wait_for_url(re.compile(r".*/expert/\d+/\d+$"))
    title = page.inner_text("#title")
    assert re.fullmatch(r"Layer \d+ · expert \d+", title)
    assert page.locator("#contexts tr").count() > 1
    page.screenshot(path=str(shots / "expert.png"), full_page=True)
    page.goto(server + "/")
    page.locator("#dictionaries a").first.click()
    page.wait_for_url(re.compile(r".*/feature/[^/]+/\d+$"))
    assert "feature" in page.inner_text("#title") and page.locator("#description").count() == 1
    page.screenshot(path=str(shots / "feature.png"), full_page=True)


def test_typed_sentence_shows_the_experts_route_records(study, server, page, shots, tmp_path):
    meta = json.loads((study / "run" / "run.json").read_text())
    (tmp_path / "text.txt").write_text(TEXT)
    subprocess.run([sys.executable, "-m", "deepseemoe.cli", "route", meta["model"], "--data", str(tmp_path / "text.txt"),
                    "--out", str(tmp_path / "r"), "--ctx-len", str(meta["ctx_len"])], check=True, capture_output=True)
    recorded: dict[int, list[list[int]]] = {}
    for layer, _pos, experts in duckdb.sql(
            f"SELECT layer, pos, list(expert ORDER BY rank) FROM read_parquet('{tmp_path}/r/routing/*.parquet') "
            "GROUP BY layer, pos ORDER BY layer, pos").fetchall():
        recorded.setdefault(layer, []).append(list(experts))
    page.goto(server + "/")
    page.click("#nav >> text=text")
    page.fill("textarea[name=text]", TEXT)
    page.click("#run")
    page.wait_for_selector("#strip")
    assert _strip(page, "strip") == recorded
    assert "tokens/s" in page.inner_text("#speed")
    page.screenshot(path=str(shots / "text.png"), full_page=True)
    # a cell of the strip opens its expert
    cell = page.locator("#strip td.cell").first
    layer, top = cell.get_attribute("data-layer"), cell.get_attribute("data-experts").split(",")[0]
    cell.locator("a").click()
    page.wait_for_url(re.compile(rf".*/expert/{layer}/{top}$"))


def test_playground_ablation_matches_ablate(study, server, page, shots, tmp_path):
    meta = json.loads((study / "run" / "run.json").read_text())
    layer = int(next(iter(meta["moe_layers"])))
    expert = busiest_expert(study, layer)  # its ablation moves the loss
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": TEXT, "domain": "typed"}) + "\n")
    subprocess.run([sys.executable, "-m", "deepseemoe.cli", "ablate", meta["model"], "--data", str(tmp_path / "text.jsonl"),
                    "--out", str(tmp_path / "a"), "--ctx-len", str(meta["ctx_len"]), "--layers", str(layer),
                    "--experts", str(expert)], check=True, capture_output=True)
    row = next(r for r in json.loads((tmp_path / "a" / "ablation.json").read_text())["experts"]
               if r["layer"] == layer and r["expert"] == expert)
    page.goto(server + "/")
    page.click("#nav >> text=playground")
    page.fill("textarea[name=text]", TEXT)
    page.select_option("#op", "ablate")
    page.select_option("#layer", str(layer))
    page.fill("#experts", str(expert))
    page.click("#run")
    page.wait_for_selector("#delta-ce")
    assert abs(row["ablate_delta_ce"]) > 1e-5
    assert float(page.inner_text("#delta-ce")) == pytest.approx(row["ablate_delta_ce"], rel=1e-4)
    assert page.locator("#edited td.cell").count() == page.locator("#clean td.cell").count() > 0
    page.screenshot(path=str(shots / "playground.png"), full_page=True)


def test_webgl_graph_draws_and_a_click_opens_the_node(study, server, page, shots):
    g = next(study.glob("*/graphs/*/summary.json"))
    key = g.parent.name  # one dictionary run in the study: the name `map` and `graph` take
    page.goto(server + "/s/demo")
    page.locator(f'#graphs a[href="/s/demo/graph/{key}"]').click()
    page.wait_for_function("window.graphReady === true", timeout=30_000)
    # the canvas holds a drawing: many pixels that are not the white background
    painted = page.evaluate("""() => {
        const src = document.getElementById("graph"), c = document.createElement("canvas");
        c.width = src.width; c.height = src.height;
        const ctx = c.getContext("2d"); ctx.drawImage(src, 0, 0);
        const px = ctx.getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < px.length; i += 4) if (px[i] < 240 || px[i + 1] < 240 || px[i + 2] < 240) n++;
        return n; }""")
    assert painted > 2000, painted
    page.screenshot(path=str(shots / "graph.png"), full_page=True)
    # a module lists its nodes
    page.locator("#modules a").first.click()
    assert page.locator("#members a").count() > 0
    # clicking an expert's point opens the expert's page
    data = page.evaluate(f"fetch('/api/s/demo/graph/{key}').then(r => r.json())")
    i = data["kind"].index("expert")
    x, y = page.evaluate(f"window.graphNodeScreen({i})")
    box = page.locator("#graph").bounding_box()
    page.mouse.click(box["x"] + x, box["y"] + y)
    page.wait_for_url(re.compile(r".*/expert/\d+/\d+$"))
    assert page.url.endswith(data["link"][i])


def _raw(server: str, request: bytes, pieces: int = 1) -> bytes:
    import socket
    import time

    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        step = -(-len(request) // pieces)
        try:
            for i in range(0, len(request), step):
                s.sendall(request[i:i + step])
                if pieces > 1:
                    time.sleep(0.002)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the whole head arrived
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if out.startswith(b"HTTP/1.1 200") and b"</html>" in out:
                    break
        except (ConnectionResetError, TimeoutError):
            pass
    return out


@pytest.mark.parametrize("pieces", [1, 64])
@pytest.mark.parametrize("kind", ["one 100 kB header", "10,000 headers"])
def test_oversized_request_heads_get_431_whatever_the_timing(server, kind, pieces):
    head = b"GET / HTTP/1.1\r\nHost: x\r\n"
    if kind == "one 100 kB header":
        head += b"X-Big: " + b"a" * 100_000 + b"\r\n"
    else:
        head += b"".join(b"X-%d: 1\r\n" % i for i in range(10_000))
    answer = _raw(server, head + b"\r\n", pieces)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:80]
    normal = _raw(server, b"GET /s/demo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert normal.startswith(b"HTTP/1.1 200"), normal[:80]
