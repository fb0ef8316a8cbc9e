"""The TUF client's HTTP seam (``corral.agent.update.fetcher``) over a fake urllib3 pool,
and what the agent and ``corral tuf-client`` processes import. The TUF workflow itself, the
attacks and resuming over a real socket: ``tests/integration/test_tuf_client.py``."""

from __future__ import annotations

import io
import subprocess
import sys
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import urllib3
from tuf.api import exceptions

from corral.agent.update import fetcher as fetcher_module
from corral.agent.update.fetcher import BearerAuth, FetchConfig, HttpFetcher, InsufficientDiskSpace, no_auth

ROOT = Path(__file__).resolve().parents[2]
DATA = bytes(range(256)) * 40
URL = "https://repo.example/targets/app.bin"


@dataclass
class Request:
    url: str
    headers: dict[str, str]


@dataclass
class FakePool:
    """``urllib3.PoolManager.request`` answered from memory; every request is kept in ``seen``."""

    data: bytes
    honour_range: bool = True
    seen: list[Request] = field(default_factory=list)

    def request(self, method: str, url: str, headers: dict[str, str], **kwargs: object) -> urllib3.HTTPResponse:
        self.seen.append(Request(url, headers))
        status, body, extra = 200, self.data, {}
        requested = headers.get("Range", "")
        if self.honour_range and requested.startswith("bytes="):
            start = int(requested[6:-1])
            status, body = 206, self.data[start:]
            extra = {"Content-Range": f"bytes {start}-{len(self.data) - 1}/{len(self.data)}"}
        if url.endswith("missing.json"):
            status, body = 404, b""
        return urllib3.HTTPResponse(io.BytesIO(body), headers={"Content-Length": str(len(body)), **extra},
                                    status=status, preload_content=False)


def fetcher_for(pool: FakePool) -> HttpFetcher:
    return HttpFetcher(FetchConfig(chunk_size=1000), pool=pool)  # type: ignore[arg-type]


def test_metadata_is_streamed_and_http_errors_carry_the_status() -> None:
    pool = FakePool(DATA)
    fetcher = fetcher_for(pool)
    assert fetcher.download_bytes("https://repo.example/metadata/timestamp.json", len(DATA)) == DATA
    with pytest.raises(exceptions.DownloadLengthMismatchError):  # python-tuf enforces the role's limit
        fetcher.download_bytes("https://repo.example/metadata/timestamp.json", len(DATA) - 1)
    with pytest.raises(exceptions.DownloadHTTPError) as error:
        fetcher.download_bytes("https://repo.example/metadata/missing.json", 100)
    assert error.value.status_code == 404
    assert {r.headers["Accept-Encoding"] for r in pool.seen} == {"identity"}


def test_the_token_goes_only_to_the_repository_origins() -> None:
    auth = BearerAuth("t0k", ["https://repo.example/metadata", "https://cdn.example:8443/targets"])
    assert auth("https://repo.example/metadata/1.root.json") == {"Authorization": "Bearer t0k"}
    assert auth("https://CDN.example:8443/targets/x") == {"Authorization": "Bearer t0k"}
    assert auth("http://repo.example/metadata/1.root.json") == {}  # not over another scheme
    assert auth("https://elsewhere.example/targets/x") == {}
    assert no_auth(URL) == {}

    pool = FakePool(DATA)
    fetcher = HttpFetcher(auth=auth, pool=pool)  # type: ignore[arg-type]
    fetcher.download_bytes("https://repo.example/metadata/timestamp.json", len(DATA))
    fetcher.download_bytes("https://elsewhere.example/metadata/timestamp.json", len(DATA))
    assert [r.headers.get("Authorization") for r in pool.seen] == ["Bearer t0k", None]


def test_a_part_is_resumed_with_range(tmp_path: Path) -> None:
    pool = FakePool(DATA)
    part = tmp_path / ".app.bin.part"
    part.write_bytes(DATA[:3000])
    fetcher_for(pool).download_to_part(URL, part, len(DATA))
    assert part.read_bytes() == DATA
    assert [r.headers.get("Range") for r in pool.seen] == ["bytes=3000-"]

    fetcher_for(pool).download_to_part(URL, part, len(DATA))  # complete already: no request
    assert len(pool.seen) == 1


def test_a_server_that_ignores_range_restarts_the_part(tmp_path: Path) -> None:
    part = tmp_path / ".app.bin.part"
    part.write_bytes(b"x" * 3000)
    fetcher_for(FakePool(DATA, honour_range=False)).download_to_part(URL, part, len(DATA))
    assert part.read_bytes() == DATA


@pytest.mark.parametrize("served", [DATA + b"more", DATA[:-1]], ids=["longer", "shorter"])
def test_a_body_of_another_length_removes_the_part(tmp_path: Path, served: bytes) -> None:
    part = tmp_path / ".app.bin.part"
    with pytest.raises(exceptions.DownloadLengthMismatchError):
        fetcher_for(FakePool(served)).download_to_part(URL, part, len(DATA))
    assert not part.exists()


def test_free_space_is_checked_before_any_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fetcher_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    pool = FakePool(DATA)
    part = tmp_path / ".app.bin.part"
    part.write_bytes(DATA[:2000])
    with pytest.raises(InsufficientDiskSpace, match=f"{len(DATA) - 2000} bytes needed, 1000 free"):
        fetcher_for(pool).download_to_part(URL, part, len(DATA))
    assert pool.seen == []
    assert part.stat().st_size == 2000  # what was there is kept for later


def loaded_modules(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "; print(' '.join(sorted(sys.modules)))"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_agent_process_imports_no_tuf() -> None:
    """ADR 0007: python-tuf (and securesystemslib, urllib3) only in ``corral tuf-client``."""
    loaded = loaded_modules("import sys; import corral.cli.entry, corral.agent.cli, corral.agent.main")
    assert not {m for m in loaded if m.split(".")[0] in ("tuf", "securesystemslib", "urllib3", "httpx")}
    assert not {m for m in loaded if m.startswith("corral.agent.update.")}


def test_corral_tuf_client_starts_without_the_operator_cli() -> None:
    loaded = loaded_modules("import sys; import corral.cli.entry, corral.agent.update.cli, "
                            "corral.agent.update.tuf_client")
    assert "tuf.ngclient" in loaded
    assert not loaded & {"typer", "click", "rich", "httpx", "fastapi", "sqlalchemy", "corral.cli.main"}
