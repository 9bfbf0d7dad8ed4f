"""A redis-server owned by this process (Debian's package), for the Redis online store in tests
and benchmarks: free loopback port, stopped on exit, and by the kernel if this process dies; and a
Redis Cluster of such servers (``RedisClusterServers``)."""

from __future__ import annotations

import atexit
import shutil
import signal
import subprocess
import time
from pathlib import Path

from twotower.benchmarks.harness import BenchmarkRefused
from twotower.serving.triton import check_port_free, free_port_numbers, set_parent_death_signal

START_TIMEOUT_S = 10.0


CLUSTER_CONFIG = "nodes.conf"  # a cluster node's own record of the cluster, in its work_dir (kept by restart())


def require_redis_server() -> str:
    """The ``redis-server`` binary; a benchmark that needs one calls this before its long work."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchmarkRefused("redis-server is not installed (Debian package redis-server)")
    return binary


def require_redis_cli() -> str:
    """The ``redis-cli`` binary (which joins a Redis Cluster's nodes), checked like ``redis-server``."""
    binary = shutil.which("redis-cli")
    if binary is None:
        raise BenchmarkRefused("redis-cli is not installed (Debian package redis-tools)")
    return binary


class RedisServer:
    """``redis-server`` on 127.0.0.1. With ``persistent`` its data survives ``restart()``
    (append-only file in ``work_dir``); without, it is memory only. With a ``cluster_port`` it starts
    as a cluster node, its cluster bus on that port, which ``RedisClusterServers`` joins to others."""

    def __init__(self, work_dir: Path, persistent: bool = False, port: int = 0, cluster_port: int = 0):
        binary = require_redis_server()
        self.binary = binary
        self.work_dir = Path(work_dir)
        self.persistent = persistent
        self.port = port or free_port_numbers("127.0.0.1", 1)[0]
        self.cluster_port = cluster_port
        self.process: subprocess.Popen | None = None

    @property
    def connection(self) -> str:
        """Feast's ``redis_connection`` string for this server."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        import redis

        check_port_free("127.0.0.1", "redis", self.port, "RedisServer(port=...)")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            *persistence,
            "--dir",
            str(self.work_dir),
        ]
        if self.cluster_port:
            command += ["--cluster-enabled", "yes", "--cluster-port", str(self.cluster_port)]
            command += ["--cluster-config-file", CLUSTER_CONFIG, "--cluster-node-timeout", "5000"]
        with open(self.work_dir / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=set_parent_death_signal
            )
        atexit.register(self.stop)
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                client.ping()
                client.close()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"redis-server did not start:\n{(self.work_dir / 'redis.log').read_text()[-2000:]}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        atexit.unregister(self.stop)
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisClusterServers:
    """A Redis Cluster of ``nodes`` masters (no replicas) on 127.0.0.1, each a ``RedisServer`` owned
    by this process, joined with ``redis-cli --cluster create``; started, it answers once every node
    reports ``cluster_state:ok``. With ``persistent`` a node restarted keeps its keys (no replica
    holds them)."""

    def __init__(self, work_dir: Path, nodes: int = 3, persistent: bool = False):
        self.cli = require_redis_cli()
        # Picked together, so no two coincide; Redis' default bus port, the port + 10000, would pass
        # 65535 for most ports the kernel picks.
        ports = free_port_numbers("127.0.0.1", 2 * nodes)
        self.servers = [
            RedisServer(Path(work_dir) / f"node-{i}", persistent, port=ports[2 * i], cluster_port=ports[2 * i + 1])
            for i in range(nodes)
        ]

    @property
    def connection(self) -> str:
        """Feast's ``redis_connection`` string for the cluster: every node."""
        return ",".join(server.connection for server in self.servers)

    def start(self) -> RedisClusterServers:
        import redis

        try:
            for server in self.servers:
                # A new cluster: a node that remembers an earlier one (its nodes.conf) or holds keys refuses to join.
                shutil.rmtree(server.work_dir, ignore_errors=True)
                server.start()
            addresses = [server.connection for server in self.servers]
            create = [self.cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"]
            created = subprocess.run(create, capture_output=True, text=True, timeout=60)
            if created.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed: {created.stdout[-2000:]}{created.stderr[-500:]}"
                )
            deadline = time.monotonic() + START_TIMEOUT_S
            for server in self.servers:
                client = redis.Redis(host="127.0.0.1", port=server.port)
                while client.cluster("info")["cluster_state"] != "ok":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the Redis Cluster at {self.connection} did not become ready")
                    time.sleep(0.05)
                client.close()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
