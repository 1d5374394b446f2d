"""`replayd run` as a subprocess: follow live, drain on SIGTERM, resume after SIGKILL with nothing lost or doubled."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from replayd.sample import load_history_sync
from tests.helpers import order_summaries, wait_for
from tests.servers import RedisServer

STREAM = "events:orders"


def start_daemon(config: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLAYD_")}
    return subprocess.Popen(
        [sys.executable, "-m", "replayd", "run", "--config", str(config), "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def write_config(tmp_path: Path, redis_url: str, **job: str | int | float) -> Path:
    settings = {"name": "orders", "streams": [STREAM], "handler": "order_summary", "end": "follow", **job}
    lines = [
        f'[redis]\nurl = "{redis_url}"\nblock_ms = 100\n',
        "[http]\nenabled = false\n",
        "[[jobs]]",
        *(f"{k} = {v!r}".replace("'", '"') for k, v in settings.items()),
    ]
    path = tmp_path / "replayd.toml"
    path.write_text("\n".join(lines).replace("'", '"') + "\n")
    return path


def progress(client: redis.Redis) -> dict[Any, Any]:
    return dict(client.hgetall("replayd:{orders}:progress"))


def last_id(client: redis.Redis) -> Any:
    entries: Any = client.xrevrange(STREAM, count=1)
    return entries[0][0]


def test_follows_live_then_drains_on_sigterm(
    tmp_path: Path, redis_url: str, sync_redis: redis.Redis, processes: list[subprocess.Popen[str]]
) -> None:
    """1. start on a short history  2. wait for live  3. append  4. SIGTERM  5. exit 0, stopped, all committed."""
    load_history_sync(sync_redis, STREAM, 500)
    proc = start_daemon(write_config(tmp_path, redis_url))
    processes.append(proc)
    wait_for(lambda: progress(sync_redis).get(b"status") == b"live")
    assert progress(sync_redis).get(b"caught_up_at")
    load_history_sync(sync_redis, STREAM, 100, seed=11)
    last = last_id(sync_redis)
    wait_for(lambda: progress(sync_redis).get(b"current_stream_id") == last)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    assert progress(sync_redis)[b"status"] == b"stopped"
    assert sync_redis.hget("replayd:{orders}:checkpoint", f"{STREAM}#*") == last


def test_second_signal_exits_at_once(
    tmp_path: Path, redis_url: str, sync_redis: redis.Redis, processes: list[subprocess.Popen[str]]
) -> None:
    """1. a handler that blocks  2. SIGTERM starts the drain  3. SIGINT exits at once with 130."""
    load_history_sync(sync_redis, STREAM, 50)
    proc = start_daemon(write_config(tmp_path, redis_url, handler="tests.lifecycle_plugins:blocking"))
    processes.append(proc)
    wait_for(lambda: progress(sync_redis).get(b"status") == b"catching_up")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=5)
    assert proc.returncode == 130


def test_a_sync_handler_stuck_for_good_does_not_keep_the_process_past_shutdown_timeout(
    tmp_path: Path, redis_url: str, sync_redis: redis.Redis, processes: list[subprocess.Popen[str]]
) -> None:
    """1. a sync handler that never returns (a worker thread cannot be cancelled)  2. SIGTERM  3. the drain
    deadline cancels the work, which waits for the thread  4. the process leaves without it, within
    shutdown_timeout_s, exit 143 (not stopped cleanly), saying why; nothing was committed."""
    load_history_sync(sync_redis, STREAM, 20)
    config = write_config(tmp_path, redis_url, handler="tests.lifecycle_plugins:stuck")
    config.write_text("shutdown_timeout_s = 3\n" + config.read_text())
    proc = start_daemon(config)
    processes.append(proc)
    wait_for(lambda: progress(sync_redis).get(b"status") == b"catching_up", proc=proc)
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    took = time.monotonic() - began
    assert proc.returncode == 143, stderr
    assert took < 3 + 2, f"exited {took:.1f} s after SIGTERM (shutdown_timeout_s 3)"
    assert "a handler call in a worker thread is still running" in stderr
    assert not sync_redis.hget("replayd:{orders}:checkpoint", f"{STREAM}#*")


def test_stop_with_redis_hung_fits_in_shutdown_timeout(
    tmp_path: Path, fresh_server: RedisServer, processes: list[subprocess.Popen[str]]
) -> None:
    """1. live  2. Redis hung (SIGSTOP)  3. SIGTERM  4. exit 0 within shutdown_timeout_s (a container's stop grace:
    past it comes SIGKILL), the final progress write's and the lease release's time-outs logged."""
    client = fresh_server.client()
    load_history_sync(client, STREAM, 200)
    config = write_config(tmp_path, fresh_server.url)
    config.write_text("shutdown_timeout_s = 6\n" + config.read_text())
    proc = start_daemon(config)
    processes.append(proc)
    wait_for(lambda: progress(client).get(b"status") == b"live", proc=proc)
    assert fresh_server.proc is not None
    fresh_server.proc.send_signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        took = time.monotonic() - began
    finally:
        fresh_server.proc.send_signal(signal.SIGCONT)
    assert proc.returncode == 0, stderr
    assert took < 6 + 1, f"stopped {took:.1f} s after SIGTERM (shutdown_timeout_s 6)"
    timed_out = [line for line in stderr.splitlines() if "timed out" in line]
    assert any("final progress hash write" in line for line in timed_out), stderr[-3000:]
    assert any("lease" in line for line in timed_out), stderr[-3000:]


@pytest.mark.timeout(180)
def test_sigkill_mid_replay_then_restart_equals_a_clean_rebuild(
    tmp_path: Path, redis_url: str, sync_redis: redis.Redis, processes: list[subprocess.Popen[str]]
) -> None:
    """1. 60k events  2. `run` to `now`, SIGKILL at random moments, restart  3. projection == clean rebuild."""
    load_history_sync(sync_redis, STREAM, 60_000)
    config = write_config(tmp_path, redis_url, end="now", batch_size=200, lease_ttl_s=1)
    last = last_id(sync_redis)
    rng = random.Random(5)
    killed_mid_replay = 0
    for _ in range(3):
        proc = start_daemon(config)
        processes.append(proc)
        wait_for(lambda: sync_redis.exists("replayd:{orders}:checkpoint") == 1)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.communicate()
        killed_mid_replay += sync_redis.hget("replayd:{orders}:checkpoint", f"{STREAM}#*") != last
    assert killed_mid_replay
    final = start_daemon(config)
    processes.append(final)
    _, stderr = final.communicate(timeout=120)
    assert final.returncode == 0, stderr
    resumed = order_summaries(sync_redis)
    clean = subprocess.run(
        [sys.executable, "-m", "replayd", "rebuild", "--redis-url", redis_url, "--stream", STREAM,
         "--handler", "order_summary", "--in-place", "--job", "clean"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    assert resumed == order_summaries(sync_redis)
