"""A cap on request bodies, enforced before and while they are read."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omniseg.serve.errors import PayloadTooLargeError


class BodySizeLimit:
    """ASGI middleware refusing request bodies over ``max_bytes`` with 413.

    A declared ``Content-Length`` over the limit is answered at once, before any of the
    body is read; a body without one (chunked) is counted as it arrives, and the read that
    crosses the limit raises :class:`PayloadTooLargeError` inside the route, whose handler
    answers 413. Either way no more than ``max_bytes`` (plus one chunk) is ever held.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, note: str = "") -> None:
        """``note`` is appended to the 413 message (what the limit means to the client)."""
        self.app = app
        self.max_bytes = max_bytes
        self.note = note

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _send_413(
                send, f"request body of {declared} bytes exceeds the limit of {self.max_bytes} bytes{self.note}"
            )
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLargeError(f"request body exceeds the limit of {self.max_bytes} bytes{self.note}")
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # malformed: the server's HTTP parser rejects it before us
    return None


async def _send_413(send: Send, message: str) -> None:
    body = json.dumps({"error": PayloadTooLargeError.__name__, "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": PayloadTooLargeError.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
