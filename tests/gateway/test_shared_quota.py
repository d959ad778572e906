"""Quotas shared by several gateways through a real redis-server (``SharedQuotas``).

Each ``Admission`` stands for one gateway process (each has its own slots and queues); they
share only the Redis server, as gateways behind a load balancer do. Windows follow an
injected clock, so nothing sleeps through a minute and nothing asserts wall-clock speed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_admission import STANDARD, START, run

from kvfactory.errors import ConfigError
from kvfactory.gateway.admission import Admission, PriorityClass, TenantLimits, Ticket
from kvfactory.gateway.errors import APIError
from kvfactory.gateway.shared_quota import SharedQuotas
from kvfactory.gateway.tenant_config import parse_tenancy
from kvfactory.telemetry.incidents import IncidentKind, IncidentLog
from kvfactory.testing import ManualClock
from store.redis_fixtures import RedisServer, require_redis_server

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    require_redis_server()
    started = RedisServer(tmp_path_factory.mktemp("quota-redis")).start()
    try:
        yield started
    finally:
        started.stop()


def gateways(
    server: RedisServer,
    limits: TenantLimits,
    clock: ManualClock,
    *,
    count: int = 2,
    prefix: str,
    incidents: IncidentLog | None = None,
    max_concurrent: int = 100,
    classes: tuple[PriorityClass, ...] = (STANDARD,),
) -> list[Admission]:
    return [
        Admission(
            {"team-a": limits},
            list(classes),
            max_concurrent,
            incidents=incidents,
            quotas=SharedQuotas(
                server.url, prefix=prefix, clock=clock, incidents=incidents, retry_s=0.2
            ),
        )
        for _ in range(count)
    ]


async def closed(*admissions: Admission) -> None:
    for admission in admissions:
        await admission.aclose()


async def attempt(admission: Admission, tokens: int = 10) -> Ticket | APIError:
    await asyncio.sleep(0)  # every client in flight at once
    try:
        return await admission.admit("team-a", tokens)
    except APIError as error:
        return error


def test_two_gateways_enforce_one_requests_per_minute_together(server: RedisServer) -> None:
    clock = ManualClock(START)
    a, b = gateways(server, TenantLimits(requests_per_minute=10), clock, prefix="rpm:")

    async def scenario() -> None:
        storm = [attempt(a if i % 2 else b) for i in range(50)]
        results = await asyncio.gather(*storm)
        admitted = [r for r in results if isinstance(r, Ticket)]
        rejected = [r for r in results if isinstance(r, APIError)]
        assert len(admitted) == 10 and len(rejected) == 40
        for error in rejected:
            assert error.status_code == 429 and error.code == "rate_limit_exceeded"
            assert 1 <= int(error.headers["Retry-After"]) <= 60
        for ticket in admitted:
            ticket.settle(10)
            ticket.release()
        clock.now += 61  # the whole window has passed, on the server's log too
        again = await asyncio.gather(*(attempt(b) for _ in range(12)))
        assert sum(isinstance(r, Ticket) for r in again) == 10
        await closed(a, b)

    run(scenario)


def test_retry_after_comes_from_the_shared_log(server: RedisServer) -> None:
    clock = ManualClock(START)
    a, b = gateways(server, TenantLimits(requests_per_minute=2), clock, prefix="retry:")

    async def scenario() -> None:
        (await a.admit("team-a", 1)).release()
        clock.now += 15
        (await b.admit("team-a", 1)).release()
        clock.now += 5  # the first reservation leaves the window 40 s from now
        with pytest.raises(APIError) as caught:
            await a.admit("team-a", 1)
        assert caught.value.headers["Retry-After"] == "40"
        clock.now += 40.5
        (await b.admit("team-a", 1)).release()
        with pytest.raises(APIError) as caught:
            await a.admit("team-a", 1)
        assert caught.value.headers["Retry-After"] == "15"
        await closed(a, b)

    run(scenario)


def test_tokens_settled_on_one_gateway_free_room_on_the_other(server: RedisServer) -> None:
    clock = ManualClock(START)
    a, b = gateways(server, TenantLimits(tokens_per_minute=1000), clock, prefix="tpm:")
    quotas_a = a._quotas
    assert isinstance(quotas_a, SharedQuotas)

    async def scenario() -> None:
        big = await a.admit("team-a", 800)
        with pytest.raises(APIError) as caught:
            await b.admit("team-a", 300)
        assert "tokens_per_minute is 1000 (used 800)" in caught.value.message
        assert big.settle(100) == 700  # the answer was short: 700 tokens come back
        big.release()
        await quotas_a.drain()
        (await b.admit("team-a", 300)).release()
        with pytest.raises(APIError) as caught:
            await b.admit("team-a", 2000)
        assert "needs more tokens than its tokens_per_minute" in caught.value.message
        await closed(a, b)

    run(scenario)


def test_a_request_refused_by_a_full_queue_gives_its_quota_back(server: RedisServer) -> None:
    clock = ManualClock(START)
    tight = (PriorityClass("standard", rank=0, max_queue=0),)
    (a,) = gateways(
        server,
        TenantLimits(requests_per_minute=2),
        clock,
        count=1,
        prefix="refund:",
        max_concurrent=1,
        classes=tight,
    )
    quotas = a._quotas
    assert isinstance(quotas, SharedQuotas)

    async def scenario() -> None:
        running = await a.admit("team-a", 1)  # holds the only slot
        with pytest.raises(APIError) as caught:
            await a.admit("team-a", 1)  # no slot, no queue: refused, quota refunded
        assert "queue is full" in caught.value.message
        await quotas.drain()
        running.release()
        (await a.admit("team-a", 1)).release()  # the refunded request's place
        with pytest.raises(APIError):
            await a.admit("team-a", 1)
        await closed(a)

    run(scenario)


def test_an_unreachable_server_falls_back_to_local_windows_then_shares_again(
    tmp_path: Path,
) -> None:
    require_redis_server()
    server = RedisServer(tmp_path / "redis").start()
    incidents = IncidentLog(tmp_path / "incidents.jsonl")
    clock = ManualClock(START)
    a, b = gateways(
        server, TenantLimits(requests_per_minute=3), clock, prefix="down:", incidents=incidents
    )

    async def scenario() -> None:
        (await a.admit("team-a", 1)).release()
        server.kill()
        # each gateway now holds the full limit on its own: three more each
        for gateway in (a, b):
            for _ in range(3):
                (await gateway.admit("team-a", 1)).release()
            with pytest.raises(APIError):
                await gateway.admit("team-a", 1)
        down = incidents.recent(10, kind=IncidentKind.DEGRADATION)
        assert len(down) == 2  # one per gateway per outage
        assert {i.details["component"] for i in down} == {"shared_quotas"}
        server.start()  # empty: the shared log starts over
        await asyncio.sleep(0.3)  # past retry_s
        for _ in range(3):
            (await a.admit("team-a", 1)).release()
        with pytest.raises(APIError):
            await b.admit("team-a", 1)  # shared again: b sees a's three
        await closed(a, b)

    try:
        run(scenario)
    finally:
        server.stop()


def test_quota_url_in_the_config() -> None:
    config = parse_tenancy({"admission": {"quota_url": "valkey://127.0.0.1:6390/2"}})
    assert config.quota_url == "valkey://127.0.0.1:6390/2"
    book = config.quotas()
    assert isinstance(book, SharedQuotas) and book.prefix == "kvf:quota:"
    asyncio.run(book.aclose())
    with pytest.raises(ConfigError, match=r"^\[admission\] quota_url 'http://u:\*\*\*@h/'"):
        parse_tenancy({"admission": {"quota_url": "http://u:secret@h/"}})


def test_without_a_clock_the_servers_time_orders_the_log(server: RedisServer) -> None:
    a, b = (
        Admission(
            {"team-a": TenantLimits(requests_per_minute=2)},
            [STANDARD],
            10,
            quotas=SharedQuotas(server.url, prefix="server-time:"),
        )
        for _ in range(2)
    )

    async def scenario() -> None:
        (await a.admit("team-a", 1)).release()
        (await b.admit("team-a", 1)).release()
        with pytest.raises(APIError) as caught:
            await a.admit("team-a", 1)
        assert 59 <= int(caught.value.headers["Retry-After"]) <= 60
        await closed(a, b)

    run(scenario)
