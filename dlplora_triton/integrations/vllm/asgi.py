"""What the middleware's modules share (server.py, runtime.py, tenants.py): the refusal of a request
(:class:`RequestError`, sent as vLLM's JSON error body by :func:`send_error`) and the names of paths and
scope keys. Imports nothing of the package, so the three import it and not each other."""

from __future__ import annotations

import json
from http import HTTPStatus

__all__ = ["LOAD_ROUTE", "TENANT_SCOPE_KEY", "UNLOAD_ROUTE", "RequestError", "send_error"]

LOAD_ROUTE, UNLOAD_ROUTE = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"  # vLLM's runtime endpoints
TENANT_SCOPE_KEY = "dlplora.tenant"  # the request's tenant, set by the guard (ASGI servers set no such key)


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message naming the problem."""

    def __init__(self, status: HTTPStatus, message: str, param: str | None = "model"):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> bytes:
        kind = {
            400: "BadRequestError",
            401: "AuthenticationError",
            403: "PermissionDeniedError",
            404: "NotFoundError",
            413: "RequestTooLargeError",
        }.get(int(self.status), "InvalidUserInput")
        error = {"message": self.message, "type": kind, "param": self.param, "code": int(self.status)}
        return json.dumps({"error": error}).encode()


async def send_error(send, error: RequestError) -> None:
    body = error.body()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": int(error.status), "headers": headers})
    await send({"type": "http.response.body", "body": body})
