"""The container image's HEALTHCHECK (copied to /app/healthcheck.py): exit 0 when healthy, 1 when not.

The daemon (`replayd run`) must answer GET /healthz with 2xx on 127.0.0.1:$REPLAYD_HTTP__PORT (9464 unless
set). A one-shot command (rebuild, verify, replay) serves metrics only when asked to (--metrics-port): when
nothing listens it passes, because its exit code, not a probe, says how it went. Standard library only: the
slim base image has no curl.
"""

import os
import sys
import urllib.error
import urllib.request

DAEMON = "run"


def command_of_pid1() -> str:
    """The replayd subcommand PID 1 runs ("" if PID 1 is not replayd)."""
    try:
        with open("/proc/1/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return DAEMON  # cannot tell: judge it as the daemon
    for i, arg in enumerate(argv[:-1]):
        if os.path.basename(arg) == "replayd":
            return argv[i + 1]
    return ""


def main() -> int:
    url = "http://127.0.0.1:%s/healthz" % os.environ.get("REPLAYD_HTTP__PORT", "9464")
    try:
        with urllib.request.urlopen(url, timeout=4) as response:  # noqa: S310 - a fixed http:// URL
            print(response.read().decode(errors="replace").strip())
        return 0
    except urllib.error.HTTPError as exc:  # 503: the body says why
        print(f"{url}: {exc.code} {exc.read().decode(errors='replace').strip()}")
        return 1
    except OSError as exc:
        command = command_of_pid1()
        if command != DAEMON:
            print(f"{url}: {exc}; PID 1 runs `replayd {command}`, a one-shot command: nothing to check")
            return 0
        print(f"{url}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
