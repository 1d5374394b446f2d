"""`make container-test`: build the image with podman and run it against a redis-server on the host's loopback.

    python -m tests.container.check_image                  # the stand-in base image, built once and cached
    PYTHON_IMAGE=python:3.12-slim-bookworm python -m tests.container.check_image

What it checks, in one pass (about two minutes once the base image is cached):
- the image: numeric USER 10001, a HEALTHCHECK (a docker-format image; OCI drops it), no pip, no build secret;
- the daemon, with a read-only root filesystem: runs as UID 10001, writes nowhere but /tmp, serves /metrics
  that `promtool check metrics` accepts, passes its HEALTHCHECK; `podman stop` in the middle of its catch-up
  drains and exits 0, and started again it resumes and ends with the projection equal to a recount;
- a one-shot `verify` (no metrics port) passes the HEALTHCHECK while it runs and finds the projection equal;
- `run --workers 2` serves one /metrics with both workers' series, and health;
- with Redis hung (SIGSTOP), `podman stop` with the default 10 s grace still ends in exit 0, inside
  shutdown_timeout_s, and the time-outs of the final writes are logged.

Podman as root, `--network host` (Redis listens on 127.0.0.1 only), runc (crun refuses cgroup v1 layouts like
this CI's), explicit ulimits (a sandbox that cannot raise them fails the defaults). The official base image
cannot be pulled everywhere: unless PYTHON_IMAGE is set, a stand-in is made with mmdebstrap (Debian bookworm,
python3 as `python`) and cached as a local image, never pushed or committed. The host's CA bundle and a pip
config naming it reach the build as build secrets (a TLS-intercepting proxy), so they never land in a layer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from replayd.embedded import EmbeddedRedis, free_port

TMP = "/tmp"  # noqa: S108 - the container's own tmpfs
STANDIN = "localhost/replayd-python-standin:bookworm"
IMAGE = "localhost/replayd:container-test"
PODMAN = ["podman", "--runtime", os.environ.get("CONTAINER_RUNTIME", "runc")]
LIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
ROOT = Path(__file__).resolve().parents[2]
EVENTS = 20_000
CUSTOMERS = 50
SHUTDOWN_TIMEOUT_S = 8.0


def log(message: str) -> None:
    print(f"container-test: {message}", flush=True)


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} ... exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.1)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - http://127.0.0.1 only
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


# --- the image -------------------------------------------------------------------------------------------------


def base_image() -> str:
    wanted = os.environ.get("PYTHON_IMAGE")
    if wanted:
        return wanted
    if podman("image", "exists", STANDIN, check=False).returncode == 0:
        return STANDIN
    log(f"making the stand-in base image {STANDIN} (mmdebstrap, about a minute; cached afterwards)")
    with tempfile.TemporaryDirectory(prefix="replayd-base-") as tmp:
        tarball = Path(tmp) / "base.tar"
        subprocess.run(
            [
                "mmdebstrap", "--quiet", "--variant=minbase", "--include=python3,python3-venv,ca-certificates,passwd",
                "--customize-hook=ln -sf /usr/bin/python3 \"$1/usr/local/bin/python\"", "bookworm", str(tarball),
            ],
            check=True, timeout=600,
        )  # fmt: skip
        podman("import", "--change", 'CMD ["python"]', str(tarball), STANDIN, timeout=300)
    return STANDIN


def build(base: str) -> None:
    log(f"building {IMAGE} on {base}")
    with tempfile.TemporaryDirectory(prefix="replayd-build-") as tmp:
        secrets: list[str] = []
        if HOST_CA.is_file():  # the host's trust store: a proxy that intercepts TLS is trusted there
            conf = Path(tmp) / "pip.conf"
            conf.write_text("[global]\ncert = /run/secrets/pip-ca.crt\n")
            secrets = ["--secret", f"id=pip.conf,src={conf}", "--secret", f"id=pip-ca.crt,src={HOST_CA}"]
        uv = os.environ.get("UV_VERSION")  # the Makefile's pin, else the Dockerfile's default
        podman(
            "build", "--format", "docker", "--network", "host", *LIMITS, "--build-arg", f"PYTHON_IMAGE={base}",
            *(["--build-arg", f"UV_VERSION={uv}"] if uv else []), *secrets, "-t", IMAGE, str(ROOT), timeout=900,
        )  # fmt: skip


def check_image() -> None:
    inspected = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    assert inspected["Config"]["User"] == "10001:10001", inspected["Config"]["User"]
    assert (inspected.get("Healthcheck") or {}).get("Test"), "no HEALTHCHECK in the image (an OCI-format build?)"
    leftovers = podman(
        "run", "--rm", *LIMITS, "--entrypoint", "sh", IMAGE, "-c",
        "ls -d /app/.venv/bin/pip* /app/.venv/lib/python3*/site-packages/pip /run/secrets /opt/tools 2>/dev/null;"
        "python -c 'import pip' 2>/dev/null && echo importable pip; true",
    ).stdout.split()  # fmt: skip
    assert not leftovers, f"the image holds build-time tools or secrets: {leftovers}"
    log("image: USER 10001:10001, HEALTHCHECK, no pip, no build secrets")


# --- the containers --------------------------------------------------------------------------------------------


class Replayd:
    """One replayd container on the host's network, read-only root, its config mounted read-only."""

    def __init__(self, name: str, config: Path, http_port: int, *args: str) -> None:
        self.name, self.http_port = name, http_port
        podman("rm", "-f", "-i", name)
        podman(
            "run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", TMP, "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges", *LIMITS, "-v", f"{config}:/etc/replayd/replayd.toml:ro",
            "-e", f"REPLAYD_HTTP__PORT={http_port}", IMAGE, *(args or ("run", "--config", "/etc/replayd/replayd.toml")),
        )  # fmt: skip

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def state(self) -> dict[str, object]:
        state: dict[str, object] = json.loads(podman("inspect", "--format", "{{json .State}}", self.name).stdout)
        return state

    def running(self) -> bool:
        return self.state()["Status"] == "running"

    def exit_code(self) -> int:
        wait_for(f"{self.name} exits", lambda: not self.running())
        return int(str(self.state()["ExitCode"]))

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def healthcheck(self) -> int:
        return podman("healthcheck", "run", self.name, check=False).returncode

    def stop(self, *grace: str) -> float:
        """`podman stop` (its default grace of 10 s unless `--time N`); the seconds it took."""
        began = time.monotonic()
        podman("stop", *grace, self.name, timeout=120)
        return time.monotonic() - began

    def remove(self) -> None:
        podman("rm", "-f", "-i", self.name, check=False)


def write_config(directory: Path, redis_url: str, *, rate_limit: int) -> Path:
    path = directory / "replayd.toml"
    path.write_text(
        f'shutdown_timeout_s = {SHUTDOWN_TIMEOUT_S}\nlog_format = "text"\n\n[redis]\nurl = "{redis_url}"\n'
        'block_ms = 500\n\n[http]\nhost = "127.0.0.1"\n\n'
        '[[jobs]]\nname = "order_summary"\nstreams = ["events:orders"]\nhandler = "order_summary"\n'
        f'end = "follow"\nrate_limit = {rate_limit}\nprogress_interval_s = 0.2\nlease_ttl_s = 5.0\n'
    )
    path.chmod(0o644)  # read by UID 10001
    return path


def seed(client: redis.Redis) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(EVENTS):
        data = {"order_id": f"o{i}", "customer_id": f"c{i % CUSTOMERS}", "total": i % 100}
        pipe.xadd("events:orders", {"event_type": "OrderCreated", "data": json.dumps(data), "metadata": "{}"})
    pipe.execute()


def recount() -> dict[str, tuple[int, float]]:
    """What the projection must hold per customer, counted here from the events written."""
    counts: Counter[str] = Counter()
    spent: Counter[str] = Counter()
    for i in range(EVENTS):
        counts[f"c{i % CUSTOMERS}"] += 1
        spent[f"c{i % CUSTOMERS}"] += i % 100
    return {c: (counts[c], float(spent[c])) for c in counts}


def projection(client: redis.Redis) -> dict[str, tuple[int, float]]:
    current = client.get("projection:order_summary:current")
    prefix = f"projection:order_summary:v{int(current)}" if current else "projection:order_summary"
    found = {}
    for key in client.scan_iter(match=f"{prefix}:customer:*", count=1000):
        fields = client.hgetall(key)
        found[key.decode().rsplit(":", 1)[1]] = (int(fields[b"order_count"]), float(fields[b"total_spent"]))
    return found


def progress(client: redis.Redis) -> dict[str, str]:
    raw: dict[bytes, bytes] = client.hgetall("replayd:{order_summary}:progress")  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()}


def promtool_check(text: str) -> None:
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"promtool check metrics:\n{done.stdout}{done.stderr}"


# --- the checks ------------------------------------------------------------------------------------------------


def check_daemon(config: Path, client: redis.Redis) -> None:
    daemon = Replayd("replayd-ct-daemon", config, free_port())
    try:
        wait_for("/readyz answers 200", lambda: get(daemon.url("/readyz"))[0] == 200)
        uid = podman("exec", daemon.name, "sh", "-c", "awk '/^Uid:/ {print $2}' /proc/1/status").stdout.strip()
        assert uid == "10001", f"PID 1 runs as UID {uid}"
        written = podman("exec", daemon.name, "sh", "-c", "touch /app/x 2>&1 || true").stdout
        assert "Read-only file system" in written, written
        podman("exec", daemon.name, "touch", f"{TMP}/x")
        log("daemon: PID 1 runs as UID 10001, root filesystem read-only, /tmp writable")
        status, metrics = get(daemon.url("/metrics"))
        assert status == 200 and "replayd_events_read_total" in metrics, metrics[:500]
        promtool_check(metrics)
        assert daemon.healthcheck() == 0, daemon.logs()[-2000:]
        log("daemon: /metrics passes promtool check metrics; the HEALTHCHECK passes")

        wait_for("the catch-up is under way", lambda: int(progress(client).get("processed_events", 0)) > 2000)
        took = daemon.stop("--time", "30")
        code, at = daemon.exit_code(), progress(client)
        assert code == 0, f"podman stop: exit {code}\n{daemon.logs()[-3000:]}"
        assert at["status"] == "stopped", at
        stopped_at = int(at["processed_events"])
        assert stopped_at < EVENTS, f"the catch-up ended before the stop ({stopped_at} events): not a mid-catch-up stop"
        log(f"daemon: podman stop mid-catch-up ({stopped_at} of {EVENTS} events) drained in {took:.1f} s, exit 0")

        podman("start", daemon.name)
        wait_for("the restarted daemon is live", lambda: progress(client).get("status") == "live", timeout=90)
        wait_for("the projection equals a recount", lambda: projection(client) == recount(), timeout=10)
        log("daemon: restarted, resumed and went live; the projection equals a recount of the events")
        one_shot_verify(config)
        daemon.stop("--time", "30")
        assert daemon.exit_code() == 0, daemon.logs()[-3000:]
    finally:
        daemon.remove()


def one_shot_verify(config: Path) -> None:
    """`verify` in a container of its own (no metrics port): healthy while it runs, exit 0 (projection equal)."""
    verify = Replayd("replayd-ct-verify", config, free_port(), "verify", "--config", "/etc/replayd/replayd.toml",
                     "--job", "order_summary")  # fmt: skip
    try:
        wait_for("verify's shadow job is under way", lambda: "holding" in verify.logs(), timeout=30)
        assert verify.running(), verify.logs()[-3000:]
        assert verify.healthcheck() == 0, verify.logs()[-2000:]
        code = verify.exit_code()
        assert code == 0, f"verify exited {code}:\n{verify.logs()[-3000:]}"
        log("verify: a one-shot container passes the HEALTHCHECK while it runs and finds the projection equal")
    finally:
        verify.remove()


def check_workers(config: Path, client: redis.Redis) -> None:
    workers = Replayd("replayd-ct-workers", config, free_port(), "run", "--workers", "2", "--config",
                      "/etc/replayd/replayd.toml")  # fmt: skip
    try:
        wait_for("both workers serve", lambda: _both_workers(get(workers.url("/metrics"))[1]), timeout=60)
        metrics = get(workers.url("/metrics"))[1]
        promtool_check(metrics)
        health, body = get(workers.url("/healthz"))
        assert health == 200, body
        assert workers.healthcheck() == 0, workers.logs()[-2000:]
        assert workers.running(), workers.logs()[-3000:]
        workers.stop("--time", "30")
        code = workers.exit_code()
        assert code == 0, f"exit {code}:\n{workers.logs()[-3000:]}"
        log("run --workers 2: one /metrics with both workers' series (promtool passes), /healthz 200, exit 0")
    finally:
        workers.remove()


def _both_workers(metrics: str) -> bool:
    return all(f'worker="{i}"' in metrics for i in (0, 1))


def check_hung_redis(config: Path, server: EmbeddedRedis, client: redis.Redis) -> None:
    daemon = Replayd("replayd-ct-hung", config, free_port())
    assert server.proc is not None
    try:
        wait_for("/readyz answers 200", lambda: get(daemon.url("/readyz"))[0] == 200)
        wait_for("the job is live", lambda: progress(client).get("status") == "live")
        server.proc.send_signal(signal.SIGSTOP)
        try:
            took = daemon.stop()  # podman's default grace: 10 s
        finally:
            server.proc.send_signal(signal.SIGCONT)
        code, logs = daemon.exit_code(), daemon.logs()
        assert code == 0, f"exit {code} after {took:.1f} s:\n{logs[-3000:]}"
        assert took < SHUTDOWN_TIMEOUT_S + 2, f"stopping took {took:.1f} s (shutdown_timeout_s {SHUTDOWN_TIMEOUT_S})"
        for said in ("progress hash", "lease"):
            assert any(said in line and "timed out" in line for line in logs.splitlines()), logs[-3000:]
        log(f"hung Redis: podman stop (10 s grace) ended in exit 0 after {took:.1f} s; the time-outs were logged")
    finally:
        daemon.remove()


@contextmanager
def workspace() -> Iterator[tuple[Path, EmbeddedRedis]]:
    with tempfile.TemporaryDirectory(prefix="replayd-ct-") as tmp:
        directory = Path(tmp)
        directory.chmod(0o755)
        with EmbeddedRedis(directory / "redis") as server:
            yield directory, server


def main() -> int:
    for tool in ("podman", "promtool"):
        if shutil.which(tool) is None:
            log(f"{tool} is not on PATH (Debian: apt-get install podman runc uidmap mmdebstrap prometheus)")
            return 1
    began = time.monotonic()
    build(base_image())
    check_image()
    with workspace() as (directory, server):
        client = redis.Redis.from_url(server.url)
        seed(client)
        config = write_config(directory, server.url, rate_limit=EVENTS // 8)
        check_daemon(config, client)
        check_workers(config, client)
        check_hung_redis(config, server, client)
    log(f"all checks passed in {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
