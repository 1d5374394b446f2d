"""TLS fixtures for the security tests: a throwaway CA with server and client certificates (the `openssl` CLI),
and a redis-server with a TLS port (plus a plain loopback port for setup), stopped by PID."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from replayd.embedded import free_port
from replayd.errors import ConfigError
from tests.servers import CLUSTER_ARGS, RedisClusterServers, RedisServer, cluster_port


@dataclass(frozen=True)
class Certs:
    """PEM files: the CA, a server certificate for 127.0.0.1/localhost, a client certificate; all signed by the CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def openssl() -> str | None:
    return shutil.which("openssl")


def _run(*args: str, cwd: Path) -> None:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr}")


def make_certs(directory: Path) -> Certs:
    """A CA, then a server and a client certificate it signs (EC P-256: quick to generate), valid for 1 day."""
    binary = openssl()
    if binary is None:
        raise RuntimeError("openssl not found on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _run(binary, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
         "-subj", "/CN=replayd test CA", cwd=directory)  # fmt: skip
    (directory / "server.ext").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    (directory / "client.ext").write_text("extendedKeyUsage = clientAuth\n")
    for name, subject in (("server", "/CN=localhost"), ("client", "/CN=replayd test client")):
        _run(binary, "req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
             cwd=directory)  # fmt: skip
        _run(binary, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext", cwd=directory)  # fmt: skip
    return Certs(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )


NO_TLS = re.compile(r"'tls-port .*\n.*Bad directive.*|Failed finding TLS support.*")
"""What a redis-server built without TLS says to `--tls-port`: Redis 6 does not know the option; Redis 7 and Valkey
know it but have no TLS connection type."""


class TlsRedisServer(RedisServer):
    """redis-server on loopback: `tls_port` requires TLS with a client certificate the CA signed; `port` is plain
    (for loading data and ACL setup; a test can drop it with ACL rules if it must)."""

    def __init__(
        self, directory: Path, certs: Certs, extra_args: list[str] | None = None, tls_port: int | None = None
    ) -> None:
        self.tls_port = tls_port or free_port()
        self.certs = certs
        super().__init__(directory, extra_args=[
            "--tls-port", str(self.tls_port), "--tls-cert-file", str(certs.server_cert),
            "--tls-key-file", str(certs.server_key), "--tls-ca-cert-file", str(certs.ca),
            "--tls-auth-clients", "yes", *(extra_args or []),
        ])  # fmt: skip

    @property
    def tls_url(self) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/0"

    def start_or_skip(self) -> TlsRedisServer:
        """Start; skip the test if this redis-server is built without TLS (as the wheels' servers are), saying so."""
        try:
            return self.start()
        except ConfigError as exc:
            said = NO_TLS.search(str(exc))
            if said is None:
                raise
            words = said[0].splitlines()[-1]
            pytest.skip(
                f"{self.binary} is built without TLS ({words!r}): the TLS tests need a redis-server built with it "
                "(Debian's is): put it on PATH or name it in REPLAYD_REDIS_SERVER"
            )


class TlsRedisClusterServers(RedisClusterServers):
    """Three TLS primaries in one cluster (`tls-cluster yes`: the cluster bus and the addresses it gives clients are
    TLS); made and checked over the nodes' plain loopback ports."""

    def __init__(self, directory: Path, certs: Certs) -> None:
        self.certs = certs
        super().__init__(directory)

    def _node(self, directory: Path) -> RedisServer:
        # with tls-cluster, the cluster bus listens 10000 above the TLS port
        return TlsRedisServer(directory, self.certs, [*CLUSTER_ARGS, "--tls-cluster", "yes"], tls_port=cluster_port())

    @property
    def url(self) -> str:
        first = self.servers[0]
        assert isinstance(first, TlsRedisServer)
        return f"rediss+cluster://127.0.0.1:{first.tls_port}"
