"""Token ids to text as they stream in: :class:`TextDecoder`.

The wire carries token ids only; their text is the server's tokenizer's
(``POST /detokenize``). Decoding each id alone breaks a character whose UTF-8
bytes span several tokens (U+FFFD each) and, with SentencePiece tokenizers, the
space a token carries at the start of a word (dropped at the start of a decode).
So each feed decodes its ids after a few already written (their text known),
and writes what the new ids add, holding back a character's first bytes until
the rest come: the incremental detokenization of vLLM and Hugging Face's
``TextStreamer``, over HTTP.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, SupportsIndex, final

import trio

from ._types import _u32_tuple

if TYPE_CHECKING:
    from ._http import HttpApi

__all__ = ["TextDecoder"]

#: Ids already written that a decode starts with (vLLM's 5): the context a
#: tokenizer needs to give the next id its text as it is inside a text.
_CONTEXT: Final = 5
#: Past this many ids in a decode's context, it starts again from the last
#: _CONTEXT written (one more request) rather than grow with the stream.
_MAX_CONTEXT: Final = 64
#: A character is at most 4 UTF-8 bytes: a trailing U+FFFD after that many new
#: ids is text of its own (an invalid sequence), not a character's start.
_MAX_CHAR_IDS: Final = 4
_REPLACEMENT: Final = "\ufffd"
#: Held back before trailing spaces too: a space and the start of what Hugging
#: Face's clean_up_tokenization removes it before (" ' ", "n't", "'s", "'ve", ...),
#: and a quote alone: the "'" that " ' " became is " '" again when punctuation
#: follows (" ' ." is " '.": the space before the "." goes first).
_HELD_TAILS: Final = (" '", " 'r", " 'v", " n", " n'", "'")


@final
class TextDecoder:
    """Token ids to text as they stream in, with the server's tokenizer.

    Made by :meth:`ApiClient.text_decoder`. :meth:`feed` takes the ids of each
    event (or of a batch) and returns the text they complete: concatenated, the
    returns are the text of all the ids, with no U+FFFD for a character whose
    bytes arrive in several tokens (held back until the rest come) and the
    spaces a tokenizer gives only inside a text. Call :meth:`flush` when the
    stream ends for what is held back (an invalid byte sequence's U+FFFD).
    Trailing spaces are held back too until more text comes, as a tokenizer
    may drop them before punctuation (Hugging Face's
    ``clean_up_tokenization_spaces``: ``" ."`` to ``"."``), and so is a space
    followed by the start of a quote or contraction it drops the space of
    (``" '"``, ``" n"``: ``" ' "`` to ``"'"``, ``" n't"`` to ``"n't"``), and a
    trailing quote (``" ' ?"`` is ``" '?"``, not ``"'?"``).

    Text once returned is not taken back: with a tokenizer whose text of some
    ids changes with the ids after them in other ways (beyond a held-back
    character's bytes or trailing spaces), the returns go on from where the
    new decode parts from what was returned, and their concatenation can
    differ from the decode of all the ids there.

    Each feed is one ``POST /detokenize`` (a reference-server extension; two,
    now and then, to restart its context or to write the text before a
    character's first bytes): feed a batch of ids (those buffered) rather than
    one per call when the stream is fast. A feed cancelled or failed before it
    returns keeps its ids for the next one; two tasks feeding one decoder at once raise
    ``trio.BusyResourceError``.

    Example::

        decoder = client.text_decoder()
        async with conv.stream(chunks, sampling) as events:
            async for ev in events:
                if isinstance(ev, poc_api.TokenOut):
                    show(await decoder.feed(ev.id))
        show(await decoder.flush())
    """

    def __init__(self, api: Callable[[], HttpApi], *, skip_special_tokens: bool = True) -> None:
        # The client's HTTP side, checked at each feed: open, and this trio run's.
        self._get_api = api
        self._api = api()
        self._specials: frozenset[int] | None = None if skip_special_tokens else frozenset()
        self._taken: list[int] = []  # fed, not yet told from special ones
        self._new_text()
        self._busy = False

    def _new_text(self) -> None:
        """Start a text of its own: decoded after none before it."""
        self._ids: list[int] = []  # the ids to decode (no special ones)
        self._start = 0  # where the decode's context starts
        self._written = 0  # ids before this are written; _start..._written is context
        self._context_text = ""  # the text of _ids[_start:_written]
        self._shown = 0  # how much of it is written (all but a held-back U+FFFD)
        self._restart_at = 0  # (_written) no context restart tried before this

    def __repr__(self) -> str:
        held = len(self._ids) - self._written
        return f"<poc_api.TextDecoder {self._written} ids written, {held} held back>"

    async def feed(self, ids: SupportsIndex | Iterable[SupportsIndex]) -> str:
        """Take ``ids`` (one id, or several) and return the text they complete
        (``""`` while a character's bytes are incomplete). Special tokens (the
        end of sequence, ...) add no text unless the decoder was made with
        ``skip_special_tokens=False``."""
        new = _ids(ids)
        return await self._decode(new, final=False)

    async def flush(self) -> str:
        """Return the text held back (a character's first bytes never completed
        come as U+FFFD); the decoder can then go on with the next ids, decoded
        as a new text (a new stream's), as by a new decoder."""
        return await self._decode((), final=True)

    async def _decode(self, new: tuple[int, ...], *, final: bool) -> str:
        self._api = self._get_api()  # (a closed client, another trio.run: said here)
        if self._busy:
            raise trio.BusyResourceError("another task is using this TextDecoder")
        self._busy = True
        try:
            # Kept before any request: a feed cancelled in one loses none of them.
            self._taken += new
            if self._specials is None and self._taken:
                info = await self._api.tokenizer_info()
                self._specials = frozenset(info["special"].values())
            specials = self._specials or frozenset()
            self._ids += (i for i in self._taken if i not in specials)
            self._taken = []
            if len(self._ids) == self._written and (
                not final or self._shown == len(self._context_text)
            ):
                await trio.lowlevel.checkpoint()
                text = ""
            else:
                text = await self._write(final)
            if final:
                # The stream ended: the next ids are a text of their own, not
                # decoded after this one's (whose held text is written now).
                self._new_text()
            return text
        finally:
            self._busy = False

    async def _write(self, final: bool) -> str:
        ids = self._ids
        start, context_text, shown = self._start, self._context_text, self._shown
        before = ""  # held text left out of a restarted context: written now
        if self._written - start > _MAX_CONTEXT and self._written >= self._restart_at:
            held = len(context_text) - shown  # (at its end: trailing spaces, a U+FFFD)
            new_start, new_text = await self._restart(start, context_text)
            if new_start != start:
                # The held text before the new context (a run of spaces longer
                # than its text) is final: no id after can change it.
                cut = len(context_text) - len(new_text)
                before = context_text[shown:cut]
                start, context_text = new_start, new_text
                shown = max(0, len(new_text) - held)
            else:
                # No start that does not cut a character (a run of bytes with an
                # invalid one): tried again only _CONTEXT ids on, not at every feed.
                self._restart_at = self._written + _CONTEXT
        end = len(ids)
        text = await self._api.detokenize(ids[start:end])
        if text.endswith(_REPLACEMENT) and not final:
            # The last ids may be a character's first bytes: held back.
            if end - self._written < _MAX_CHAR_IDS:
                return before + self._keep(start, context_text, shown)
            for keep in range(1, _MAX_CHAR_IDS):
                head = await self._api.detokenize(ids[start : end - keep])
                if not head.endswith(_REPLACEMENT):
                    text, end = head, end - keep
                    break
            else:
                # Every head ends with U+FFFD too: a byte that starts no character,
                # or ids whose bytes end one character and start the next (byte-level
                # BPE). The text before the last U+FFFD is written; that one is held
                # back (by text: its bytes may share an id with characters before it).
                at = _common(text, context_text, shown)
                out = text[at:-1]
                self._start, self._written = start, end
                self._context_text, self._shown = text, max(at, len(text) - 1)
                return before + out
        # Where the new text starts: where it parts from the text written (a
        # tokenizer may change the context's end by what follows, as Hugging
        # Face's clean_up_tokenization_spaces turns " ." into "."; what was
        # written stays).
        # Trailing spaces are held back too, until the next text (that cleanup
        # removes a space before punctuation).
        new_shown = len(text) if final else _held_from(text)
        at = _common(text, context_text, shown)
        self._start, self._written, self._context_text = start, end, text
        self._shown = max(at, new_shown)
        return before + text[at : self._shown]

    async def _restart(self, start: int, context_text: str) -> tuple[int, str]:
        # From the last _CONTEXT written, or a few ids earlier when that cuts a
        # character (a decode starting inside one does not end as a suffix of
        # the text: byte fallback makes its whole byte run U+FFFD); else not.
        for new in range(self._written - _CONTEXT, self._written - _CONTEXT - _MAX_CHAR_IDS, -1):
            if new <= start:
                break
            text = await self._api.detokenize(self._ids[new : self._written])
            if context_text.endswith(text):
                return new, text
        return start, context_text

    def _keep(self, start: int, context_text: str, shown: int) -> str:
        # A restarted context is kept even when nothing is written (its text known).
        self._start, self._context_text, self._shown = start, context_text, shown
        return ""


def _common(text: str, context_text: str, shown: int) -> int:
    """Where ``text`` goes on from the ``shown`` characters of ``context_text``
    written: there, or where it parts from them."""
    n = min(shown, len(text))
    if text[:n] == context_text[:n]:
        return n
    return next(i for i in range(n) if text[i] != context_text[i])


def _held_from(text: str) -> int:
    """Where the end of ``text`` held back starts: its trailing spaces, with a
    tail of _HELD_TAILS before them."""
    end = len(text.rstrip(" "))
    for tail in _HELD_TAILS:
        if text.endswith(tail, 0, end):
            at = end - len(tail)
            if tail == " '" and at == len(text) - 2:
                # " ' " becomes "'", and what it then stands after may lose its
                # space too: "  ' s" is " 's", then "'s"; " n ' t" is "n't".
                for before in (" n", " "):
                    if text.endswith(before, 0, at):
                        return at - len(before)
            return at
    return end


def _ids(ids: SupportsIndex | Iterable[SupportsIndex]) -> tuple[int, ...]:
    if isinstance(ids, Iterable):
        return _u32_tuple(ids)
    try:
        return _u32_tuple((operator.index(ids),))
    except TypeError:
        raise TypeError(
            f"ids must be a token id or an iterable of them, not {type(ids).__name__}"
        ) from None
