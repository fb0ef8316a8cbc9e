"""The CLI contract (DESIGN §8): --json on lists and shows, one-line errors with exit 1,
usage errors with exit 2, login storing a token."""

from __future__ import annotations

import json
import os
import stat
import subprocess

from tests.conftest import ServerProc, corral_cmd
from tests.integration.test_registry_api import enroll


def test_login_stores_a_private_token(shared_server: ServerProc, tmp_path) -> None:
    s = shared_server
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    env.pop("CORRAL_TOKEN", None)
    env.pop("CORRAL_SERVER", None)
    r = subprocess.run(corral_cmd("login", "--server", s.url, "--user", "admin", "--password-stdin"),
                       input=s.admin_password + "\n", capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    cfg = tmp_path / "cfg" / "corral" / "config.toml"
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    r = subprocess.run(corral_cmd("device", "list", "--json"), capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), list)

    r = subprocess.run(corral_cmd("login", "--server", s.url, "--user", "admin", "--password-stdin"),
                       input="wrong-password\n", capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1
    assert r.stderr == "error: wrong user name or password\n"


def test_json_on_every_list_and_show(shared_server: ServerProc) -> None:
    s = shared_server
    [dev] = enroll(s, 1, {"site": "osaka"})
    assert s.cli("group", "create", "osaka", "--selector", 'tag.site == "osaka"').returncode == 0
    for args, kind in [
        (["device", "list"], list), (["device", "show", dev], dict), (["group", "list"], list),
        (["group", "show", "osaka"], dict), (["enrollment-token", "list"], list), (["audit", "list"], list),
        (["user", "list"], list), (["audit", "verify"], dict),
        (["device", "list", "--selector", 'tag.site == "osaka"'], list),
    ]:
        r = s.cli(*args, "--json")
        assert r.returncode == 0, (args, r.stderr)
        doc = json.loads(r.stdout)
        assert isinstance(doc, kind), args
    show = json.loads(s.cli("group", "show", "osaka", "--json").stdout)
    assert [d["id"] for d in show["devices"]] == [dev]
    tok = json.loads(s.cli("enrollment-token", "create", "--tag", "site=osaka", "--expires", "24h",
                           "--max-uses", "3", "--json").stdout)
    assert tok["token"].startswith("cet_") and tok["max_uses"] == 3 and tok["tags"] == {"site": "osaka"}
    # human output works too (and escapes markup in values)
    assert s.cli("device", "tag", dev, "note=[bold]x[/bold]").returncode == 0
    r = s.cli("device", "list")
    assert r.returncode == 0 and "[bold]x[/bold]" in r.stdout


def test_errors_are_one_line_with_exit_1(shared_server: ServerProc, tmp_path) -> None:
    s = shared_server
    cases = [
        (["device", "show", "nope"], "no device 'nope'"),
        (["device", "tag", "nope", "a=b"], "no device"),
        (["device", "tag", "x", "novalue"], "KEY=VALUE"),
        (["group", "show", "nope"], "no group"),
        (["enrollment-token", "create", "--expires", "soon"], "not a duration"),
        (["device", "list", "--sort", "bogus"], "sort must be"),
    ]
    for args, needle in cases:
        r = s.cli(*args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, (args, r.stderr)
        assert needle in r.stderr, (args, r.stderr)
    r = s.cli("device", "list", token="crl_wrong")
    assert r.returncode == 1 and r.stderr == "error: invalid API token\n"
    r = s.cli("device", "list", env={"CORRAL_SERVER": "http://127.0.0.1:9"})
    assert r.returncode == 1 and r.stderr.startswith("error: cannot reach") and r.stderr.count("\n") == 1
    r = s.cli("device", "list", env={"CORRAL_TOKEN": "", "XDG_CONFIG_HOME": str(tmp_path)}, token="")
    assert r.returncode == 1 and "not logged in" in r.stderr


def test_usage_errors_exit_2(shared_server: ServerProc) -> None:
    s = shared_server
    for args in (["device", "frobnicate"], ["device", "show"], ["sim", "--devices", "0", "--server", "x"]):
        r = s.cli(*args)
        assert r.returncode == 2, (args, r.stderr)


def test_server_init_refuses_an_initialized_dir(shared_server: ServerProc) -> None:
    r = subprocess.run(corral_cmd("server", "init", "--data-dir", str(shared_server.data_dir), "--json"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "already initialized" in r.stderr and r.stdout == ""


def test_user_roles_from_the_cli(shared_server: ServerProc) -> None:
    s = shared_server
    r = s.cli("user", "create", "viv", "--role", "viewer", "--json")
    assert r.returncode == 0, r.stderr
    password = json.loads(r.stdout)["password"]
    login = s.api("POST", "/auth/login", json={"user": "viv", "password": password})
    viewer_token = login.json()["token"]
    r = s.cli("group", "create", "nope", token=viewer_token)
    assert r.returncode == 1 and "needs the operator role" in r.stderr
    r = s.cli("user", "create", "bad", "--role", "superuser")
    assert r.returncode == 1 and "role must be one of" in r.stderr
