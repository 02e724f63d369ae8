"""Starts a throwaway Redis Cluster (masters + replicas) from redis-server processes on loopback.

Test and benchmark infrastructure only: the server never imports it. It never touches port 6379.
"""

from __future__ import annotations

import atexit
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

FORBIDDEN_PORTS = {6379, 16379}
# openssl's options for a new key: P-256, which takes milliseconds where an RSA key takes up to seconds.
NEW_KEY = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"


class RedisNotInstalledError(RuntimeError):
    """redis-server or redis-cli is not on PATH."""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As redis-server binds: a port whose old connections linger in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(count: int, taken: set[int] | None = None) -> list[int]:
    """Ports p whose cluster bus port p + 10000 is free too; 6379 never."""
    taken = set(taken or ()) | FORBIDDEN_PORTS
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 45000)
        if {port, port + 10000} & taken or not (_port_free(port) and _port_free(port + 10000)):
            continue
        taken |= {port, port + 10000}
        ports.append(port)
    return ports


@dataclass
class RedisClusterProcesses:
    """A cluster of `masters` masters with `replicas` replicas each, living under `root`.

    With `password`, every node requires it for the default user and also knows `user` with the same
    password (ACL); replicas authenticate to their masters with it. With `tls`, nodes speak only TLS
    (clients, replication and cluster bus), with a certificate for 127.0.0.1 signed by `ca_file`.
    """

    root: Path
    masters: int = 3
    replicas: int = 1
    password: str = ""
    user: str = "hps"
    node_timeout_ms: int = 1000
    tls: bool = False
    tls_auth_clients: bool = False
    tls_names: str = "IP:127.0.0.1"
    ports: list[int] = field(default_factory=list)
    _procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def seed(self) -> str:
        """host:port of one node (clients discover the rest)."""
        return f"127.0.0.1:{self.ports[0]}"

    @property
    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self, timeout: float = 30.0) -> RedisClusterProcesses:
        for tool in ("redis-server", "redis-cli"):
            if shutil.which(tool) is None:
                raise RedisNotInstalledError(f"{tool} not found on PATH; install redis (e.g. apt-get install redis)")
        if self.tls:
            self._make_certificates()
        self.ports = free_port_pairs(self.masters * (1 + self.replicas))
        atexit.register(self.close)  # no orphaned redis-server if the caller dies before closing
        for port in self.ports:
            self.start_node(port)
        for port in self.ports:
            self._wait_ping(port, timeout)
        subprocess.run(
            ["redis-cli", *self._auth_args(), "--cluster", "create"]
            + [f"127.0.0.1:{p}" for p in self.ports]
            + ["--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        self.wait_ok(timeout)
        return self

    @property
    def ca_file(self) -> Path:
        """The CA that signed the nodes' certificate and `client_cert_file` (tls only)."""
        return self.root / "tls" / "ca.crt"

    @property
    def client_cert_file(self) -> Path:
        """A client certificate signed by `ca_file`, as a cluster with tls_auth_clients requires (tls only)."""
        return self.root / "tls" / "client.crt"

    @property
    def client_key_file(self) -> Path:
        return self.root / "tls" / "client.key"

    def _make_certificates(self) -> None:
        folder = self.root / "tls"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "san.ext").write_text(f"subjectAltName={self.tls_names}\n")
        for command in (
            f"req -x509 {NEW_KEY} -keyout ca.key -out ca.crt -days 2 -subj /CN=hps-test-ca",
            f"req {NEW_KEY} -keyout node.key -out node.csr -subj /CN=hps-test-redis",
            "x509 -req -in node.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out node.crt -days 2 -extfile san.ext",
            f"req {NEW_KEY} -keyout client.key -out client.csr -subj /CN=hps-test-client",
            "x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out client.crt -days 2",
        ):
            subprocess.run(["openssl", *command.split()], cwd=folder, check=True, capture_output=True, timeout=60)

    def _auth_args(self) -> list[str]:
        auth = ["--user", self.user, "--pass", self.password, "--no-auth-warning"] if self.password else []
        files = [str(self.ca_file), str(self.client_cert_file), str(self.client_key_file)]
        tls = ["--tls", "--cacert", files[0], "--cert", files[1], "--key", files[2]] if self.tls else []
        return auth + tls

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(
            "127.0.0.1",
            port,
            username=self.user if self.password else None,
            password=self.password or None,
            ssl=self.tls,
            ssl_ca_certs=str(self.ca_file) if self.tls else None,
            ssl_certfile=str(self.client_cert_file) if self.tls else None,
            ssl_keyfile=str(self.client_key_file) if self.tls else None,
            ssl_check_hostname=False,  # the nodes' certificate may name other hosts (tls_names)
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
        )

    def start_node(self, port: int) -> None:
        """Starts (or restarts, keeping its cluster identity) the node on `port`."""
        folder = self.root / str(port)
        folder.mkdir(parents=True, exist_ok=True)
        args = [
            "redis-server",
            "--port", "0" if self.tls else str(port),
            "--bind", "127.0.0.1",
            "--dir", str(folder),
            "--logfile", "redis.log",
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # A replica takes over however long its master was gone: tests kill masters at will.
            "--cluster-replica-validity-factor", "0",
            "--save", "",
            # Replicas sync at once instead of waiting 5 s for more replicas to share the transfer.
            "--repl-diskless-sync-delay", "0",
            "--appendonly", "no",
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.tls:
            tls = self.root / "tls"
            args += [
                "--tls-port", str(port),
                "--tls-cluster", "yes",
                "--tls-replication", "yes",
                "--tls-cert-file", str(tls / "node.crt"),
                "--tls-key-file", str(tls / "node.key"),
                "--tls-ca-cert-file", str(tls / "ca.crt"),
                "--tls-auth-clients", "yes" if self.tls_auth_clients else "no",
            ]  # fmt: skip
        if self.password:
            args += [
                "--requirepass", self.password,
                "--user", self.user, "on", f">{self.password}", "~*", "&*", "+@all",
                "--masteruser", self.user,
                "--masterauth", self.password,
            ]  # fmt: skip
        self._procs[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill_node(self, port: int) -> None:
        """SIGKILL: the node vanishes mid-conversation, as a crashed host would."""
        proc = self._procs.pop(port)
        proc.kill()
        proc.wait(10)

    def stop_all(self) -> None:
        """Every node gone at once (SIGKILL); start_all brings the same cluster back, without data."""
        for port in list(self._procs):
            self.kill_node(port)

    def pause_node(self, port: int) -> None:
        """SIGSTOP: the node keeps its connections but answers nothing, as an overloaded host would."""
        self._procs[port].send_signal(signal.SIGSTOP)

    def resume_node(self, port: int) -> None:
        self._procs[port].send_signal(signal.SIGCONT)

    def start_all(self, timeout: float = 30.0) -> None:
        for port in self.ports:
            if port not in self._procs:
                self.start_node(port)
        self.wait_ok(timeout)

    def flush(self) -> None:
        """Deletes every key on every master (replicas follow)."""
        for port in self.masters_ports():
            with self.client(port) as c:
                c.flushall()

    def wait_replicated(self, timeout: float = 10.0) -> None:
        """Until every replica has acknowledged everything its master has written so far."""
        deadline = time.monotonic() + timeout
        while True:
            behind = False
            for port in self.masters_ports():
                with self.client(port) as c:
                    info = c.info("replication")
                offsets = [v["offset"] for v in info.values() if isinstance(v, dict) and "offset" in v]
                behind |= any(offset < info["master_repl_offset"] for offset in offsets)
            if not behind:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis replicas still behind after {timeout} s")
            time.sleep(0.02)

    def masters_ports(self) -> list[int]:
        """Ports of the nodes that are masters right now."""
        found = []
        for port in self._procs:
            with self.client(port) as c:
                if c.info("replication")["role"] == "master":
                    found.append(port)
        return found

    def reshard(self, slots: Sequence[int], timeout: float = 120.0) -> tuple[int, int]:
        """Moves one of `slots` to another master with a live `redis-cli --cluster reshard` (keys migrated
        while clients keep using them: ASK while a slot is half moved, MOVED after). redis-cli takes a
        master's slots lowest first, so the slot with the fewest of its master's slots below it is moved,
        those below it with it; returns (the slot, how many slots moved)."""
        with self.client(self.ports[0]) as c:
            ranges = [
                (int(r[0]), int(r[1]), int(r[2][1]), r[2][2].decode()) for r in c.execute_command("CLUSTER SLOTS")
            ]

        def cost(slot: int) -> tuple[int, str]:
            owner = next(node for start, end, _, node in ranges if start <= slot <= end)
            below = sum(min(end, slot) - start + 1 for start, end, _, node in ranges if node == owner and start <= slot)
            return below, owner

        slot = min(slots, key=lambda s: cost(s)[0])
        moved, source = cost(slot)
        target = next(node for _, _, _, node in ranges if node != source)
        command = ["--cluster", "reshard", self.seed, "--cluster-from", source, "--cluster-to", target]
        command += ["--cluster-slots", str(moved), "--cluster-yes"]
        subprocess.run(["redis-cli", *self._auth_args(), *command], check=True, capture_output=True, timeout=timeout)
        return slot, moved

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every running node says cluster_state:ok and every master has its replicas in sync."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._all_ok():
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis cluster on ports {self.ports} not ok after {timeout} s")
            time.sleep(0.1)

    def _all_ok(self) -> bool:
        masters = 0
        for port in self._procs:
            with self.client(port) as c:
                if c.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                    return False
                info = c.info("replication")
                if info["role"] == "master" and int(info.get("connected_slaves", 0)) > 0:
                    masters += 1
                    lagging = [v for v in info.values() if isinstance(v, dict) and v.get("state") != "online"]
                    if lagging:
                        return False
        return masters == self.masters if len(self._procs) == len(self.ports) else True

    def _wait_ping(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with self.client(port) as c:
                    c.ping()
                    return
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {port} did not start; see {self.root / str(port) / 'redis.log'}")

    def close(self) -> None:
        """Stops every node (SIGKILL: their data is throwaway)."""
        for proc in self._procs.values():
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        for proc in self._procs.values():
            proc.wait(10)
        self._procs.clear()

    def __enter__(self) -> RedisClusterProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
