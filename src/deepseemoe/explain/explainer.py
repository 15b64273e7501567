"""Prompts from the templates in prompts/ (or a folder of the user's with the same file names),
and the explainer: examples → prompt → the `[EXPLANATION]:` line of the answer.

Rendering follows delphi's explainer: in each example the tokens above 0.3 × that example's
maximum are marked <<like this>> (consecutive ones as one span), followed by their activations
scaled to 0–10.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.explain.backends import ChatBackend, Messages
from deepseemoe.explain.units import Example

PROMPTS = Path(__file__).parent / "prompts"
PROMPT_FILES = ("explainer_system.txt", "explainer_user.j2", "detection_system.txt", "detection_user.j2",
                "fuzz_system.txt", "fuzz_user.j2", "routing_system.txt", "routing_user.j2")
UNPARSED = "Explanation could not be parsed."  # delphi's text for an answer without the line
NO_DESCRIPTION = "No usable description."  # every try was empty, an echo of the prompt, a token run or too long
MAX_CHARS = 200  # "one short phrase or sentence"; longer answers are rambling
MARK_SHARE = 0.3


@dataclass
class Prompts:
    folder: Path

    @classmethod
    def load(cls, folder: str | Path | None = None) -> Prompts:
        folder = Path(folder) if folder else PROMPTS
        missing = [f for f in PROMPT_FILES if not (folder / f).is_file()]
        if missing:
            raise DeepSeeMoEError(f"--prompts {folder} lacks {', '.join(missing)}; copy {PROMPTS} and edit the copies")
        return cls(folder)

    def text(self, name: str) -> str:
        return (self.folder / name).read_text(encoding="utf-8")

    def render(self, name: str, **values) -> str:
        import jinja2

        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
        try:
            return env.from_string(self.text(name)).render(**values)
        except jinja2.TemplateError as e:
            raise DeepSeeMoEError(f"prompt template {self.folder / name}: {e}") from None

    def digest(self) -> str:
        import hashlib

        return hashlib.sha256("".join(self.text(f) for f in PROMPT_FILES).encode()).hexdigest()


def marked(tokens: list[str], on: list[bool]) -> str:
    """The text with the tokens flagged `on` between << and >> (consecutive ones as one span)."""
    out, open_ = [], False
    for tok, flag in zip(tokens, on, strict=True):
        if flag and not open_:
            out.append("<<")
        if not flag and open_:
            out.append(">>")
        out.append(tok)
        open_ = flag
    return "".join(out) + (">>" if open_ else "")


def mark(tokens: list[str], activations: list[float], share: float = MARK_SHARE) -> str:
    """The text with the tokens above `share` × the maximum marked <<…>>."""
    top = max(activations, default=0.0)
    return marked(tokens, [top > 0 and a > share * top for a in activations])


# the strongest marked tokens an example's "Activations" line lists (in text order): an expert marks
# most of a window, and listing every token doubled the prompt without telling a small model more
MAX_LEVELS = 6


def levels(tokens: list[str], activations: list[float], share: float = MARK_SHARE, most: int = MAX_LEVELS) -> str:
    """The marked tokens' activations scaled to 0–10, the `most` strongest, in text order."""
    top = max(activations, default=0.0)
    marked_at = [i for i, a in enumerate(activations) if top > 0 and a > share * top]
    keep = sorted(sorted(marked_at, key=lambda i: -activations[i])[:most])
    return ", ".join(f"({tokens[i]!r}, {math.ceil(activations[i] * 10 / top)})" for i in keep)


def evidence(unit_doc: dict, n_tokens: int = 5) -> dict:
    """What a unit's stored examples show without any LLM (beside its description, so the section
    says something even when the explainer is weak): the tokens it is most active on, with how often
    (tokens above MARK_SHARE × their example's maximum, over the explaining and held-out activating
    examples), and its strongest example's text with those tokens marked."""
    from collections import Counter

    examples = [e for e in (*unit_doc.get("train", []), *unit_doc.get("test", []))
                if max(e["activations"], default=0.0) > 0]
    counts: Counter = Counter()
    for e in examples:
        top = max(e["activations"])
        counts.update(t for t, a in zip(e["tokens"], e["activations"], strict=True) if a > MARK_SHARE * top)
    best = max(examples, key=lambda e: max(e["activations"]), default=None)
    return {"tokens": counts.most_common(n_tokens), "examples": len(examples),
            "context": mark(best["tokens"], best["activations"]) if best else ""}


def explainer_messages(prompts: Prompts, examples: list[Example], context: str = "") -> Messages:
    shown = [{"marked": mark(e.tokens, e.activations), "levels": levels(e.tokens, e.activations)} for e in examples]
    return [{"role": "system", "content": prompts.text("explainer_system.txt")},
            {"role": "user", "content": prompts.render("explainer_user.j2", examples=shown, context=context)}]


def parse_explanation(text: str | None) -> str:
    """The line after `[EXPLANATION]:` (delphi keeps all that follows; the prompt asks for one line,
    and small models ramble on after it), or UNPARSED."""
    if not text:
        return UNPARSED
    m = re.search(r"\[EXPLANATION\]:\s*([^\n]*)", text)
    return m.group(1).strip() if m and m.group(1).strip() else UNPARSED


_DANGLING = {"a", "an", "the", "of", "in", "on", "to", "is", "are", "and", "or", "which", "that", "with", "for", "as",
             "by", "from", "at", "its", "their", "it", "be", "was", "were"}


# what the prompt's context says about the unit's place in the model, repeated back as a description
_ABOUT_THE_MODEL = (r"\b(moe|mixture-of-experts|expert) layer\b", r"\blayer \d+\b", r"\btokens routed to it\b")


def trimmed(explanation: str) -> str:
    """The explanation without a last sentence the token limit cut off: "X is Y. The unit is" →
    "X is Y." (kept whole when it is one sentence: `unusable` judges that)."""
    text = explanation.strip()
    if text and text[-1] not in ".!?)\"'" and ". " in text:
        return text[:text.rindex(". ") + 1]
    return text


def unusable(explanation: str, instructions: str) -> str | None:
    """Why an explanation is junk, or None: empty or unparsed, longer than MAX_CHARS (or cut off by
    the token limit mid-sentence), a run of one character or word ("<<<<<<", "the the the"), a phrase
    said over and over ("the domain of the domain of the domain"; five words twice), the unit's place
    in the model instead of what it reads ("active in the MoE layer 2"), the prompt's delimiters or its
    example numbering ("[1] …", "[Example 1]"), mostly not letters, or an echo of the instructions
    (six words in a row taken from them)."""
    text = explanation.strip()
    if not text or text == UNPARSED:
        return "empty"
    if len(text) > MAX_CHARS:
        return "too long"
    words = re.findall(r"\w+", text.lower())
    if re.search(r"(\S)\1{3,}", text) or re.search(r"\b(\w+)(\W+\1\b){2,}", text, re.I):
        return "a token run"
    trigrams = [" ".join(words[i:i + 3]) for i in range(len(words) - 2)]
    fivegrams = [" ".join(words[i:i + 5]) for i in range(len(words) - 4)]
    if (trigrams and max(trigrams.count(t) for t in set(trigrams)) >= 3) or len(set(fivegrams)) < len(fivegrams):
        return "a repeated phrase"
    if any(re.search(p, text, re.I) for p in _ABOUT_THE_MODEL):
        return "the model's structure, not the data"
    if "<<" in text or ">>" in text:
        return "the delimiters"
    if re.match(r"\[\s*(\d+|example)", text, re.I) or re.search(r"\bexample \d+\b", text, re.I):
        return "the prompt's example numbering"
    if sum(c.isalpha() for c in text) < 0.6 * len(text.replace(" ", "")):
        return "not words"
    if text[-1] not in ".!?)\"'" and (len(text) >= 0.75 * MAX_CHARS or (len(words) > 3 and words[-1] in _DANGLING)):
        return "cut off"
    said = " ".join(re.findall(r"\w+", instructions.lower()))
    if any(" ".join(words[i:i + 6]) in said for i in range(len(words) - 5)):
        return "an echo of the prompt"
    return None


def _reordered(examples: list[Example], attempt: int) -> list[Example]:
    """The examples as shown on a retry: half of them (at least 3), in another seeded order — greedy
    decoding answers the same prompt the same way, and a shorter prompt costs less to ask again."""
    import random

    if attempt == 0:
        return examples
    order = list(examples)
    random.Random(attempt).shuffle(order)
    return order[:max(3, len(order) // 2)]


def explain(backend: ChatBackend, prompts: Prompts, units: dict[int, list[Example]], contexts: dict[int, str],
            *, max_tokens: int = 40, retries: int = 2) -> dict[int, str]:
    """One explanation per unit. A junk answer (`unusable`) is asked again with the examples in
    another order, up to `retries` times, then recorded as NO_DESCRIPTION; units without examples get
    none, and neither do units whose request failed for good (they are asked again next time); when
    every request failed, one line says why."""
    todo = [u for u, ex in units.items() if ex]
    instructions = prompts.text("explainer_system.txt")
    out: dict[int, str] = {}
    for attempt in range(retries + 1):
        if not todo:
            break
        answers = backend.complete_many(
            [explainer_messages(prompts, _reordered(units[u], attempt), contexts.get(u, "")) for u in todo],
            max_tokens=max_tokens, prefix="[EXPLANATION]:")
        failed = [a.error for a in answers if a.text is None]
        if attempt == 0 and len(failed) == len(todo):
            raise DeepSeeMoEError(f"the explainer answered none of {len(todo)} requests ({failed[0]}); check --url, "
                                  "--model and the API key")
        again = []
        for u, a in zip(todo, answers, strict=True):
            if a.text is None:
                continue
            text = trimmed(parse_explanation(a.text))
            if unusable(text, instructions) is None:
                out[u] = text
            elif attempt == retries:
                out[u] = NO_DESCRIPTION
            else:
                again.append(u)
        todo = again
    return out
