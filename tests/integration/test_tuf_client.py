"""``corral tuf-client`` against a real TUF repository served over HTTP on loopback.

The repository is built here with python-tuf's Metadata API (Ed25519 keys, one per top-level
role) and served by a threaded ``http.server`` that understands ``Range``, logs every request and
can cut a transfer short. Every run is the real ``corral tuf-client`` process, as the agent (and
the tuf-conformance suite) starts it: the exit status, the trusted metadata it keeps and the
files it leaves in the target dir are what is asserted. No attack may leave anything there.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from tests.conftest import corral_cmd

ROOT = Path(__file__).resolve().parents[2]
ROLES = (Root.type, Timestamp.type, Snapshot.type, Targets.type)


@dataclass
class Served:
    """What the HTTP server answers: ``files`` by URL path; ``cut`` stops a body after N bytes
    (the connection closes mid-transfer); ``log`` is every (path, Range, Authorization)."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)
    log: list[tuple[str, str | None, str | None]] = field(default_factory=list)


def handler_for(served: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = unquote(self.path)
            served.log.append((path, self.headers.get("Range"), self.headers.get("Authorization")))
            data = served.files.get(path)
            if data is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status, start = 200, 0
            requested = self.headers.get("Range", "")
            if requested.startswith("bytes=") and requested.endswith("-"):
                start = int(requested[6:-1])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            self.send_response(status)
            self.send_header("Content-Length", str(len(data) - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            body = data[start:]
            if path in served.cut:
                self.wfile.write(body[: served.cut[path]])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that closes its keep-alive connection is not news


@pytest.fixture
def served() -> Iterator[tuple[Served, str]]:
    state = Served()
    server = QuietServer(("127.0.0.1", 0), handler_for(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def in_days(days: float) -> datetime.datetime:
    return (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)).replace(microsecond=0)


class Repository:
    """A TUF repository (top-level roles only) publishing into ``served.files`` under
    ``/metadata/`` and ``/targets/``, with consistent snapshots or without."""

    def __init__(self, served: Served, consistent_snapshot: bool = True) -> None:
        self.served = served
        self.signers = {role: CryptoSigner.generate_ed25519() for role in ROLES}
        root = Root(expires=in_days(365), consistent_snapshot=consistent_snapshot)
        for role, signer in self.signers.items():
            root.add_key(signer.public_key, role)
        self.root = Metadata(root)
        self.targets = Metadata(Targets(expires=in_days(30)))
        self.snapshot = Metadata(Snapshot(expires=in_days(7)))
        self.timestamp = Metadata(Timestamp(expires=in_days(1)))
        self.root_bytes = self.signed(self.root)
        self.put_metadata(f"{root.version}.root.json", self.root_bytes)
        self.published = False

    @property
    def consistent(self) -> bool:
        return self.root.signed.consistent_snapshot

    def signed(self, metadata: Metadata, signer: CryptoSigner | None = None) -> bytes:
        metadata.signatures.clear()
        metadata.sign(signer or self.signers[metadata.signed.type])
        return metadata.to_bytes(JSONSerializer())

    def put_metadata(self, name: str, data: bytes) -> None:
        self.served.files[f"/metadata/{name}"] = data

    def add_target(self, path: str, data: bytes) -> TargetFile:
        info = TargetFile.from_data(path, data, ["sha256"])
        self.targets.signed.targets[path] = info
        self.served.files[self.target_url_path(info)] = data
        return info

    def target_url_path(self, info: TargetFile) -> str:
        return "/targets/" + (info.get_prefixed_paths()[0] if self.consistent else info.path)

    def publish(self, timestamp_signer: CryptoSigner | None = None) -> dict[str, bytes]:
        """Sign a new targets, snapshot and timestamp version; the bytes of each, by role."""
        if self.published:
            for md in (self.targets, self.snapshot, self.timestamp):
                md.signed.version += 1
        self.published = True
        out = {"targets": self.signed(self.targets)}
        self.snapshot.signed.meta["targets.json"] = MetaFile(self.targets.signed.version)
        out["snapshot"] = self.signed(self.snapshot)
        self.timestamp.signed.snapshot_meta = MetaFile(self.snapshot.signed.version)
        out["timestamp"] = self.signed(self.timestamp, timestamp_signer)
        for role in ("targets", "snapshot"):
            version = getattr(self, role).signed.version
            self.put_metadata(f"{version}.{role}.json" if self.consistent else f"{role}.json", out[role])
        self.put_metadata("timestamp.json", out["timestamp"])
        return out


@dataclass
class Client:
    base: str
    metadata_dir: Path
    target_dir: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(corral_cmd("tuf-client", "--metadata-dir", str(self.metadata_dir), *args), cwd=ROOT,
                              capture_output=True, text=True, timeout=60, env=self.env)

    def init(self, root: Path) -> subprocess.CompletedProcess[str]:
        return self.run("init", str(root))

    def refresh(self) -> subprocess.CompletedProcess[str]:
        return self.run("--metadata-url", f"{self.base}/metadata", "refresh")

    def download(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.run("--metadata-url", f"{self.base}/metadata", "--target-name", name,
                        "--target-base-url", f"{self.base}/targets", "--target-dir", str(self.target_dir),
                        "download")

    def version(self, role: str) -> int:
        return Metadata.from_file(str(self.metadata_dir / f"{role}.json")).signed.version

    def target_files(self) -> list[str]:
        """Everything in the target dir, hidden ``.part`` files included."""
        return sorted(p.name for p in self.target_dir.iterdir())


def failed(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a run that must have failed with exit status 1."""
    print(result.stderr, end="")
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stderr)
    return result.stdout


def new_client(tmp_path: Path, base: str, repo: Repository) -> Client:
    client = Client(base, tmp_path / "metadata", tmp_path / "targets")
    client.metadata_dir.mkdir()
    client.target_dir.mkdir()
    root_file = tmp_path / "initial_root.json"
    root_file.write_bytes(repo.root_bytes)
    ok(client.init(root_file))
    return client


ARTIFACT = bytes(range(256)) * 800  # 200 KiB: several chunks


@pytest.mark.parametrize("consistent", [True, False], ids=["consistent-snapshot", "plain-names"])
def test_init_refresh_download_and_skip_when_present(tmp_path: Path, served: tuple[Served, str],
                                                     consistent: bool) -> None:
    state, base = served
    repo = Repository(state, consistent_snapshot=consistent)
    info = repo.add_target("apps/demo/demo-1.2.0.tar.zst", ARTIFACT)
    repo.publish()
    client = new_client(tmp_path, base, repo)
    assert [p.name for p in client.metadata_dir.glob("*.json")] == ["root.json"]
    assert state.log == []  # init makes no request

    ok(client.refresh())
    for role in ROLES:  # non-versioned names, as the conformance contract wants
        assert client.version(role) == 1
    assert client.target_files() == []

    path = ok(client.download(info.path)).strip()
    stored = client.target_dir / quote(info.path, "")
    assert path == str(stored)
    assert stored.read_bytes() == ARTIFACT
    assert client.target_files() == [stored.name]
    target_requests = [entry for entry in state.log if entry[0].startswith("/targets/")]
    assert target_requests == [(repo.target_url_path(info), None, None)]

    state.log.clear()
    ok(client.download(info.path))  # already there with matching hashes: no transfer
    assert [entry for entry in state.log if entry[0].startswith("/targets/")] == []
    assert any(entry[0] == "/metadata/timestamp.json" for entry in state.log)  # but a refresh

    new = ARTIFACT[::-1]  # a new version under the same target path replaces the file
    repo.add_target(info.path, new)
    repo.publish()
    ok(client.download(info.path))
    assert stored.read_bytes() == new
    assert client.target_files() == [stored.name]
    assert client.version("targets") == 2


def test_a_target_of_a_delegated_role_with_an_unusual_name(tmp_path: Path, served: tuple[Served, str]) -> None:
    """Role names are quoted in URLs and in the metadata dir's file names (python-tuf's rule)."""
    state, base = served
    repo = Repository(state)
    role, signer = "../releases?", CryptoSigner.generate_ed25519()
    repo.targets.signed.delegations = Delegations(keys={}, roles={role: DelegatedRole(role, [], 1, True, ["apps/*"])})
    repo.targets.signed.add_key(signer.public_key, role)
    delegated = Metadata(Targets(expires=in_days(30)))
    info = TargetFile.from_data("apps/demo.tar.zst", ARTIFACT, ["sha256"])
    delegated.signed.targets[info.path] = info
    state.files[repo.target_url_path(info)] = ARTIFACT
    repo.snapshot.signed.meta[f"{role}.json"] = MetaFile(1)
    repo.put_metadata(f"1.{role}.json", repo.signed(delegated, signer))
    repo.publish()
    client = new_client(tmp_path, base, repo)

    ok(client.download(info.path))
    assert ("/metadata/1.../releases?.json", None, None) in state.log
    assert client.version(quote(role, "")) == 1
    assert (client.target_dir / "apps%2Fdemo.tar.zst").read_bytes() == ARTIFACT


def test_a_bearer_token_from_the_environment_goes_with_every_request(tmp_path: Path,
                                                                      served: tuple[Served, str]) -> None:
    state, base = served
    repo = Repository(state)
    repo.add_target("a.bin", b"payload")
    repo.publish()
    client = new_client(tmp_path, base, repo)
    client.env["CORRAL_TUF_TOKEN"] = "device-session-token"
    ok(client.download("a.bin"))
    assert state.log and {auth for _, _, auth in state.log} == {"Bearer device-session-token"}


def test_an_interrupted_download_resumes_with_range(tmp_path: Path, served: tuple[Served, str]) -> None:
    state, base = served
    repo = Repository(state)
    info = repo.add_target("rootfs.img", ARTIFACT)
    repo.publish()
    client = new_client(tmp_path, base, repo)
    url_path = repo.target_url_path(info)
    state.cut[url_path] = 70_000

    line = failed(client.download("rootfs.img"))
    assert "resume" in line
    part = client.target_dir / ".rootfs.img.part"
    assert client.target_files() == [part.name]  # no file under the target's name
    kept = part.stat().st_size
    assert 0 < kept <= 70_000
    assert part.read_bytes() == ARTIFACT[:kept]

    del state.cut[url_path]
    state.log.clear()
    ok(client.download("rootfs.img"))
    assert (url_path, f"bytes={kept}-", None) in state.log
    assert (client.target_dir / "rootfs.img").read_bytes() == ARTIFACT
    assert client.target_files() == ["rootfs.img"]


def test_a_part_that_does_not_verify_is_discarded_and_the_next_run_starts_over(
        tmp_path: Path, served: tuple[Served, str]) -> None:
    state, base = served
    repo = Repository(state)
    repo.add_target("rootfs.img", ARTIFACT)
    repo.publish()
    client = new_client(tmp_path, base, repo)
    (client.target_dir / ".rootfs.img.part").write_bytes(b"\xff" * 1000)  # not the artifact's first bytes

    assert "rootfs.img" in failed(client.download("rootfs.img"))
    assert client.target_files() == []
    ok(client.download("rootfs.img"))
    assert (client.target_dir / "rootfs.img").read_bytes() == ARTIFACT


TARGET = "app.tar.zst"


def started(tmp_path: Path, served: tuple[Served, str]) -> tuple[Repository, TargetFile, Client]:
    """A repository publishing version 1 with :data:`TARGET`, and a client that trusts its root."""
    state, base = served
    repo = Repository(state)
    info = repo.add_target(TARGET, ARTIFACT)
    repo.publish()
    return repo, info, new_client(tmp_path, base, repo)


def flip_a_byte(repo: Repository, info: TargetFile) -> None:
    data = repo.served.files[repo.target_url_path(info)]
    middle = len(data) // 2
    repo.served.files[repo.target_url_path(info)] = data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:]


def serve(change: Callable[[bytes], bytes]) -> Callable[[Repository, TargetFile], None]:
    def tamper(repo: Repository, info: TargetFile) -> None:
        repo.served.files[repo.target_url_path(info)] = change(ARTIFACT)

    return tamper


def sign_another_length(repo: Repository, info: TargetFile) -> None:
    """The served bytes are the real artifact, but the signed metadata lists another length."""
    info.length += 1
    repo.publish()


@pytest.mark.parametrize("tamper", [flip_a_byte, serve(lambda d: d[:-100]), serve(lambda d: d + b"\0" * 4096),
                                    serve(lambda d: d * 20), sign_another_length],
                         ids=["flipped-byte", "truncated", "longer", "endless", "wrong-length"])
def test_a_corrupt_artifact_is_refused_and_nothing_is_stored(
        tmp_path: Path, served: tuple[Served, str], tamper: Callable[[Repository, TargetFile], None]) -> None:
    repo, info, client = started(tmp_path, served)
    tamper(repo, info)
    failed(client.download(TARGET))
    assert client.target_files() == []


def forge_timestamp(repo: Repository, client: Client) -> None:
    repo.add_target(TARGET, b"malicious")
    repo.publish(timestamp_signer=CryptoSigner.generate_ed25519())  # a key the root does not trust


def forge_targets(repo: Repository, client: Client) -> None:
    repo.add_target(TARGET, b"malicious")
    repo.publish()
    repo.put_metadata("2.targets.json", repo.signed(repo.targets, CryptoSigner.generate_ed25519()))


def roll_back_timestamp(repo: Repository, client: Client) -> None:
    old = repo.served.files["/metadata/timestamp.json"]
    repo.publish()
    ok(client.refresh())  # the client trusts version 2 ...
    repo.put_metadata("timestamp.json", old)  # ... and is offered version 1, validly signed


def freeze(repo: Repository, client: Client) -> None:
    repo.add_target(TARGET, b"malicious")
    repo.timestamp.signed.expires = in_days(-1)
    repo.publish()


def mix_and_match(repo: Repository, client: Client) -> None:
    old_targets = repo.served.files["/metadata/1.targets.json"]
    repo.add_target(TARGET, b"malicious")
    repo.publish()
    repo.put_metadata("2.targets.json", old_targets)  # validly signed targets of another snapshot


@pytest.mark.parametrize(("attack", "role", "refused"), [
    (forge_timestamp, "timestamp", "timestamp was signed by 0/1 keys"),
    (forge_targets, "targets", "targets was signed by 0/1 keys"),
    (roll_back_timestamp, "timestamp", "timestamp version 1 must be >= 2"),
    (freeze, "timestamp", "timestamp.json is expired"),
    (mix_and_match, "targets", "Expected targets v2, got v1"),
], ids=["forged-signature", "forged-targets-signature", "rollback", "freeze", "mix-and-match"])
def test_a_metadata_attack_is_refused_and_the_trusted_metadata_stays(
        tmp_path: Path, served: tuple[Served, str], attack: Callable[[Repository, Client], None], role: str,
        refused: str) -> None:
    """python-tuf's own message says what it refused; the attacked role keeps its trusted version
    (the roles verified before it may advance: they are genuine)."""
    repo, _, client = started(tmp_path, served)
    ok(client.refresh())
    attack(repo, client)
    trusted = client.version(role)
    assert refused in failed(client.download(TARGET))
    assert client.version(role) == trusted
    assert client.target_files() == []


def test_bad_input_gets_one_clear_line(tmp_path: Path, served: tuple[Served, str]) -> None:
    state, base = served
    repo = Repository(state)
    repo.publish()
    client = Client(base, tmp_path / "missing", tmp_path / "targets")
    assert "missing" in failed(client.refresh())
    root_file = tmp_path / "root.json"
    root_file.write_bytes(repo.root_bytes)
    assert "missing" in failed(client.init(root_file))

    client.metadata_dir.mkdir()
    (tmp_path / "broken.json").write_text('{"signed": {"_type": "root"')
    assert "not TUF root metadata" in failed(client.init(tmp_path / "broken.json"))
    assert "cannot read" in failed(client.init(tmp_path / "no-such-file.json"))
    assert list(client.metadata_dir.iterdir()) == []

    ok(client.init(root_file))
    client.target_dir.mkdir()
    assert "not in the repository" in failed(client.download("nope.bin"))

    with socket_closed_port() as port:
        client.base = f"http://127.0.0.1:{port}"
        assert "127.0.0.1" in failed(client.refresh())


class socket_closed_port:
    """A loopback port nothing listens on (bound, never listening, for the duration)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_the_stored_root_is_the_one_given(tmp_path: Path, served: tuple[Served, str]) -> None:
    state, base = served
    repo = Repository(state)
    client = new_client(tmp_path, base, repo)
    assert (client.metadata_dir / "root.json").read_bytes() == repo.root_bytes
