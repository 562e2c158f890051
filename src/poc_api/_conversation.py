"""Conversations: a reusable session slot that sends only what changed.

The trio counterpart of the seed's ``session_lock`` + ``stream_session_mm`` +
``run_session_generate``. Each :meth:`Conversation.stream` walks the prompt's
chunks against what the session already holds, sends the delta (text runs
merged, a prefill flush before each image, images appended in order), and
streams the decoded tokens. On success the session is kept for the next call; on
any error or cancellation once the call has its turn and before its
:class:`StreamDone` was read (a timeout while another task's turn runs leaves it
alone) it is closed and forgotten, and the next call opens a new one and sends
the whole prompt again. The block's own exception after ``StreamDone`` keeps it.

Divergence (the prompt no longer matches the session): by default the
conversation *rewinds* — it keeps the longest prefix the prompt shares with
what the session holds (token by token; images whole) and truncates the rest
server-side with ``truncating = true``, logging a line on ``poc_api.grpc``.
``rewind=False`` gives the seed's behaviour: :class:`SessionDivergence` with the
numbers, raised before anything is sent.

An image takes the positions the server gives it: the session's history records
each appended image's ``placeholder_count``, never the caller's
``known_expanded_len`` (a disagreeing one is logged as a warning), so the next
turn's delta is cut where the session really ends.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, SupportsFloat, SupportsIndex, final

import attrs
import trio

from ._chunks import (
    Chunk,
    Tokens,
    check_chunks,
    check_image_sizes,
    chunks_before,
    plan_delta,
    text_len,
)
from ._errors import (
    NeedsAsyncWith,
    PocApiError,
    PocApiTimeout,
    ServerUnavailable,
    SessionNotFound,
    stream_closed,
)
from ._session import (
    GenerateStream,
    ReadoutMismatch,
    ReadoutShaper,
    Session,
    check_readout_shape,
    check_window,
    open_session,
)
from ._types import (
    U32_MAX,
    Done,
    ImageAppended,
    SamplingParams,
    StreamDone,
    StreamEvent,
    Token,
    TokenOut,
    check_int32,
    check_timeout,
    keyword_only_from,
    sampling_in_params,
)

if TYPE_CHECKING:
    from ._pool import Router

__all__ = ["Conversation", "ConversationStream"]

log = logging.getLogger("poc_api.grpc")


def _remaining(deadline_at: float) -> float | None:
    """Seconds left until a trio deadline (``None`` for no deadline)."""
    if math.isinf(deadline_at):
        return None
    return max(0.0, deadline_at - trio.current_time())


@final
class ConversationStream:
    """Events of one :meth:`Conversation.stream`: :class:`ImageAppended` for each
    image sent, :class:`TokenOut` for each decoded token, then :class:`StreamDone`.
    """

    def __init__(
        self,
        prefix: list[StreamEvent],
        events: GenerateStream,
        readout_shape: tuple[int, int] | None,
        readout_mismatch: ReadoutMismatch | None = None,
    ) -> None:
        self._prefix = prefix
        self._events = events
        self._shaper = (
            None
            if readout_shape is None
            else ReadoutShaper(readout_shape, readout_mismatch, events._session)
        )
        self._lookahead: Token | Done | None = None
        self._done_delivered = False  # the caller has seen the StreamDone
        # The stream itself raised (a PocApiError): the turn failed, whatever the
        # block then did with it (the drop is logged with this error).
        self._failed: PocApiError | None = None
        self._closed = False  # aclose() was called
        self.decoded: list[int] = []
        """Ids of the tokens decoded so far."""

    def __repr__(self) -> str:
        # Cheap and never raising: it lands in logs and tracebacks.
        if self._done_delivered:
            state = "done"
        elif self._events._exited:
            state = "left before StreamDone"
        else:
            state = "streaming"
        return (
            f"<ConversationStream session {self._events._session.session_id} "
            f"decoded={len(self.decoded)} {state}>"
        )

    def __aiter__(self) -> ConversationStream:
        return self

    async def _prime(self) -> None:
        """Wait for the first wire event, so a vanished session shows up before
        the caller sees anything (and the stream can be retried on a new one)."""
        async for ev in self._events:
            if type(ev) is Token and ev.is_prefill:
                continue
            self._lookahead = ev
            return

    def _convert(self, ev: Token | Done) -> StreamEvent:
        if type(ev) is Token:
            readout = None
            if ev.readout is not None and self._shaper is not None:
                readout = self._shaper.shaped(ev.readout)
            self.decoded.append(ev.id)
            return TokenOut(ev.id, readout, ev.sampled_logprob, ev.position, ev.top_logprobs)
        assert isinstance(ev, Done)
        self._done_delivered = True
        if self._shaper is not None:
            self._shaper.done()
        return StreamDone(ev.usage, ev.finish_reason)

    async def aclose(self) -> None:
        """Stop reading (idempotent; what ``contextlib.aclosing`` calls): later
        iteration raises ``trio.ClosedResourceError``; the turn ends as when its
        block is left early."""
        self._check_run()  # before it counts as closed
        self._closed = True
        await self._events.aclose()

    def _check_run(self) -> None:
        # From another trio.run: the image events and the first token (read ahead)
        # were handed over unrefused, and a close closed the owner's stream.
        self._events._check_run()

    async def __anext__(self) -> StreamEvent:
        await trio.lowlevel.checkpoint_if_cancelled()  # as GenerateStream's
        self._check_run()
        if self._closed:
            raise stream_closed()
        if self._prefix:
            return self._prefix.pop(0)
        if self._lookahead is not None:
            ev, self._lookahead = self._lookahead, None
            return self._convert(ev)
        try:
            async for ev in self._events:
                if type(ev) is Token and ev.is_prefill:
                    continue
                return self._convert(ev)
        except PocApiError as exc:
            # After StreamDone too (events after Done: a broken server): the
            # turn failed, and its session is not kept.
            self._failed = exc
            raise
        raise StopAsyncIteration


@final
class Conversation:
    """A session slot reused across turns. Get one from ``ApiClient.conversation()``.

    Streams on one conversation are serialised: a second :meth:`stream` waits
    for the first block to exit (within its ``timeout``, if it has one).
    """

    def __init__(
        self,
        transport: Router,
        model: str,
        *,
        rewind: bool,
        max_buffered_events: int,
        close_timeout: float,
        known_shape: Callable[[], tuple[int, int] | None] = lambda: None,
        readout_mismatch: ReadoutMismatch | None = None,
    ) -> None:
        self._transport = transport
        self._model = model
        self._rewind = rewind
        self._known_shape = known_shape  # the readout manifest's, once fetched
        self._readout_mismatch = readout_mismatch
        self._max_buffered = max_buffered_events
        self._close_timeout = close_timeout
        self._lock = trio.Lock()
        self._stack: AsyncExitStack | None = None
        self._session: Session | None = None
        self._history: list[Chunk] = []
        self._closed = False
        # The last turn's start was refused, too long, before it sent anything (_start).
        self._untouched = False
        # The current turn has had a request answered (its OpenSession, a rewind, a
        # prefill, an image): what it failed with was not all it did (_Turn).
        self._turn_sent = False
        # The turn's Generate is open, its timeouts counted from the turn's start.
        self._generate_timed = False

    def __repr__(self) -> str:
        # Cheap and never raising: it lands in logs and tracebacks.
        session = self._session
        held = (
            "no session"
            if session is None
            else f"session {session.session_id} committed_len={session.committed_len}"
        )
        busy = " streaming" if self._lock.locked() else ""
        closed = " closed" if self._closed else ""
        return f"<Conversation {held} rewind={self._rewind}{busy}{closed}>"

    @property
    def session(self) -> Session | None:
        """The session currently held, or ``None`` between a failure and the next stream."""
        return self._session

    @property
    def committed_len(self) -> int:
        """Positions the held session has on the server (0 when none is held)."""
        return 0 if self._session is None else self._session.committed_len

    # Protected from Ctrl-C: an opened session must reach self._stack to be closed.
    @trio.lowlevel.enable_ki_protection
    async def _open(self, timeout: float | None = None) -> Session:
        stack = AsyncExitStack()
        try:
            session = await stack.enter_async_context(
                open_session(
                    self._transport,
                    self._model,
                    max_buffered_events=self._max_buffered,
                    close_timeout=self._close_timeout,
                    timeout=timeout,
                )
            )
        except BaseException:
            await stack.aclose()
            raise
        if self._closed:
            # Closed by another task while this turn waited for its session: the
            # turn would go on on a closed conversation, holding the session.
            await stack.aclose()
            raise trio.ClosedResourceError("the conversation is closed")
        self._stack, self._session, self._history = stack, session, []
        return session

    @trio.lowlevel.enable_ki_protection
    async def _drop(self) -> None:
        """Close and forget the held session (shielded inside ``Session.aclose``)."""
        stack, self._stack, self._session, self._history = self._stack, None, None, []
        if stack is not None:
            await stack.aclose()

    @keyword_only_from(2, ("priority", "readout_shape"))  # (outermost: its stacklevel)
    @sampling_in_params
    def stream(
        self,
        chunks: Sequence[Chunk],
        sampling: SamplingParams | None = None,
        *,
        priority: SupportsIndex | None = None,
        readout_shape: tuple[SupportsIndex, SupportsIndex] | None = None,
        timeout: SupportsFloat | None = None,
        first_token_timeout: SupportsFloat | None = None,
        token_timeout: SupportsFloat | None = None,
    ) -> AbstractAsyncContextManager[ConversationStream]:
        """Send the prompt's delta and stream the reply.

        Before the block's body runs, text before each image is flushed with a
        prefill, the images are appended (their :class:`ImageAppended` events come
        first from the iterator) and the first reply event has arrived. The final
        ``Generate`` carries the trailing text and the decode budget; with
        ``readout_shape`` it asks for readouts of every decoded position,
        reshaped to ``(n_layers, n_concepts)``: the readout manifest's shape
        (``ValueError`` before sending for another, once the client has fetched
        the manifest; else a readout of the wrong size is dropped with a warning).

        A held session the server no longer knows (restart, idle eviction:
        ``NOT_FOUND``) is replaced transparently: a new session is opened, the
        whole prompt is sent again, and a log line says so.

        Leaving the block before :class:`StreamDone` was read, an error or
        cancellation closes the session; the next stream starts a new one. After
        it, the session is kept whatever ends the block; so it is when a turn
        with nothing to decode (``max_tokens=0``, or a full context window),
        whose ``Done`` has come before the block's body runs, is left unread
        without an exception: the turn is complete on both sides. So too when
        the block is left after its last token was read and its ``Done`` has
        arrived, the ``StreamDone`` not yet read.

        Timeouts (seconds, off by default, :class:`PocApiTimeout`): ``timeout``
        bounds everything up to ``StreamDone``, the wait for another task's turn
        on this conversation included (running out there raises a retriable
        ``PocApiTimeout``: nothing was sent, and the conversation and its session
        are left as they are); ``first_token_timeout`` bounds the wait for the
        first decoded token (or ``Done``) from the turn's start past that wait:
        opening the session and sending the delta (a rewind, prefills, image
        appends) included; ``token_timeout`` is as in :meth:`Session.generate`.

        A turn that fails with a ``retriable`` error before any of its requests
        was processed leaves the conversation and its session as they were; once
        one was, the session is closed (a note on the error says so), and the next
        turn opens another and sends the whole prompt.

        Example::

            async with client.conversation() as conv:
                async with conv.stream([poc_api.Tokens(ids)], SamplingParams(max_tokens=32)) as ev:
                    async for e in ev:
                        if isinstance(e, poc_api.TokenOut):
                            print(e.id)
        """
        chunks = check_chunks(chunks)
        check_image_sizes(chunks, self._transport.max_message_size)
        sampling = SamplingParams() if sampling is None else sampling
        if not isinstance(sampling, SamplingParams):
            raise TypeError("sampling must be a SamplingParams")
        shape = check_readout_shape(readout_shape, self._known_shape())
        prio = check_int32("priority", 0 if priority is None else priority)
        total = check_timeout("timeout", timeout)
        first = check_timeout("first_token_timeout", first_token_timeout)
        between = check_timeout("token_timeout", token_timeout)
        return _Turn(self, chunks, sampling, prio, shape, (first, between), total)

    async def _begin(
        self,
        gen_stack: AsyncExitStack,
        chunks: list[Chunk],
        sampling: SamplingParams,
        priority: int,
        shape: tuple[int, int] | None,
        timeouts: tuple[float | None, float | None, float, float],
    ) -> tuple[ConversationStream, GenerateStream, list[Chunk], Session]:
        """Start a turn: a held or new session, replaced once if it is gone."""
        first, between, deadline_at, turn_started = timeouts
        # first_token_timeout runs from here (past the wait for the turn): no token
        # comes before the session is open and the delta sent, so it bounds those too.
        started = trio.current_time()
        first_at = math.inf if first is None else started + first
        clocks = (started, first_at, between, deadline_at, turn_started)
        self._untouched = self._turn_sent = self._generate_timed = False
        try:
            for attempt in range(2):
                fresh = self._session is None
                if self._session is not None:
                    session = self._session
                else:
                    session = await self._open(_remaining(min(first_at, deadline_at)))
                    self._turn_sent = True
                try:
                    out, events, sent = await self._start(
                        gen_stack,
                        session,
                        chunks,
                        sampling,
                        priority,
                        shape,
                        clocks,
                        held=not fresh,
                    )
                    return out, events, sent, session
                except SessionNotFound as exc:
                    await _leave(gen_stack, exc)
                    if fresh or attempt:
                        raise
                    log.info(
                        "session %s is gone on the server (restarted or evicted): "
                        "opening a new one and sending the whole prompt again",
                        session.session_id,
                    )
                    with trio.CancelScope(shield=True):
                        await self._drop()
                except ServerUnavailable as exc:
                    # A pool places the new session on another endpoint (issue 12).
                    await _leave(gen_stack, exc)
                    if attempt or self._transport.failover_attempts < 2:
                        raise
                    log.info(
                        "session %s: its server is unreachable: opening a new session "
                        "on another endpoint and sending the whole prompt again",
                        session.session_id,
                    )
                    with trio.CancelScope(shield=True):
                        await self._drop()
        except PocApiTimeout as exc:
            ran_out = trio.current_time() >= min(first_at, deadline_at)
            # The Generate's block told first: one that timed out before its request
            # went out makes the timeout retriable (and keeps the session intact).
            await _leave(gen_stack, exc)
            if self._generate_timed or not ran_out:
                # The Generate's own, which names the turn's bounds; or not the
                # turn's bound at all (a server's DEADLINE_EXCEEDED, in no time).
                raise
            # A bound of the turn ran out before the Generate (opening the session,
            # sending the delta), in a call that got what was left of it and named
            # that: say which bound, and its whole length, as the Generate's own does.
            if first is not None and first_at <= deadline_at:
                which, bound = "first-token", first
            elif not math.isinf(deadline_at):
                which, bound = "total", deadline_at - turn_started
            else:  # pragma: no cover - a call of the turn got a bound of its own
                raise
            raise PocApiTimeout(
                f"{which} timeout after {bound:.4g} s, before the Generate: {exc}",
                retriable=exc.retriable,
            ) from exc
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _start(
        self,
        gen_stack: AsyncExitStack,
        session: Session,
        chunks: list[Chunk],
        sampling: SamplingParams,
        priority: int,
        shape: tuple[int, int] | None,
        clocks: tuple[float, float, float | None, float, float],
        *,
        held: bool = False,
    ) -> tuple[ConversationStream, GenerateStream, list[Chunk]]:
        """Send the delta, open the final Generate (into ``gen_stack``) and prime it.

        ``clocks``: when the turn started sending and when its first token is due
        (trio times), the token timeout, when the turn is due, and when it began
        (its wait for the conversation included)."""
        started, first_at, token_timeout, deadline_at, turn_started = clocks
        before_token = min(first_at, deadline_at)  # (the calls that send the delta)
        # (A divergence, rewind=False, fails the turn as any error: README.)
        plan = plan_delta(chunks, session.committed_len, self._history, rewind=self._rewind)
        # Text only: an image's stated length may be wrong (the server decides
        # it); the checks before each call below have its real one. Refused here,
        # before a call of the turn was sent, a prompt too long for the context
        # leaves the session as it was: it is kept (see _Turn.__aenter__).
        self._untouched = True
        end = plan.offset + text_len(plan.delta)
        if held and session.max_length and end > session.max_length:
            # The held session's window is the one its server had when it opened
            # the session: one restarted since (with a larger max_context) has
            # forgotten it. Ask before refusing: an empty prefill answers NOT_FOUND
            # then (the session is replaced, and the new one's window decides) and
            # changes nothing otherwise.
            self._untouched = False
            await session.prefill([], timeout=_remaining(before_token), priority=priority)
            self._untouched = True
        check_window(session, end)
        # Again, with the session's id (stream() checked without it).
        session._check_images(plan.delta)
        self._untouched = False
        if plan.truncating:
            log.info(
                "session %s: prompt diverges from the session at position %d "
                "(committed_len %d): rewinding",
                session.session_id,
                plan.offset,
                session.committed_len,
            )
        # The rewind rides on the turn's first call (its offset, truncating):
        # a Generate of its own would be one round trip more.
        rewind_to: int | None = plan.offset if plan.truncating else None
        at = plan.offset  # the session's length once the calls so far are done
        prefix: list[StreamEvent] = []
        pending: list[int] = []
        # What the session will hold after Done: what it kept (the history's own
        # chunks, whose image lengths are known), the delta with each image's
        # length as the server reported it, then the decoded tokens.
        # Taken from the prompt instead, an image sent in an earlier turn kept
        # the caller's length 0, and the next turn rewound to before it.
        sent = chunks_before(self._history, plan.offset)
        for chunk in plan.delta:
            if isinstance(chunk, Tokens):
                pending.extend(chunk.ids)
                sent.append(chunk)
                continue
            if pending:
                check_window(session, at + len(pending))
                # The turn's priority: on a busy server the text before an image
                # waited behind every other request's decode.
                await session.prefill(
                    pending,
                    timeout=_remaining(before_token),
                    priority=priority,
                    rewind_to=rewind_to,
                )
                self._turn_sent = True
                rewind_to, at = None, session.committed_len
                pending = []
            appended = await session.append_image(
                chunk.data, chunk.mime, rewind_to=rewind_to, timeout=_remaining(before_token)
            )
            self._turn_sent = True
            rewind_to, at = None, session.committed_len
            n = appended.placeholder_count
            if chunk.known_expanded_len not in (0, n):
                # The server decides how many positions an image takes; keeping
                # the caller's number would cut the next turn's delta in the wrong place.
                log.warning(
                    "session %s: an image's known_expanded_len is %d but the server "
                    "gave it %d positions; the conversation uses the server's count",
                    session.session_id,
                    chunk.known_expanded_len,
                    n,
                )
            sent.append(attrs.evolve(chunk, known_expanded_len=n))
            prefix.append(ImageAppended(appended.placeholder_count))
        prompt_len = at + len(pending)
        check_window(session, prompt_len)
        readout_ranges = [(prompt_len, U32_MAX)] if shape is not None else []
        events = await gen_stack.enter_async_context(
            session.generate(
                pending,
                sampling=sampling,
                readout_ranges=readout_ranges,
                priority=priority,
                rewind_to=rewind_to,
                timeout=_remaining(deadline_at),
                first_token_timeout=_remaining(first_at),
                token_timeout=token_timeout,
            )
        )
        clock = events._timeouts
        self._generate_timed = True
        # The same deadlines, counted from the turn's start: a timeout then names
        # the turn's bound, not the part of it the Generate got.
        if clock is not None and not math.isinf(first_at):
            clock.first_token_from, clock.first_token = started, first_at - started
        if clock is not None and not math.isinf(deadline_at):
            clock.started = turn_started  # (total_at is deadline_at already)
        out = ConversationStream(prefix, events, shape, self._readout_mismatch)
        await out._prime()
        return out, events, sent

    async def aclose(self) -> None:
        """Close the held session, if any (idempotent). A checkpoint."""
        if self._closed and self._stack is None:  # (closed already: nothing to change)
            await trio.lowlevel.checkpoint()
            return
        # Before anything changes: from another trio.run, the session would be
        # forgotten and its close fail (logged only), leaving it on the server.
        self._transport.check_run()
        self._closed = True
        if self._stack is None:
            await trio.lowlevel.checkpoint()
            return
        await self._drop()


def _log_dropped(session: Session | None, exc: BaseException | None) -> None:
    """Say that a turn failed and its session goes (the seed's ``log::warn!`` of
    every failed turn, "... dropping session"): the caller gets the exception,
    the log says which session went. Not for a cancellation or the caller's own
    exception, which the seed did not log either."""
    if session is None or not isinstance(exc, PocApiError):
        return
    log.info(
        "session %s: the turn failed (%s: %s); dropping the session, the next turn "
        "opens a new one and sends the whole prompt",
        session.session_id,
        type(exc).__name__,
        exc,
    )


async def _leave(gen_stack: AsyncExitStack, exc: BaseException) -> None:
    """Close the turn's Generate block as left by ``exc`` (which it may have
    raised): a block left by its own retriable error keeps its session intact."""
    await gen_stack.__aexit__(type(exc), exc, exc.__traceback__)


@final
class _Turn(NeedsAsyncWith):
    """The block of :meth:`Conversation.stream`.

    A class, not an ``@asynccontextmanager``: trio frees every async generator
    through a weakref callback, where CPython drops a Ctrl-C
    (python/cpython#95959).
    """

    __slots__ = (
        "_chunks",
        "_conv",
        "_entered",
        "_events",
        "_gen_stack",
        "_out",
        "_priority",
        "_sampling",
        "_sent",
        "_session",
        "_shape",
        "_timeout",
        "_timeouts",
    )

    def _usage(self) -> str:
        return "conversation.stream(...)"

    def __init__(
        self,
        conv: Conversation,
        chunks: list[Chunk],
        sampling: SamplingParams,
        priority: int,
        shape: tuple[int, int] | None,
        timeouts: tuple[float | None, float | None],
        timeout: float | None,
    ) -> None:
        self._conv = conv
        self._chunks = chunks
        self._sampling = sampling
        self._priority = priority
        self._shape = shape
        self._timeouts = timeouts
        self._timeout = timeout
        self._entered = False
        self._gen_stack = AsyncExitStack()
        self._out: ConversationStream | None = None
        self._events: GenerateStream | None = None
        self._sent: list[Chunk] = []
        self._session: Session | None = None

    @trio.lowlevel.enable_ki_protection
    async def __aenter__(self) -> ConversationStream:
        conv = self._conv
        # Before the turn's lock (see Session._busy_check), and before the block
        # counts as entered: from another run it was spent.
        conv._transport.check_run()
        if self._entered:
            raise RuntimeError("a conversation stream block can be entered only once")
        self._entered = True
        timeout = self._timeout
        started = trio.current_time()
        deadline_at = started + timeout if timeout is not None else math.inf
        if conv._lock.statistics().owner is trio.lowlevel.current_task():
            raise RuntimeError(
                "this task is already in a stream block of this conversation, which "
                "runs one turn at a time: leave that block first"
            )
        await self._take_turn(deadline_at, started)
        if conv._closed:
            conv._lock.release()
            raise trio.ClosedResourceError("the conversation is closed")
        try:
            self._out, self._events, self._sent, self._session = await conv._begin(
                self._gen_stack,
                self._chunks,
                self._sampling,
                self._priority,
                self._shape,
                (*self._timeouts, deadline_at, started),
            )
        except BaseException as exc:
            try:
                try:
                    # The Generate's block first, told why it is left: one that
                    # timed out before its request went out makes the timeout
                    # retriable, and a block left by its own retriable error keeps
                    # the session intact (else it marks it lost).
                    await _leave(self._gen_stack, exc)
                finally:
                    retriable = isinstance(exc, PocApiError) and exc.retriable
                    if conv._untouched or (retriable and not conv._turn_sent):
                        # Refused before sending, or its first request was never
                        # processed: the session is as it was, and stands.
                        pass
                    else:
                        _log_dropped(conv._session, exc)
                        if retriable:
                            exc.add_note(
                                "this turn's earlier requests had been processed: its "
                                "session is closed, and the next turn sends the whole "
                                "prompt again"
                            )
                        with trio.CancelScope(shield=True):
                            await conv._drop()
            finally:
                conv._lock.release()
            raise
        return self._out

    async def _take_turn(self, deadline_at: float, started: float) -> None:
        """Wait for the conversation (another task's turn may hold it) until ``deadline_at``.

        ``timeout`` bounds this wait too. Running out raises a retriable
        :class:`PocApiTimeout` before anything is sent or dropped: the session
        belongs to the other turn, which keeps it for the next one.
        """
        lock = self._conv._lock
        if deadline_at == math.inf:
            await lock.acquire()
            return
        held = lock.locked()  # another task's turn: the message says so
        with trio.CancelScope(deadline=deadline_at) as waiting:
            await lock.acquire()
        if not waiting.cancelled_caught and trio.current_time() < deadline_at:
            return
        # Handed the turn only as the time ran out: the session's own wait would
        # time out at once, and the failed turn would drop the session.
        if not waiting.cancelled_caught:
            lock.release()
        raise PocApiTimeout(
            f"conversation stream: timeout after {deadline_at - started:.3g} s "
            "waiting for the conversation"
            f"{', whose turn another task holds' if held else ''}; nothing was sent",
            retriable=True,
        )

    async def _fail(self) -> None:
        # The stack may still hold the Generate when priming failed: close it
        # first, then drop the session (the next turn starts a new one).
        try:
            await self._gen_stack.aclose()
        finally:
            with trio.CancelScope(shield=True):
                await self._conv._drop()

    @trio.lowlevel.enable_ki_protection
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conv, out, events, session = self._conv, self._out, self._events, self._session
        assert out is not None and events is not None and session is not None
        # What was read ahead on entry and is still unread stays unread: iterated
        # after the block, the stream says the block has exited, as a Generate
        # stream's does (or ends, if it had ended inside).
        out._prefix.clear()
        out._lookahead = None
        ok = False
        try:
            await self._gen_stack.__aexit__(exc_type, exc, tb)
            if events.done is None or session.lost:
                return  # failed or left early: the session is lost; it is dropped
            if exc is not None and (not out._done_delivered or out._failed is not None):
                return  # raised before the end was seen, or by the stream: a failed turn
            # Also with the body's own exception (or a cancel) after StreamDone: the
            # turn is complete on both sides, and the session is kept, as
            # Session.generate keeps it (the next turn sent the whole prompt again).
            if len(out.decoded) != events.done.completion_tokens:
                if not out._done_delivered:
                    # Left before reading every token: the history would lack them.
                    log.debug(
                        "session %s: the stream was left before its last token; "
                        "dropping the session",
                        session.session_id,
                    )
                    return
                log.warning(
                    "session %s: Done says %d tokens were decoded but %d arrived; "
                    "dropping the session",
                    session.session_id,
                    events.done.completion_tokens,
                    len(out.decoded),
                )
                return
            conv._history = [*self._sent, Tokens(out.decoded)] if out.decoded else self._sent
            ok = True
        finally:
            try:
                if not ok:
                    if out._failed is not None:
                        # The stream's own error, also when the block caught it
                        # or raised another: it is why the session goes.
                        _log_dropped(session, out._failed)
                    await self._fail()
            finally:
                conv._lock.release()
