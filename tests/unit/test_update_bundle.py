"""The app bundle contract: the manifest read strictly, members checked, the bundle scanned and
extracted as a stream (bad bundles refused, nothing written outside the slot)."""

from __future__ import annotations

import os
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from corral.agent.update.bundle import (
    extract_bundle,
    link_stays_inside,
    member_path,
    resolves_inside,
    scan_bundle,
)
from corral.agent.update.installers import ArtifactRefused, DiskFull, SpaceBudget
from corral.agent.update.manifest import HealthSpec, RunSpec, parse_manifest
from tests.bundles import Entry, app, bundle, directory, file, hardlink, manifest, symlink

FULL = b'''name = "demo"
version = "1.2.0"
[run]
command = "./bin/demo --port 8081"
[health]
command = "./bin/healthcheck"
http = "http://127.0.0.1:8081/health"
timeout = "30s"
'''


def test_the_manifest_of_the_contract() -> None:
    m = parse_manifest(FULL)
    assert (m.name, m.version) == ("demo", "1.2.0")
    assert m.run == RunSpec("./bin/demo --port 8081")
    assert m.health == HealthSpec("./bin/healthcheck", "http://127.0.0.1:8081/health", 30.0)
    minimal = parse_manifest(b'name = "x"\nversion = "1"\n')
    assert (minimal.run, minimal.health) == (None, None)


@pytest.mark.parametrize(("text", "message"), [
    (b'version = "1"', "name is missing"),
    (b'name = "x"', "version is missing"),
    (b'name = 3\nversion = "1"', "name must be a non-empty string"),
    (b'name = ""\nversion = "1"', "name must be a non-empty string"),
    (b'name = "../x"\nversion = "1"', "name '../x' must be 1-64 letters"),
    (b'name = ".x"\nversion = "1"', "name '.x' must be"),
    (b'name = "x"\nversion = "1"\nextra = 1', "unknown key 'extra'"),
    (b'name = "x"\nversion = "1"\nrun = "go"', "[run] must be a table"),
    (b'name = "x"\nversion = "1"\n[run]\n', "run.command is missing"),
    (b'name = "x"\nversion = "1"\n[run]\ncommand = "a"\nuser = "root"', "unknown key run.'user'"),
    (b'name = "x"\nversion = "1"\n[health]\ntimeout = "3s"', "[health] needs a command or an http URL"),
    (b'name = "x"\nversion = "1"\n[health]\nhttp = "ftp://h/"', "health.http must be an http:// URL"),
    (b'name = "x"\nversion = "1"\n[health]\nhttp = "http://h/"\ntimeout = "soon"', "health.timeout: not a duration"),
    (b'name = "x"\nversion = "1\n', "not valid TOML"),
    (b'\xff', "not UTF-8"),
])
def test_a_bad_manifest_says_what_is_wrong(text: bytes, message: str) -> None:
    with pytest.raises(ArtifactRefused, match=r"corral-app\.toml: ") as e:
        parse_manifest(text)
    assert message in e.value.detail


@pytest.mark.parametrize(("name", "path"), [("a/b", "a/b"), ("./a//b/", "a/b"), (".", ""), ("./", "")])
def test_member_paths_are_normalized(name: str, path: str) -> None:
    assert member_path(name) == path


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../x", "a/..", ""])
def test_absolute_and_dotdot_member_paths_are_refused(name: str) -> None:
    with pytest.raises(ArtifactRefused):
        member_path(name)


@pytest.mark.parametrize(("path", "target", "inside"), [
    ("lib/x.so", "x.so.1", True),
    ("bin/x", "../lib/x", True),
    ("a/b/c", "../../d", True),
    ("x", "..", False),
    ("bin/x", "../../etc", False),
    ("x", "/etc/passwd", False),
    ("x", "", False),
])
def test_link_targets_read_lexically(path: str, target: str, inside: bool) -> None:
    assert link_stays_inside(path, target) is inside


@pytest.mark.parametrize(("path", "inside"), [
    ("x", False),  # d/up/.. is the slot's parent: d/up is the slot itself
    ("d/up", True),
    ("d/up/d/up/d", True),
    ("loop", False),
    ("abs", False),
    ("ok", True),
])
def test_links_resolve_through_each_other_as_the_kernel_would(path: str, inside: bool) -> None:
    links = {"d/up": "..", "x": "d/up/..", "loop": "loop2", "loop2": "loop", "abs": "d/up/../../etc",
             "ok": "d/up/d"}
    assert resolves_inside(path, links) is inside


BAD_BUNDLES = {
    "traversal": [file("../evil", "x")],
    "deep traversal": [file("a/../../evil", "x")],
    "absolute path": [file("/tmp/evil", "x")],
    "symlink escape": [symlink("etc", "../../etc")],
    "absolute symlink": [symlink("passwd", "/etc/passwd")],
    "symlink chain escape": [directory("d"), symlink("d/up", ".."), symlink("x", "d/up/..")],
    "write through a symlink": [directory("d"), symlink("link", "d"), file("link/f", "x")],
    "hardlink outside": [hardlink("h", "/etc/passwd")],
    "hardlink to nothing earlier": [hardlink("h", "later"), file("later", "x")],
    "character device": [Entry("dev", kind=tarfile.CHRTYPE)],
    "block device": [Entry("dev", kind=tarfile.BLKTYPE)],
    "fifo": [Entry("fifo", kind=tarfile.FIFOTYPE)],
    "setuid": [file("bin/su", "x", mode=0o4755)],
    "setgid": [file("bin/sg", "x", mode=0o2755)],
    "a path twice": [file("a", "1"), file("a", "2")],
    "manifest as a link": [symlink("corral-app.toml", "other.toml")],
}


@pytest.mark.parametrize("case", sorted(BAD_BUNDLES))
def test_bad_bundles_are_refused_by_scan_and_by_extract_which_writes_nothing_outside(
        tmp_path: Path, case: str) -> None:
    entries = BAD_BUNDLES[case]
    if case != "manifest as a link":
        entries = [file("corral-app.toml", manifest()), *entries]
    path = bundle(tmp_path / "bad.tar.zst", entries)
    with pytest.raises(ArtifactRefused):
        scan_bundle(path)
    dest = tmp_path / "slot" / "inner"
    dest.mkdir(parents=True)
    with pytest.raises(ArtifactRefused):
        extract_bundle(path, dest, SpaceBudget(dest, lambda p: 10**9, 0))
    outside = sorted(p.name for p in tmp_path.iterdir())
    assert outside == ["bad.tar.zst", "slot"]
    assert sorted(p.name for p in (tmp_path / "slot").iterdir()) == ["inner"]


@pytest.mark.parametrize(("entries", "message"), [
    ([file("x", "1")], "no corral-app.toml at its root"),
    ([file("sub/corral-app.toml", manifest())], "no corral-app.toml at its root"),
    ([file("corral-app.toml", b"name = ")], "not valid TOML"),
])
def test_a_bundle_needs_a_valid_manifest_at_its_root(tmp_path: Path, entries: list[Entry], message: str) -> None:
    with pytest.raises(ArtifactRefused, match=message):
        scan_bundle(bundle(tmp_path / "b.tar.gz", entries, compression="gz"))


def test_not_an_archive_and_a_corrupt_one_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"hello world, not an archive")
    with pytest.raises(ArtifactRefused, match=r"not a \.tar\.gz or \.tar\.zst"):
        scan_bundle(plain)
    good = app(tmp_path / "good.tar.zst", files=[file("data", os.urandom(100_000))])
    cut = tmp_path / "cut.tar.zst"
    cut.write_bytes(good.read_bytes()[:-5000])
    with pytest.raises(ArtifactRefused, match="corrupt archive"):
        scan_bundle(cut)
    gz = app(tmp_path / "good.tar.gz", files=[file("data", os.urandom(100_000))], compression="gz")
    cut.write_bytes(gz.read_bytes()[:-5000])
    with pytest.raises(ArtifactRefused, match="corrupt archive"):
        scan_bundle(cut)


@pytest.mark.parametrize("compression", ["zst", "gz"])
def test_a_good_bundle_extracts_with_its_modes_and_in_slot_links(tmp_path: Path, compression: str) -> None:
    path = app(tmp_path / f"b.tar.{compression}", files=[
        directory("bin"), file("bin/run", "#!/bin/sh\n", mode=0o755), directory("lib"),
        file("lib/x.so.1", "so"), symlink("lib/x.so", "x.so.1"), symlink("bin/lib", "../lib"),
        hardlink("bin/run2", "bin/run"), file("deep/er/file", "made parents"),
    ], compression=compression)
    info = scan_bundle(path)
    assert (info.manifest.name, info.entries) == ("demo", 9)
    dest = tmp_path / "slot"
    dest.mkdir()
    m = extract_bundle(path, dest, SpaceBudget(dest, lambda p: 10**9, 0))
    assert m == info.manifest
    assert (dest / "bin/run").stat().st_mode & 0o777 == 0o755
    assert (dest / "lib/x.so").read_text() == "so"
    assert (dest / "bin/lib/x.so.1").read_text() == "so"
    assert (dest / "bin/run2").stat().st_ino == (dest / "bin/run").stat().st_ino
    assert (dest / "deep/er/file").read_text() == "made parents"


def test_the_space_budget_stops_an_extraction_before_the_disk_is_full(tmp_path: Path) -> None:
    path = app(tmp_path / "b.tar.zst", files=[file(f"f{i}", os.urandom(300_000)) for i in range(5)])
    dest = tmp_path / "slot"
    dest.mkdir()
    with pytest.raises(DiskFull, match="not enough space"):
        extract_bundle(path, dest, SpaceBudget(dest, lambda p: 1_000_000, 0))
    assert sorted(p.name for p in dest.iterdir()) == ["corral-app.toml", "f0", "f1", "f2"]


def test_a_large_bundle_extracts_in_bounded_memory(tmp_path: Path) -> None:
    """200 MB of file data (zeros: the archive is small, and the extracted file sparse) through
    zstd and tarfile's stream mode: the peak of Python allocations stays a few MB."""
    size = 200 * 1024 * 1024
    path = bundle(tmp_path / "big.tar.zst", [file("corral-app.toml", manifest())], big=("data.bin", size))
    dest = tmp_path / "slot"
    dest.mkdir()
    tracemalloc.start()
    try:
        extract_bundle(path, dest, SpaceBudget(dest, lambda p: 10**12, 0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (dest / "data.bin").stat().st_size == size
    assert peak < 8 * 1024 * 1024, peak
