"""poc_api: a trio-native client for stateful LLM inference over salience gRPC.

Example::

    import trio, poc_api

    async def main():
        async with poc_api.ApiClient("http://127.0.0.1:8000/v1") as client:
            async with client.session() as s:
                await s.prefill([72, 105])
                async with s.generate(sampling=poc_api.SamplingParams(max_tokens=8)) as ev:
                    async for e in ev:
                        print(e)

    trio.run(main)

Everything public is re-exported here from private modules; see ``__all__``.
"""

# (No ``from __future__ import annotations`` here: it would leave a stray
# ``poc_api.annotations`` behind, and this module annotates nothing.)
from ._chunks import Chunk, Image, Tokens, prompt_to_chunks
from ._client import ApiClient, resolve_grpc_url
from ._conversation import Conversation, ConversationStream
from ._detok import TextDecoder
from ._errors import (
    AuthenticationError,
    ContextOverflow,
    DivergenceReason,
    HttpError,
    InvalidRequest,
    LimitExceeded,
    OffsetMismatch,
    PocApiError,
    PocApiTimeout,
    ProtocolViolation,
    ResourceExhausted,
    RpcError,
    ServerUnavailable,
    SessionDivergence,
    SessionLost,
    SessionNotFound,
    StreamCancelled,
    TransportError,
)
from ._http import (
    ChatCompletion,
    ChatDelta,
    ChatDone,
    ChatEvent,
    ChatLogprobs,
    ChatReasoningDelta,
    ChatStream,
    ChatTokenLogprob,
    ChatToolCall,
    ChatToolCallDelta,
    ChatTopLogprob,
    TokenizerInfo,
)
from ._log import configure_debug_from_env as _configure_debug_from_env
from ._log import escape_controls_in_logs as _escape_controls_in_logs
from ._pool import EndpointState, EndpointStatus
from ._session import GenerateStream, Session
from ._types import (
    Done,
    ImageAppend,
    ImageAppended,
    Ranges,
    ReadoutManifest,
    SamplingParams,
    ScoreResult,
    StreamDone,
    StreamEvent,
    Token,
    TokenOut,
    TopLogprob,
    TrainResult,
    TrainSample,
    Usage,
    WireEvent,
)

__all__ = [
    "ApiClient",
    "AuthenticationError",
    "ChatCompletion",
    "ChatDelta",
    "ChatDone",
    "ChatEvent",
    "ChatLogprobs",
    "ChatReasoningDelta",
    "ChatStream",
    "ChatTokenLogprob",
    "ChatToolCall",
    "ChatToolCallDelta",
    "ChatTopLogprob",
    "Chunk",
    "ContextOverflow",
    "Conversation",
    "ConversationStream",
    "DivergenceReason",
    "Done",
    "EndpointState",
    "EndpointStatus",
    "GenerateStream",
    "HttpError",
    "Image",
    "ImageAppend",
    "ImageAppended",
    "InvalidRequest",
    "LimitExceeded",
    "OffsetMismatch",
    "PocApiError",
    "PocApiTimeout",
    "ProtocolViolation",
    "Ranges",
    "ReadoutManifest",
    "ResourceExhausted",
    "RpcError",
    "SamplingParams",
    "ScoreResult",
    "ServerUnavailable",
    "Session",
    "SessionDivergence",
    "SessionLost",
    "SessionNotFound",
    "StreamCancelled",
    "StreamDone",
    "StreamEvent",
    "Token",
    "TextDecoder",
    "TokenOut",
    "TokenizerInfo",
    "Tokens",
    "TopLogprob",
    "TrainResult",
    "TrainSample",
    "TransportError",
    "Usage",
    "WireEvent",
    "prompt_to_chunks",
    "resolve_grpc_url",
]

__version__ = "0.1.0"


def _fixup_module_metadata() -> None:
    """Show exported classes as ``poc_api.X`` (reprs, tracebacks, ``help()``),
    not as the private module that defines them, as trio does.

    Pickles name them ``poc_api.X`` too, which resolves since they are exported.
    ``typing.get_type_hints`` evaluates a class's string annotations in the
    namespace of its ``__module__``: they are resolved in their own module
    first, so attrs.resolve_types, cattrs and pydantic still see the types.
    """
    import inspect
    import typing

    for name in __all__:
        obj = globals()[name]
        if not isinstance(obj, type) or not obj.__module__.startswith("poc_api._"):
            continue
        own = inspect.get_annotations(obj)  # the class's own, unevaluated
        if own:
            hints = typing.get_type_hints(obj)
            obj.__annotations__ = {key: hints[key] for key in own}
        obj.__module__ = "poc_api"


_fixup_module_metadata()
_escape_controls_in_logs()
_configure_debug_from_env()
