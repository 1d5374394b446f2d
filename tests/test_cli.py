"""The command line: exit codes, messages without tracebacks, config errors naming the field and file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from replayd.sample import load_history_sync
from tests.helpers import cli_env, replayd
from tests.servers import RedisServer

STREAM = "events:orders"


@pytest.fixture
def history(sync_redis: redis.Redis) -> int:
    return load_history_sync(sync_redis, STREAM, 2000)


def test_replay_prints_a_summary_and_exits_0(redis_url: str, history: int) -> None:
    done = replayd("replay", "--redis-url", redis_url, "--stream", STREAM, "--handler", "order_summary")
    assert done.returncode == 0, done.stderr
    assert "replayed 2,000 events" in done.stderr
    assert "Traceback" not in done.stderr


def test_rebuild_writes_the_article_meta_hash(redis_url: str, history: int, sync_redis: redis.Redis) -> None:
    done = replayd("rebuild", "--redis-url", redis_url, "--stream", STREAM, "--handler", "order_summary", "--in-place")
    assert done.returncode == 0, done.stderr
    meta = sync_redis.hgetall("projection:order_summary:meta")
    assert set(meta) == {b"rebuilt_at", b"total_events", b"processed_events"}
    assert meta[b"total_events"] == b"2000"


def test_status_and_checkpoint_show_read_state_back(redis_url: str, history: int) -> None:
    replayd("replay", "--redis-url", redis_url, "--stream", STREAM, "--handler", "order_summary", "--job", "j1")
    status = replayd("status", "j1", "--json", "--redis-url", redis_url)
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)["j1"]
    assert state["progress"]["status"] == "completed"
    assert state["progress"]["processed_events"] == state["progress"]["processed_events"]
    shown = replayd("checkpoint", "show", "j1", "--json", "--redis-url", redis_url)
    assert json.loads(shown.stdout)["positions"][STREAM] == state["positions"][STREAM]


def test_checkpoint_set_and_reset_need_yes(redis_url: str, history: int, sync_redis: redis.Redis) -> None:
    replayd("replay", "--redis-url", redis_url, "--stream", STREAM, "--handler", "order_summary", "--job", "j2")
    refused = replayd("checkpoint", "reset", "j2", "--redis-url", redis_url)
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    entries: Any = sync_redis.xrange(STREAM, count=1)
    first = entries[0][0].decode()
    moved = replayd("checkpoint", "set", "j2", "--stream", STREAM, "--to", first, "--yes", "--redis-url", redis_url)
    assert moved.returncode == 0, moved.stderr
    again = replayd("replay", "--redis-url", redis_url, "--stream", STREAM, "--handler", "order_summary", "--job", "j2")
    assert "replayed 1,999 events" in again.stderr
    assert replayd("checkpoint", "reset", "j2", "--yes", "--redis-url", redis_url).returncode == 0
    assert not sync_redis.exists("replayd:{j2}:checkpoint")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay", "--stream", STREAM], "--handler is required"),
        (["replay", "--handler", "order_summary"], "--stream is required"),
        (["replay", "--stream", STREAM, "--handler", "order_summary", "--from", "1-0", "--after", "1-0"], "exclusive"),
        (["replay", "--stream", STREAM, "--handler", "order_summary", "--where", "total"], "PATH OP VALUE"),
        (["replay", "--stream", STREAM, "--handler", "order_summary", "--from", "yesterday"], "ISO-8601"),
        (["replay", "--stream", STREAM, "--handler", "order_summary", "--partitions", "0"], "partitions"),
        (["replay", "--no-such-flag"], "unrecognized arguments"),
        (["replay", "--stream", STREAM, "--handler", "order_summary", "--shard", "3/3"], "0 <= i < N"),
    ],
)
def test_usage_errors_exit_2_without_traceback(redis_url: str, args: list[str], message: str) -> None:
    done = replayd(*args, "--redis-url", redis_url)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


JOB = '[[jobs]]\nname = "j"\nstreams = ["s"]\nhandler = "order_summary"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[jobs]\n", "cannot be read"),
        (JOB + "partitions = 'many'\n", "jobs.0.partitions"),
        (JOB + "bogus = 1\n", "jobs.0.bogus"),
        (JOB.replace('"order_summary"', '"no.such.module:thing"'), "cannot import module 'no.such.module'"),
        ("[redis]\nblock_ms = 5000\nsocket_timeout_s = 1\n" + JOB, "block_ms"),
    ],
)
def test_config_errors_exit_78_naming_field_and_file(tmp_path: Path, text: str, message: str) -> None:
    config = write(tmp_path / "replayd.toml", text)
    done = replayd("run", "--config", config)
    assert done.returncode == 78, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    done = replayd("run", "--config", str(tmp_path / "absent.toml"))
    assert done.returncode == 78
    assert "absent.toml does not exist" in done.stderr


def test_environment_wins_over_the_file(tmp_path: Path, redis_url: str, history: int) -> None:
    config = write(tmp_path / "c.toml", '[redis]\nurl = "redis://127.0.0.1:1/0"\n' + JOB.replace('"s"', f'"{STREAM}"'))
    done = replayd("rebuild", "--config", config, "--job", "j", env={"REPLAYD_REDIS__URL": redis_url})
    assert done.returncode == 0, done.stderr


def test_unreachable_redis_exits_69_after_retrying_and_hides_the_password() -> None:
    started = time.monotonic()
    done = replayd(
        "replay", "--redis-url", "redis://user:hunter2@127.0.0.1:1/0", "--stream", "s", "--handler", "order_summary",
        env={"REPLAYD_REDIS__UNAVAILABLE_TIMEOUT_S": "2"},
    )  # fmt: skip
    assert done.returncode == 69
    assert time.monotonic() - started < 30  # retried with backoff within the budget, then gave up
    assert "unavailable" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout


def test_replay_on_embedded_server_version(redis_server: RedisServer) -> None:
    assert redis_server.version() >= (6, 2)


def test_demo_drains_and_exits_0_on_a_terminal_ctrl_c(tmp_path: Path) -> None:
    """`make run`'s demo, stopped as a terminal stops it: SIGINT to its whole process group. The embedded
    redis-server is in a group of its own, so it outlives the drain that commits through it."""
    command = [sys.executable, "-m", "replayd", "demo", "--events", "2000", "--rate", "50"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the demo rebuilds, then follows the producer live
            if line.startswith("live:"):
                break
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-2000:]
    assert "stopped cleanly" in out


def test_an_embedded_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """1. a process starts an embedded redis-server  2. the process is killed (SIGKILL: no clean-up of its own)
    3. the server is killed too (by the reaper it started), instead of living on."""
    script = (
        "import sys, time; from pathlib import Path; from replayd.embedded import EmbeddedRedis; "
        "print(EmbeddedRedis(Path(sys.argv[1])).start().proc.pid, flush=True); time.sleep(60)"
    )
    with subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=cli_env(), stdout=subprocess.PIPE,
                          text=True) as owner:  # fmt: skip
        assert owner.stdout is not None
        server = int(owner.stdout.readline())
        assert _running(server)
        owner.kill()
    deadline = time.monotonic() + 10
    while _running(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(server)


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie nobody has reaped yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
