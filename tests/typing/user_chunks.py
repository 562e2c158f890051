"""A user's program splitting a flat prompt into chunks: image data as the rest of
the API takes it.

Checked by ``mypy --strict tests/typing`` (nox's typecheck session), never run.
"""

from __future__ import annotations

import io

import poc_api


def chunks_from_buffers(ids: list[int], png: bytes, out: io.BytesIO) -> list[poc_api.Chunk]:
    # Image() and Session.append_image() take bytes, a bytearray or a memoryview;
    # so does a (data, mime) pair here (it becomes an Image): a BytesIO's buffer
    # (getbuffer(): a memoryview) or a bytearray the image was written into.
    poc_api.Image(memoryview(png), "image/png")
    poc_api.prompt_to_chunks(ids, [(out.getbuffer(), "image/png")], 258, 259)
    poc_api.prompt_to_chunks(ids, [(bytearray(png), "image/png")], 258, 259)
    return poc_api.prompt_to_chunks(ids, [(png, "image/png")], 258, 259)


def still_refused(ids: list[int], png: bytes) -> None:
    poc_api.prompt_to_chunks(ids, [("not bytes", "image/png")], 258, 259)  # type: ignore[list-item]
    poc_api.prompt_to_chunks(ids, [png], 258, 259)  # type: ignore[list-item]
