"""Value types: sampling parameters, wire events, stream events, results.

All are frozen attrs classes. Readout data is a ``memoryview`` of float32
(format ``"f"``) that numpy wraps without copying. The typed way to read it is
``numpy.asarray(ev.readout, dtype=numpy.float32)``: an ``NDArray[numpy.float32]``
to a type checker, where a bare ``numpy.asarray(ev.readout)`` is an array of
``Any``. numpy is not needed to use it: ``ev.readout.tolist()`` gives (nested)
lists of floats at run time, though typeshed types ``memoryview.tolist()`` as
``list[int]`` (a checker sees ints there).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import operator
import struct
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    SupportsFloat,
    SupportsIndex,
    TypeAlias,
    TypeVar,
    cast,
    final,
)

import attrs

__all__ = [
    "keyword_only_from",
    "Done",
    "ImageAppend",
    "ImageAppended",
    "Ranges",
    "ReadoutManifest",
    "SamplingParams",
    "ScoreResult",
    "StreamDone",
    "StreamEvent",
    "Token",
    "TokenOut",
    "TopLogprob",
    "TrainResult",
    "TrainSample",
    "Usage",
    "WireEvent",
]

U32_MAX = 2**32 - 1

# The readouts' type, written ``_memoryview[float]``. An import, not a TypeAlias:
# pyright (Pylance) names an alias in hovers and messages, so users saw the private
# name ``_FloatView | None`` where ``memoryview[float] | None`` is meant.
if TYPE_CHECKING:
    from builtins import memoryview as _memoryview
else:
    # memoryview takes a subscript from 3.12 on: spelled out, ``memoryview[float]``
    # would break typing.get_type_hints (attrs.resolve_types, cattrs, pydantic) on
    # 3.11. At run time this one's subscript is plain memoryview, on every Python.
    class _memoryview:
        def __class_getitem__(cls, item: object) -> type[memoryview]:
            return memoryview


def as_int(name: str, value: object) -> int:
    """``value`` as a plain ``int``: an int, or an integer that is not one by type
    (numpy's ``int64``, an ``IntEnum``) through ``operator.index``.

    ``TypeError`` naming ``name`` for anything else, bools included (numpy's too).
    """
    if type(value) is int:
        return value
    if not isinstance(value, bool) and not _is_odd_numpy(value):
        # Not isinstance(value, SupportsIndex): a Protocol check costs ~8 µs.
        try:
            return operator.index(value)  # type: ignore[arg-type]
        except TypeError:  # no __index__ (a float), or one that refuses (numpy's bool)
            pass
    raise TypeError(f"{name} must be an int, not {type(value).__name__}")


def as_float(name: str, value: object, what: str = "a float") -> float:
    """``value`` as a plain ``float``: an int or float, or anything else that
    ``SupportsFloat`` (numpy's ``float32`` or a 0-d array, a ``Fraction``, a
    ``Decimal``).

    ``TypeError`` ("``name`` must be ``what``") for anything else, bools included
    (numpy's too), numpy times and arrays of more than one value; ``OverflowError``
    from ``float()`` for an int past float's range.
    """
    if type(value) is float:
        return value
    if (
        isinstance(value, bool)
        or not (isinstance(value, numbers.Real) or hasattr(type(value), "__float__"))
        or _is_odd_numpy(value)
    ):
        raise TypeError(f"{name} must be {what}, not {type(value).__name__}")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # an array of more than one value
        raise TypeError(f"{name} must be {what}, not {type(value).__name__}") from None


def _is_odd_numpy(value: object) -> bool:
    # numpy's timedelta64 is an integer to numpy (numbers.Real, and __index__ on
    # some versions), in a unit of its own: a 200 ms timeout would be 200 s. And
    # its bools have __float__.
    return getattr(getattr(value, "dtype", None), "kind", None) in ("m", "M", "b")


def _u32(name: str, value: object) -> int:
    value = as_int(name, value)
    if not 0 <= value <= U32_MAX:
        raise ValueError(f"{name} must be in [0, 2**32), got {value}")
    return value


# One converter per field, so errors name the field (attrs passes the value only);
# converters, not validators, so a numpy integer is stored as a plain int.
def _max_tokens(value: SupportsIndex) -> int:
    return _u32("max_tokens", value)


def _top_k(value: SupportsIndex) -> int:
    return _u32("top_k", value)


def _logprob_top_k(value: SupportsIndex) -> int:
    return _u32("logprob_top_k", value)


def _finite(name: str, value: object) -> float:
    try:
        number = as_float(name, value)
    except OverflowError:  # an int past 1.8e308
        raise ValueError(f"{name} must be finite, got an int too large for a float") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value}")
    return number


def _weight(value: SupportsFloat) -> float:
    return _finite("weight", value)


_F32 = struct.Struct("<f")
_F32_MAX = 3.4028234663852886e38
_F32_TINY = 2.0**-149  # float32's smallest positive (subnormal) value


def _float32(name: str, value: object) -> float:
    """A finite float that a protobuf ``float`` (float32) field can carry.

    Checked with the packing the encoder does, so exactly what would overflow
    there (magnitudes rounding past ``_F32_MAX``) is refused here, by name. Tiny
    magnitudes (below float32's ~1.4e-45) are let through: they round to 0.0 on
    the wire, which is what such a temperature means anyway (``top_p``, whose 0
    means "off", is raised to float32's smallest instead).
    """
    number = _finite(name, value)
    try:
        _F32.pack(number)
    except OverflowError:
        raise ValueError(
            f"{name} must fit in a float32 (magnitude <= {_F32_MAX:.8g}), got {value}"
        ) from None
    return number


# Converters (as for the int fields), so a numpy float is stored as a plain float.
def _temperature(value: SupportsFloat) -> float:
    return _float32("temperature", value)


def _top_p(value: SupportsFloat) -> float:
    top_p = _float32("top_p", value)
    if 0.0 < top_p < _F32_TINY:
        # 0 on the wire switches the filter off (PROTOCOL.md §3): the tightest
        # nucleus asked for would become none. float32's smallest keeps its meaning.
        return _F32_TINY
    return top_p


def check_timeout(name: str, value: SupportsFloat | None) -> float | None:
    """A timeout in seconds (``None`` = none), as a plain float.

    ``TypeError`` naming ``name`` unless a number :func:`as_float` takes (an int or
    float, numpy's ``float32``, a ``Fraction``, a ``Decimal``; bools refused);
    ``ValueError`` if negative, NaN or too large. Use what it returns, not the
    value given: a trio deadline made of a numpy float32 breaks trio's I/O wait.
    """
    if value is None:
        return None
    try:
        seconds = as_float(name, value, "a number of seconds or None")
    except OverflowError:  # an int past float's range (math.inf is the way to say "never")
        if cast(numbers.Real, value) < 0:  # (as_float took it: a real number)
            seconds = -math.inf  # (refused below, as negative)
        else:
            raise ValueError(f"{name} is too large a number of seconds (math.inf: none)") from None
    if not seconds >= 0:  # NaN too
        raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")
    return seconds


def check_int32(name: str, value: SupportsIndex) -> int:
    """An int32 field: ``TypeError`` unless an int (bools rejected), ``ValueError``
    unless it fits."""
    value = as_int(name, value)
    if not -(2**31) <= value < 2**31:
        raise ValueError(f"{name} must fit in an int32, got {value}")
    return value


def unordered(value: object, name: str, what: str) -> None:
    """``TypeError`` for a set or a mapping given where order matters.

    Its order is arbitrary: a set of ids would be a prompt silently scrambled, a
    set of ranges results that come back shuffled.
    """
    if isinstance(value, AbstractSet | Mapping):
        raise TypeError(
            f"{name} must be a sequence of {what}, not {type(value).__name__}: "
            "its order is arbitrary (sort it, or make it a list)"
        )


# Values that iterate as characters or as small ints (bytes): never token ids, a
# range pair or a sequence of chunks, though they are sequences.
BYTES_LIKE: Final = str | bytes | bytearray | memoryview


def _u32_tuple(
    value: Iterable[SupportsIndex], name: str = "tokens", *, ordered: bool = True
) -> tuple[int, ...]:
    """Token ids as a tuple; ``TypeError`` naming ``name`` unless an iterable of ints
    (and, if ``ordered``, not a set).

    An element's error names it, ``tokens[3]``. (Prompts run to 100k ids: plain
    in-range ints take a check-only loop, and the element's name is only made on
    the path of numpy integers and errors.)
    """
    if isinstance(value, BYTES_LIKE):
        kind = "a string" if isinstance(value, str) else type(value).__name__
        raise TypeError(f"{name} must be a sequence of token ids, not {kind}")
    if ordered:
        unordered(value, name, "token ids")
    # A numpy array gives plain ints in one C call (20x faster than its scalars
    # one by one); what it gives is checked below.
    given = type(value).__name__
    value = cast(Iterable[int], _plain(value))
    try:
        ids = tuple(value)
    except TypeError:
        # (Named as given: a 0-d numpy array is an int once plain.)
        zero_d = "a 0-d " if given != type(value).__name__ else ""
        raise TypeError(f"{name} must be a sequence of token ids, not {zero_d}{given}") from None
    for v in ids:
        if type(v) is not int or not 0 <= v <= U32_MAX:
            break
    else:
        return ids
    return tuple(_u32(f"{name}[{i}]", v) for i, v in enumerate(ids))


# One converter per field, so errors name the field (attrs passes the value only).
def _stop_token_ids(value: Iterable[SupportsIndex]) -> tuple[int, ...]:
    return _u32_tuple(value, "stop_token_ids", ordered=False)  # (a set of them is fine)


# A repr shows this many ids at most: a prompt's run can hold 100k of them, and a
# repr lands in tracebacks and logs.
_REPR_IDS: Final = 16


def _ids_repr(ids: tuple[int, ...]) -> str:
    if len(ids) <= _REPR_IDS:
        return repr(ids)
    shown = ", ".join(map(str, ids[:_REPR_IDS]))
    return f"({shown}, ... {len(ids) - _REPR_IDS} more)"


def _tokens(value: Iterable[SupportsIndex]) -> tuple[int, ...]:
    return _u32_tuple(value, "tokens")


@final
@attrs.frozen
class SamplingParams:
    """How to decode. Mirrors the sampling fields of ``GenerateRequest``.

    Args:
        max_tokens: decode budget; 0 appends the prompt and decodes nothing
            (default 256).
        temperature: 0 is greedy (the default).
        top_p: nucleus filter; 0 or 1 switches it off (default 1).
        top_k: 0 switches it off (the default).
        stop_token_ids: decoding stops after emitting one of these (default none).
        logprob_top_k: when > 0, decoded tokens carry the k most likely
            alternatives (default 0).

    Example::

        SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9)
    """

    max_tokens: int = attrs.field(default=256, converter=_max_tokens)
    # float32 on the wire (GenerateRequest): checked to fit before anything is sent.
    temperature: float = attrs.field(default=0.0, converter=_temperature)
    top_p: float = attrs.field(default=1.0, converter=_top_p)
    top_k: int = attrs.field(default=0, converter=_top_k)
    stop_token_ids: tuple[int, ...] = attrs.field(default=(), converter=_stop_token_ids)
    logprob_top_k: int = attrs.field(default=0, converter=_logprob_top_k)

    def __attrs_post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")


@final
@attrs.frozen
class Usage:
    """Token accounting of one generate call (from the wire ``Done``)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def _sequence(name: str, value: object, of: str) -> tuple[object, ...]:
    # A str is iterable, but a manifest of "vowel" is not five concepts.
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of {of}, not {type(value).__name__}")
    # A readout is indexed by this order: a set's (a mapping's keys') changes with
    # PYTHONHASHSEED, and would label the vectors wrongly, silently.
    unordered(value, name, of)
    return tuple(value)


# Typed converters (not a bare ``tuple``, whose TypeVar mypy's attrs plugin
# cannot solve): ``ReadoutManifest(["a"], [0])`` type-checks under --strict.
def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    concepts = _sequence("concepts", value, "str")
    for i, concept in enumerate(concepts):
        if not isinstance(concept, str):
            raise TypeError(f"concepts[{i}] must be a str, not {type(concept).__name__}")
    return cast("tuple[str, ...]", concepts)


def _int_tuple(value: Iterable[SupportsIndex]) -> tuple[int, ...]:
    # Negative indices are fine: -1 can mean the last layer.
    layers = _sequence("layers", value, "int")
    return tuple(as_int(f"layers[{i}]", layer) for i, layer in enumerate(layers))


@final
@attrs.frozen
class ReadoutManifest:
    """Names for the readout vectors: which concepts, read at which layers.

    ``concepts`` is a sequence of str and ``layers`` one of ints (negative ones
    count from the last layer); anything else, a bare str included, is a
    ``TypeError``.
    """

    concepts: tuple[str, ...] = attrs.field(converter=_str_tuple)
    layers: tuple[int, ...] = attrs.field(converter=_int_tuple)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_layers, n_concepts)``: the shape of one token's readout."""
        return (len(self.layers), len(self.concepts))


_E = TypeVar("_E", bound="Token | TokenOut")


def _readout_repr(view: _memoryview[float] | None) -> str:
    # ``<memory at 0x...>`` says nothing; the format and shape are what one checks.
    if view is None:
        return "None"
    try:
        kind = "float32" if view.format == "f" else f"memoryview format {view.format!r}"
        return f"<{kind} {view.shape}>"
    except ValueError:  # released by its owner
        return "<released memoryview>"


def _readout_state(view: _memoryview[float] | None) -> tuple[bytes, str, tuple[int, ...]] | None:
    return None if view is None else (view.tobytes(), view.format, view.shape or ())


def _readout_from_state(
    state: tuple[bytes, str, tuple[int, ...]] | None,
) -> _memoryview[float] | None:
    if state is None:
        return None
    data, fmt, shape = state
    # cast refuses a shape with a zero in it: an empty readout comes back flat.
    # (The format is the view's own, ``"f"`` for every readout poc_api makes.)
    raw = memoryview(data)
    view = raw.cast(fmt, shape) if data else raw.cast(fmt)  # type: ignore[call-overload]
    return cast("_memoryview[float]", view)


def _rebuild_with_readout(
    cls: type[_E], fields: dict[str, Any], state: tuple[bytes, str, tuple[int, ...]] | None
) -> _E:
    return cls(**fields, readout=_readout_from_state(state))


def _reduce_with_readout(self: Token | TokenOut) -> tuple[Any, ...]:
    """``__reduce__`` of the events that carry a readout.

    A memoryview neither pickles nor deep-copies, so events could not go to a
    worker process (``ProcessPoolExecutor``, trio-parallel): the readout goes as
    its bytes, format and shape, and comes back as a read-only view equal to it.
    """
    fields = {a.name: getattr(self, a.name) for a in attrs.fields(type(self))}
    return (_rebuild_with_readout, (type(self), fields, _readout_state(fields.pop("readout"))))


@final
@attrs.frozen
class TopLogprob:
    """One of the most likely tokens at a decoded position."""

    id: int
    logprob: float


@final
@attrs.frozen
class Token:
    """A wire ``Token`` event from ``Session.generate``.

    ``sampled_logprob`` is the token's log-probability for a decoded token, and
    for a prefill one whose position is in ``logprobs_ranges``; it is 0 (the
    wire's default) for a prefill token sent only for its readout (a position in
    ``readout_ranges`` alone) and at position 0 (no prefix). Sum only those asked
    for: ``score`` does.

    ``readout`` is a float32 ``memoryview`` or ``None`` when not requested
    (``readout_ranges`` on ``Session.generate``): flat (``n_layers * n_concepts``,
    layer-major, as on the wire), or 2-D ``(n_layers, n_concepts)`` when
    ``readout_shape`` on ``Session.generate`` asked for it (a vector of another
    length then comes as ``None``, with a warning). A flat one shapes without a
    copy: ``numpy.asarray(ev.readout, dtype=numpy.float32).reshape(manifest.shape)``
    (without numpy, ``mv.cast("B").cast("f", (n_layers, n_concepts))``).

    Tokens compare by value, readouts included; the hash leaves the readout out
    (a float memoryview has none). They pickle and deep-copy (to a worker
    process, say): the readout comes back as an equal read-only view of the same
    format and shape. The repr shows a readout's shape, ``<float32 (24,)>``.
    """

    id: int
    position: int
    is_prefill: bool
    sampled_logprob: float
    top_logprobs: tuple[TopLogprob, ...] = ()
    readout: _memoryview[float] | None = attrs.field(default=None, hash=False, repr=_readout_repr)
    """The float32 readout, flat or shaped as ``readout_shape`` asked, or ``None``.

    Typed: ``numpy.asarray(ev.readout, dtype=numpy.float32)``, an
    ``NDArray[numpy.float32]`` over the same memory. ``ev.readout.tolist()`` gives
    floats at run time, though typeshed types it ``list[int]``.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle and copy support: the readout goes as its bytes, format and shape."""
        return _reduce_with_readout(self)


@final
@attrs.frozen
class Done:
    """The wire ``Done`` event: last event of every generate call."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    finish_reason: str

    @property
    def usage(self) -> Usage:
        """The token accounting as a :class:`Usage`."""
        return Usage(self.prompt_tokens, self.completion_tokens, self.total_tokens)


WireEvent: TypeAlias = Token | Done
"""An event of ``Session.generate``'s stream: a :class:`Token` per prompt position
asked for and per decoded token, then one :class:`Done`."""


@final
@attrs.frozen
class ImageAppend:
    """Result of ``Session.append_image``."""

    placeholder_count: int
    total_length: int


@final
@attrs.frozen
class TokenOut:
    """A decoded token from ``Conversation.stream``.

    ``readout`` is a 2-D float32 ``memoryview`` shaped ``(n_layers, n_concepts)``
    when a ``readout_shape`` was given and the server sent a vector of that size:
    ``numpy.asarray(ev.readout, dtype=numpy.float32)`` wraps it without a copy,
    typed ``NDArray[numpy.float32]``.
    ``top_logprobs`` holds the ``logprob_top_k`` most likely tokens when the
    stream's sampling asked for them. Compared by value, pickled and copied like
    :class:`Token`.
    """

    id: int
    readout: _memoryview[float] | None = attrs.field(default=None, hash=False, repr=_readout_repr)
    """The float32 readout shaped ``(n_layers, n_concepts)``, or ``None``.

    Typed: ``numpy.asarray(ev.readout, dtype=numpy.float32)``, an
    ``NDArray[numpy.float32]`` over the same memory. ``ev.readout.tolist()`` gives
    lists of floats at run time, though typeshed types it ``list[int]``.
    """
    logprob: float = 0.0
    position: int = 0
    top_logprobs: tuple[TopLogprob, ...] = ()

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle and copy support: the readout goes as its bytes, format and shape."""
        return _reduce_with_readout(self)


@final
@attrs.frozen
class ImageAppended:
    """An image of the prompt was appended to the session during a stream."""

    placeholder_count: int


@final
@attrs.frozen
class StreamDone:
    """The stream finished; ``usage`` is the final ``Done``'s accounting."""

    usage: Usage
    finish_reason: str = ""


StreamEvent: TypeAlias = TokenOut | ImageAppended | StreamDone
"""An event of ``Conversation.stream``: an :class:`ImageAppended` per image sent,
a :class:`TokenOut` per decoded token, then one :class:`StreamDone`."""


@final
@attrs.frozen
class ScoreResult:
    """Summed log-probability of positions ``[start, end)`` of a scored prompt.

    ``token_count`` is how many log-probabilities the sum holds: the range's text
    positions but position 0 (which has no prefix to be predicted from) and an
    image's placeholders (which have none). ``logprob / token_count`` is the mean
    per token (``end - start`` is not, for a range over an image or from 0).
    Not compared by ``==`` (a result built by hand leaves it 0).
    """

    start: int
    end: int
    logprob: float
    token_count: int = attrs.field(default=0, kw_only=True, eq=False)


def _plain(value: object) -> object:
    # A numpy array (or array.array) as plain Python lists and ints, in one C call.
    if isinstance(value, list | tuple):
        return value
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else value


def _plain_iterable(value: object, must: str) -> Iterable[object]:
    """``_plain(value)``, refused with ``TypeError("{must}, not a 0-d ...")`` when
    not iterable: a 0-d numpy array's is a scalar ("'int' object is not
    iterable" named neither the argument nor the array)."""
    plain = _plain(value)
    if not isinstance(plain, Iterable):
        raise TypeError(f"{must}, not a 0-d {type(value).__name__}")
    return plain


Ranges: TypeAlias = Iterable[Sequence[SupportsIndex]]
"""Half-open ``(start, end)`` position pairs, as ``score``, ``generate``'s
``logprobs_ranges``/``readout_ranges`` and ``TrainSample`` take them.

Tuples or lists of ints (numpy's integers too), ``range(start, end)`` objects (a
range of step 1 is the range of its positions), or a 2-D numpy array (whose rows
are ``Any`` to a type checker, not sequences). Bytes-like pairs are refused.
"""


def check_ranges(
    value: Ranges, name: str = "ranges", *, allow_empty: bool = False, ordered: bool = True
) -> list[tuple[int, int]]:
    """``(start, end)`` position pairs: ints in uint32, ``start < end`` (``<=`` with
    ``allow_empty``), any order; a set of them only if not ``ordered`` (results
    come back in the ranges' order).

    A 2-D numpy array of pairs works as a list of them. Errors name ``name``.
    """
    # (A mapping iterates its keys: pairs as keys passed, their values dropped.)
    if isinstance(value, BYTES_LIKE | Mapping) or not isinstance(value, Iterable):
        raise TypeError(
            f"{name} must be a sequence of (start, end) pairs, not {type(value).__name__}"
        )
    if ordered:
        unordered(value, name, "(start, end) pairs")
    out = []
    for r in _plain_iterable(value, f"{name} must be a sequence of (start, end) pairs"):
        if isinstance(r, range) and r.step == 1:
            # The range of its positions (not the pair of its two elements).
            r = (r.start, r.stop)
        elif not isinstance(r, BYTES_LIKE | range):
            r = _plain(r)
        if isinstance(r, BYTES_LIKE | range) or not isinstance(r, Sequence) or len(r) != 2:
            raise TypeError(f"{name} must hold (start, end) pairs, got {r!r}")
        start, end = _u32(f"{name} start", r[0]), _u32(f"{name} end", r[1])
        if start > end or (start == end and not allow_empty):
            want = "start <= end" if allow_empty else "start < end"
            raise ValueError(f"{name} must have {want}, got [{start}, {end})")
        out.append((start, end))
    return out


def _ranges(value: Ranges) -> tuple[tuple[int, int], ...]:
    return tuple(check_ranges(value, "target_ranges", ordered=False))


@final
@attrs.frozen
class TrainSample:
    """One training sample for ``ApiClient.train``: tokens and the ranges to learn.

    ``tokens`` must not be empty; each target range ``(start, end)`` has
    ``0 <= start < end <= len(tokens)`` (``ValueError`` otherwise, when made).
    """

    tokens: tuple[int, ...] = attrs.field(converter=_tokens, repr=_ids_repr)
    target_ranges: tuple[tuple[int, int], ...] = attrs.field(converter=_ranges)
    weight: float = attrs.field(default=1.0, converter=_weight)

    def __attrs_post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("a TrainSample needs at least one token (tokens is empty)")
        for start, end in self.target_ranges:
            if end > len(self.tokens):
                raise ValueError(
                    f"target range [{start}, {end}) exceeds the sample's {len(self.tokens)} tokens"
                )


@final
@attrs.frozen
class TrainResult:
    """Answer of ``POST /train``."""

    accepted: int
    job_id: str


_F = TypeVar("_F", bound=Callable[..., Any])


def sampling_in_params(fn: _F) -> _F:
    """Say where a ``SamplingParams`` field given to ``fn`` as its own keyword goes
    (``stream(chunks, max_tokens=3)``): Python's own error named only the keyword."""
    params = inspect.signature(fn).parameters
    fields = frozenset(a.name for a in attrs.fields(SamplingParams))

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for key in kwargs:
            if key not in params and key in fields:
                raise TypeError(
                    f"{fn.__qualname__}() got an unexpected keyword argument {key!r}: "
                    f"pass sampling=SamplingParams({key}=...)"
                )
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def keyword_only_from(position: int, names: tuple[str, ...]) -> Callable[[_F], _F]:
    """Accept, for one release and with a ``DeprecationWarning``, arguments that
    became keyword-only: those passed positionally past ``position`` (``self``
    not counted) are handed on as the keywords ``names``."""

    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(self: object, *args: Any, **kwargs: Any) -> Any:
            extra = args[position:]
            if extra:
                if len(extra) > len(names):
                    raise TypeError(
                        f"{fn.__qualname__}() takes at most {position} positional arguments"
                    )
                given = names[: len(extra)]
                warnings.warn(
                    f"{fn.__qualname__}(): pass {', '.join(given)} by keyword; "
                    "positional use is deprecated and will be removed",
                    DeprecationWarning,
                    stacklevel=2,
                )
                for name, value in zip(given, extra, strict=True):
                    if name in kwargs:
                        raise TypeError(f"{fn.__qualname__}() got multiple values for {name!r}")
                    kwargs[name] = value
                args = args[:position]
            return fn(self, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
