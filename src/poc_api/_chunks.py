"""Prompt chunks and the pure logic that walks them against a session.

A prompt is a list of chunks: :class:`Tokens` and :class:`Image`. Nothing here
does I/O; the conversation uses these functions to decide what to send.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, SupportsIndex, TypeAlias, final

import attrs

from ._errors import LimitExceeded, SessionDivergence
from ._types import BYTES_LIKE, _ids_repr, _u32, _u32_tuple, unordered
from ._wire import append_image_request_size

__all__ = [
    "Chunk",
    "DeltaPlan",
    "Image",
    "Tokens",
    "check_chunks",
    "chunk_len",
    "chunks_before",
    "common_prefix_len",
    "plan_delta",
    "prompt_to_chunks",
    "walk_chunks",
]


def _ids(value: Iterable[SupportsIndex]) -> tuple[int, ...]:
    return _u32_tuple(value, "ids")


@final
@attrs.frozen
class Tokens:
    """A run of text token ids (each takes one session position)."""

    ids: tuple[int, ...] = attrs.field(converter=_ids, repr=_ids_repr)

    def __len__(self) -> int:
        return len(self.ids)


def _known_len(value: SupportsIndex) -> int:
    return _u32("known_expanded_len", value)


def image_bytes(value: object) -> bytes:
    """Image data as bytes (a copy): ``TypeError`` unless bytes, a bytearray or a
    memoryview, ``ValueError`` if it holds no byte."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"image data must be bytes, not {type(value).__name__}")
    # nbytes, not len(): a memoryview's len() is its first dimension (5 for 5 x 0).
    if not memoryview(value).nbytes:
        raise ValueError("image data is empty")
    return bytes(value)


# RFC 6838: a type and a subtype name of at most 127 characters each.
_MAX_MIME = 255


def check_image_mime(value: object) -> str:
    """An image MIME type: ``TypeError`` unless a str, ``ValueError`` unless
    ``image/<subtype>`` (any case, as MIME types are), at most 255 characters and
    encodable (UTF-8)."""
    if not isinstance(value, str):
        raise TypeError(f"mime must be a str, not {type(value).__name__}")
    if len(value) > _MAX_MIME:
        raise ValueError(
            f"mime must be at most {_MAX_MIME} characters (RFC 6838), got {len(value)}: "
            f"{value[:40]!r}..."
        )
    if not value[:6].lower() == "image/" or len(value) == 6:
        raise ValueError(f"mime must be an image type such as 'image/png', got {value!r}")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(f"mime must be encodable as UTF-8, got {value!r}") from None
    return value


def _image_data(value: bytes | bytearray | memoryview) -> bytes:
    # The converter's parameter types ``Image.__init__``'s ``data`` (attrs, mypy's
    # attrs plugin, pyright): ``object`` there let ``Image("text", ...)`` type-check.
    return image_bytes(value)


def _check_mime(_inst: object, _attr: object, value: Any) -> None:
    check_image_mime(value)


@final
@attrs.frozen
class Image:
    """An encoded image. ``known_expanded_len = 0`` means "not appended yet".

    Once the server has appended it, the image takes ``known_expanded_len``
    placeholder positions.
    """

    data: bytes = attrs.field(converter=_image_data, repr=lambda d: f"<{len(d)} bytes>")
    mime: str = attrs.field(validator=_check_mime)
    known_expanded_len: int = attrs.field(default=0, converter=_known_len)


Chunk: TypeAlias = Tokens | Image
"""One piece of a prompt: a run of text token ids (:class:`Tokens`) or an
:class:`Image`. A prompt is a sequence of them (``Conversation.stream``,
``ApiClient.score``, :func:`prompt_to_chunks`)."""


def check_chunks(chunks: Sequence[Chunk], name: str = "chunks") -> list[Chunk]:
    """A list of the prompt's chunks; ``TypeError`` (naming the parameter ``name``)
    unless a sequence of which each is Tokens or Image."""
    if isinstance(chunks, Tokens | Image):
        raise TypeError(
            f"{name} must be a sequence of Tokens/Image, not a single chunk (wrap it in a list)"
        )
    if isinstance(chunks, BYTES_LIKE) or not isinstance(chunks, Sequence):
        raise TypeError(f"{name} must be a sequence of Tokens/Image, not {type(chunks).__name__}")
    out = list(chunks)
    for c in out:
        if not isinstance(c, Tokens | Image):
            raise TypeError(f"{name} must hold Tokens or Image, got {type(c).__name__}")
    return out


def check_image_sizes(
    chunks: Sequence[Chunk],
    max_message_size: int,
    name: str = "chunks",
    session_id: str = "",
    max_offset: int = 2**32 - 1,
) -> None:
    """``LimitExceeded`` for an image whose ``AppendImage`` request would be over
    ``max_message_size``: it could never be sent, and a call made of several (a
    prompt's ``OpenSession``, prefill, image) is refused before the first goes out.

    The request's size is taken at its largest: at ``max_offset`` (a session's
    context window bounds it), truncating; a few bytes over what it may be. Without
    the ``session_id`` (no session yet) it is short of the id's bytes: the call
    checks again once its session is open, before it sends anything else.
    """
    for i, c in enumerate(chunks):
        if not isinstance(c, Image):
            continue
        size = append_image_request_size(
            session_id=session_id, image_len=len(c.data), mime=c.mime, max_offset=max_offset
        )
        if size > max_message_size:
            raise LimitExceeded(
                f"{name}[{i}]: an image of {len(c.data)} bytes, whose AppendImage request "
                f"({size} bytes) is over max_message_size={max_message_size} "
                "(refused before sending)"
            )


def chunk_len(chunk: Chunk) -> int:
    """Positions the chunk takes in a session; 0 for an image of unknown length."""
    if isinstance(chunk, Tokens):
        return len(chunk.ids)
    return chunk.known_expanded_len


def known_len(chunks: Iterable[Chunk]) -> int | None:
    """Positions the chunks take, or None when an image's length is unknown."""
    total = 0
    for c in chunks:
        if isinstance(c, Tokens):
            total += len(c.ids)
        elif c.known_expanded_len:
            total += c.known_expanded_len
        else:
            return None
    return total


def text_len(chunks: Iterable[Chunk]) -> int:
    """Positions the chunks' text takes: a lower bound of theirs that holds whatever
    an image's stated length (the server decides that one)."""
    return sum(len(c.ids) for c in chunks if isinstance(c, Tokens))


_NO_IMAGE: Any = object()


def _as_image(item: object) -> Image:
    if isinstance(item, Image):
        return item
    if isinstance(item, tuple | list) and len(item) == 2:
        return Image(item[0], item[1])
    raise TypeError(
        f"each image must be an Image or a (bytes, mime) pair, not {type(item).__name__}"
        + (f" of length {len(item)}" if isinstance(item, tuple | list) else "")
    )


def prompt_to_chunks(
    tokens: Iterable[SupportsIndex],
    images: Iterable[Image | tuple[bytes | bytearray | memoryview, str]],
    vision_start: SupportsIndex,
    vision_end: SupportsIndex,
) -> list[Chunk]:
    """Split a flat token prompt into chunks at image brackets (proto/PROTOCOL.md §4).

    ``tokens`` is any iterable of ids (read once: a list, a numpy array, a
    generator; not a set or a mapping, whose order is arbitrary, nor ``str`` or
    bytes); ids and brackets may be numpy integers. ``images`` likewise, in
    bracket order: :class:`Image` s or ``(data, mime)`` pairs.

    Tokens up to and including ``vision_start`` stay text; the positions strictly
    between ``vision_start`` and ``vision_end`` become the next image of
    ``images`` with ``known_expanded_len`` = their count; ``vision_end`` and what
    follows is text again. Brackets with nothing between them (a template whose
    image the server expands) give an image of unknown length
    (``known_expanded_len`` 0): the server's count is used once it is appended.

    Raises:
        ValueError: unbalanced brackets, or a different number of images than
            bracket pairs.
        TypeError: ``tokens`` or ``images`` unordered (a set, a mapping) or
            ``tokens`` a string or bytes; an item of ``images`` that is neither an
            :class:`Image` nor a ``(data, mime)`` pair.

    Example::

        >>> png = pathlib.Path("cat.png").read_bytes()
        >>> prompt_to_chunks([1, 258, 260, 260, 259, 2], [(png, "image/png")], 258, 259)
        [Tokens(ids=(1, 258)), Image(..., known_expanded_len=2), Tokens(ids=(259, 2))]
    """
    vision_start = _u32("vision_start", vision_start)
    vision_end = _u32("vision_end", vision_end)
    # As Tokens refuses them: bytes iterate as small ints, a set or a mapping
    # (its keys) in an arbitrary order, images in hash order (PYTHONHASHSEED).
    tokens = _u32_tuple(tokens, "tokens")
    unordered(images, "images", "images")
    if vision_start == vision_end:
        raise ValueError("vision_start and vision_end must differ")
    image_iter = iter(images)
    out: list[Chunk] = []
    text: list[SupportsIndex] = []
    inside = False
    inner = 0
    for tok in tokens:
        if inside:
            if tok == vision_end:
                item = next(image_iter, _NO_IMAGE)
                if item is _NO_IMAGE:
                    raise ValueError("more image brackets in the prompt than images given")
                img = _as_image(item)
                if text:
                    out.append(Tokens(text))
                    text = []
                out.append(attrs.evolve(img, known_expanded_len=inner))
                inside = False
                text.append(tok)
            elif tok == vision_start:
                raise ValueError("nested vision_start inside an image")
            else:
                inner += 1
            continue
        if tok == vision_end:
            raise ValueError("vision_end without a matching vision_start")
        text.append(tok)
        if tok == vision_start:
            inside = True
            inner = 0
    if inside:
        raise ValueError("vision_start without a matching vision_end")
    if next(image_iter, _NO_IMAGE) is not _NO_IMAGE:  # (a None there is one too many)
        raise ValueError("more images given than image brackets in the prompt")
    if text:
        out.append(Tokens(text))
    return out


def walk_chunks(chunks: Sequence[Chunk], committed_len: int) -> int:
    """Index of the first chunk not yet on the server (the seed's walk).

    Sums chunk lengths until the sum equals ``committed_len``.

    Raises:
        SessionDivergence: a chunk of unknown length before ``committed_len``
            (``"unknown_length"``), a chunk straddling it (``"straddle"``), or
            chunks summing to less (``"short"``).
    """
    acc = 0
    for i, chunk in enumerate(chunks):
        if acc == committed_len:
            return i
        n = chunk_len(chunk)
        # Only an image's length can be unknown (0); an empty token run takes 0
        # positions, known (the seed's check took it for unknown: spec §4 wins).
        if n == 0 and not isinstance(chunk, Tokens):
            raise SessionDivergence(
                f"session divergence: chunk {i} has unknown length but precedes "
                f"committed_len {committed_len} (acc={acc})",
                reason="unknown_length",
                chunk_index=i,
                accumulated=acc,
                chunk_len=0,
                committed_len=committed_len,
            )
        if acc + n > committed_len:
            raise SessionDivergence(
                f"session divergence: chunk {i} straddles committed_len "
                f"(acc={acc}, len={n}, committed={committed_len})",
                reason="straddle",
                chunk_index=i,
                accumulated=acc,
                chunk_len=n,
                committed_len=committed_len,
            )
        acc += n
    if acc != committed_len:
        raise SessionDivergence(
            f"session divergence: chunks sum to {acc} but committed_len is {committed_len}",
            reason="short",
            chunk_index=None,
            accumulated=acc,
            chunk_len=0,
            committed_len=committed_len,
        )
    return len(chunks)


def _units(chunks: Iterable[Chunk]) -> Iterable[int | Image]:
    for chunk in chunks:
        if isinstance(chunk, Tokens):
            yield from chunk.ids
        else:
            yield chunk


def common_prefix_len(committed: Sequence[Chunk], chunks: Sequence[Chunk]) -> int:
    """Positions at the start of both chunk lists that hold the same content.

    Tokens compare one by one (a token run may be cut anywhere); an image counts
    only whole, when its bytes and mime are equal, and it takes the committed
    side's length (the server's count, 0 included): the server derives
    an image's placeholder count from its bytes, so the session's record (the
    server's answer) is the truth, and the other side's ``known_expanded_len``
    (0, or a number of the caller's own) is not looked at. The result is always a
    boundary both sides share.
    """
    pos = 0
    for a, b in zip(_units(committed), _units(chunks), strict=False):
        if isinstance(a, int):
            if not isinstance(b, int) or a != b:
                break
            pos += 1
        else:
            if (
                not isinstance(b, Image)
                or a.data != b.data
                or a.mime.lower() != b.mime.lower()  # (MIME types are case-insensitive)
            ):
                break
            pos += a.known_expanded_len
    return pos


@final
@attrs.frozen
class DeltaPlan:
    """What to send for a prompt given the session's state.

    ``offset`` is where sending starts; ``truncating`` is set when that is before
    the session's end (a rewind); ``delta`` are the chunks to send from there.
    """

    offset: int
    truncating: bool
    delta: tuple[Chunk, ...]


def chunks_before(chunks: Sequence[Chunk], pos: int) -> list[Chunk]:
    """The chunks up to position ``pos``, cutting a token run when needed.

    ``pos`` must not fall inside an image (a shared boundary never does).
    """
    acc = 0
    out: list[Chunk] = []
    for chunk in chunks:
        if acc >= pos:
            break
        n = chunk_len(chunk)
        if acc + n > pos:
            if not isinstance(chunk, Tokens):
                raise ValueError(f"position {pos} falls inside an image")
            chunk = Tokens(chunk.ids[: pos - acc])
        out.append(chunk)
        acc += n
    return out


def _split_at(chunks: Sequence[Chunk], pos: int, history: Sequence[Chunk]) -> tuple[Chunk, ...]:
    """The chunks from position ``pos`` on, cutting a token run when needed.

    ``pos`` is a boundary the chunks share with ``history``
    (:func:`common_prefix_len`): before it, the k-th image of the chunks is the
    k-th image of the history, and takes the history's length, whatever the
    chunk's own ``known_expanded_len`` says.
    """
    held = iter([c.known_expanded_len for c in history if isinstance(c, Image)])
    acc = 0
    out: list[Chunk] = []
    for chunk in chunks:
        if acc >= pos:
            out.append(chunk)
        elif isinstance(chunk, Tokens):
            if acc + len(chunk) > pos:
                out.append(Tokens(chunk.ids[pos - acc :]))
            acc += len(chunk)
        else:
            acc += next(held)
    return tuple(out)


def _describes(history: Sequence[Chunk], committed_len: int) -> bool:
    """Whether ``history`` can be the content of a session of ``committed_len``.

    Its images carry the server's counts, 0 included (an image that took no
    position): taken for "unknown", such an image made every later turn rewind
    to 0 and send the whole prompt again."""
    return sum(chunk_len(c) for c in history) == committed_len


def plan_delta(
    chunks: Sequence[Chunk],
    committed_len: int,
    history: Sequence[Chunk] | None,
    *,
    rewind: bool,
) -> DeltaPlan:
    """Decide what a conversation sends for ``chunks``.

    ``history`` is the content the session holds (the chunks sent plus the tokens
    decoded), or ``None`` when unknown. Without history, or with
    ``rewind=False``, this is the seed's length walk (:func:`walk_chunks`),
    which raises :class:`SessionDivergence`; ``rewind=False`` with a history
    also raises when the content before ``committed_len`` differs (reason
    ``"content"``). With ``rewind=True`` and a history, a prompt that differs from
    the session's content rewinds to the last shared boundary.

    Images compare by content; the history's length is the truth (see
    :func:`common_prefix_len`; its images carry the server's counts, 0 included).
    A history that does not add up to ``committed_len`` does not describe the
    session: it is treated as knowing nothing, so a rewind
    starts over from position 0 and ``rewind=False`` raises ``"content"``,
    rather than cutting the delta in the wrong place.
    """
    if history is not None and not _describes(history, committed_len):
        history = []
    if history is None:
        start = walk_chunks(chunks, committed_len)
        return DeltaPlan(committed_len, False, tuple(chunks[start:]))
    shared = min(common_prefix_len(history, chunks), committed_len)
    if not rewind:
        walk_chunks(chunks, committed_len)  # the seed's checks, with its numbers
        if shared < committed_len:
            # The walk passed: the chunks before committed_len have known lengths.
            index, acc = 0, 0
            while acc + chunk_len(chunks[index]) <= shared:
                acc += chunk_len(chunks[index])
                index += 1
            raise SessionDivergence(
                f"session divergence: the prompt differs from the session's content "
                f"at position {shared}, in chunk {index} (committed_len {committed_len})",
                reason="content",
                chunk_index=index,
                accumulated=acc,
                chunk_len=chunk_len(chunks[index]),
                committed_len=committed_len,
            )
    # Cut where the history says, not where the walk by the caller's lengths
    # does: wrong image lengths that cancel out pass the walk at another boundary.
    return DeltaPlan(shared, shared < committed_len, _split_at(chunks, shared, history))
