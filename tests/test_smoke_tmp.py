import pytest
from redis.asyncio import Redis
import redis
from replayd.config import RedisConfig
from tests.helpers import add, orders, spec, run, checkpoint

@pytest.mark.anyio
async def test_smoke(raw_redis: Redis, redis_cfg: RedisConfig, sync_redis: redis.Redis) -> None:
    add(sync_redis, orders(100))
    stats, rec = await run(spec(partition_by="customer_id"), raw_redis, redis_cfg)
    print(stats, len(rec.events), checkpoint(sync_redis))
    assert len(rec.events) == 100
