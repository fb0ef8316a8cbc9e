"""The CLI's HTTP client: one place that turns API errors into CorralError subclasses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx

from corral.errors import (
    Conflict,
    CorralError,
    DeviceUnavailable,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
)

_BY_STATUS: dict[int, type[CorralError]] = {
    400: InvalidInput, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: PayloadTooLarge,
    422: InvalidInput, 503: DeviceUnavailable,
}


class Client:
    def __init__(self, server: str, token: str = "", timeout: float = 30.0) -> None:
        if not server:
            raise CorralError("no server: pass --server URL, set CORRAL_SERVER, or run 'corral login'")
        if not server.startswith(("http://", "https://")):
            raise InvalidInput(f"server must be an http:// or https:// URL, not {server!r}")
        self.server = server.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kw: Any) -> Any:
        r = self._send(method, path, **kw)
        if r.status_code == 204 or not r.content:
            return None
        return r.json()

    def get_bytes(self, path: str) -> bytes:
        """A response body as it is (a file), or the API's error."""
        return self._send("GET", path).content

    def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, "/api/v1" + path, **kw)
        except httpx.HTTPError as e:
            raise CorralError(f"cannot reach {self.server}: {e}") from e
        if r.status_code >= 400:
            try:
                body = r.json()
                detail = body.get("detail") or body.get("error") or r.reason_phrase
            except ValueError:
                detail = r.text[:200] or r.reason_phrase
            cls = _BY_STATUS.get(r.status_code, CorralError)
            raise cls(str(detail))
        return r

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, json=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def pages(self, path: str, limit: int | None = None, **params: Any) -> Iterator[dict[str, Any]]:
        """Every item of a paged list (or the first ``limit``)."""
        cursor: str | None = None
        seen = 0
        while True:
            page_size = min(1000, limit - seen) if limit else 1000
            page = self.get(path, cursor=cursor, limit=page_size, **params)
            for item in page["items"]:
                yield item
                seen += 1
                if limit and seen >= limit:
                    return
            cursor = page.get("next_cursor")
            if not cursor:
                return
