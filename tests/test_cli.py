"""The command line: exit codes, messages without tracebacks, config errors naming the field and file."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from replayd import __version__ as replayd_version
from replayd.jobs.progress import Stats
from replayd.ops.console import with_progress
from replayd.ops.logs import setup_logging
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


# --- the command line as a new user meets it -------------------------------------------------------------------


def test_version_flag_prints_the_version() -> None:
    done = replayd("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"replayd {replayd_version}"


def test_an_unknown_option_is_reported_with_the_commands_usage() -> None:
    done = replayd("status", "--no-such-flag")
    assert done.returncode == 2
    assert done.stderr.startswith("usage: replayd status")
    assert "unrecognized arguments: --no-such-flag" in done.stderr


def test_a_mistyped_replayd_variable_is_named_with_the_one_meant(redis_url: str) -> None:
    done = replayd("status", env={"REPLAYD_REDIS_URL": redis_url, "REPLAYD_REDIS__URL": redis_url})
    assert done.returncode == 0, done.stderr
    assert "ignoring REPLAYD_REDIS_URL" in done.stderr
    assert "did you mean REPLAYD_REDIS__URL?" in done.stderr
    assert "REPLAYD_REDIS__URL," not in done.stderr  # the right spelling is not warned about


def test_a_range_that_ends_before_it_starts_is_refused(redis_url: str, history: int) -> None:
    for bounds in (["--from", "2026-11-25T11:00:00Z", "--to", "2026-11-25T10:00:00Z"], ["--from", "1h", "--to", "2h"]):
        done = replayd("replay", "--redis-url", redis_url, "--stream", STREAM, "--handler", "order_summary", *bounds)
        assert done.returncode == 2, done.stderr
        assert "is not before --to" in done.stderr


def test_a_stream_that_does_not_exist_is_refused(redis_url: str, history: int) -> None:
    for command in ("replay", "plan", "rebuild"):
        done = replayd(command, "--redis-url", redis_url, "--stream", "events:ordrs", "--handler", "order_summary")
        assert done.returncode == 2, (command, done.stderr)
        assert "stream 'events:ordrs' does not exist" in done.stderr


def test_show_of_something_that_does_not_exist_says_so(redis_url: str, history: int) -> None:
    shown = replayd("checkpoint", "show", "nosuchjob", "--redis-url", redis_url)
    assert shown.returncode == 1
    assert "job 'nosuchjob' has no checkpoint" in shown.stderr
    entries: Any = replayd("dlq", "show", "j", "1-0", "--redis-url", redis_url)
    assert entries.returncode == 1
    assert "no dead letter 1-0 in job 'j'" in entries.stderr


def test_output_into_a_reader_that_stops_early_ends_quietly(redis_url: str, sync_redis: redis.Redis) -> None:
    """`replayd dlq list JOB | head -1`: once head exits, a write to stdout fails with EPIPE. That is not Redis."""
    letter = {"stream": STREAM, "id": "1-0", "event_type": "E", "error_type": "RuntimeError", "error": "x" * 80}
    with sync_redis.pipeline(transaction=False) as pipe:
        for _ in range(5000):  # ~700 kB of lines: more than a pipe holds
            pipe.xadd("replayd:{j}:dlq", letter)  # type: ignore[arg-type]
        pipe.execute()
    command = [sys.executable, "-m", "replayd", "dlq", "list", "j", "--redis-url", redis_url]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert "RuntimeError" in proc.stdout.readline()
        proc.stdout.close()
        stderr = proc.stderr.read()
    assert proc.returncode == 141, stderr
    assert stderr == ""


def test_pause_of_a_job_nobody_runs_says_so(redis_url: str, history: int) -> None:
    replayd("replay", "--redis-url", redis_url, "--stream", STREAM, "--handler", "order_summary", "--job", "done")
    paused = replayd("pause", "done", "--redis-url", redis_url)
    assert paused.returncode == 1
    assert "job 'done' is not running" in paused.stderr
    assert "paused" not in paused.stdout


def test_status_says_whether_an_owner_holds_the_lease(redis_url: str, sync_redis: redis.Redis) -> None:
    """A process killed with SIGKILL leaves its progress hash saying `live`; its lease expires."""
    sync_redis.hset("replayd:{j}:progress", mapping={"status": "live", "updated_at": "1764150000.5"})
    orphan = replayd("status", "--redis-url", redis_url)
    assert "live (no owner holds the lease: not running" in orphan.stdout
    assert "updated 2025-11-26T09:40:00Z" in orphan.stdout  # a time, not an epoch float
    sync_redis.set("replayd:{j}:lease", "host:123:abc")
    owned = replayd("status", "--redis-url", redis_url)
    assert "live (owner host:123:abc)" in owned.stdout


def test_plan_counts_the_selected_types_at_a_measured_rate(redis_url: str, history: int) -> None:
    rebuilt = replayd("rebuild", "--redis-url", redis_url, "--stream", STREAM, "--handler", "order_summary")
    assert rebuilt.returncode == 0, rebuilt.stderr
    shown = replayd("plan", "--redis-url", redis_url, "--stream", STREAM, "--handler", "order_summary",
                    "--types", "OrderCreated", "--to", "2100-01-01T00:00:00Z", "--json")  # fmt: skip
    report = json.loads(shown.stdout)
    about = report["streams"][STREAM]
    assert list(about["types"]) == ["OrderCreated"]
    assert 0 < about["selected_entries"] < about["entries"] == history
    assert report["measured_rate_events_per_s"] > 0  # the rebuild's run, of the projection's own job
    text = replayd("plan", "--redis-url", redis_url, "--stream", STREAM, "--handler", "order_summary",
                   "--to", "2100-01-01T00:00:00Z")  # fmt: skip
    assert "to 4102444800000:" in text.stdout  # the whole millisecond, not 4102444800000-18446744073709551615
    assert "18446744073709551615" not in text.stdout


def test_a_failing_handlers_traceback_is_printed_once(redis_url: str, history: int) -> None:
    done = replayd("replay", "--redis-url", redis_url, "--stream", STREAM, "--handler", "tests.plugins:always_fail",
                   env={"REPLAYD_LOG_FORMAT": "text"})  # fmt: skip
    assert done.returncode == 65, done.stderr
    assert done.stderr.count("Traceback") == 1
    assert "During handling of the above exception" not in done.stderr


def test_rebuild_of_a_projection_class_is_named_after_the_projection(
    redis_url: str, history: int, sync_redis: redis.Redis
) -> None:
    handler = "replayd.handlers.builtin.order_summary:OrderSummary"
    done = replayd("rebuild", "--redis-url", redis_url, "--stream", STREAM, "--handler", handler)
    assert done.returncode == 0, done.stderr
    assert sync_redis.exists("replayd:{order_summary}:checkpoint")  # where `run` and `rebuild order_summary` look
    assert not sync_redis.keys("replayd:{OrderSummary*")


def test_progress_from_the_beginning_is_measured_from_the_first_entry() -> None:
    """A run from the beginning starts after `0-0`: measured from there, its first batch read as 100%."""
    first, last = 1_764_150_000_000, 1_764_150_010_000  # ten seconds of history
    stats = Stats("j", [STREAM], start={STREAM: (0, 0)}, target={STREAM: (last, 0)})
    assert stats.percent() == 0.0
    stats.position[STREAM] = (first + 100, 0)  # the first batch committed
    assert stats.percent() == 0.0
    stats.position[STREAM] = (first + 5_050, 0)
    assert stats.percent() == 50.0
    resumed = Stats("j", [STREAM], start={STREAM: (first, 0)}, target={STREAM: (last, 0)})
    resumed.position[STREAM] = (first + 2_500, 0)
    assert resumed.percent() == 25.0  # a start of its own is where the span begins, as before


class Terminal(io.StringIO):
    """What the progress bar draws on: a terminal's stderr, kept as text."""

    def isatty(self) -> bool:
        return True


@pytest.mark.anyio
async def test_the_progress_bar_shows_the_time_left_and_log_lines_start_their_own_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    setup_logging("INFO", "text")
    first = 1_764_150_000_000
    stats = Stats("j", [STREAM], start={STREAM: (0, 0)}, target={STREAM: (first + 10_000, 0)})

    async def work() -> Stats:
        for step in range(1, 6):
            stats.position[STREAM] = (first + step * 1_000, 0)
            await anyio.sleep(0.25)
        logging.getLogger("replayd.test").warning("a log line")
        await anyio.sleep(0.25)
        return stats

    try:
        await with_progress(stats, work())
    finally:
        logging.getLogger().handlers.clear()
    drawn = terminal.getvalue()
    assert re.search(r"ETA \d+s", drawn), drawn
    assert "%  0 events" in drawn
    before, _, _ = drawn.partition("a log line")
    assert before.rsplit("\r\033[K", 1)[1].split()[:1] != ["["]  # the bar was erased before the line was written
    assert "ETA" not in before.rsplit("\r\033[K", 1)[1]


def test_log_levels_are_taken_in_any_case(redis_url: str, sync_redis: redis.Redis) -> None:
    """`--log-level debug` is what people type; it was refused (exit 2) for not being `DEBUG`."""
    status = replayd("status", "--log-level", "debug", "--redis-url", redis_url)
    assert status.returncode == 0, status.stderr


def test_a_replay_to_a_time_logs_its_end_as_the_millisecond(redis_url: str, history: int) -> None:
    """The engine's start line says `to <ms>` for `--to <time>`, as plan and status do, not `<ms>-2^64-1`."""
    done = replayd("replay", "--redis-url", redis_url, "--stream", STREAM, "--handler", "order_summary",
                   "--to", "2100-01-01T00:00:00Z", "--log-format", "text")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "to 4102444800000" in done.stderr
    assert "18446744073709551615" not in done.stderr
