"""Each token's text as a reader should see it, not the tokenizer's internal symbol.

Byte-level BPE tokenizers (GPT-2, OLMoE, Llama 3, Qwen …) store a token as printable stand-ins for
its bytes: "Ġ" for a space, "Ã©" for "é", "Ð°" for "а". SentencePiece tokenizers write a space as
"▁" and, with byte fallback, a lone byte as "<0xD0>". `token_texts` maps every token id to the
text its bytes spell. A token that ends mid-character (its bytes are not whole UTF-8 characters)
shows the characters that are whole and then the remaining bytes as \\xNN escapes, so the reader
sees where a character was cut, never a replacement character or mojibake.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of byte-level BPE's byte → printable character table: bytes that print as
    themselves keep their character; the other 68 take the code points from 256 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


def _readable(data: bytes) -> str:
    return data.decode("utf-8", errors="backslashreplace")


def piece_text(piece: str | None, byte_level: bool) -> str:
    """The text of one token symbol (see the module docstring)."""
    if piece is None:
        return ""
    if byte_level:
        table = _unicode_to_byte()
        if all(ch in table for ch in piece):
            return _readable(bytes(table[ch] for ch in piece))
        return piece  # an added token written as plain text ("<s>", "<|endoftext|>")
    m = _BYTE_TOKEN.fullmatch(piece)
    if m:
        return _readable(bytes([int(m.group(1), 16)]))
    return piece.replace("▁", " ")


def token_texts(tokenizer, ids: Iterable[int]) -> list[str]:
    """The text of each token id (one call per distinct id)."""
    ids = list(ids)
    byte_level = _is_byte_level(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    cache: dict[int, str] = {}
    for i in set(ids):
        piece = tokenizer.convert_ids_to_tokens(int(i))
        cache[i] = piece if i in special else piece_text(piece, byte_level)
    return [cache[i] for i in ids]


# only bytes ≥ 0x80: backslashreplace escapes nothing else, and a literal "\x41" in code stays text
_ESCAPE = re.compile(r"\\x([89a-f][0-9a-f])")


def _bytes_of(text: str) -> bytes:
    """A token text back to its bytes: its \\xNN escapes (the cut bytes of a character) and UTF-8 of the rest."""
    out, last = bytearray(), 0
    for m in _ESCAPE.finditer(text):
        out += text[last:m.start()].encode("utf-8")
        out.append(int(m.group(1), 16))
        last = m.end()
    return bytes(out + text[last:].encode("utf-8"))


def joined_texts(texts: list[str], frame: int | None = None) -> list[str]:
    """Token texts for display in sequence: a character cut across neighbouring tokens (byte-level
    BPE splits "Ы" into \\xd0 | \\xab) is shown whole, once, in the token holding its last byte, and
    the tokens holding only its first bytes show nothing; the `frame`d token (a context's centre)
    shows every character it holds a byte of. Bytes that complete no character stay escaped."""
    if "\\x" not in "".join(texts):
        return list(texts)
    data = [_bytes_of(t) for t in texts]
    stream = b"".join(data)
    owner = [i for i, d in enumerate(data) for _ in d]  # the token of every byte
    out = [""] * len(texts)
    pos = 0
    while pos < len(stream):
        for size in (1, 2, 3, 4):  # the shortest decodable sequence from here: one character
            try:
                char = stream[pos:pos + size].decode("utf-8")
                break
            except UnicodeDecodeError:
                continue
        else:
            char, size = f"\\x{stream[pos]:02x}", 1
        holders = set(owner[pos:pos + size])
        out[frame if frame in holders else owner[pos + size - 1]] += char
        pos += size
    return out
