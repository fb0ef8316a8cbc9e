"""Agent config: TOML file, flag overrides, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.agent.config import (
    DEFAULT_STATE_DIR,
    AgentConfig,
    config_from_dict,
    device_ws_url,
    load_config,
)
from corral.errors import InvalidInput

EXAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "agent.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_defaults_need_only_a_server() -> None:
    cfg = load_config(server="https://corral.example.com")
    assert cfg.state_dir == DEFAULT_STATE_DIR
    assert cfg.enroll_token is None
    assert cfg.reboot_command == ("systemctl", "reboot")
    assert cfg.backoff.base > 0 and cfg.backoff.cap >= cfg.backoff.base
    assert cfg.device_url == "wss://corral.example.com/device/v1/connect"


def test_file_then_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
server = "http://10.0.0.1:8080"
state_dir = "/tmp/corral-state"
enroll_token = "from-file"
connect_timeout = 3
reboot_command = ["/sbin/reboot", "-f"]
model = "custom-board"

[backoff]
base = 0.5
cap = 30
reset_after = 10

[attributes]
site = "berlin"
rack = 4
outdoor = true
""",
    )
    cfg = load_config(path)
    assert cfg.server == "http://10.0.0.1:8080"
    assert cfg.state_dir == Path("/tmp/corral-state")
    assert cfg.connect_timeout == 3.0
    assert cfg.reboot_command == ("/sbin/reboot", "-f")
    assert (cfg.backoff.base, cfg.backoff.cap, cfg.backoff.reset_after) == (0.5, 30.0, 10.0)
    assert cfg.attributes == {"site": "berlin", "rack": 4, "outdoor": True}
    assert cfg.model == "custom-board"
    assert cfg.token() == "from-file"

    over = load_config(path, server="https://other", enroll_token="flag", state_dir=tmp_path / "s")
    assert over.server == "https://other"
    assert over.enroll_token == "flag"
    assert over.state_dir == tmp_path / "s"
    assert over.backoff.cap == 30.0  # untouched keys stay


def test_enroll_token_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("secret-token\n")
    cfg = load_config(write(tmp_path, f'server = "https://x"\nenroll_token_file = "{tmp_path / "token"}"\n'))
    assert cfg.token() == "secret-token"
    # a token flag wins over a token file from the config
    assert load_config(tmp_path / "agent.toml", enroll_token="flag").token() == "flag"
    missing = config_from_dict({"server": "https://x", "enroll_token_file": str(tmp_path / "nope")})
    with pytest.raises(InvalidInput, match="enroll_token_file"):
        missing.token()


@pytest.mark.parametrize(
    ("server", "url"),
    [
        ("http://h:8080", "ws://h:8080/device/v1/connect"),
        ("https://h/", "wss://h/device/v1/connect"),
        ("https://h/corral", "wss://h/corral/device/v1/connect"),
        ("wss://h/device/v1/connect", "wss://h/device/v1/connect"),
        ("HTTPS://h", "wss://h/device/v1/connect"),
    ],
)
def test_device_url(server: str, url: str) -> None:
    assert device_ws_url(server) == url


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('server = "ftp://x"', "must look like https://host"),
        ('server = "corral.example.com"', "must look like https://host"),
        ("connect_timeout = 5", "no server URL"),
        ('server = "https://x"\nconnect_timeot = 5', "unknown field `connect_timeot`"),
        (
            'server = "https://x"\nconnect_timeout = "soon"',
            "Expected `float`, got `str` - at `$.connect_timeout`",
        ),
        ('server = "https://x"\nconnect_timeout = 0', "connect_timeout must be > 0"),
        ('server = "https://x"\n[backoff]\nbase = 10\ncap = 1', "backoff.cap must be >= backoff.base"),
        ('server = "https://x"\n[backoff]\nbase = 0', "backoff.base must be > 0"),
        ('server = "https://x"\nreboot_command = []', "reboot_command must not be empty"),
        ('server = "https://x"\nmax_frame_bytes = 10', "max_frame_bytes must be >= 1024"),
        ('server = "https://x"\n[attributes]\nsite = [1]', "at `$.attributes"),
        ('server = "https://x"\nlog_level = "loud"', "log_level must be one of"),
        ('server = "https://x"\nstate_dir = 5', "Expected a path string"),
        ('server = "https://x"\nenroll_token = "a"\nenroll_token_file = "/t"', "not both"),
        ('server = "https://x"\n[backoff]\ncap = inf', "backoff.cap must be a finite number"),
        ('server = "https://x"\nproxy = "yes"', 'proxy must be "auto", "none" or a proxy URL'),
        ("server = ", "config file"),
    ],
)
def test_invalid_config_is_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        load_config(write(tmp_path, text))
    assert message in info.value.detail
    assert "\n" not in info.value.detail


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not found"):
        load_config(tmp_path / "nope.toml", server="https://x")


def test_missing_server_names_the_flag() -> None:
    with pytest.raises(InvalidInput, match="--server"):
        load_config()


def test_the_packaged_example_is_valid() -> None:
    cfg = load_config(EXAMPLE)
    assert isinstance(cfg, AgentConfig)
    assert cfg.state_dir == DEFAULT_STATE_DIR
