"""HTTP for the TUF client: metadata through tuf's ``FetcherInterface``, targets streamed to disk.

Only ``corral tuf-client`` imports this module (ADR 0007: python-tuf and its HTTP stack stay out
of the resident agent). :class:`HttpFetcher` is a small synchronous urllib3 client (the HTTP library
python-tuf itself loads; httpx would add a second stack, and its import brings click and rich)
with two uses:

- **metadata** (``_fetch``): python-tuf calls it for ``root``/``timestamp``/``snapshot``/``targets``
  and delegated roles and enforces each role's maximum length itself
  (``FetcherInterface.download_file``); we only stream the body in chunks and report HTTP errors
  as ``DownloadHTTPError`` (python-tuf reads a 404/403 on ``N.root.json`` as "no newer root").
- **targets** (:meth:`HttpFetcher.download_to_part`): the artifact is appended to a ``.part`` file
  chunk by chunk, never held in memory. A ``.part`` left by an interrupted transfer is resumed
  with ``Range: bytes=N-``; a server that ignores the range (200) restarts it from zero. The
  expected length bounds the transfer (an endless or oversized body is cut off and the part
  removed), and the free space of the part's file system is checked before any byte is fetched.
  Verifying the finished part against the trusted ``TargetFile`` is the caller's job
  (``corral.agent.update.tuf_client``): this module knows bytes, not TUF.

Authentication is a seam: an :data:`AuthHeaders` callable gives the headers for a URL
(:func:`no_auth`, or :class:`BearerAuth` that sends a token only to the origins it is given).
``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` are honoured, as by the agent's own connection.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import urllib3
from tuf.api import exceptions
from tuf.ngclient import FetcherInterface

from corral.errors import CorralError

#: the headers to add to a request for a URL (credentials, or nothing)
AuthHeaders = Callable[[str], Mapping[str, str]]


class TufClientError(CorralError):
    """A TUF client operation failed; ``detail`` is the one line the CLI prints."""

    code = "tuf_client_error"


class InsufficientDiskSpace(TufClientError):
    code = "insufficient_disk_space"


def no_auth(url: str) -> Mapping[str, str]:
    return {}


def origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


class BearerAuth:
    """``Authorization: Bearer <token>`` for requests to the given origins only, so a redirect or
    a delegated URL elsewhere never receives the device's credential."""

    def __init__(self, token: str, urls: Collection[str]) -> None:
        self._header = {"Authorization": f"Bearer {token}"}
        self._origins = {origin(url) for url in urls}

    def __call__(self, url: str) -> Mapping[str, str]:
        return self._header if origin(url) in self._origins else {}


@dataclass(frozen=True)
class FetchConfig:
    """Network limits of the TUF client (the metadata size limits are tuf's ``UpdaterConfig``)."""

    connect_timeout: float = 10.0
    #: seconds without a byte before a transfer counts as interrupted
    read_timeout: float = 30.0
    #: bytes read from the network and written to disk at a time
    chunk_size: int = 64 * 1024
    #: bytes that must stay free on the target's file system after the download
    disk_reserve: int = 0
    user_agent: str = "corral-tuf-client"


class HttpFetcher(FetcherInterface):
    def __init__(self, config: FetchConfig | None = None, auth: AuthHeaders = no_auth,
                 pool: urllib3.PoolManager | None = None) -> None:
        self.config = config or FetchConfig()
        self._auth = auth
        # identity encoding: the bytes hashed and the byte offsets of a Range are the file's own
        self._headers = {"User-Agent": self.config.user_agent, "Accept-Encoding": "identity"}
        self._pool = pool
        self._proxies = getproxies()
        self._pools: dict[str, urllib3.PoolManager] = {}

    def close(self) -> None:
        for pool in self._pools.values():
            pool.clear()

    def _pool_for(self, url: str) -> urllib3.PoolManager:
        if self._pool is not None:
            return self._pool
        parts = urlsplit(url)
        proxy = "" if proxy_bypass(parts.hostname or "") else self._proxies.get(parts.scheme, "")
        if proxy not in self._pools:
            self._pools[proxy] = urllib3.ProxyManager(proxy) if proxy else urllib3.PoolManager()
        return self._pools[proxy]

    def _open(self, url: str, headers: Mapping[str, str] | None = None) -> urllib3.BaseHTTPResponse:
        try:
            return self._pool_for(url).request(
                "GET", url, headers={**self._headers, **self._auth(url), **(headers or {})},
                preload_content=False, decode_content=False,
                timeout=urllib3.Timeout(connect=self.config.connect_timeout, read=self.config.read_timeout),
                retries=urllib3.Retry(total=2, read=0, redirect=5, status=0, raise_on_status=False))
        except urllib3.exceptions.HTTPError as e:
            raise exceptions.DownloadError(f"{url}: {describe(e)}") from e

    def _fetch(self, url: str) -> Iterator[bytes]:
        response = self._open(url)
        if response.status != 200:
            release(response)
            raise exceptions.DownloadHTTPError(f"{url}: HTTP {response.status}", response.status)
        return self._chunks(url, response)

    def _chunks(self, url: str, response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        try:
            yield from response.stream(self.config.chunk_size, decode_content=False)
        except urllib3.exceptions.HTTPError as e:
            raise exceptions.DownloadError(f"{url}: {describe(e)}") from e
        finally:
            release(response)

    def download_to_part(self, url: str, part: Path, length: int) -> None:
        """Make ``part`` hold the ``length`` bytes served at ``url``, resuming what it holds.

        Raises ``DownloadError`` when the transfer is interrupted (the part is kept, to resume),
        ``DownloadLengthMismatchError`` when the server sends more or fewer bytes than
        ``length`` (the part is removed: those bytes can never verify), and
        :class:`InsufficientDiskSpace` before any transfer that would not fit.
        """
        offset = part.stat().st_size if part.exists() else 0
        if offset > length:
            part.unlink()
            offset = 0
        if offset == length:
            return
        self.check_free_space(part.parent, length - offset)
        response = self._open(url, {"Range": f"bytes={offset}-"} if offset else None)
        try:
            if response.status == 416 and offset:  # the file changed under the part: start over
                release(response)
                part.unlink()
                self.download_to_part(url, part, length)
                return
            if response.status == 206 and offset and content_range_start(response) == offset:
                mode = "ab"
            elif response.status == 200:
                mode, offset = "wb", 0
            else:
                raise exceptions.DownloadHTTPError(f"{url}: HTTP {response.status}", response.status)
            received = self._append(url, response, part, mode, offset, length)
        finally:
            release(response)
        if received != length:
            part.unlink()
            raise exceptions.DownloadLengthMismatchError(
                f"{url}: the server sent {'more' if received > length else 'fewer'} than the {length} bytes "
                "the trusted metadata lists")

    def _append(self, url: str, response: urllib3.BaseHTTPResponse, part: Path, mode: str, offset: int,
                length: int) -> int:
        """Write the body to ``part`` (``mode`` "ab" after ``offset`` bytes, or "wb"), stopping
        past ``length``; the byte count reached, fsync'd when it is ``length``."""
        received = offset
        with part.open(mode) as out:
            try:
                for chunk in response.stream(self.config.chunk_size, decode_content=False):
                    received += len(chunk)
                    if received > length:
                        return received
                    out.write(chunk)
            except urllib3.exceptions.HTTPError as e:
                raise exceptions.DownloadError(
                    f"{url}: interrupted after {received} of {length} bytes ({describe(e)}); run again to resume"
                ) from e
            if received == length:
                out.flush()
                os.fsync(out.fileno())
        return received

    def check_free_space(self, directory: Path, needed: int) -> None:
        free = shutil.disk_usage(directory).free
        if free < needed + self.config.disk_reserve:
            raise InsufficientDiskSpace(
                f"not enough disk space in {directory}: {needed + self.config.disk_reserve} bytes needed, "
                f"{free} free")


def release(response: urllib3.BaseHTTPResponse) -> None:
    """Give the connection back to the pool. urllib3 already did when the body was read to its
    end; otherwise closing drops it (a connection in the middle of a body cannot carry the next
    request) and the pool opens a new one."""
    response.close()
    response.release_conn()


def content_range_start(response: urllib3.BaseHTTPResponse) -> int | None:
    """The first byte of a ``Content-Range: bytes START-END/TOTAL`` answer, if it is one."""
    unit, _, spec = response.headers.get("Content-Range", "").partition(" ")
    start = spec.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def describe(error: BaseException) -> str:
    """One line for an error; for urllib3's, its own message without the pool and URL it repeats."""
    if isinstance(error, urllib3.exceptions.MaxRetryError) and error.reason is not None:
        return describe(error.reason)
    cause = error.__cause__
    if isinstance(error, urllib3.exceptions.NewConnectionError) and isinstance(cause, OSError) and cause.strerror:
        return f"cannot connect: {cause.strerror}"
    text = str(error)
    if isinstance(error, urllib3.exceptions.HTTPError):
        text = next((arg for arg in reversed(error.args) if isinstance(arg, str)), text)
    return " ".join(text.split()) or type(error).__name__
