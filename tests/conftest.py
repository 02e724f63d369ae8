"""Fixtures that start real services (Redis Cluster) for the tests, and clean up after them.

No fakes: every fixture here runs the real server process on free loopback ports (never 6379).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.redis_cluster_launcher import RedisClusterProcesses, RedisNotInstalledError


def _start_cluster(root: Path, **options: object) -> RedisClusterProcesses:
    try:
        return RedisClusterProcesses(root, **options).start()  # type: ignore[arg-type]
    except RedisNotInstalledError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and Redis is missing: {e}")
        pytest.skip(f"needs Redis: {e}")


@pytest.fixture(scope="session")
def redis_cluster_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """A 3 masters + 3 replicas cluster shared by the session; tests must not stop its nodes."""
    with _start_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_cluster(redis_cluster_processes: RedisClusterProcesses) -> str:
    """host:port of a seed node of the shared cluster; tests keep to their own table names."""
    return redis_cluster_processes.seed


@pytest.fixture(scope="session")
def redis_cluster_acl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """A cluster requiring a password, for the ACL user `.user` as well as the default user."""
    with _start_cluster(tmp_path_factory.mktemp("redis-cluster-acl"), password="hps-test-secret") as cluster:
        yield cluster


@pytest.fixture
def disposable_redis_cluster(tmp_path: Path) -> Iterator[RedisClusterProcesses]:
    """A cluster of the test's own, which it may kill, pause and restart at will."""
    with _start_cluster(tmp_path / "redis-cluster") as cluster:
        yield cluster
