"""Redis Cluster: a real 3-primary cluster of redis-server processes (no node is killed).

The order_summary rebuild on the cluster leaves key for key what it leaves on one server (its keys tagged
`{order_summary}`, all in the slot of the job's keys); a transactional job whose keys cannot share that slot is
refused at start, and a commit that would write outside it is refused before anything is sent.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
import redis
from redis.asyncio import Redis, RedisCluster

from replayd.cli import run_cli
from replayd.config import JobSpec, RedisConfig, load_settings
from replayd.connection import Client, create_redis
from replayd.embedded import free_port
from replayd.errors import ConfigError
from replayd.events import Event
from replayd.handlers import Context, FunctionHandler
from replayd.jobs.engine import Engine
from replayd.jobs.rebuild import rebuild_in_place
from replayd.pipeline.commit import job_key, slot_of
from replayd.sample import load_history_sync
from tests.helpers import as_text, snapshot
from tests.lifecycle_plugins import seen
from tests.servers import RedisClusterServers, RedisServer

pytestmark = pytest.mark.anyio

STREAM = "events:orders"
OTHER_STREAM = "events:orders:us"  # slot 14291, another node than events:orders (2141)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def cluster_cfg(cluster: RedisClusterServers) -> RedisConfig:
    cluster.flush()
    return RedisConfig(url=cluster.url, block_ms=100, socket_timeout_s=5)


@pytest.fixture
async def cluster_redis(cluster_cfg: RedisConfig) -> AsyncIterator[Client]:
    client = create_redis(cluster_cfg)
    try:
        yield client
    finally:
        await client.aclose()


def load(cluster: RedisClusterServers, stream: str, n: int, **options: Any) -> None:
    """XADD sample history on the node that serves the stream."""
    with cluster.node_of(stream).client() as node:
        load_history_sync(node, stream, n, **options)


def everything(servers: list[RedisServer], pattern: str) -> dict[str, dict[str, tuple[str, Any]]]:
    """Per node (by port): the keys matching `pattern`, with their types and values."""
    found = {}
    for server in servers:
        with server.client() as client:
            found[str(server.port)] = snapshot(client, pattern)
    return found


def job(**overrides: Any) -> JobSpec:
    values: dict[str, Any] = {"name": "order_summary", "streams": [STREAM], "handler": "order_summary", "end": "now"}
    values.update(overrides)
    return JobSpec(**values)


def test_cluster_urls_and_the_switch_choose_the_cluster_client() -> None:
    assert RedisConfig(url="redis+cluster://10.0.0.1:7000").is_cluster
    assert RedisConfig(url="rediss+cluster://10.0.0.1:7000").node_url() == "rediss://10.0.0.1:7000"
    assert RedisConfig(url="redis://10.0.0.1:7000", cluster=True).is_cluster
    assert not RedisConfig(url="redis://10.0.0.1:7000").is_cluster
    with pytest.raises(ConfigError, match="over TCP"):
        load_settings(None, redis={"url": "unix:///tmp/redis.sock", "cluster": True})


async def test_order_summary_rebuild_on_a_cluster_equals_one_server(
    cluster: RedisClusterServers, cluster_redis: Client, cluster_cfg: RedisConfig,
    sync_redis: redis.Redis, raw_redis: Redis, redis_cfg: RedisConfig,
) -> None:  # fmt: skip
    """1. the same history on one server and on the cluster  2. rebuild order_summary on both (16 partitions)
    3. the same keys (braces aside) and values  4. on the cluster all of them, and the checkpoint, on one node."""
    assert isinstance(cluster_redis, RedisCluster)
    load_history_sync(sync_redis, STREAM, 5_000, seed=5, customers=300)
    load(cluster, STREAM, 5_000, seed=5, customers=300)

    single = await rebuild_in_place(Engine(job(partitions=16), raw_redis, redis_cfg=redis_cfg))
    clustered = await rebuild_in_place(Engine(job(partitions=16), cluster_redis, redis_cfg=cluster_cfg))

    assert (clustered.status, clustered.processed, clustered.failed) == ("completed", single.processed, 0)
    expected = snapshot(sync_redis, "projection:order_summary:*")
    per_node = everything(cluster.servers, "projection:*")
    home = cluster.node_of(job_key("order_summary", "checkpoint"))
    assert {port for port, keys in per_node.items() if keys} == {str(home.port)}
    ours = {key.replace("{order_summary}", "order_summary"): value for key, value in per_node[str(home.port)].items()}
    meta = "projection:order_summary:meta"
    assert ours.pop(meta)[1][b"processed_events"] == expected.pop(meta)[1][b"processed_events"]
    assert len(expected) > 1000
    assert ours.keys() == expected.keys()
    assert [key for key in expected if ours[key] != expected[key]] == []


async def test_streams_on_other_slots_are_read_and_a_following_job_goes_live(
    cluster: RedisClusterServers, cluster_redis: Client, cluster_cfg: RedisConfig
) -> None:
    """1. two streams on different nodes  2. a following job catches up on both (XRANGE by key)
    3. an entry added meanwhile arrives through XREAD BLOCK  4. the checkpoint holds both streams."""
    load(cluster, STREAM, 300)
    load(cluster, OTHER_STREAM, 200)
    assert cluster.node_of(STREAM) is not cluster.node_of(OTHER_STREAM)
    engine = Engine(job(streams=[STREAM, OTHER_STREAM], end="follow"), cluster_redis, redis_cfg=cluster_cfg)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        with anyio.fail_after(20):
            await engine.caught_up.wait()
            load(cluster, OTHER_STREAM, 1, seed=9)
            while engine.stats.total < 501:  # noqa: ASYNC110 - the engine's counters have no event
                await anyio.sleep(0.02)
        engine.stop()
    assert engine.stats.failed == 0
    with cluster.node_of(job_key("order_summary", "checkpoint")).client() as node:
        fields = {as_text(k): as_text(v) for k, v in node.hgetall(job_key("order_summary", "checkpoint")).items()}
    assert {f"{STREAM}#*", f"{OTHER_STREAM}#*"} <= fields.keys()


async def test_a_transactional_job_not_named_after_its_projection_is_refused(cluster_redis: Client) -> None:
    with pytest.raises(ConfigError) as refused:
        Engine(job(name="summaries"), cluster_redis)
    message = str(refused.value)
    assert "different hash slots" in message
    assert "name = 'order_summary'" in message
    assert "--job order_summary" in message


async def test_a_commit_writing_outside_the_job_slot_is_refused_and_writes_nothing(
    cluster: RedisClusterServers, cluster_redis: Client, cluster_cfg: RedisConfig
) -> None:
    """A plain function is not a projection: its keys are checked per commit, and one of another slot stops
    the job (exit 78) before anything of that commit reaches Redis."""

    def stray(event: Event, ctx: Context) -> None:
        ctx.tx.hset(f"totals:{event.data['customer_id']}", "seen", 1)

    load(cluster, STREAM, 50)
    spec = job(name="stray", handler="tests.test_cluster:stray")
    assert slot_of("totals:x") != slot_of(job_key("stray", "checkpoint"))
    engine = Engine(spec, cluster_redis, redis_cfg=cluster_cfg, handler=FunctionHandler(stray, "stray"))
    with pytest.raises(ConfigError, match=r"outside the slot of the job's keys .* Nothing of this commit"):
        await engine.run()
    assert all(not keys for keys in everything(cluster.servers, "totals:*").values())
    with cluster.node_of(job_key("stray", "checkpoint")).client() as node:
        assert not any(b"#" in field for field in node.hkeys(job_key("stray", "checkpoint")))


async def test_a_command_no_redis_command_takes_makes_its_event_poison_on_a_cluster(
    cluster: RedisClusterServers, cluster_redis: Client, cluster_cfg: RedisConfig
) -> None:
    """The cluster client's encoder refuses such a value itself (DataError): the event that queued it is
    dead-lettered all the same, and the rest of the commit applies."""

    async def count(event: Event, ctx: Context) -> None:
        amount: Any = {"not": "a Redis value"} if event.event_type == "OrderShipped" else 1
        ctx.tx.hincrby(ctx.key("by_type"), event.event_type, amount)

    load(cluster, STREAM, 60)
    spec = job(name="counter", handler="tests.test_cluster:count", on_poison="dead-letter", retries=0, ordering="none")
    engine = Engine(spec, cluster_redis, redis_cfg=cluster_cfg, handler=FunctionHandler(count, "counter"))
    stats = await engine.run()
    with cluster.node_of(STREAM).client() as node:
        types = Counter(as_text(fields[b"event_type"]) for _, fields in node.xrange(STREAM))
    with cluster.node_of(job_key("counter", "checkpoint")).client() as node:
        totals = {as_text(k): int(v) for k, v in node.hgetall("projection:{counter}:by_type").items()}
        letters = node.xlen(job_key("counter", "dlq"))
    assert stats.status == "completed" and types["OrderShipped"] > 0
    assert totals == {kind: n for kind, n in types.items() if kind != "OrderShipped"}
    assert letters == types["OrderShipped"] == stats.dead_lettered


async def test_dead_letters_are_retried_on_a_cluster(
    cluster: RedisClusterServers, cluster_redis: Client, cluster_cfg: RedisConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """1. a job named after its projection dead-letters two events (retries 0) and parks their customers' later
    events behind them; the others are committed in its slot  2. `dlq retry` with a handler that works now: each
    letter's writes and its removal are one transaction in that slot  3. every event marked, no letter left."""
    load(cluster, STREAM, 30)
    with cluster.node_of(STREAM).client() as node:
        ids = [raw.decode() for raw, _ in node.xrange(STREAM)]
    bad = {ids[4], ids[17]}

    def failing(event: Event, ctx: Context) -> None:
        if event.stream_id in bad:
            raise RuntimeError("not yet")
        seen(event, ctx)

    spec = job(name="seen", handler="tests.lifecycle_plugins:seen", on_poison="dead-letter", retries=0,
               partitions=4, partition_by="customer_id")  # fmt: skip
    engine = Engine(spec, cluster_redis, redis_cfg=cluster_cfg, handler=FunctionHandler(failing, "seen"))
    stats = await engine.run()
    assert stats.processed + stats.dead_lettered == 30
    assert 2 <= stats.dead_lettered < 30
    url = ["--redis-url", cluster.url]
    assert await anyio.to_thread.run_sync(run_cli, ["dlq", "retry", "seen", "--handler", spec.handler, *url]) == 0
    assert f"{stats.dead_lettered} handled and removed, 0 left" in capsys.readouterr().out
    home = cluster.node_of(job_key("seen", "dlq"))
    with home.client() as node:
        assert node.xlen(job_key("seen", "dlq")) == 0
        assert sorted(as_text(key).rsplit(":", 1)[1] for key in node.keys("projection:{seen}:*")) == sorted(ids)


def test_replay_refusal_status_and_checkpoint_from_the_command_line(
    cluster: RedisClusterServers, cluster_cfg: RedisConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """1. `replay` of a projection under its default job name exits 78 with the fix  2. `rebuild --in-place` works
    (a rebuild beside the live version is refused, for now)
    3. `status --json` and `checkpoint show` find the job on the cluster (SCAN over every primary)
    4. `checkpoint set` moves it (a one-slot MULTI/EXEC)."""
    load(cluster, STREAM, 500)
    url = ["--redis-url", cluster.url]
    assert run_cli(["replay", *url, "--stream", STREAM, "--handler", "order_summary"]) == 78
    assert "--job order_summary" in capsys.readouterr().err

    assert run_cli(["rebuild", *url, "--stream", STREAM, "--handler", "order_summary"]) == 78
    assert "use `replayd rebuild --in-place` there" in capsys.readouterr().err
    assert run_cli(["rebuild", *url, "--stream", STREAM, "--handler", "order_summary", "--in-place"]) == 0
    capsys.readouterr()
    assert run_cli(["status", *url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["order_summary"]["progress"]["status"] == "completed"
    assert report["order_summary"]["positions"][STREAM] != "0-0"
    assert run_cli(["checkpoint", "show", "order_summary", *url]) == 0
    assert f"{STREAM}#*" in capsys.readouterr().out
    assert run_cli(["checkpoint", "set", "order_summary", *url, "--stream", STREAM, "--to", "1-0", "--yes"]) == 0
    capsys.readouterr()
    assert run_cli(["status", "order_summary", *url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["order_summary"]["positions"] == {STREAM: "1-0"}


def test_an_unreachable_cluster_exits_69_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["status", "--redis-url", f"redis+cluster://127.0.0.1:{free_port()}"]) == 69
    err = capsys.readouterr().err
    assert err.startswith("replayd: cannot reach Redis")
    assert "Traceback" not in err
