"""The public surface: everything re-exported from private modules, nothing missing."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys

import poc_api


def test_all_names_exist_and_are_documented() -> None:
    for name in poc_api.__all__:
        obj = getattr(poc_api, name)
        if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "__origin__")):
            assert getattr(obj, "__doc__", None), f"{name} has no docstring"


def test_the_namespace_holds_nothing_public_beyond_all_and_classes_say_poc_api() -> None:
    # ``from __future__ import annotations`` left poc_api.annotations behind, and
    # the POC_DEBUG hook was reachable as poc_api.configure_debug_from_env.
    import pickle
    import types

    stray = {
        name
        for name, obj in vars(poc_api).items()
        if not name.startswith("_") and not isinstance(obj, types.ModuleType)
    } - set(poc_api.__all__)
    assert stray == set()
    # As trio: reprs, tracebacks and help() show poc_api.X, not the private module...
    classes = [obj for name in poc_api.__all__ if isinstance(obj := getattr(poc_api, name), type)]
    assert len(classes) > 40
    assert [c for c in classes if c.__module__ != "poc_api"] == []
    assert repr(poc_api.SamplingParams) == "<class 'poc_api.SamplingParams'>"
    # ... and pickles by reference to poc_api.X, which resolves (values and errors).
    for cls in classes:
        assert b"poc_api._" not in pickle.dumps(cls), cls
        assert pickle.loads(pickle.dumps(cls)) is cls
    for value in (
        poc_api.SamplingParams(max_tokens=3),
        poc_api.Tokens([1, 2]),
        poc_api.TokenOut(1),
        poc_api.EndpointState.SERVING,
        poc_api.SessionLost("gone"),
    ):
        back = pickle.loads(pickle.dumps(value))
        assert type(back) is type(value) and repr(back) == repr(value)


def test_every_public_name_of_private_modules_is_reexported() -> None:
    exported = set(poc_api.__all__)
    internal_only = {
        # plumbing that users never touch
        "AsyncioBridge",
        "PRIVATE_NAMES",
        "keyword_only_from",
        "collapse_cancellation",
        "start_tasks",
        "BatchReceiver",
        "Sink",
        "open_bridge",
        "GrpcTarget",
        "GrpcTransport",
        "KeepAlive",
        "StreamBudget",
        "Orphan",
        "backoff",
        "deadline",
        "map_grpc_error",
        "RawCodec",
        "CachingEncoder",
        "never_indexed_literal",
        "decode_append_image",
        "decode_generate_event",
        "decode_health_check",
        "decode_open_session",
        "encode_append_image_request",
        "encode_generate_request",
        "encode_string_field",
        "HttpApi",
        "error_excerpt",
        "redact_url",
        "shown_url",
        "url_password",
        "key_redactor",
        "SSEDecoder",
        "SSEEvent",
        "open_session",
        "close_live_sessions",
        "DeltaPlan",
        "check_chunks",
        "chunk_len",
        "chunks_before",
        "common_prefix_len",
        "plan_delta",
        "walk_chunks",
        "reshape_readout",
        "ReadoutMismatch",
        "ReadoutShaper",
        "check_readout_shape",
        "merge_ranges",
        "range_sums",
        "positions_within",
        "score_chunks",
        "score_many",
        "score_continuations",
        "group_by_prefix",
        "validate_ranges",
        "configure_debug_from_env",
        "DEFAULT_MAX_BUFFER",
        "encode_png",
        # the pool's plumbing (issue 12)
        "DEFAULT_AFFINITY_HEADER",
        "DnsTarget",
        "Router",
        "SessionRoute",
        "check_affinity_header",
        "parse_grpc_targets",
        # the MockClock hold (_clock)
        "HOLD_SECONDS",
        "autojumping",
        "hold_clock",
        # a stream's fair share of trio's thread (_clock)
        "FAIR_SLICE",
        "FairSlice",
    }
    for info in pkgutil.iter_modules(poc_api.__path__):
        if not info.name.startswith("_") or info.name == "_proto":
            continue
        module = importlib.import_module(f"poc_api.{info.name}")
        names = getattr(module, "__all__", None)
        assert names is not None, f"poc_api.{info.name} has no __all__"
        for name in names:
            assert name in exported or name in internal_only, (
                f"poc_api.{info.name}.{name} is neither exported nor listed as internal"
            )


def test_deprecation_warnings_of_poc_api_and_its_runtime_deps_are_errors() -> None:
    # pyproject's filterwarnings: an API slated for removal must turn the run red.
    import warnings

    import pytest

    for module in ("poc_api._transport", "grpclib.client", "trio._core", "h2.connection"):
        with pytest.raises(DeprecationWarning):
            warnings.warn_explicit("going away", DeprecationWarning, "x.py", 1, module=module)
    # ... and only theirs: a test dependency's warning is not ours to fail on.
    with warnings.catch_warnings(record=True):
        warnings.warn_explicit("going away", DeprecationWarning, "x.py", 1, module="hypothesis")


def test_readout_manifest_takes_typed_iterables() -> None:
    # attrs' __init__ takes its argument types from the converters, and so does
    # mypy's attrs plugin: with a bare ``tuple`` converter mypy --strict could not
    # solve its TypeVar, and no ``ReadoutManifest(...)`` call type-checked.
    import typing
    from collections.abc import Iterable

    hints = typing.get_type_hints(poc_api.ReadoutManifest.__init__)
    assert hints["concepts"] == Iterable[str]
    assert hints["layers"] == Iterable[typing.SupportsIndex]  # numpy's ints too
    manifest = poc_api.ReadoutManifest(["a", "b"], [0, 1])
    assert manifest == poc_api.ReadoutManifest(("a", "b"), (0, 1))
    assert manifest.concepts == ("a", "b") and manifest.layers == (0, 1)


def test_readout_manifest_refuses_strings_and_elements_of_the_wrong_type() -> None:
    # A str was split into characters, and elements went unchecked: ("v", "o", ...).
    import pytest

    bad = [
        (("vowel", [0]), "^concepts must be a sequence of str, not str"),
        ((b"ab", [0]), "^concepts must be a sequence of str, not bytes"),
        ((None, [0]), "^concepts must be a sequence of str, not NoneType"),
        ((["a", 1], [0]), r"^concepts\[1\] must be a str, not int"),
        ((["a"], "012"), "^layers must be a sequence of int, not str"),
        ((["a"], 3), "^layers must be a sequence of int, not int"),
        ((["a"], [0.5, None]), r"^layers\[0\] must be an int, not float"),
        ((["a"], [0, True]), r"^layers\[1\] must be an int, not bool"),
    ]
    for args, match in bad:
        with pytest.raises(TypeError, match=match):
            poc_api.ReadoutManifest(*args)
    # Negative layer indices count from the end; any iterable of the right elements.
    manifest = poc_api.ReadoutManifest(iter(["a", "b"]), range(-2, 0))
    assert (manifest.concepts, manifest.layers, manifest.shape) == (("a", "b"), (-2, -1), (2, 2))


def test_attributes_are_typed_as_precisely_as_their_values() -> None:
    # HttpError.http_status was int | None though always set; reason a plain str
    # (a typo in a comparison went unnoticed); chat logprobs were Any.
    import typing
    from typing import Any, Literal

    assert typing.get_type_hints(poc_api.HttpError)["http_status"] is int
    assert typing.get_type_hints(poc_api.PocApiError)["http_status"] == int | None
    reason = typing.get_type_hints(poc_api.SessionDivergence.__init__)["reason"]
    assert reason == Literal["unknown_length", "straddle", "short", "content"]
    # Then they were dict[str, Any], and tokenizer_info() too: Any reached user
    # code (tests/typing/user_http.py).
    for cls in (poc_api.ChatCompletion, poc_api.ChatDelta):
        assert typing.get_type_hints(cls)["logprobs"] == poc_api.ChatLogprobs | None
    assert typing.get_type_hints(poc_api.ChatLogprobs) == {
        "content": list[poc_api.ChatTokenLogprob] | None,
        "refusal": list[poc_api.ChatTokenLogprob] | None,
    }
    top = {"token": str, "logprob": float, "bytes": list[int] | None}
    assert typing.get_type_hints(poc_api.ChatTopLogprob) == top
    assert typing.get_type_hints(poc_api.ChatTokenLogprob) == {
        **top,
        "top_logprobs": list[poc_api.ChatTopLogprob],
    }
    for unchecked in (poc_api.ChatLogprobs, poc_api.ChatTokenLogprob, poc_api.ChatTopLogprob):
        assert unchecked.__required_keys__ == frozenset(), unchecked  # as the server sent it
    returned = typing.get_type_hints(poc_api.ApiClient.tokenizer_info)["return"]
    assert returned is poc_api.TokenizerInfo
    assert typing.get_type_hints(returned) == {"vocab_size": int, "special": dict[str, int]}
    assert returned.__required_keys__ == {"vocab_size", "special"}  # checked
    assert Any not in typing.get_type_hints(poc_api.ChatDelta).values()


def test_the_type_aliases_public_signatures_use_are_exported() -> None:
    # Ranges (score, generate's ranges, TrainSample) and the Literal of
    # SessionDivergence.reason were private: a user could not name them in an
    # annotation without importing a private module (tests/typing/user_aliases.py).
    import typing
    from typing import Literal

    assert {"Ranges", "DivergenceReason"} <= set(poc_api.__all__)
    assert poc_api.Ranges == typing.get_type_hints(poc_api.ApiClient.score)["ranges"]
    assert poc_api.Ranges == typing.get_type_hints(poc_api.Session.generate)["readout_ranges"]
    reason = typing.get_type_hints(poc_api.SessionDivergence.__init__)["reason"]
    assert poc_api.DivergenceReason == reason
    assert reason == Literal["unknown_length", "straddle", "short", "content"]


def test_public_type_aliases_are_explicit_with_a_docstring_for_hover() -> None:
    # WireEvent, StreamEvent, Chunk and ChatEvent were bare `X = A | B`: editors
    # (pyright/Pylance) showed no docstring on hover. The convention they show:
    # `X: TypeAlias = ...` followed by a string literal.
    import ast
    import inspect
    from pathlib import Path

    aliases = {
        name
        for name in poc_api.__all__
        if not isinstance(obj := getattr(poc_api, name), type) and not inspect.isfunction(obj)
    }
    assert {"WireEvent", "StreamEvent", "Chunk", "ChatEvent", "Ranges", "DivergenceReason"} <= (
        aliases
    )
    found: dict[str, str] = {}
    for path in Path(poc_api.__file__).parent.glob("_*.py"):
        body = ast.parse(path.read_text(encoding="utf-8")).body
        for i, node in enumerate(body):
            names = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            for name in set(names) & aliases:
                assert isinstance(node, ast.AnnAssign), f"{name} ({path.name}) is not annotated"
                assert ast.unparse(node.annotation) == "TypeAlias", name
                after = body[i + 1] if i + 1 < len(body) else None
                assert (
                    isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)
                    and after.value.value.strip()
                ), f"{name} ({path.name}) has no docstring after it"
                found[name] = path.name
    assert set(found) == aliases


def test_public_annotations_name_no_private_type_alias() -> None:
    # pyright (Pylance) shows a type alias by its name in hovers and messages (mypy
    # expands it): Token.readout and TokenOut.readout read `_FloatView | None`, a
    # name users cannot import, instead of `memoryview[float] | None`.
    import ast
    import inspect
    import re
    from pathlib import Path

    import attrs

    import poc_api.server
    import poc_api.testing

    private: set[str] = set()
    for path in Path(poc_api.__file__).parent.rglob("*.py"):
        if "_proto" in path.parts:
            continue
        body = ast.parse(path.read_text(encoding="utf-8")).body
        # Module level, including the branches of `if TYPE_CHECKING:`.
        nodes = body + [n for node in body if isinstance(node, ast.If) for n in node.body]
        for node in nodes:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if ast.unparse(node.annotation) == "TypeAlias":
                    private.add(node.target.id)
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Subscript | ast.BinOp):
                private.update(t.id for t in node.targets if isinstance(t, ast.Name))
    private = {name for name in private if name.startswith("_")}
    assert "_Unit" in private  # (_score.py's, used by private functions only)

    def annotations(obj: object) -> list[str]:
        if inspect.isfunction(obj):
            return [str(a) for a in inspect.get_annotations(obj).values()]
        if not isinstance(obj, type):
            return []
        found = [str(a) for a in inspect.get_annotations(obj).values()]
        if attrs.has(obj):
            found += [str(a.type) for a in attrs.fields(obj)]
        for name, member in vars(obj).items():
            if name.startswith("_") and name != "__init__":
                continue
            if isinstance(member, property):
                member = member.fget
            found += annotations(inspect.unwrap(member)) if inspect.isfunction(member) else []
        return found

    for module in (poc_api, poc_api.server, poc_api.testing):
        for name in module.__all__:
            for annotation in annotations(getattr(module, name)):
                named = set(re.findall(r"\b_\w+", annotation)) & private
                assert not named, f"{module.__name__}.{name}: {annotation!r} names {named}"
    # pyright --verifytypes poc_api scored 89.9 %: attributes assigned without an
    # annotation (a literal, or more than one assignment) "could be inferred
    # differently by type checkers", on classes that public signatures reach
    # (these, found by it), and `__reduce__ = _reduce_with_readout` on Token and
    # TokenOut was an "ambiguous base class override". Each public attribute the
    # methods of these classes assign is declared with an annotation.
    import ast
    import typing
    from pathlib import Path

    reached = {
        "_bridge.py": ["_Buffer"],
        "_session.py": ["_Timeouts"],
        "_pool.py": ["_Endpoint", "LiveSessions", "Router"],
        "_transport.py": ["StreamBudget", "GrpcTransport", "_Progress"],
        "server/_app.py": ["ReferenceServer"],
        "_types.py": ["Token", "TokenOut"],
    }
    src = Path(poc_api.__file__).parent
    for module, names in reached.items():
        tree = ast.parse((src / module).read_text(encoding="utf-8"))
        classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
        for name in names:
            assigned, declared = set(), set()
            for node in ast.walk(classes[name]):
                targets = []
                if isinstance(node, ast.Assign):
                    targets = node.targets
                elif isinstance(node, ast.AugAssign):
                    targets = [node.target]
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Attribute):
                    declared.add(node.target.attr)
                for target in targets:
                    if isinstance(target, ast.Attribute) and ast.unparse(target.value) == "self":
                        assigned.add(target.attr)
            public = {attr for attr in assigned if not attr.startswith("_")}
            assert public <= declared, f"{name}: {sorted(public - declared)} undeclared"
            for node in classes[name].body:
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name):
                    raise AssertionError(f"{name}: `{ast.unparse(node)}` is not a typed method")
    for cls in (poc_api.Token, poc_api.TokenOut):
        assert typing.get_type_hints(cls.__reduce__)["return"] == tuple[typing.Any, ...]


def test_stream_done_always_carries_usage() -> None:
    # StreamDone is built from a wire Done, whose usage is always there.
    import typing

    assert typing.get_type_hints(poc_api.StreamDone)["usage"] is poc_api.Usage


def test_every_exception_survives_pickling_with_its_attributes() -> None:
    # Errors cross process boundaries (multiprocessing, trio-parallel): those with
    # required keyword-only arguments (HttpError, SessionDivergence) did not unpickle.
    import pickle

    made = {
        poc_api.HttpError: poc_api.HttpError(
            "HTTP 500", http_status=500, url="http://h/v1/train", body_excerpt="boom"
        ),
        poc_api.SessionDivergence: poc_api.SessionDivergence(
            "diverged",
            reason="short",
            chunk_index=None,
            accumulated=3,
            chunk_len=0,
            committed_len=5,
        ),
    }
    classes = [
        obj
        for name in poc_api.__all__
        if isinstance(obj := getattr(poc_api, name), type) and issubclass(obj, poc_api.PocApiError)
    ]
    assert poc_api.HttpError in classes and len(classes) > 10
    for cls in classes:
        exc = made.get(cls) or cls("went wrong", grpc_status="UNAVAILABLE", retriable=True)
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is cls
        assert (str(back), back.args, vars(back)) == (str(exc), exc.args, vars(exc))


def test_type_hints_of_every_public_class_resolve() -> None:
    # attrs.resolve_types, cattrs and pydantic evaluate the annotations: on 3.11,
    # where memoryview takes no subscript, Token's ``memoryview[float]`` raised.
    import typing

    import attrs

    for name in poc_api.__all__:
        obj = getattr(poc_api, name)
        if not isinstance(obj, type):
            continue
        typing.get_type_hints(obj)
        if attrs.has(obj):
            attrs.resolve_types(obj)
    hints = typing.get_type_hints(poc_api.Token)
    assert hints["readout"] == memoryview | None


def test_api_client_chat_spells_out_the_keywords_of_http_api_chat() -> None:
    # ApiClient.chat/chat_stream took **kwargs: no type checking, help() showed
    # nothing, and an unknown keyword (max_new_tokens=2) was sent as it was.
    import inspect
    from collections.abc import Callable

    from poc_api._http import HttpApi

    def keywords(fn: Callable[..., object]) -> list[str]:
        params = inspect.signature(fn).parameters.values()
        return [p.name for p in params if p.kind is p.KEYWORD_ONLY]

    for method in (poc_api.ApiClient.chat, poc_api.ApiClient.chat_stream):
        kinds = [p.kind for p in inspect.signature(method).parameters.values()]
        assert inspect.Parameter.VAR_KEYWORD not in kinds, method
    client_chat = keywords(poc_api.ApiClient.chat)
    assert client_chat == ["timeout", *keywords(HttpApi.chat)]  # a per-call deadline of its own
    assert keywords(poc_api.ApiClient.chat_stream) == keywords(HttpApi.chat_stream)
    assert "max_tokens" in client_chat and "extra_body" in client_chat
    for method in (poc_api.ApiClient.chat, poc_api.ApiClient.chat_stream):
        doc = inspect.getdoc(method) or ""
        assert all(f"    {name}:" in doc for name in client_chat), method


def _run_with_poc_debug(script: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter with ``POC_DEBUG=1`` (read at import)."""
    env = dict(os.environ, POC_DEBUG="1")
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_poc_debug_lines_appear_once_when_the_app_configures_logging_too() -> None:
    # POC_DEBUG=1 adds a stderr handler at import; an app calling basicConfig()
    # afterwards got every poc_api line twice (its handler and ours).
    script = (
        "import logging, poc_api\n"
        "log = logging.getLogger('poc_api.grpc')\n"
        "log.debug('before the app configures logging')\n"
        "logging.basicConfig(level=logging.WARNING, format='APP %(levelname)s %(message)s')\n"
        "log.debug('after basicConfig')\n"
        "log.warning('a warning')\n"
    )
    proc = _run_with_poc_debug(script)
    lines = proc.stderr.splitlines()
    # Before: our handler; after: the app's handler (and format) alone.
    assert sum("before the app" in line for line in lines) == 1
    assert "poc_api.grpc DEBUG before the app configures logging" in proc.stderr
    assert [line for line in lines if "after basicConfig" in line] == [
        "APP DEBUG after basicConfig"
    ]
    assert [line for line in lines if "a warning" in line] == ["APP WARNING a warning"]


def test_the_poc_debug_handler_takes_no_lock_before_its_check() -> None:
    # Its check takes logging's module lock (getLogger); dictConfig holds that lock
    # while it takes every handler's. Done under the handler's own lock (in emit),
    # a thread logging while another configured logging deadlocked both.
    script = (
        "import logging, threading, time, poc_api\n"
        "handler = logging.getLogger('poc_api').handlers[0]\n"
        "log = logging.getLogger('poc_api.grpc')\n"
        "log.debug('warm the level cache')\n"
        "logging._lock.acquire()  # as dictConfig does, before the handlers' locks\n"
        "t = threading.Thread(target=log.debug, args=('a line',), daemon=True)\n"
        "t.start(); time.sleep(0.3)  # it waits for the module lock now\n"
        "free = handler.lock.acquire(timeout=2)  # dictConfig's next step\n"
        "print('handler lock free:', free)\n"
        "free and handler.lock.release()\n"
        "logging._lock.release()\n"
        "t.join(5); print('logged:', not t.is_alive())\n"
    )
    proc = _run_with_poc_debug(script)
    assert proc.stdout.split("\n")[:2] == ["handler lock free: True", "logged: True"], proc.stdout


def test_chat_stream_yields_a_typed_stream_with_aclose() -> None:
    # It was typed as a bare AsyncIterator[ChatEvent], so `events.aclose()`, which
    # the README documents (and contextlib.aclosing calls), failed mypy --strict.
    import typing
    from contextlib import AbstractAsyncContextManager

    returned = typing.get_type_hints(poc_api.ApiClient.chat_stream)["return"]
    assert typing.get_origin(returned) is AbstractAsyncContextManager
    assert typing.get_args(returned) == (poc_api.ChatStream,)
    assert callable(poc_api.ChatStream.aclose)


def test_the_installed_version_is_the_packages_own() -> None:
    # One place for the version (pyproject reads __init__'s): they cannot drift.
    import importlib.metadata

    assert importlib.metadata.version("poc_api") == poc_api.__version__


def test_image_data_is_typed_as_the_bytes_it_takes() -> None:
    # attrs (and mypy's attrs plugin, and pyright) type __init__'s ``data`` by the
    # converter's parameter: ``object`` let Image("not bytes", "image/png") and
    # Image(12, ...) type-check, where append_image("not bytes", ...) is refused.
    import typing

    hints = typing.get_type_hints(poc_api.Image.__init__)
    assert hints["data"] == bytes | bytearray | memoryview
    assert poc_api.Image(bytearray(b"\x89PNG"), "image/png").data == b"\x89PNG"
    assert poc_api.Image(memoryview(b"\x89PNG"), "image/png").data == b"\x89PNG"


def test_readout_manifest_refuses_unordered_concepts_and_layers() -> None:
    # A readout is layer-major, indexed by the manifest's order: a set of concept
    # names (or a mapping, whose keys it iterates) labelled the vector in an order
    # that changes with PYTHONHASHSEED, silently. Token ids and ranges refuse sets
    # for the same reason (their order matters); so must the manifest.
    import pytest

    from poc_api.server import ServerConfig

    for args in (({"vowel", "digit"}, [0]), ({"vowel": 0, "digit": 1}, [0]), (["a"], {0, 1})):
        with pytest.raises(TypeError, match="order is arbitrary"):
            poc_api.ReadoutManifest(*args)
    with pytest.raises(TypeError, match="order is arbitrary"):
        ServerConfig(concepts=frozenset({"vowel", "digit"}))
