"""The TUF client: every update the agent installs is verified here, by ``tuf.ngclient``.

It runs in the short-lived ``corral tuf-client`` process, never in the resident agent (ADR 0007,
ADR 0010). Three operations, those of the tuf-conformance client contract:

- :func:`init` stores a trusted root (``METADATA_DIR/root.json``); no network.
- :meth:`TufClient.refresh` runs the TUF client workflow (root rotation, timestamp, snapshot,
  targets; every signature, threshold, version and expiry check) with python-tuf's ``Updater``.
  python-tuf keeps the trusted metadata under non-versioned names (``root.json``,
  ``timestamp.json``, ``snapshot.json``, ``targets.json``, delegated roles by URL-quoted name).
- :meth:`TufClient.download` refreshes, looks the target up in the trusted metadata, and stores
  it in the target directory as ``quote(target_path, "")``, python-tuf's own naming. A file
  already there whose length and hashes match is kept without a request. Otherwise the bytes go
  into a hidden ``.NAME.part`` beside it (resumed if an earlier run was interrupted), are checked
  against the trusted ``TargetFile`` (length and every hash), and only then renamed into place:
  a file under the stable name is always a verified one.

python-tuf's own ``Updater.download_target`` is not used for the bytes: it neither resumes nor
checks disk space, and it writes the destination in place rather than by rename.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from tuf.api import exceptions
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import Updater, UpdaterConfig

from corral.agent.update.fetcher import HttpFetcher, TufClientError, describe
from corral.fileio import atomic_write, fsync_dir

# python-tuf logs what it is about to raise; the CLI says it once, on one line
logging.getLogger("tuf").addHandler(logging.NullHandler())


def init(metadata_dir: Path, trusted_root: Path) -> None:
    """Make ``trusted_root`` the trust anchor of ``metadata_dir`` (replacing any earlier one)."""
    if not metadata_dir.is_dir():
        raise TufClientError(f"metadata dir {metadata_dir} is not a directory")
    try:
        data = trusted_root.read_bytes()
    except OSError as e:
        raise TufClientError(f"cannot read the trusted root {trusted_root}: {e.strerror}") from e
    try:
        Metadata[Root].from_bytes(data)
    except (exceptions.RepositoryError, ValueError, KeyError, TypeError) as e:
        raise TufClientError(f"{trusted_root} is not TUF root metadata: {describe(e)}") from e
    atomic_write(metadata_dir / "root.json", data)


@dataclass
class TufClient:
    """python-tuf's ``Updater`` over :class:`HttpFetcher`, for one metadata dir and repository."""

    metadata_dir: Path
    metadata_url: str
    fetcher: HttpFetcher = field(default_factory=HttpFetcher)
    config: UpdaterConfig = field(default_factory=UpdaterConfig)

    def _updater(self) -> Updater:
        if not (self.metadata_dir / "root.json").is_file():
            raise TufClientError(f"no trusted root in {self.metadata_dir}: run `corral tuf-client init` first")
        # bootstrap=None: the trust anchor is the root.json that init stored (and python-tuf
        # updated on every verified rotation since)
        return Updater(str(self.metadata_dir), self.metadata_url, fetcher=self.fetcher, config=self.config,
                       bootstrap=None)

    def refresh(self) -> Updater:
        updater = self._updater()
        with self.refused():
            updater.refresh()
        return updater

    @contextmanager
    def refused(self) -> Iterator[None]:
        """Metadata that fails verification, named as such (python-tuf says only what failed)."""
        try:
            yield
        except exceptions.RepositoryError as e:
            raise TufClientError(f"metadata from {self.metadata_url} refused: {describe(e)}") from e

    def download(self, target_path: str, target_base_url: str, target_dir: Path) -> Path:
        """The verified file of ``target_path`` in ``target_dir``, downloaded unless already there."""
        updater = self.refresh()
        with self.refused():  # delegated targets roles are loaded here
            info = updater.get_targetinfo(target_path)
        if info is None:
            raise TufClientError(f"target {target_path!r} is not in the repository's trusted metadata")
        name = quote(info.path, "")
        if name in ("", ".", ".."):
            raise TufClientError(f"target path {info.path!r} cannot name a file")
        if not target_dir.is_dir():
            raise TufClientError(f"target dir {target_dir} is not a directory")
        destination = target_dir / name
        if updater.find_cached_target(info, str(destination)) is not None:
            return destination
        part = target_dir / f".{name}.part"
        self.fetcher.download_to_part(self.target_url(updater, info, target_base_url), part, info.length)
        try:
            with part.open("rb") as f:
                info.verify_length_and_hashes(f)
        except exceptions.LengthOrHashMismatchError as e:
            part.unlink()
            raise TufClientError(f"target {info.path!r} does not match the trusted metadata, "
                                 f"not stored: {describe(e)}") from e
        os.replace(part, destination)
        fsync_dir(target_dir)
        return destination

    def target_url(self, updater: Updater, info: TargetFile, base_url: str) -> str:
        """Where the repository serves ``info``: with consistent snapshots (as python-tuf's
        ``download_target`` does) under ``DIR/HASH.NAME``, the first hash the metadata lists."""
        path = info.path
        if updater.config.prefix_targets_with_hash:
            # python-tuf keeps root.json the newest verified root (it has no public getter)
            root = Metadata[Root].from_file(str(self.metadata_dir / "root.json")).signed
            if root.consistent_snapshot:
                path = info.get_prefixed_paths()[0]
        return base_url.rstrip("/") + "/" + quote(path)


