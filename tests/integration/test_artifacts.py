"""The artifact store through a real server process: CLI and REST uploads, list/show/delete, the
SBOM component query, every refused input changing nothing, and Range on the device surface."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProc, server_on

LIMIT = 1_000_000  # --max-artifact-bytes of the servers here

CYCLONEDX = {"bomFormat": "CycloneDX", "specVersion": "1.5", "components": [
    {"type": "library", "name": "OpenSSL", "version": "3.0.13", "purl": "pkg:deb/debian/openssl@3.0.13"},
    {"type": "library", "name": "zlib", "version": "1.3"},
]}
SPDX = {"spdxVersion": "SPDX-2.3", "packages": [
    {"name": "openssl", "versionInfo": "1.1.1w", "externalRefs": [
        {"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
         "referenceLocator": "pkg:generic/openssl@1.1.1w"}]},
]}


@pytest.fixture(params=["sqlite", "postgresql"])
def art_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerProc]:
    yield from server_on(request.param, tmp_path, extra=["--max-artifact-bytes", str(LIMIT)])


@pytest.fixture
def sqlite_server(tmp_path: Path) -> Iterator[ServerProc]:
    yield from server_on("sqlite", tmp_path, extra=["--max-artifact-bytes", str(LIMIT)])


def payload(n: int, seed: int = 0) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (n // 32) + b"x" * (n % 32)


def upload(s: ServerProc, data: bytes, sbom: bytes = b"", token: str | None = None, **params: Any) -> httpx.Response:
    params = {"kind": "app", **params}
    if sbom:
        params["sbom_size"] = len(sbom)
    return s.api("POST", "/artifacts", token=token, params=params, content=sbom + data,
                 headers={"Content-Type": "application/octet-stream"})


def tuf_versions(s: ServerProc) -> dict[str, int]:
    r = s.api("GET", "/tuf")
    assert r.status_code == 200, r.text
    return {role: v["version"] for role, v in r.json()["roles"].items()}


def targets(s: ServerProc) -> dict[str, Any]:
    version = tuf_versions(s)["targets"]
    r = httpx.get(f"{s.url}/device/v1/tuf/metadata/{version}.targets.json")
    assert r.status_code == 200
    return dict(r.json()["signed"]["targets"])


def artifact_files(s: ServerProc) -> list[str]:
    return sorted(os.listdir(s.data_dir / "artifacts"))


def state(s: ServerProc) -> dict[str, Any]:
    """Everything an upload or delete may change."""
    return {"artifacts": s.api("GET", "/artifacts").json()["items"], "tuf": tuf_versions(s),
            "files": artifact_files(s), "audit": s.api("GET", "/audit", params={"action": "artifact."}).json()["items"]}


def test_cli_upload_list_show_components_delete(art_server: ServerProc, tmp_path: Path) -> None:
    s = art_server
    data = payload(300_000)
    f = tmp_path / "demo-1.2.0.tar.zst"
    f.write_bytes(data)
    sbom = tmp_path / "bom.json"
    sbom.write_text(json.dumps(CYCLONEDX))
    before = tuf_versions(s)
    r = s.cli("artifact", "upload", str(f), "--name", "demo", "--version", "1.2.0", "--kind", "app",
              "--hardware", "rpi4", "--hardware", "imx8mm", "--sbom", str(sbom), "--commit", "0123abcD" * 5,
              "--build-url", "https://ci.example.com/jobs/42", "--build-time", "2026-11-30T12:00:00Z", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    sha = hashlib.sha256(data).hexdigest()
    assert doc["name"] == "demo" and doc["version"] == "1.2.0" and doc["kind"] == "app"
    assert doc["hardware"] == ["imx8mm", "rpi4"] and doc["size"] == len(data) and doc["sha256"] == sha
    assert doc["filename"] == "demo-1.2.0.tar.zst"
    assert doc["provenance"] == {"git_commit": "0123abcd" * 5, "build_url": "https://ci.example.com/jobs/42",
                                 "build_time": "2026-11-30T12:00:00.000Z"}
    assert doc["sbom"] == {"format": "CycloneDX 1.5", "components": 2}
    assert doc["tuf"] == {"target_name": "demo/1.2.0/demo-1.2.0.tar.zst",
                          "target_url_path": f"demo/1.2.0/{sha}.demo-1.2.0.tar.zst",
                          "metadata_url": f"{s.url}/device/v1/tuf/metadata",
                          "target_base_url": f"{s.url}/device/v1/tuf/targets"}
    assert (s.data_dir / "artifacts" / sha).read_bytes() == data
    # signed on upload: a new targets version lists it, with a new snapshot and timestamp
    after = tuf_versions(s)
    assert {role: after[role] - before[role] for role in after} == {"root": 0, "targets": 1, "snapshot": 1,
                                                                     "timestamp": 1}
    assert targets(s)["demo/1.2.0/demo-1.2.0.tar.zst"] == {
        "length": len(data), "hashes": {"sha256": sha},
        "custom": {"name": "demo", "version": "1.2.0", "kind": "app", "hardware": ["imx8mm", "rpi4"]}}

    listed = json.loads(s.cli("artifact", "list", "--json").stdout)
    assert [(a["name"], a["version"]) for a in listed] == [("demo", "1.2.0")]
    assert listed[0]["components"] is None
    shown = json.loads(s.cli("artifact", "show", "demo@1.2.0", "--json").stdout)
    assert shown["components"] == [
        {"name": "OpenSSL", "version": "3.0.13", "purl": "pkg:deb/debian/openssl@3.0.13", "type": "library"},
        {"name": "zlib", "version": "1.3", "purl": None, "type": "library"}]
    assert s.cli("artifact", "list").returncode == 0  # the table renders
    assert "demo" in s.cli("artifact", "show", "demo@1.2.0").stdout

    # the supply-chain query: which artifacts contain openssl (names match case-insensitively)
    found = json.loads(s.cli("artifact", "components", "openssl", "--json").stdout)
    assert [(m["artifact"], m["component"]["version"]) for m in found] == [("demo@1.2.0", "3.0.13")]
    assert s.api("GET", "/artifacts/components", params={"name": "openssl", "version": "1.0"}).json()["items"] == []

    audit = s.api("GET", "/audit", params={"action": "artifact."}).json()["items"]
    assert [(e["action"], e["target"], e["actor"]) for e in audit] == [("artifact.upload", "demo@1.2.0", "user:admin")]

    r = s.cli("artifact", "delete", "demo@1.2.0")
    assert r.returncode == 0, r.stderr
    assert json.loads(s.cli("artifact", "list", "--json").stdout) == []
    assert "demo/1.2.0/demo-1.2.0.tar.zst" not in targets(s)
    assert tuf_versions(s)["targets"] == after["targets"] + 1
    assert artifact_files(s) == []
    assert httpx.get(f"{s.url}/device/v1/tuf/targets/{doc['tuf']['target_url_path']}").status_code == 404
    assert s.api("GET", "/artifacts/components", params={"name": "openssl"}).json()["items"] == []
    assert s.api("GET", "/audit", params={"action": "artifact."}).json()["items"][0]["action"] == "artifact.delete"
    r = s.cli("artifact", "delete", "demo@1.2.0")
    assert (r.returncode, r.stderr) == (1, "error: no artifact demo@1.2.0\n")


def test_rest_upload_shares_content_and_concurrent_uploads_keep_every_target(art_server: ServerProc) -> None:
    s = art_server
    data = payload(5000)
    r = upload(s, data, sbom=json.dumps(SPDX).encode(), name="tool", version="1.0", kind="script")
    assert r.status_code == 201, r.text
    assert r.json()["sbom"] == {"format": "SPDX-2.3", "components": 1}
    assert r.json()["filename"] == "tool-1.0"
    assert upload(s, data, name="tool", version="1.1", kind="script").status_code == 201
    sha = hashlib.sha256(data).hexdigest()
    assert artifact_files(s) == [sha]  # content-addressed: one file for both
    found = s.api("GET", "/artifacts/components", params={"name": "OPENSSL"}).json()["items"]
    assert [(m["artifact"], m["component"]["purl"]) for m in found] == [("tool@1.0", "pkg:generic/openssl@1.1.1w")]
    assert s.api("DELETE", "/artifacts/tool/1.0").status_code == 204
    assert artifact_files(s) == [sha]  # still used by tool@1.1
    assert s.api("DELETE", "/artifacts/tool/1.1").status_code == 204
    assert artifact_files(s) == []

    # concurrent uploads each sign their own targets version; none loses another's target
    results: list[int] = []

    def one(i: int) -> None:
        results.append(upload(s, payload(2000, seed=i), name=f"app{i}", version="1.0.0").status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [201] * 6
    assert sorted(targets(s)) == sorted(f"app{i}/1.0.0/app{i}-1.0.0" for i in range(6))


def test_bad_input_is_refused_and_changes_nothing(art_server: ServerProc, tmp_path: Path) -> None:
    s = art_server
    assert upload(s, payload(1000), name="demo", version="1.0.0").status_code == 201
    viewer = s.make_user("vera", "viewer")
    before = state(s)
    cyclonedx_bad = json.dumps({"bomFormat": "CycloneDX", "components": [{"name": "a"}, {"version": "1"}]}).encode()
    cases: list[tuple[dict[str, Any], bytes, bytes, int, str]] = [
        ({"name": "demo", "version": "2.0", "kind": "firmware"}, b"x", b"", 400, "kind 'firmware' is not valid"),
        ({"name": "demo", "version": "latest"}, b"x", b"", 400, "version 'latest' is not valid"),
        ({"name": "demo", "version": "1.0 beta"}, b"x", b"", 400, "version '1.0 beta' is not valid"),
        ({"name": "../etc", "version": "1.0"}, b"x", b"", 400, "name '../etc' is not valid"),
        ({"name": "demo", "version": "2.0", "filename": "../x"}, b"x", b"", 400, "filename '../x' is not valid"),
        ({"name": "demo", "version": "2.0", "commit": "nothex!"}, b"x", b"", 400, "commit 'nothex!' is not a git"),
        ({"name": "demo", "version": "2.0", "build_time": "yesterday"}, b"x", b"", 400, "build_time 'yesterday'"),
        ({"name": "demo", "version": "2.0", "build_url": "ftp://x"}, b"x", b"", 400, "build_url must be"),
        ({"name": "demo", "version": "1.0.0"}, b"x", b"", 409, "artifact demo@1.0.0 exists"),
        ({"name": "demo", "version": "2.0"}, payload(LIMIT + 1), b"", 413,
         f"the artifact is larger than {LIMIT} bytes"),
        ({"name": "demo", "version": "2.0"}, b"", b"", 400, "the artifact is empty"),
        ({"name": "demo", "version": "2.0"}, b"x", b"{not json", 400, "SBOM is not valid JSON"),
        ({"name": "demo", "version": "2.0"}, b"x", b'{"a": 1}', 400, "SBOM format not recognised"),
        ({"name": "demo", "version": "2.0"}, b"x", cyclonedx_bad, 400, "SBOM components[1].name is missing"),
    ]
    for params, data, sbom, status, detail in cases:
        r = upload(s, data, sbom=sbom, **params)
        assert r.status_code == status, (params, r.text)
        assert r.json()["detail"].startswith(detail), (params, r.json())
    r = s.api("POST", "/artifacts", params={"name": "demo", "version": "2.0", "kind": "app"},
              files={"file": ("a.bin", b"x")})
    assert r.status_code == 400 and "not as a form" in r.json()["detail"]
    # an SBOM size that runs past the body
    r = s.api("POST", "/artifacts", params={"name": "demo", "version": "2.0", "kind": "app", "sbom_size": 100},
              content=b"{}")
    assert r.status_code == 400 and "inside the SBOM" in r.json()["detail"]
    # over the limit without a Content-Length: refused while streaming
    r = s.api("POST", "/artifacts", params={"name": "demo", "version": "2.0", "kind": "app"},
              content=iter([payload(300_000)] * 4))
    assert r.status_code == 413, r.text
    # a viewer may read but not upload or delete
    assert upload(s, b"x", token=viewer, name="demo", version="2.0").status_code == 403
    assert s.api("DELETE", "/artifacts/demo/1.0.0", token=viewer).status_code == 403
    assert s.api("GET", "/artifacts", token=viewer).status_code == 200
    # the CLI: one line on stderr, exit 1 (the SBOM and the oversized file are checked by the server)
    f, big = tmp_path / "small.bin", tmp_path / "big.bin"
    f.write_bytes(payload(100))
    big.write_bytes(payload(LIMIT + 10))
    bad_sbom = tmp_path / "bad.json"
    bad_sbom.write_text("[1, 2]")
    for args, detail in [
        (["--kind", "firmware"], "--kind must be one of app, rootfs, script, agent, not 'firmware'"),
        (["--kind", "app", "--version", "x.y"], "version 'x.y' is not valid"),
        (["--kind", "app", "--sbom", str(bad_sbom)], "SBOM must be a JSON object"),
        (["--kind", "app", "--version", "1.0.0"], "artifact demo@1.0.0 exists"),
    ]:
        argv = ["artifact", "upload", str(f), "--name", "demo", "--version", "3.0", *args]
        r = s.cli(*argv)
        assert r.returncode == 1, (args, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(f"error: {detail}"), (args, r.stderr)
    r = s.cli("artifact", "upload", str(big), "--name", "demo", "--version", "3.0", "--kind", "app")
    assert r.returncode == 1 and f"larger than {LIMIT} bytes" in r.stderr, r.stderr
    assert s.cli("artifact", "show", "demo").returncode == 1  # not NAME@VERSION

    assert state(s) == before
    assert not [p for p in os.listdir(s.data_dir / "artifacts") if p.startswith(".upload-")]


def test_targets_and_metadata_are_served_with_range(sqlite_server: ServerProc) -> None:
    s = sqlite_server
    data = payload(200_000)
    doc = upload(s, data, name="demo", version="1.0.0", filename="demo.tar.zst").json()
    url = f"{doc['tuf']['target_base_url']}/{doc['tuf']['target_url_path']}"
    with httpx.Client(timeout=30) as c:
        full = c.get(url, headers={"Accept-Encoding": "identity"})
        assert full.status_code == 200 and full.content == data
        assert full.headers["accept-ranges"] == "bytes" and "content-encoding" not in full.headers
        # resume: the first part, then the rest with Range: bytes=N-
        head = c.get(url, headers={"Range": "bytes=0-69999"})
        assert head.status_code == 206 and head.headers["content-range"] == f"bytes 0-69999/{len(data)}"
        rest = c.get(url, headers={"Range": "bytes=70000-"})
        assert rest.status_code == 206 and rest.headers["content-range"] == f"bytes 70000-{len(data) - 1}/{len(data)}"
        assert int(rest.headers["content-length"]) == len(data) - 70000
        assert head.content + rest.content == data
        past = c.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(data)}"
        assert c.head(url).headers["content-length"] == str(len(data))
        # a wrong hash prefix or a name that is not a target: 404
        wrong = url.replace(doc["sha256"], "0" * 64)
        assert c.get(wrong).status_code == 404
        assert c.get(f"{doc['tuf']['target_base_url']}/demo/1.0.0/demo.tar.zst").status_code == 404
        meta = doc["tuf"]["metadata_url"]
        timestamp = c.get(f"{meta}/timestamp.json")
        assert timestamp.status_code == 200 and timestamp.json()["signed"]["_type"] == "timestamp"
        assert c.get(f"{meta}/1.root.json").json()["signed"]["consistent_snapshot"] is True
        assert c.get(f"{meta}/2.root.json").status_code == 404  # the client's "no newer root"
        assert c.get(f"{meta}/root.json").status_code == 404
    assert s.api("GET", "/tuf/root.json").json() == httpx.get(f"{meta}/1.root.json").json()
    paths = httpx.get(f"{s.url}/openapi.json").json()["paths"]
    assert {"/api/v1/artifacts", "/api/v1/artifacts/{name}/{version}", "/api/v1/artifacts/components",
            "/api/v1/tuf/root.json", "/device/v1/tuf/targets/{path}"} <= set(paths)


def test_uploads_cut_off_by_a_crash_are_removed_at_start(sqlite_server: ServerProc) -> None:
    s = sqlite_server
    stale, fresh = s.data_dir / "artifacts" / ".upload-stale", s.data_dir / "artifacts" / ".upload-fresh"
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"y" * 100)  # another replica's upload in progress
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    s.restart()
    assert not stale.exists() and fresh.exists()
