"""Screenshots of every explorer view on a study, through `deepseemoe serve` and a headless Chromium.

    .venv/bin/python scripts/explorer_screenshots.py runs/demo docs/screenshots

Starts the server on a free loopback port, opens the overview, an expert, a feature, a recorded
document, the text view and the playground with a typed sentence, the comparison and a search, and
writes one full-page PNG per view. Needs Debian's chromium (or CHROMIUM=/path/to/chrome).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

TEXT = "def greet(name):\n    return 'Hallo ' + name  # Der König sprach zu seinen Knechten"


def main() -> None:
    study, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("error: no chromium; apt-get install chromium (or set CHROMIUM)")
    proc = subprocess.Popen([sys.executable, "-m", "deepseemoe.cli", "serve", str(study), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        base = proc.stdout.readline().strip().rstrip("/")
        if not re.fullmatch(r"http://127\.0\.0\.1:\d+", base):
            raise SystemExit(f"error: the server did not start ({base!r})")
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            # WebGL (the graph view) runs on SwiftShader in headless Chromium, which must be asked for
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--enable-unsafe-swiftshader"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(base + "/")
            key = page.url.rstrip("/").rsplit("/", 1)[1]
            shots = {"overview": page.url}
            layer = page.locator("#layout a").nth(len(page.locator("#layout a").all()) // 2).inner_text()
            shots["expert"] = f"{base}/s/{key}/expert/{layer}/0"
            feature = page.locator("#dictionaries a").first
            if feature.count():
                shots["feature"] = base + feature.get_attribute("href")
            doc = page.locator("h2:has-text('Documents') + p a").first.get_attribute("href")
            shots["document"] = base + doc
            shots["text"] = f"{base}/s/{key}/text?text={quote(TEXT)}"
            shots["playground"] = f"{base}/s/{key}/playground?text={quote(TEXT)}&op=exclude&layer={layer}&experts=0,1"
            if page.locator("#nav a:has-text('MoE vs dense')").count():
                shots["compare"] = f"{base}/s/{key}/compare"
            shots["search"] = f"{base}/s/{key}/search?q=code"
            graph = page.locator("#graphs a").first
            if graph.count():
                shots["graph"] = base + graph.get_attribute("href")
            for name, url in shots.items():
                page.goto(url)
                if name == "graph":
                    page.wait_for_function("window.graphReady === true", timeout=60_000)
                page.screenshot(path=str(out / f"{name}.png"), full_page=True)
                print(f"{out / f'{name}.png'}  ← {url}")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


if __name__ == "__main__":
    main()
