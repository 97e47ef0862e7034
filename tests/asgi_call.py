"""One HTTP request through an ASGI app, without a server: what the middleware tests send."""

from __future__ import annotations


async def asgi_request(
    app, method: str, path: str, body: bytes = b"", headers=()
) -> tuple[int, bytes, dict, bool]:
    """``(status, response body, response headers, whether the app read the request body)`` of one
    request; ``headers`` are the request's ``(name, value)`` byte pairs."""
    sent, read = [], []

    async def receive():
        read.append(True)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": list(headers),
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 1234),
        "http_version": "1.1",
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], payload, {k.decode(): v.decode() for k, v in start["headers"]}, bool(read)
