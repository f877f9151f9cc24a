"""Made-up model output: words for completions, vectors for embeddings.

Output is deterministic when the request asks for it (temperature 0 or a seed), so tests and
caches can compare answers across servers; otherwise it is random like a sampling model.
"""

from __future__ import annotations

import hashlib
import math
import random
import zlib
from functools import lru_cache

_VOCABULARY = """
the of and to in is that it for as with was on be by this are from at or an have not
they which one you were all we can her has there been if more when will would who so no
model token server queue request answer river mountain signal garden window ocean light
paper number system water history music market energy simple quick bright quiet early
later often really always never perhaps however because therefore cluster worker router
batch stream vector memory context latency throughput
"""
_WORDS = _VOCABULARY.split()
_ENDINGS = (",", ".", "", "", "", "", "", "", "", "", "", "")
# One draw per token keeps a shorter answer a prefix of a longer one.
_PAIRS = [(word, end) for word in _WORDS for end in _ENDINGS]


def approx_tokens(text: str) -> int:
    """Token count of a prompt, taken as its number of words (real tokenizers give ~1.3x)."""
    return len(text.split())


def _seed_of(*parts: object) -> int:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def completion_tokens(n: int, rng: random.Random | None, *key: object) -> list[str]:
    """``n`` tokens forming sentence-like text.

    With ``rng`` None the tokens are a pure function of ``key``; a prefix of a longer answer
    equals the shorter answer, as with a real model at temperature 0.
    """
    rng = rng or random.Random(_seed_of(*key))
    tokens: list[str] = []
    capital = True
    for word, end in rng.choices(_PAIRS, k=n):
        text = word.capitalize() if capital else word
        tokens.append(f"{' ' if tokens else ''}{text}{end}")
        capital = end == "."
    return tokens


def token_ids(text: str, tokens: list[str]) -> list[int]:
    """Plausible token ids for a generate ``context``: prompt words, then the answer."""
    ids = [zlib.crc32(w.encode()) % 128_000 for w in text.split()]
    ids.extend(zlib.crc32(t.encode()) % 128_000 for t in tokens)
    return ids


@lru_cache(maxsize=4096)
def embedding_json(model: str, text: str, dims: int, normalized: bool) -> str:
    """A JSON array for ``text``: the same text always gets the same vector.

    ``/api/embed`` returns float32-precision, L2-normalised vectors; the legacy
    ``/api/embeddings`` returns raw float64 values.  Truncating to ``dims`` keeps a prefix of
    the full vector, like Ollama's ``dimensions``.  Encoding is cached because formatting
    hundreds of floats is the dominant cost of an embedding request.
    """
    rng = random.Random(_seed_of(model, text))
    values = [rng.random() * 2 - 1 for _ in range(dims)]
    if not normalized:
        return "[" + ",".join(map(repr, values)) + "]"
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return "[" + ",".join(format(v / norm, ".8g") for v in values) + "]"
