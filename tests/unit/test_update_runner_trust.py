"""The update runner's trust on first use fetches the TUF root only over http(s): a metadata URL
of another scheme (file://, ftp://, which urllib would also open) is refused with a reason and
nothing is fetched or trusted."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral import protocol
from corral.agent.config import load_config
from corral.agent.update.runner import UpdateRunner


@pytest.mark.parametrize("url", ["file:///etc", "ftp://127.0.0.1/tuf", "/device/v1/tuf/metadata"])
def test_a_root_is_fetched_on_first_use_only_over_http(tmp_path: Path, url: str) -> None:
    runner = UpdateRunner(load_config(server="http://127.0.0.1:9", state_dir=tmp_path / "state"))
    job = protocol.Deploy(deployment_id="d", name="demo", version="1.0.0", kind="app", target_name="demo/1.0.0/x",
                          metadata_url=url, target_base_url="http://127.0.0.1:9/t")
    why = runner._trust(job)
    assert why is not None and "is not http(s)" in why
    assert not (runner.dir / "root-tofu.json").exists()
    assert not (runner.dir / "tuf" / "root.json").exists()
