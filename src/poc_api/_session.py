"""Sessions: one server-side KV cache, driven position by position.

The trio counterpart of the seed's ``SessionHandle``: ``OpenSession`` on entry,
``prefill`` / ``append_image`` / ``generate`` while open, ``CloseSession`` on
exit — always, shielded, bounded by a short timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, NoReturn, SupportsFloat, SupportsIndex, final

import trio

from . import _errors as e
from ._chunks import Chunk, check_image_mime, check_image_sizes, image_bytes
from ._clock import FairSlice
from ._transport import StreamCall, _Progress, map_grpc_error
from ._types import (
    U32_MAX,
    Done,
    ImageAppend,
    Ranges,
    SamplingParams,
    Token,
    WireEvent,
    _u32,
    _u32_tuple,
    as_int,
    check_int32,
    check_ranges,
    check_timeout,
    sampling_in_params,
)
from ._wire import (
    decode_append_image,
    decode_generate_event,
    decode_open_session,
    encode_append_image_request,
    encode_generate_request,
    encode_string_field,
)

if TYPE_CHECKING:
    from ._bridge import AsyncioBridge, BatchReceiver
    from ._pool import Router, SessionRoute
    from ._transport import GrpcTransport

__all__ = [
    "GenerateStream",
    "ReadoutMismatch",
    "ReadoutShaper",
    "Session",
    "check_readout_shape",
    "close_live_sessions",
    "open_session",
    "reshape_readout",
]

log = logging.getLogger("poc_api.grpc")

# A wait for the trailers after Done shorter than this, cut by the call's own
# timeout, is no grounds for a warning: trailers follow Done at once, but not
# within a window a scheduler hiccup can eat.
_BLAME_AFTER = 0.1


def _short(exc: BaseException, limit: int = 200) -> str:
    """``str(exc)`` on one line, at most ``limit`` characters (for another message)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _block_exited() -> trio.ClosedResourceError:
    """What reading a stream's events gets once its block has been left."""
    return trio.ClosedResourceError(
        "this stream's block has exited: iterate its events inside the block"
    )


def _closed_under(session: Session) -> trio.ClosedResourceError:
    """What a call gets when its session is closed by another task while it runs."""
    if session._closed_by_client or session._transport.closed:
        return e.closed_under_call()
    return trio.ClosedResourceError(
        f"session {session._session_id} was closed while this call was running"
    )


class _Timeouts:
    """Deadlines of one generate stream, in trio time."""

    __slots__ = ("between", "first_token", "first_token_from", "last_event", "started", "total_at")

    def __init__(
        self, total: float | None, first_token: float | None, between: float | None
    ) -> None:
        now = trio.current_time()
        self.started: float = now
        self.last_event: float = now
        self.first_token_from: float = now
        self.total_at: float = now + total if total is not None else math.inf
        self.first_token: float | None = first_token
        self.between: float | None = between


def reshape_readout(flat: memoryview[float], shape: tuple[int, int]) -> memoryview[float] | None:
    """View a flat float32 readout as ``(n_layers, n_concepts)``, without copying.

    Returns ``None`` when the vector's length is not ``n_layers * n_concepts``
    (the caller warns, as the seed does).
    """
    n_layers, n_concepts = shape
    if len(flat) != n_layers * n_concepts:
        return None
    if flat.c_contiguous:
        return flat.cast("B").cast("f", shape)
    return memoryview(array("f", flat).tobytes()).cast("f", shape)  # pragma: no cover


def check_readout_shape(
    shape: object, known: tuple[int, int] | None = None
) -> tuple[int, int] | None:
    """A ``readout_shape`` argument checked: ``None``, or positive ``(n_layers,
    n_concepts)`` that is the readout manifest's when that is ``known``."""
    if shape is None:
        return None
    if not isinstance(shape, tuple | list) or len(shape) != 2:
        raise TypeError(f"readout_shape must be (n_layers, n_concepts), got {shape!r}")
    n_layers, n_concepts = as_int("n_layers", shape[0]), as_int("n_concepts", shape[1])
    if n_layers <= 0 or n_concepts <= 0:
        raise ValueError(f"readout_shape must be positive, got {shape!r}")
    if known is not None and (n_layers, n_concepts) != known:
        # A wrong count would drop every readout (with a warning); a swapped
        # shape would reshape them wrongly without a word.
        raise ValueError(
            f"readout_shape {(n_layers, n_concepts)} is not the server's readout "
            f"manifest's (n_layers, n_concepts) = {known}"
        )
    return (n_layers, n_concepts)


#: Told that a stream asking for readouts shaped ``(n_layers, n_concepts)`` got
#: one of another length (``HttpApi.readout_mismatch``).
ReadoutMismatch = Callable[[tuple[int, int], int], None]


@final
class ReadoutShaper:
    """The readouts of one stream, shaped ``(n_layers, n_concepts)``; a vector of
    another length is dropped with a warning, as the seed does: once per stream
    (and a count at its end), not once per token. Each names the session and its
    server; of the streams that find a mismatch, one a minute per endpoint says so
    at WARNING, the rest at DEBUG (a stale shape given to every turn would make a
    warning of every turn)."""

    __slots__ = ("_level", "_mismatches", "_on_mismatch", "_session", "shape")

    def __init__(
        self,
        shape: tuple[int, int],
        on_mismatch: ReadoutMismatch | None = None,
        session: Session | None = None,
    ) -> None:
        self.shape: tuple[int, int] = shape
        self._mismatches = 0
        self._on_mismatch = on_mismatch  # the client's manifest cache may be stale
        self._session = session
        self._level = logging.WARNING

    def _where(self) -> str:
        session = self._session
        if session is None:
            return "a stream"
        return f"session {session.session_id} (on {session._transport.url})"

    def shaped(self, flat: memoryview[float]) -> memoryview[float] | None:
        readout = reshape_readout(flat, self.shape)
        if readout is None:
            self._mismatches += 1
            if self._mismatches == 1:
                if self._on_mismatch is not None:
                    self._on_mismatch(self.shape, len(flat))
                session = self._session
                warn = session is None or session._transport.warn_now("readout")
                self._level = logging.WARNING if warn else logging.DEBUG
                n_layers, n_concepts = self.shape
                log.log(
                    self._level,
                    "%s: readout shape mismatch: expected %d*%d=%d, got %d; dropped "
                    "(readout=None)%s",
                    self._where(),
                    n_layers,
                    n_concepts,
                    n_layers * n_concepts,
                    len(flat),
                    " (more this minute from its server are logged at DEBUG)" if warn else "",
                )
        return readout

    def done(self) -> None:
        if self._mismatches > 1:
            log.log(
                self._level,
                "%s: %d readouts of this stream were dropped (length)",
                self._where(),
                self._mismatches,
            )


@final
class GenerateStream:
    """The events of one ``Generate`` call: :class:`Token`\\ s, then one :class:`Done`.

    Iterate it with ``async for``. Each step is a cancellation point; events
    already received come out without a trip through trio's scheduler, except
    that one is taken at least every millisecond (so a consumer slower than the
    server, always finding events buffered, does not starve other tasks or
    overrun its deadlines). A session closed by another task while this stream
    runs (:meth:`Session.aclose`) ends it with ``trio.ClosedResourceError``, as
    a trio stream closed under its reader.
    """

    def __init__(
        self,
        rx: BatchReceiver[bytes],
        session: Session,
        method_started: float,
        timeouts: _Timeouts | None = None,
        shaper: ReadoutShaper | None = None,
        server_ended: Callable[[], bool] = lambda: False,
        prompt_end: int | None = None,
    ) -> None:
        self._rx = rx
        self._prompt_end = prompt_end  # offset + appended: the Done's prompt_tokens
        self._server_ended = server_ended  # the server ended the call (all of it is here)
        self._shaper = shaper  # readout_shape=: Token readouts shaped 2-D
        self._timeouts = timeouts
        self._session = session
        self._batch: list[bytes] = []
        self._i = 0
        self._finished = False
        self._started = method_started
        self._first_decode = False
        self._received = False
        self._exited = False  # its block has exited: no more waiting for events
        self._drained = False  # _drain ran: its grace is spent, even if it gave up
        self._fair = FairSlice()  # when this stream last let others run
        self._run = trio.lowlevel.current_trio_token()  # the block's (see __anext__)
        self._reader_closed = False  # aclose() was called
        self._raised: e.PocApiError | None = None  # the last error the call raised
        self.done: Done | None = None
        """The ``Done`` event once it has arrived."""

    def __repr__(self) -> str:
        # Cheap and never raising: it lands in logs and tracebacks.
        if self.done is not None:
            state = f"done finish_reason={self.done.finish_reason!r}"
        elif self._exited:
            state = "left before Done"
        elif self._finished:
            state = "ended without Done"
        else:
            state = "streaming"
        return f"<GenerateStream session {self._session.session_id} {state}>"

    def __aiter__(self) -> GenerateStream:
        return self

    def _left_early(self) -> None:
        """The block is being left before Done: a task reading the events (another
        task's) is told so, not that the stream ended without Done (the reset that
        ends it is the client's own)."""
        if self.done is None and not self._rx.interrupted:
            self._rx.interrupt(_block_exited)

    async def aclose(self) -> None:
        """Stop reading (idempotent; what ``contextlib.aclosing`` calls).

        Later iteration raises ``trio.ClosedResourceError``, also in a task waiting
        for an event now. The call itself ends as when the block is left early:
        the block's exit resets it, unless its ``Done`` had already arrived.
        """
        self._check_run()  # (its reader's wake-up must come from the block's run)
        self._reader_closed = True
        if self.done is None:
            self._rx.interrupt(e.stream_closed)
        await trio.lowlevel.checkpoint()

    def _check_run(self) -> None:
        """``RuntimeError`` unless called from the block's trio run (per event:
        the token compared first, about 0.1 µs)."""
        if trio.lowlevel.current_trio_token() is not self._run:
            e.check_run(self._run)

    async def __anext__(self) -> WireEvent:
        # A cancellation point on every event (0.3 µs), as trio's own receive is:
        # a cancelled scope stops the loop at once, not after the buffered batch.
        # The scheduling half of a checkpoint (a few µs) comes with each wait for a
        # batch, and at least every FAIR_SLICE: a slow consumer always finds
        # events buffered, and would otherwise hold trio's only thread for as long
        # as the server keeps ahead (other tasks, and deadlines, wait meanwhile).
        await trio.lowlevel.checkpoint_if_cancelled()
        # Every event, not once per batch: a reader of another run took the rest
        # of the batch (and the Done) from the block's own reader, unrefused.
        self._check_run()
        if self._fair.due():
            await trio.lowlevel.cancel_shielded_checkpoint()
        if self._reader_closed:
            raise e.stream_closed()
        if self.done is None and self._session._closed and not self._exited:
            raise _closed_under(self._session)
        while True:
            if self.done is not None:
                # Done is last: only the end of the stream may follow (bounded wait).
                if self._i < len(self._batch):
                    raise e.ProtocolViolation("Generate: the server sent events after Done")
                await self._drain()
                raise StopAsyncIteration
            if self._i < len(self._batch):
                raw = self._batch[self._i]
                self._i += 1
                ev = decode_generate_event(raw)
                if ev is None:
                    continue
                if type(ev) is Token:
                    if not ev.is_prefill and not self._first_decode:
                        self._first_decode = True
                        log.debug(
                            "session %s first decode token at %.1f ms",
                            self._session.session_id,
                            (time.perf_counter() - self._started) * 1e3,
                        )
                    if ev.readout is not None and self._shaper is not None:
                        ev = Token(
                            ev.id,
                            ev.position,
                            ev.is_prefill,
                            ev.sampled_logprob,
                            ev.top_logprobs,
                            self._shaper.shaped(ev.readout),
                        )
                    return ev
                assert isinstance(ev, Done)
                self._on_done(ev)
                if self._shaper is not None:
                    self._shaper.done()
                return ev
            if self._finished:
                raise StopAsyncIteration
            if self._exited:
                raise _block_exited()
            try:
                if self._timeouts is None:
                    self._batch = await self._rx.receive_batch()
                else:
                    self._batch = await self._receive_with_timeouts(self._timeouts)
            except e.PocApiError as exc:
                self._raised = exc  # the call's own failure (its block's exit looks)
                raise
            self._i = 0
            self._received = self._received or bool(self._batch)
            if not self._batch:
                self._finished = True
                if self.done is None:
                    raise e.ProtocolViolation("Generate: the stream ended without a Done event")

    def _call_ended(self) -> bool:
        """The call has ended: all that is left of it is in memory, and reading it
        never waits. (The server's end, not only the buffer's: a full buffer holds
        the rest back, in memory already, until the reader takes what it has.)"""
        return self._rx.ended or self._server_ended()

    async def _receive_with_timeouts(self, t: _Timeouts) -> list[bytes]:
        limit, what = t.total_at, "total"
        if trio.current_time() >= limit:
            if self._call_ended():
                # The call ended in time, and what is buffered is the rest of it
                # (its Done too): a timeout cuts only a read that would wait.
                return await self._rx.receive_batch()
            # Out of time, though events keep coming: a consumer slower than the
            # server always finds a batch ready, so the wait below never ends late.
            return self._timed_out(t, what)
        if not self._first_decode and self.done is None:
            if t.first_token is not None and t.first_token_from + t.first_token < limit:
                limit, what = t.first_token_from + t.first_token, "first-token"
        elif t.between is not None and t.last_event + t.between < limit:
            limit, what = t.last_event + t.between, "between-tokens"
        # Not move_on_at: a @contextmanager, which a Ctrl-C can tear (this frame
        # is not KI-protected: it runs per event).
        with trio.CancelScope(deadline=limit):
            batch = await self._rx.receive_batch()
            t.last_event = trio.current_time()
            return batch
        if self._call_ended():
            # The call ended as the time ran out (its end came while this task
            # waited to run: a busy trio thread): the rest is buffered, nothing
            # would wait. A prefill raised the timeout though it had taken effect.
            return await self._rx.receive_batch()
        if what != "total" and not self._rx.interrupted and self._rx.ready:
            # Events came as the first-token or between-tokens time ran out (this
            # task woke late: a busy trio thread): the read would not wait, and the
            # stream is alive.
            if trio.current_time() >= t.total_at:
                # Past the total bound too: that one cuts the call (it is the bound
                # that ran out with events ready), and is the one the error names.
                return self._timed_out(t, "total")
            batch = self._rx.receive_nowait()
            t.last_event = trio.current_time()
            return batch
        return self._timed_out(t, what)

    def _timed_out(self, t: _Timeouts, what: str) -> NoReturn:
        # The bound that passed, not the time measured: a loaded machine wakes
        # this task late, and "after 0.632 s" for a 0.5 s timeout reads as a bug.
        if what == "total":
            bound = t.total_at - t.started
        elif what == "first-token":
            bound = t.first_token or 0.0
        else:
            bound = t.between or 0.0
        raise e.PocApiTimeout(
            f"Generate: {what} timeout after {bound:.3g} s (session {self._session.session_id})"
        )

    def _on_done(self, done: Done) -> None:
        # Called only while no Done has come: a second one is among the
        # "events after Done" that _drain and __anext__ refuse.
        end = self._prompt_end
        if end is not None and (
            done.prompt_tokens != end
            or done.total_tokens != done.prompt_tokens + done.completion_tokens
        ):
            # Spec §3: prompt_tokens is the length before decoding (offset +
            # appended), total_tokens the length after. Taken as committed_len,
            # another total would send the next call to the wrong offset.
            raise e.ProtocolViolation(
                f"Generate: Done says prompt={done.prompt_tokens} completion="
                f"{done.completion_tokens} total={done.total_tokens}, but the call "
                f"appended up to position {end}"
            )
        self.done = done
        self._session._committed_len = done.total_tokens
        log.debug(
            "session %s Done: prompt=%d completion=%d total=%d reason=%r elapsed=%.1f ms",
            self._session.session_id,
            done.prompt_tokens,
            done.completion_tokens,
            done.total_tokens,
            done.finish_reason,
            (time.perf_counter() - self._started) * 1e3,
        )

    def _done_if_buffered(self) -> None:
        """Left early: if ``Done`` already arrived (unread), the call did finish."""
        pending = self._batch[self._i :] + self._rx.receive_nowait()
        self._batch, self._i = [], 0
        for i, raw in enumerate(pending):
            ev = decode_generate_event(raw)
            if isinstance(ev, Done):
                self._on_done(ev)
                self._batch = pending[i + 1 :]  # for _drain: only the end may follow
                return

    async def _receive_after_done(self) -> bool:
        """The next batch into ``_batch``; False if the stream failed (the call stands)."""
        try:
            self._batch = await self._rx.receive_batch()
        except (e.TransportError, e.RpcError) as exc:
            # Done told the session's state (and the session outlives a
            # connection): the call succeeded, whatever ended its stream (a lost
            # connection, a reset, an error status), as when a server stalls after
            # Done. Raising would invite a retry that appends the tokens twice. (A
            # malformed end, ProtocolViolation, is still raised: the server is
            # broken.)
            log.warning(
                "session %s: the stream failed after Done (%s: %s); the call completed",
                self._session.session_id,
                type(exc).__name__,
                exc,
            )
            self._finished = True
            return False
        return True

    async def _read_end(self) -> None:
        """After ``Done``: read the end of the stream (what ``_drain`` bounds)."""
        while not self._finished:
            # (A helper, not a try here: CPython 3.11 leaves a try's first line
            # outside the with's exception table, and the Ctrl-C injection test
            # stops there.)
            if not await self._receive_after_done():
                return
            self._i = len(self._batch)
            if not self._batch:
                self._finished = True
            else:
                raise e.ProtocolViolation("Generate: the server sent events after Done")

    async def _drain(self) -> None:
        """After ``Done``, read to the end so the stream finishes cleanly.

        Bounded: by the call's own ``timeout`` if it has one, and in any case by
        a grace of ``close_timeout`` seconds. A server that sent ``Done`` and
        then no trailers has its stream reset when the block exits; the session
        is kept, since ``Done`` told its state. Runs once: the iteration and the
        block's exit both call it, and the grace must not be given twice.
        """
        if self._drained:
            return
        self._drained = True
        if self._i < len(self._batch):
            # Events that came with Done, unread (the body stopped at Done): as
            # those that come later, a broken server (they were dropped silently).
            raise e.ProtocolViolation("Generate: the server sent events after Done")
        if self._rx.interrupted:
            return  # the session was closed under it: the block's exit resets the stream
        now = trio.current_time()
        limit = now + self._session._close_timeout
        if self._timeouts is not None:
            limit = min(limit, self._timeouts.total_at)
        with trio.CancelScope(deadline=limit) as scope:
            await self._read_end()
        if scope.cancelled_caught and self._call_ended():
            # The end came as the time ran out (this task woke late: a busy trio
            # thread): it is buffered, nothing would wait. Not the server's fault.
            await self._read_end()
            return
        if scope.cancelled_caught:
            if limit <= now:
                # The block went on past the call's timeout before it left: no
                # wait was given, and the server is not to blame for the reset.
                log.debug(
                    "session %s: the call's timeout had passed when the block left after "
                    "Done; resetting the stream",
                    self._session.session_id,
                )
                return
            by_timeout = limit < now + self._session._close_timeout
            if by_timeout and limit - now < _BLAME_AFTER:
                log.debug(
                    "session %s: no end of stream within the %.3g s of Done left by the "
                    "call's timeout (too short to blame the server); resetting the stream",
                    self._session.session_id,
                    limit - now,
                )
                return
            # One a minute per endpoint: a stalled server makes one per stream.
            warn = self._session._transport.warn_now("drain")
            log.log(
                logging.WARNING if warn else logging.DEBUG,
                "session %s: no end of stream within %.3g s of Done%s; resetting the stream%s",
                self._session.session_id,
                limit - now,
                " (the call's timeout)" if by_timeout else "",
                " (more such within a minute are logged at DEBUG)" if warn else "",
            )


@final
class Session:
    """An open inference session. Get one from ``ApiClient.session()``.

    Attributes mirror the server: ``session_id``, ``committed_len`` (positions the
    session holds) and ``max_length`` (its context window, 0 if not reported).
    Calls on one session are serialised; a call made while this task holds the
    session (inside its own ``generate`` block) raises ``RuntimeError``.
    """

    def __init__(
        self,
        transport: GrpcTransport | SessionRoute,
        session_id: str,
        max_length: int,
        *,
        max_buffered_events: int,
        close_timeout: float = 5.0,
        known_shape: Callable[[], tuple[int, int] | None] = lambda: None,
        readout_mismatch: ReadoutMismatch | None = None,
    ) -> None:
        self._transport = transport
        self._close_timeout = close_timeout
        self._known_shape = known_shape  # the readout manifest's, once fetched
        self._readout_mismatch = readout_mismatch
        self._session_id = session_id
        self._max_length = max_length
        self._committed_len = 0
        self._lock = trio.Lock()
        self._lost = False
        self._lost_why = ""  # what made it lost, for SessionLost's message
        self._closed = False
        self._closed_by_client = False  # CloseSession sent by the client's close
        self._max_buffered = max_buffered_events
        # Ends the call holding the session, when the session is closed under it.
        self._interrupt: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return (
            f"<Session {self._session_id} committed_len={self._committed_len} "
            f"max_length={self._max_length}{' lost' if self._lost else ''}"
            f"{' closed' if self._closed else ''}>"
        )

    @property
    def session_id(self) -> str:
        """The server's id for this session."""
        return self._session_id

    @property
    def committed_len(self) -> int:
        """Positions the session holds on the server, as of the last finished call."""
        return self._committed_len

    @property
    def max_length(self) -> int:
        """The context window in positions; 0 when the server did not say."""
        return self._max_length

    @property
    def lost(self) -> bool:
        """True after a call that did not finish (cancelled, timed out, failed
        part-way) or that found the session gone from the server: the server-side
        state is unknown, and later calls raise :class:`SessionLost` saying why."""
        return self._lost

    def _mark_lost(self, cause: BaseException | None, *, own: bool = True) -> None:
        """The session's state is unknown now, after ``cause`` (see ``lost``).

        ``own``: ``cause`` is the call's own outcome, not the exception of the
        block around it (a generate block left part-way by its body's error).
        """
        if self._lost:
            return
        self._lost = True
        if isinstance(cause, e.SessionNotFound):
            why = f"the server does not know it ({_short(cause)})"
        elif isinstance(cause, trio.Cancelled):
            why = "a call on it was cancelled before it finished"
        elif isinstance(cause, KeyboardInterrupt):
            why = "a call on it was interrupted (Ctrl-C) before it finished"
        elif cause is None or not own:
            left = "" if cause is None else f" by {type(cause).__name__}"
            why = f"a generate block on it was left{left} before its Done"
        else:
            why = f"a call on it did not finish: {type(cause).__name__}: {_short(cause)}"
        self._lost_why = why

    def _busy_check(self) -> None:
        # Before the session's lock: a task of another trio.run waiting for it
        # would be handed it by this run's release (an internal error in trio
        # there, and the session held for ever).
        self._transport.check_run()
        # trio.Lock would say "attempt to re-acquire an already held Lock".
        if self._lock.locked() and self._lock.statistics().owner is trio.lowlevel.current_task():
            raise RuntimeError(
                f"session {self._session_id} is busy in this task (inside its own "
                "generate block): finish or leave that block first"
            )

    def _check_images(self, chunks: Sequence[Chunk], name: str = "chunks") -> None:
        """``LimitExceeded`` for an image whose ``AppendImage`` here would be too
        large: with this session's id (a call that made the session checked without
        it, before its OpenSession), at an offset within its context window. For
        such calls, before their first send."""
        check_image_sizes(
            chunks,
            self._transport.max_message_size,
            name,
            self._session_id,
            self._max_length or U32_MAX,
        )

    def _check_usable(self) -> None:
        if self._transport.closed or self._closed_by_client:
            raise trio.ClosedResourceError("the ApiClient is closed")
        if self._closed:
            raise trio.ClosedResourceError("the session is closed")
        if self._lost:
            raise e.SessionLost(
                f"session {self._session_id} is lost: {self._lost_why}; its state on the "
                "server is unknown: open a new session"
            )

    async def prefill(
        self,
        tokens: Iterable[SupportsIndex],
        *,
        timeout: SupportsFloat | None = None,
        priority: SupportsIndex = 0,
        rewind_to: SupportsIndex | None = None,
    ) -> Done:
        """Append tokens without decoding (``Generate`` with ``max_tokens = 0``).

        Returns the ``Done`` event. A checkpoint; cancelling it (or ``timeout``
        seconds passing, :class:`PocApiTimeout`) once its request is sent marks the
        session lost. Before that (waiting for another task's call on the session)
        the session stays as it was, and the timeout is ``retriable``.
        ``priority`` and ``rewind_to`` as for :meth:`generate`.
        """
        async with self.generate(
            tokens,
            sampling=SamplingParams(max_tokens=0),
            timeout=timeout,
            priority=priority,
            rewind_to=rewind_to,
        ) as events:
            async for _ in events:
                pass
        assert events.done is not None
        return events.done

    async def rewind(
        self,
        length: SupportsIndex,
        *,
        timeout: SupportsFloat | None = None,
        priority: SupportsIndex = 0,
    ) -> Done:
        """Drop every position ``>= length`` (``Generate`` with ``truncating = true``).

        ``length`` is an int in ``[0, committed_len]``: ``TypeError`` /
        ``ValueError`` (naming ``length``) before anything is sent otherwise.
        ``priority`` as for :meth:`generate`.
        """
        # None too, at once: to the generate block it would mean "no rewind". The
        # end of the session is checked once the call holds it.
        length = _u32("length", length)
        total = check_timeout("timeout", timeout)
        prio = check_int32("priority", priority)
        timeouts = _Timeouts(total, None, None) if total is not None else None
        block = _GenerateBlock(
            self, (), SamplingParams(max_tokens=0), [], [], prio, length, timeouts, "length"
        )
        async with block as ev:
            async for _ in ev:
                pass
        assert ev.done is not None
        return ev.done

    # Protected: a Ctrl-C between taking the session and the try that gives it
    # back would leave the session taken (it comes at the next checkpoint instead).
    @trio.lowlevel.enable_ki_protection
    async def append_image(
        self,
        data: bytes | bytearray | memoryview,
        mime: str,
        *,
        rewind_to: SupportsIndex | None = None,
        timeout: SupportsFloat | None = None,
    ) -> ImageAppend:
        """Append an encoded image; the server writes its placeholder positions.

        Args:
            data: encoded image bytes (PNG, JPEG, GIF, WebP): ``bytes``, a
                ``bytearray`` or a ``memoryview`` (copied before sending).
            mime: its type, e.g. ``"image/png"``.
            rewind_to: append at this offset instead, dropping the positions after it.
            timeout: seconds before :class:`PocApiTimeout` (the session is then
                lost, unless the time ran out while another task's call held the
                session: nothing was sent then).
        """
        image = image_bytes(data)  # checked (and copied) as the Image chunk's
        check_image_mime(mime)  # as the Image chunk does: the server decodes images only
        # A plain float: a numpy float32 would make a float32 trio deadline, which
        # trio's I/O wait refuses ("timeout must be an integer or None").
        seconds = check_timeout("timeout", timeout)
        if rewind_to is not None:
            rewind_to = _u32("rewind_to", rewind_to)
        self._busy_check()
        now = trio.current_time()
        deadline_at = now + (math.inf if seconds is None else seconds)
        await self._take(deadline_at, "AppendImage", now)
        try:
            self._check_usable()
            # The offset once the session is ours: a call that held it may have
            # moved its end (the server would refuse a stale one).
            offset, truncating = self._offset(rewind_to)
            request = encode_append_image_request(
                session_id=self._session_id,
                image=image,
                mime=mime,
                offset=offset,
                truncating=truncating,
            )
            left = None if seconds is None else max(0.0, deadline_at - trio.current_time())
            # A client-side refusal sends nothing: the session stays as it was.
            self._transport.check_sendable("AppendImage", request)
            progress = _Progress()  # (whether its request was written)
            with trio.CancelScope() as closing:  # cancelled by aclose() from another task
                self._interrupt = closing.cancel
                try:
                    raw = await self._transport.unary(
                        "AppendImage", request, timeout=left, abortable=True, progress=progress
                    )
                except _REJECTED:
                    raise  # rejected before anything was appended
                except e.PocApiError as exc:
                    if not exc.retriable:  # (retriable: the server never processed it)
                        self._mark_lost(exc)
                    raise
                except BaseException as exc:
                    # Cancelled (or Ctrl-C) before its request was written, as while it
                    # waited for a stream of the connection, or between two attempts
                    # (the last one never processed): the server never saw it.
                    if not progress.unsent():
                        self._mark_lost(exc)
                    raise
                finally:
                    self._interrupt = None
            if closing.cancelled_caught:
                raise _closed_under(self)
            try:
                count, total = decode_append_image(raw)
                if total != offset + count:
                    # Spec §2: N positions appended at `offset`, total_length the
                    # length after. Another total does not describe the session:
                    # taken as committed_len, every later call would go to the
                    # wrong offset (OffsetMismatch, with the session kept).
                    raise e.ProtocolViolation(
                        f"AppendImage: the server appended {count} positions at offset "
                        f"{offset} but says the session now has {total}"
                    )
            except e.ProtocolViolation as exc:
                # The server answered OK: it may have appended the image, and the
                # session's length is unknown (later calls would miss its offset).
                self._mark_lost(exc)
                raise
            log.debug("AppendImage: N=%d total_length=%d", count, total)
            self._committed_len = total
            return ImageAppend(count, total)
        finally:
            self._lock.release()

    async def _take(self, deadline_at: float, method: str, since: float) -> None:
        """Wait for the session (another task's call may hold it) until ``deadline_at``.

        Running out raises :class:`PocApiTimeout` with nothing sent: the session
        is left as it is. The caller releases ``_lock``.
        """
        if deadline_at == math.inf:
            await self._lock.acquire()
            return
        held = self._lock.locked()  # another task's call: the message says so
        with trio.CancelScope(deadline=deadline_at) as waiting:
            await self._lock.acquire()
        late = not waiting.cancelled_caught and trio.current_time() >= deadline_at
        if late:
            # Handed the session only as the time ran out (this task ran late):
            # sent now, the call would time out at once, a race with the loop
            # thread deciding whether the server saw it (the session then lost).
            self._lock.release()
        if waiting.cancelled_caught or late:
            bound = deadline_at - since  # the bound set, not the wait (the wake may come late)
            if held or self._lock.locked():
                where = f"waiting for session {self._session_id}, which another call holds"
            else:  # (a timeout of 0, or one that ran out in this checkpoint)
                where = f"before its request was sent (session {self._session_id})"
            raise e.PocApiTimeout(
                f"{method}: timeout after {bound:.3g} s {where}; nothing was sent",
                retriable=True,
            )

    def _offset(self, rewind_to: SupportsIndex | None, name: str = "rewind_to") -> tuple[int, bool]:
        if rewind_to is None:
            return self._committed_len, False
        rewind_to = _u32(name, rewind_to)
        if rewind_to > self._committed_len:
            raise ValueError(
                f"{name}={rewind_to} is past the session's end ({self._committed_len})"
            )
        return rewind_to, True

    @sampling_in_params
    def generate(
        self,
        tokens: Iterable[SupportsIndex] = (),
        *,
        sampling: SamplingParams | None = None,
        logprobs_ranges: Ranges = (),
        readout_ranges: Ranges = (),
        priority: SupportsIndex = 0,
        rewind_to: SupportsIndex | None = None,
        timeout: SupportsFloat | None = None,
        first_token_timeout: SupportsFloat | None = None,
        token_timeout: SupportsFloat | None = None,
        readout_shape: tuple[SupportsIndex, SupportsIndex] | None = None,
    ) -> AbstractAsyncContextManager[GenerateStream]:
        """Append ``tokens``, decode, and stream the wire events.

        ``sampling`` sets the decode (``max_tokens=0``: prefill only, as
        :meth:`prefill`). ``logprobs_ranges`` and ``readout_ranges`` are
        half-open ``(start, end)`` positions: each appended position in one comes
        as a prefill ``Token`` with its logprob, or its readout (positions of
        earlier calls are not sent again); decoded tokens always come, with their
        logprob, and their readout inside a readout range. ``priority`` (int32,
        higher first) only orders work on a busy server. ``rewind_to`` appends at
        that offset instead of the session's end, dropping the positions after it.

        Timeouts (seconds, all off by default; each raises :class:`PocApiTimeout`
        from the iteration and marks the session lost): ``timeout`` bounds the
        whole call, ``first_token_timeout`` the wait for the first decoded token
        (or ``Done``), ``token_timeout`` each wait between events after that. A
        healthy stream is never cut by a timeout you did not set, nor a call whose
        stream had ended in time by your own slow reading of its events (a timeout
        raises from a read that would still wait: not when the call's end came
        as it ran out, while the trio thread was busy elsewhere). Waiting for the
        session while another task's call holds it counts against ``timeout``
        only; running out there raises on entry, with nothing sent and the
        session intact.

        Readouts come flat (``n_layers * n_concepts`` floats, layer-major, as on
        the wire); with ``readout_shape=(n_layers, n_concepts)`` (the readout
        manifest's ``shape``) each ``Token.readout`` is that 2-D view instead, as
        ``Conversation.stream`` gives, and a vector of another length is dropped
        with a warning. A shape that is not the manifest's, once the client has
        fetched it, is a ``ValueError``.

        The RPC runs while the block is open. Leaving the block before the
        ``Done`` event — by ``break``, an exception or cancellation — resets the
        HTTP/2 stream (CANCEL), the server stops, and the session is marked
        :attr:`lost`. Arguments are checked before anything is sent, the context
        window too: an append past ``max_length`` raises :class:`ContextOverflow`
        (``grpc_status`` ``None``) and leaves the session as it was.

        Example::

            async with s.generate([1, 2], sampling=SamplingParams(max_tokens=8)) as events:
                async for ev in events:
                    if isinstance(ev, poc_api.Token) and not ev.is_prefill:
                        print(ev.id, ev.sampled_logprob)
        """
        ids = _u32_tuple(tokens, "tokens")
        sampling = SamplingParams() if sampling is None else sampling
        if not isinstance(sampling, SamplingParams):
            raise TypeError("sampling must be a SamplingParams")
        lp = check_ranges(logprobs_ranges, "logprobs_ranges")
        ro = check_ranges(readout_ranges, "readout_ranges")
        prio = check_int32("priority", priority)
        timeouts = None
        total = check_timeout("timeout", timeout)
        first = check_timeout("first_token_timeout", first_token_timeout)
        between = check_timeout("token_timeout", token_timeout)
        if total is not None or first is not None or between is not None:
            timeouts = _Timeouts(total, first, between)
        shape = check_readout_shape(readout_shape, self._known_shape())
        return _GenerateBlock(self, ids, sampling, lp, ro, prio, rewind_to, timeouts, shape=shape)

    @trio.lowlevel.enable_ki_protection
    async def aclose(self) -> None:
        """Send ``CloseSession`` (idempotent), shielded from cancellation.

        Bounded by the client's ``close_timeout``; a close cut by a lost connection
        (or never sent) goes once more, on a new one. A failure is logged, not raised,
        because the server frees idle sessions by itself. Of the sessions lost with
        a server that cannot be reached (``ServerUnavailable``), only the first is
        logged at WARNING until the client reaches that server again; the rest at
        DEBUG. A close that timed out or could not reach the server is sent again in
        the background until it gets through (for up to 10 minutes, and once more as
        the client closes). A call of another task running on the session meanwhile ends with
        ``trio.ClosedResourceError`` (its stream is reset when its block exits), as
        do calls waiting for the session.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        # Before it counts as closed: another trio.run's CloseSession would fail
        # (logged only), and the block's own close, finding it closed, send none.
        self._transport.check_run()
        self._closed = True
        if self._interrupt is not None:
            self._interrupt()
        if self._transport.closed:
            log.warning(
                "session %s outlived its ApiClient; the server frees it when idle",
                self._session_id,
            )
            await trio.lowlevel.checkpoint()
            return
        timeout = self._close_timeout
        transport = self._transport
        with trio.CancelScope(relative_deadline=timeout, shield=True) as scope:
            req = encode_string_field(self._session_id)  # CloseSessionRequest
            for attempt in (1, 2):
                try:
                    await transport.unary("CloseSession", req, cleanup=True)
                    log.debug("session %s closed", self._session_id)
                    break
                except Exception as exc:
                    # A close cut by its connection (or never sent) goes once more,
                    # on a new one: closing twice is harmless (spec: an unknown or
                    # closed session's close succeeds), a session left is not
                    # (its KV cache stays until the server evicts it when idle).
                    lost = isinstance(map_grpc_error(exc, "CloseSession"), e.ServerUnavailable)
                    if attempt == 1 and lost and not transport.closed:
                        log.debug("session %s: its close failed (%s); again", self._session_id, exc)
                        continue
                    _log_close_failure(transport, self._session_id, exc)
                    if lost and not transport.closed:
                        transport.close_later(self._session_id, timed_out=False)
                    break  # (refused, or its second try: not sent again here)
        if not scope.cancelled_caught:
            return
        # A server stalled past close_timeout (a GC pause, a busy host): the session
        # would stay there until its idle eviction. Sent again in the background
        # until it gets through (not in the client's close). One warning per outage.
        if transport.closed or not transport.close_later(self._session_id, timed_out=True):
            log.warning("CloseSession %s timed out after %.1f s", self._session_id, timeout)
        elif transport.first_loss_of_outage():
            log.warning(
                "CloseSession %s timed out after %.1f s; it is sent again in the "
                "background until %s answers (further sessions whose close times "
                "out are logged at DEBUG until then)",
                self._session_id,
                timeout,
                transport.url,
            )
        else:
            log.debug("CloseSession %s timed out after %.1f s", self._session_id, timeout)


def check_window(session: Session, end: int) -> None:
    """ContextOverflow, before anything is sent, for a call that would take
    ``session`` to ``end`` positions, past its context window (the server would
    refuse it with OUT_OF_RANGE, after what came before it was sent)."""
    if session.max_length and end > session.max_length:
        raise e.ContextOverflow(
            f"the prompt takes {end} positions, past the context window of "
            f"{session.max_length} (refused before sending)"
        )


@final
class open_session(e.NeedsAsyncWith):  # used like the function it replaced
    """Open a session for the block; close it on exit, whatever happens.

    A class rather than an ``@asynccontextmanager``: its enter and exit are
    protected from Ctrl-C as a whole, so a ``KeyboardInterrupt`` cannot land
    between the server making the session and the block owning it (contextlib's
    own frames would be unprotected).
    """

    def _usage(self) -> str:
        return "client.session()"

    def __init__(
        self,
        transport: Router,
        model: str,
        *,
        max_buffered_events: int,
        close_timeout: float,
        timeout: SupportsFloat | None = None,
        known_shape: Callable[[], tuple[int, int] | None] = lambda: None,
        readout_mismatch: ReadoutMismatch | None = None,
    ) -> None:
        self._timeout = check_timeout("timeout", timeout)
        self._transport = transport
        self._model = model
        self._max_buffered = max_buffered_events
        self._close_timeout = close_timeout
        self._known_shape = known_shape
        self._readout_mismatch = readout_mismatch
        self._session: Session | None = None
        self._entering = False  # its entry waits (another task's is refused)

    @trio.lowlevel.enable_ki_protection
    async def __aenter__(self) -> Session:
        if self._session is not None or self._entering:
            raise RuntimeError("this session block was already entered")
        self._entering = True
        try:
            return await self._enter()
        finally:
            self._entering = False

    async def _enter(self) -> Session:
        """The entry's work (KI-protected as ``__aenter__``)."""
        live = self._transport.live_sessions
        if live.closing:  # past the client's own check, before its close began
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("the ApiClient is closed")
        # In a pool, each session gets its own route (endpoint + affinity key).
        transport = self._transport.bind_session()
        log.debug("opening new session (model=%r)", self._model)

        async def close_orphan(
            reply: bytes, owner: GrpcTransport, metadata: tuple[tuple[str, str], ...]
        ) -> None:
            # asyncio side: the server made the session, and the caller never got
            # it (it gave up on OpenSession, or the call failed after the answer
            # came): close it instead of leaking it until eviction. ``owner`` is
            # the transport the OpenSession went by (in a pool, the route may
            # already point at the next attempt's endpoint).
            sid, _ = decode_open_session(reply)
            if not sid:
                return
            log.debug("closing session %s, which its OpenSession caller never got", sid)
            try:
                await owner.unary_in_loop(
                    "CloseSession",
                    encode_string_field(sid),  # CloseSessionRequest
                    extra_metadata=metadata,
                )
            except asyncio.CancelledError:
                # Cut by reap_timeout (a stalled server), or by the client's close
                # (then not queued): sent again later, as a session's own close is.
                owner._queue_close(sid, True, metadata)
                raise
            except Exception as exc:
                mapped = map_grpc_error(exc, "CloseSession")
                if isinstance(mapped, e.SessionNotFound):
                    # A failed call's reply need not mean the session was kept.
                    log.debug("session %s, of a failed OpenSession, was not found", sid)
                else:
                    _log_close_failure(owner, sid, exc, " (its OpenSession's caller never got it)")
                    if isinstance(mapped, e.ServerUnavailable):
                        owner._queue_close(sid, False, metadata)

        live.in_flight += 1
        try:
            raw = await transport.unary(
                "OpenSession",
                encode_string_field(self._model),  # OpenSessionRequest
                timeout=self._timeout,
                orphan=close_orphan,
                # The client's close waits for it only once it may have reached the server.
                abort_unsent=True,
            )
        finally:
            live.in_flight -= 1
            live.changed()
        session_id, max_length = decode_open_session(raw)
        if not session_id:
            raise e.ProtocolViolation("OpenSession: the server sent an empty session id")
        session = self._session = Session(
            transport,
            session_id,
            max_length,
            max_buffered_events=self._max_buffered,
            close_timeout=self._close_timeout,
            known_shape=self._known_shape,
            readout_mismatch=self._readout_mismatch,
        )
        log.debug("session %s opened (max_length=%d)", session_id, max_length)
        live.held.add(session)  # the client's close closes it too
        if live.closing:
            # The client began closing while this session opened: that close
            # closes it with the others; the block does not start.
            self._session = None
            raise e.closed_under_call()
        transport.open_sessions += 1  # keepalive watches the connection between turns
        return session

    @trio.lowlevel.enable_ki_protection
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            live = self._transport.live_sessions
            live.held.discard(self._session)
            live.in_flight += 1  # the client's close waits for this CloseSession
            try:
                await self._session.aclose()
            finally:
                live.in_flight -= 1
                live.changed()
                # The session's own transport: in a pool, its endpoint's.
                self._session._transport.open_sessions -= 1


# Raised by a Generate that the server refused before any event: nothing was appended.
_REJECTED = (e.InvalidRequest, e.OffsetMismatch, e.ContextOverflow)


@final
class _GenerateBlock(e.NeedsAsyncWith):
    """The block of :meth:`Session.generate`.

    A class, not an ``@asynccontextmanager``: trio frees every async generator
    through a weakref callback, where CPython drops a Ctrl-C
    (python/cpython#95959), and scoring runs one block per chunk.
    """

    __slots__ = (
        "_entering",
        "_ids",
        "_lp",
        "_priority",
        "_rewind_name",
        "_rewind_to",
        "_ro",
        "_rpc",
        "_sampling",
        "_session",
        "_shape",
        "_stream",
        "_timeouts",
    )

    def _usage(self) -> str:
        return "session.generate(...)"

    def __init__(
        self,
        session: Session,
        ids: tuple[int, ...],
        sampling: SamplingParams,
        lp: list[tuple[int, int]],
        ro: list[tuple[int, int]],
        priority: int,
        rewind_to: SupportsIndex | None,
        timeouts: _Timeouts | None,
        rewind_name: str = "rewind_to",
        shape: tuple[int, int] | None = None,
    ) -> None:
        self._session = session
        self._shape = shape
        self._rewind_name = rewind_name  # the caller's parameter, for errors
        self._ids = ids
        self._sampling = sampling
        self._lp = lp
        self._ro = ro
        self._priority = priority
        self._rewind_to = rewind_to
        self._timeouts = timeouts
        self._rpc: StreamCall | None = None
        self._stream: GenerateStream | None = None
        self._entering = False  # its entry waits (another task's is refused)

    @trio.lowlevel.enable_ki_protection
    async def __aenter__(self) -> GenerateStream:
        if self._rpc is not None or self._entering:
            raise RuntimeError("a generate block can be entered only once")
        self._entering = True
        try:
            return await self._enter()
        finally:
            self._entering = False

    async def _enter(self) -> GenerateStream:
        """The entry's work (KI-protected as ``__aenter__``)."""
        s = self._session
        s._busy_check()
        timeouts = self._timeouts
        if timeouts is None:
            await s._lock.acquire()
        else:
            # Waiting for the session counts against the total timeout only.
            await s._take(timeouts.total_at, "Generate", timeouts.started)
            # The first-token and between-tokens clocks start with the call itself.
            timeouts.last_event = timeouts.first_token_from = trio.current_time()
        try:
            first = None if timeouts is None else timeouts.first_token
            if first is not None and first <= 0:
                # A bound no answer can meet (0, or a conversation's first token due
                # already): nothing is sent, as for a timeout of 0. Sent, whether
                # the request went out before its first read timed out was a race
                # with the loop thread (the session lost, or not).
                raise e.PocApiTimeout(
                    f"Generate: first-token timeout after {first:.3g} s "
                    f"before its request was sent (session {s._session_id}); nothing was sent",
                    retriable=True,
                )
            return await self._start(s)
        except BaseException:
            s._lock.release()
            raise

    async def _start(self, s: Session) -> GenerateStream:
        s._check_usable()
        ids, sampling = self._ids, self._sampling
        offset, truncating = s._offset(self._rewind_to, self._rewind_name)
        if offset + len(ids) > U32_MAX:
            raise ValueError("the prompt does not fit in uint32 positions")
        # The server would refuse it (OUT_OF_RANGE): say so without a round trip.
        check_window(s, offset + len(ids))
        req = encode_generate_request(
            session_id=s._session_id,
            append_tokens=ids,
            offset=offset,
            truncating=truncating,
            max_tokens=sampling.max_tokens,
            logprobs_ranges=self._lp,
            logprob_top_k=sampling.logprob_top_k,
            readout_ranges=self._ro,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            stop_token_ids=sampling.stop_token_ids,
            priority=self._priority,
        )
        log.debug(
            "session %s Generate: offset=%d append=%d max_tokens=%d priority=%d",
            s._session_id,
            offset,
            len(ids),
            sampling.max_tokens,
            self._priority,
        )
        started = time.perf_counter()
        rpc = s._transport.server_stream("Generate", req, max_items=s._max_buffered)
        self._rpc = rpc
        # What fails here (a client-side limit, a closed client) failed before
        # anything was sent: the session is untouched and stays usable.
        rx = await rpc.__aenter__()
        shaper = None if self._shape is None else ReadoutShaper(self._shape, s._readout_mismatch, s)
        stream = self._stream = GenerateStream(
            rx, s, started, self._timeouts, shaper, lambda: rpc.server_ended, offset + len(ids)
        )

        def interrupt() -> None:
            # Not once Done is in: the call is over, only its trailers are due.
            if stream.done is None:
                rx.interrupt(lambda: _closed_under(s))

        s._interrupt = interrupt
        return stream

    @trio.lowlevel.enable_ki_protection
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        s, stream, rpc = self._session, self._stream, self._rpc
        assert stream is not None and rpc is not None, "exited a block never entered"
        out = exc  # what leaves the block: the body's exception, or one raised here
        s._interrupt = None
        try:
            if exc is None:
                try:
                    if stream.done is None:
                        stream._done_if_buffered()
                    if stream.done is not None:
                        await stream._drain()
                except BaseException as err:
                    out = err
                    stream._left_early()
                    await rpc.__aexit__(type(err), err, err.__traceback__)
                    raise
                stream._left_early()
                await rpc.__aexit__(None, None, None)
            else:
                if stream.done is None:
                    # Left by an exception after Done arrived unread: the call did
                    # finish, and the session is kept, as when left by ``break``.
                    try:
                        stream._done_if_buffered()
                    except e.PocApiError:
                        pass  # a malformed event among them: the body's exception leaves
                stream._left_early()
                await rpc.__aexit__(exc_type, exc, tb)
        except BaseException as err:
            out = err
            raise
        finally:
            stream._exited = True
            own = out is not None and out is stream._raised
            if own and isinstance(out, e.PocApiTimeout) and not rpc.sent:
                # Its time ran out while it waited for a stream of the connection
                # (or for the connection): the request never reached the server.
                out.retriable = True
            # Refused before any event (or not processed at all, as a retriable
            # error says): nothing was appended, the session is intact.
            # The call's own error only: one the body raised (another call's) says
            # nothing of what this call did.
            rejected = (
                own and not stream._received and (isinstance(out, _REJECTED) or out.retriable)  # type: ignore[union-attr]
            )
            # Nothing was written (cancelled while it waited for a stream of the
            # connection, or for the connection): the server never saw the call,
            # whatever ended it, as a timeout there says (retriable).
            unsent = not rpc.sent and not stream._received
            if not rejected and not unsent and stream.done is None:
                s._mark_lost(out, own=own)
            s._lock.release()


async def close_live_sessions(owner: Router, bridge: AsyncioBridge, timeout: float) -> None:
    """Close the sessions that blocks still hold when their client closes (trio side).

    A client closed from another task (a supervisor shutting down, say) would
    otherwise leave these on the server until its idle eviction. One
    ``CloseSession`` each, all at once; an ``OpenSession`` still in flight is
    waited for and its session closed too (one whose request never went out
    ends at once: ``abort_calls``), as is a block's own ``CloseSession``.
    All of it within ``timeout``; a failure is logged (as by ``Session.aclose``).
    The blocks, when they leave, find their session closed and say nothing. The
    caller shields this (``ApiClient.aclose``).
    """
    live = owner.live_sessions
    live.closing = True
    unsettled: set[Session] = set()  # their CloseSession has not ended (yet)
    with trio.CancelScope(relative_deadline=timeout):
        while True:
            sending = list(live.held)
            live.held.clear()
            if sending:
                for session in sending:
                    # Before anything is sent: a block leaving meanwhile sends nothing.
                    session._closed = session._closed_by_client = True
                log.debug("closing %d sessions still held by blocks", len(sending))
                unsettled.update(sending)
                await bridge.run(_close_all, sending, unsettled, defer_ki=True)
            elif live.in_flight:
                await live.wait_changed()
            else:
                return
    log.warning(
        "%d sessions (and %d opening or closing) were not closed within close_timeout=%g s "
        "of the client's close; the server frees them when idle",
        len(unsettled) + len(live.held),
        live.in_flight,
        timeout,
    )


async def _close_all(sessions: list[Session], unsettled: set[Session] | None = None) -> None:
    """asyncio: ``CloseSession`` for each of ``sessions``, at once; failures are logged.

    Each session whose ``CloseSession`` succeeded leaves ``unsettled``: what is
    left when this is cancelled is what the close did not close.
    """
    calls = {
        asyncio.ensure_future(_close_in_loop(s._transport, s._session_id)): s for s in sessions
    }
    try:
        await asyncio.wait(calls)
    finally:  # cancelled: the client's close_timeout ran out
        for task, s in calls.items():
            closed = task.done() and not task.cancelled() and task.exception() is None
            if closed and unsettled is not None:
                unsettled.discard(s)
            task.cancel()
    for task, s in calls.items():
        if task.cancelled():  # the loop is closing under it
            log.warning("CloseSession %s (client closing) was cancelled", s._session_id)
        elif (exc := task.exception()) is not None:
            _log_close_failure(s._transport, s._session_id, exc, " (client closing)")
        else:
            log.debug("session %s closed with its client", s._session_id)


def _log_close_failure(
    transport: GrpcTransport | SessionRoute, session_id: str, exc: BaseException, when: str = ""
) -> None:
    """Log a failed ``CloseSession`` (either thread): at WARNING, except that of the
    sessions lost because their endpoint cannot be reached (``ServerUnavailable``)
    only the first is, until a connection to it is made again; the rest go to DEBUG.
    """
    if isinstance(map_grpc_error(exc, "CloseSession"), e.ServerUnavailable):
        if transport.first_loss_of_outage():
            log.warning(
                "CloseSession %s%s failed: %s (further sessions lost with %s are logged "
                "at DEBUG until it is reached again; the server frees them when idle)",
                session_id,
                when,
                exc,
                transport.url,
            )
        else:
            log.debug("CloseSession %s%s failed: %s", session_id, when, exc)
        return
    log.warning("CloseSession %s%s failed: %s", session_id, when, exc)


async def _close_in_loop(transport: GrpcTransport | SessionRoute, session_id: str) -> None:
    """asyncio: ``CloseSession`` for one session, on its own route."""
    await transport.unary_in_loop(
        "CloseSession",
        encode_string_field(session_id),  # CloseSessionRequest
    )
