"""A small deterministic server speaking the OpenAI chat-completions protocol, for tests.

Its "model" is an oracle that reads the prompts DeepSeeMoE sends:
- explainer prompts (the system message asks for `[EXPLANATION]:`): answers with the distinct
  marked words (<<…>>) of the examples, most frequent first: "[EXPLANATION]: cat dog horse";
- scorer prompts (one "Text: …" each): 1 when the text (detection) or its marked part (fuzz,
  routing) holds a word of the explanation, else 0 — or always 1 with `always_yes`. Asked for
  log-probabilities, it gives the top two candidates, "1" and "0", with P = 0.9 / 0.1 for its
  answer (`ignore_input`: P(1) = 0.7 whatever the prompt), unless `logprobs=False`.
`fail_first` answers each distinct prompt's first request with that HTTP status (429, 500) before
answering it properly. Counts requests and the most that were in flight at once.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Stub:
    def __init__(self, *, fail_first: int | None = None, always_yes: bool = False, delay: float = 0.0,
                 always_status: int | None = None, ignore_input: bool = False, logprobs: bool = True):
        self.fail_first, self.always_yes, self.delay = fail_first, always_yes, delay
        self.ignore_input, self.logprobs = ignore_input, logprobs
        self.always_status = always_status  # answer every request with this HTTP status (a client error)
        self.requests = 0
        self.answered = 0
        self.failed = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.seen: set[str] = set()
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests += 1
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                    key = json.dumps(body["messages"], sort_keys=True)
                    first = key not in stub.seen
                    stub.seen.add(key)
                try:
                    time.sleep(stub.delay)
                    if stub.always_status:
                        self._send(stub.always_status, {"error": "unauthorized"})
                        return
                    if stub.fail_first and first:
                        with stub.lock:
                            stub.failed += 1
                        self._send(stub.fail_first, {"error": "try again"})
                        return
                    text = stub.answer(body["messages"])
                    with stub.lock:
                        stub.answered += 1
                    choice = {"message": {"role": "assistant", "content": text}}
                    if body.get("logprobs") and stub.logprobs:
                        p1 = 0.7 if stub.ignore_input else (0.9 if text == "1" else 0.1)
                        choice["logprobs"] = {"content": [{"token": text, "logprob": 0.0, "top_logprobs": [
                            {"token": "1", "logprob": math.log(p1)}, {"token": "0", "logprob": math.log(1 - p1)}]}]}
                    self._send(200, {"choices": [choice]})
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

            def _send(self, code, doc):
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def answer(self, messages: list[dict]) -> str:
        system, user = messages[0]["content"], messages[-1]["content"]
        if "[EXPLANATION]" in system:
            words = Counter(w.strip().lower() for span in re.findall(r"<<(.*?)>>", user) for w in span.split())
            return "[EXPLANATION]: " + " ".join(w for w, _ in words.most_common(5))
        m = re.search(r"(?:Explanation|Expert description): (.*)", user)
        vocab = set(m.group(1).lower().split()) if m else set()
        ex = re.search(r"^Text: (.*)$", user, re.M).group(1)
        if self.always_yes or self.ignore_input:
            return "1"
        looked_at = " ".join(re.findall(r"<<(.*?)>>", ex)) if "<<" in ex else ex
        return str(int(bool(vocab & set(looked_at.lower().split()))))
