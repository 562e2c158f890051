"""The reference server's toy language model: pure functions and data, no I/O.

- A byte-level tokenizer: ids 0..255 are UTF-8 bytes, then five special ids.
- A character n-gram model with interpolated Witten-Bell smoothing down to a
  uniform floor over the whole vocabulary, so every id has a nonzero probability
  and every logprob is a true log-softmax over the vocabulary.
- Sampling (greedy, temperature, top-k, top-p) driven by a counter-based hash, so
  a draw depends only on (seed, position, recent context) and never on hidden state.
- Readouts: per layer, a differently-decayed average of concept indicators over
  the last ``READOUT_WINDOW`` tokens; a pure function of the prefix.
"""

from __future__ import annotations

import bisect
import functools
import math
import operator
import string
import zlib
from array import array
from collections.abc import Callable, Sequence
from importlib import resources
from itertools import accumulate
from typing import Final, final

import attrs

__all__ = [
    "BOS",
    "DEFAULT_CONCEPTS",
    "EOS",
    "IMAGE_PAD",
    "SPECIAL_NAMES",
    "VISION_END",
    "VISION_START",
    "VOCAB_SIZE",
    "Distribution",
    "NGramModel",
    "Readout",
    "SamplingSpec",
    "default_model",
    "detokenize",
    "tokenize",
]

BOS: Final = 256
EOS: Final = 257
VISION_START: Final = 258
VISION_END: Final = 259
IMAGE_PAD: Final = 260
VOCAB_SIZE: Final = 261

#: Name of each special id, as used by ``/v1/tokenizer`` and rendered by detokenize.
SPECIAL_NAMES: Final[dict[int, str]] = {
    BOS: "bos",
    EOS: "eos",
    VISION_START: "vision_start",
    VISION_END: "vision_end",
    IMAGE_PAD: "image_pad",
}

DEFAULT_CONCEPTS: Final = (
    "vowel",
    "consonant",
    "digit",
    "space",
    "punct",
    "upper",
    "newline",
    "image",
)

READOUT_WINDOW: Final = 16
_M64: Final = (1 << 64) - 1


def tokenize(text: str) -> list[int]:
    """Encode text as UTF-8 byte ids (no special tokens are ever produced)."""
    return list(text.encode("utf-8"))


def detokenize(ids: Sequence[int]) -> str:
    """Decode ids to text: byte runs as UTF-8 (errors replaced), specials as ``<|name|>``."""
    out: list[str] = []
    run = bytearray()
    for i in ids:
        if 0 <= i < 256:
            run.append(i)
            continue
        if run:
            out.append(run.decode("utf-8", errors="replace"))
            run.clear()
        out.append(f"<|{SPECIAL_NAMES.get(i, str(i))}|>")
    if run:
        out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)


@final
class Distribution:
    """The next-token distribution after one context, with what sampling needs cached."""

    __slots__ = ("_filtered", "_order", "argmax", "cum", "logprobs", "probs")

    def __init__(self, probs: Sequence[float]) -> None:
        total = math.fsum(probs)
        self.probs = array("d", (p / total for p in probs))
        self.logprobs = array("d", map(math.log, self.probs))
        self.cum = array("d", accumulate(self.probs))
        # max() returns the first maximum, so ties go to the lowest id.
        self.argmax: int = max(range(VOCAB_SIZE), key=self.probs.__getitem__)
        self._order: list[int] | None = None
        self._filtered: dict[tuple[float, int, float], tuple[list[int], list[float]]] = {}

    @property
    def order(self) -> list[int]:
        """All ids, most likely first (ties by id); computed on first use."""
        if self._order is None:
            lp = self.logprobs
            self._order = sorted(range(VOCAB_SIZE), key=lambda i: (-lp[i], i))
        return self._order

    def filtered(
        self, temperature: float, top_k: int, top_p: float
    ) -> tuple[list[int], list[float]]:
        """Candidates and their cumulative weights after temperature, top-k and top-p.

        Cached per setting: distributions are cached per context, so a decode
        loop pays for the exponentials once per (context, setting).
        """
        key = (temperature, top_k, top_p)
        hit = self._filtered.get(key)
        if hit is not None:
            return hit
        cands = self.order[:top_k] if top_k > 0 else self.order
        lp = self.logprobs
        inv_t = 1.0 / temperature
        best = lp[cands[0]]
        # Temperature in log space, shifted by the max for numerical safety.
        weights = [math.exp((lp[i] - best) * inv_t) for i in cands]
        if top_p < 1.0:
            total = math.fsum(weights)
            keep, mass = 0, 0.0
            for w in weights:
                keep += 1
                mass += w / total
                if mass >= top_p:
                    break
            cands, weights = cands[:keep], weights[:keep]
        result = (cands, list(accumulate(weights)))
        if len(self._filtered) < 8:  # a handful of settings per context is plenty
            self._filtered[key] = result
        return result

    def top(self, k: int) -> list[tuple[int, float]]:
        """The ``k`` most likely ids with their logprobs, most likely first."""
        lp = self.logprobs
        return [(i, lp[i]) for i in self.order[:k]]


@attrs.frozen
class SamplingSpec:
    """How to pick the next token: ``temperature = 0`` is greedy; 0 switches filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        """True when the choice is the argmax (temperature 0 or top_k 1)."""
        return self.temperature <= 0.0 or self.top_k == 1

    def pick(self, dist: Distribution, position: int, context: Sequence[int]) -> int:
        """Choose the token at ``position`` given the tokens before it (``context``)."""
        if self.greedy:
            return dist.argmax
        u = _uniform(self.seed, position, context)
        top_p = self.top_p if 0.0 < self.top_p < 1.0 else 1.0
        if self.temperature == 1.0 and self.top_k <= 0 and top_p >= 1.0:
            return min(bisect.bisect_right(dist.cum, u * dist.cum[-1]), VOCAB_SIZE - 1)
        cands, cum = dist.filtered(self.temperature, self.top_k, top_p)
        return cands[min(bisect.bisect_right(cum, u * cum[-1]), len(cands) - 1)]


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


_P61: Final = (1 << 61) - 1


def _seed_key(seed: int) -> int | tuple[int, int]:
    """``seed`` as a value whose hash() tells it from its neighbours.

    hash() of an int is the int modulo 2**61 - 1, and hash(-1) is hash(-2): seeds
    -1 and -2 (or s and s + 2**61 - 1) drew the same numbers. The usual seeds, in
    [0, 2**61 - 1), are kept as they are (their draws do not change). (No key can
    keep all 1.5 * 2**64 accepted seeds apart in a 64-bit hash; these are apart
    from every seed near them.)
    """
    if 0 <= seed < _P61:
        return seed
    return seed % _P61, (seed // _P61) & _M64


def _uniform(seed: int, position: int, context: Sequence[int]) -> float:
    """A uniform draw in [0, 1) from (seed, position, last 8 tokens of context).

    Keyed on content rather than on a session id so the same request replayed in
    a fresh session samples the same text. Tuples of ints hash the same in every
    process (no hash randomisation for ints).
    """
    h = hash((_seed_key(seed), position, tuple(context[-8:]))) & _M64
    return (_splitmix(h) >> 11) * (1.0 / (1 << 53))


@final
class NGramModel:
    """Character n-gram LM with interpolated Witten-Bell smoothing.

    ``p(w|h) = (c(h,w) + T(h) * p(w|h')) / (c(h) + T(h))`` where ``h'`` drops the
    oldest token of ``h`` and the recursion ends in a uniform distribution, so
    every probability is positive.
    """

    def __init__(self, training: Sequence[int], order: int = 5, cache_size: int = 8192) -> None:
        if order < 1:
            raise ValueError("order must be >= 1")
        self.order = order
        self._ctx = order - 1
        counts: dict[tuple[int, ...], dict[int, int]] = {}
        for i, w in enumerate(training):
            for n in range(min(self._ctx, i) + 1):
                h = tuple(training[i - n : i])
                nxt = counts.setdefault(h, {})
                nxt[w] = nxt.get(w, 0) + 1
        counts.setdefault((), {})
        self._counts = counts
        self._cache: dict[tuple[int, ...], Distribution] = {}
        self._cache_size = cache_size
        self._uniform = [1.0 / VOCAB_SIZE] * VOCAB_SIZE

    def _key(self, context: Sequence[int]) -> tuple[int, ...]:
        # An unseen context has T(h) = 0, so its distribution is its suffix's:
        # key the cache on the longest suffix seen in training.
        h = tuple(context[-self._ctx :]) if self._ctx else ()
        counts = self._counts
        while h not in counts:
            h = h[1:]
        return h

    def dist(self, context: Sequence[int]) -> Distribution:
        """The distribution of the next token after ``context`` (all tokens before it)."""
        key = self._key(context) if self._ctx else ()
        d = self._cache.get(key)
        if d is None:
            d = self._build(key)
        return d

    def _build(self, key: tuple[int, ...]) -> Distribution:
        lower = self._uniform if not key else self.dist(key[1:]).probs
        nxt = self._counts[key]
        c = sum(nxt.values())
        t = len(nxt)
        if c == 0:
            probs = list(lower)
        else:
            scale = t / (c + t)
            probs = [p * scale for p in lower]
            for w, n in nxt.items():
                probs[w] += n / (c + t)
        d = Distribution(probs)
        if len(self._cache) >= self._cache_size:
            # Crude bound on memory: contexts recur, so a refill is cheap.
            self._cache.clear()
        self._cache[key] = d
        return d

    def logprob(self, tokens: Sequence[int], position: int) -> float:
        """log P(tokens[position] | tokens[:position]); 0.0 at position 0 (no prefix)."""
        if position == 0:
            return 0.0
        return self.dist(tokens[max(0, position - self._ctx) : position]).logprobs[tokens[position]]


def _concept_predicate(name: str) -> Callable[[int], bool]:
    letters = set(string.ascii_letters.encode())
    vowels = set(b"aeiouAEIOU")
    known: dict[str, Callable[[int], bool]] = {
        "vowel": lambda t: t in vowels,
        "consonant": lambda t: t in letters and t not in vowels,
        "digit": lambda t: 48 <= t <= 57,
        "space": lambda t: t in (9, 32),
        "punct": lambda t: t < 128 and chr(t) in string.punctuation,
        "upper": lambda t: 65 <= t <= 90,
        "newline": lambda t: t in (10, 13),
        "image": lambda t: t in (VISION_START, VISION_END, IMAGE_PAD),
    }
    if name in known:
        return known[name]
    # Unknown concept names still get a fixed, name-dependent feature.
    salt = zlib.crc32(name.encode())
    return lambda t: _splitmix(salt * 1_000_003 + t) % 4 == 0


@final
class Readout:
    """Readout vectors: ``n_layers * n_concepts`` floats, layer-major.

    Layer ``l`` averages concept indicators of the last ``READOUT_WINDOW`` tokens
    (up to and including the position) with weights ``exp(-age / tau_l)``; deeper
    layers remember longer. Only the prefix is used, so truncation needs no state.
    """

    def __init__(self, concepts: Sequence[str], n_layers: int) -> None:
        if n_layers < 1 or not concepts:
            raise ValueError("readout needs at least one layer and one concept")
        self.concepts = tuple(concepts)
        self.n_layers = n_layers
        self.width = n_layers * len(self.concepts)
        preds = [_concept_predicate(c) for c in self.concepts]
        self._active: list[tuple[int, ...]] = [
            tuple(ci for ci, pred in enumerate(preds) if pred(t)) for t in range(VOCAB_SIZE)
        ]
        self._weights = [
            # (3.0**647 overflows; from layer 40 on every weight is 1.0 anyway)
            [math.exp(-age / (0.5 * 3.0 ** min(layer, 300))) for age in range(READOUT_WINDOW)]
            for layer in range(n_layers)
        ]
        self._cum_weights = [list(accumulate(w)) for w in self._weights]
        # The same numbers by age and by span, every layer's at once: vector() adds
        # them a layer-tuple at a time in C (map), 4-5x faster at 64 layers than
        # adding one float at a time, with the same additions in the same order.
        self._by_age = [tuple(w[age] for w in self._weights) for age in range(READOUT_WINDOW)]
        self._norms = [tuple(c[span] for c in self._cum_weights) for span in range(READOUT_WINDOW)]

    def vector(self, tokens: Sequence[int], position: int) -> list[float]:
        """The readout at ``position``: a function of ``tokens[: position + 1]`` only."""
        n_c = len(self.concepts)
        start = max(0, position - READOUT_WINDOW + 1)
        by_age, active = self._by_age, self._active
        # Per concept, its per-layer sums, youngest token first.
        sums: list[Sequence[float] | None] = [None] * n_c
        for age, t in enumerate(reversed(tokens[start : position + 1])):
            if 0 <= t < VOCAB_SIZE:
                weights = by_age[age]
                for ci in active[t]:
                    acc = sums[ci]
                    # (0.0 + w is w: the first needs no addition.)
                    sums[ci] = weights if acc is None else list(map(operator.add, acc, weights))
        out = [0.0] * self.width
        norms = self._norms[position - start]
        for ci, acc in enumerate(sums):
            if acc is not None:
                out[ci::n_c] = map(operator.truediv, acc, norms)  # layer-major
        return out


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def training_tokens(text: str) -> list[int]:
    """The training stream: each paragraph's bytes followed by EOS."""
    out: list[int] = []
    for p in _paragraphs(text):
        out.extend(tokenize(p))
        out.append(EOS)
    return out


@functools.cache
def default_model() -> NGramModel:
    """The model trained on the shipped corpus (built once per process, < 1 s)."""
    text = resources.files(__package__).joinpath("corpus.txt").read_text("utf-8")
    return NGramModel(training_tokens(text))
