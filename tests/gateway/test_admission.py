"""Admission under real asyncio concurrency: exact quotas, slots, priority queues, FIFO.

Window tests drive an injected clock instead of sleeping; nothing asserts wall-clock speed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from kvfactory.errors import ConfigError
from kvfactory.gateway.admission import Admission, PriorityClass, TenantLimits, Ticket
from kvfactory.gateway.errors import APIError
from kvfactory.telemetry.incidents import IncidentKind, IncidentLog
from kvfactory.testing import ManualClock

T = TypeVar("T")

STANDARD = PriorityClass("standard", rank=0, max_queue=64)
START = 1000.0
"""Where the windows' clock starts (the tests' comments count from it)."""


def run(coro: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro()

    return asyncio.run(main())


async def settle_tasks(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def test_requests_per_minute_hold_exactly_under_50_concurrent_clients(tmp_path: Path) -> None:
    clock = ManualClock(START)
    incidents = IncidentLog(tmp_path / "incidents.jsonl")
    admission = Admission(
        {"team-a": TenantLimits(requests_per_minute=20)},
        [STANDARD],
        max_concurrent=100,
        clock=clock,
        incidents=incidents,
    )

    async def client(i: int) -> Ticket | APIError:
        await asyncio.sleep(0)  # interleave: every client is in flight at once
        try:
            ticket = await admission.admit("team-a", 10, request_id=f"r{i}")
        except APIError as exc:
            return exc
        await asyncio.sleep(0)
        ticket.settle(10)
        ticket.release()
        return ticket

    async def storm() -> list[Ticket | APIError]:
        return await asyncio.gather(*(client(i) for i in range(50)))

    results = run(storm)
    admitted = [r for r in results if isinstance(r, Ticket)]
    rejected = [r for r in results if isinstance(r, APIError)]
    assert len(admitted) == 20
    assert len(rejected) == 30
    for error in rejected:
        assert error.status_code == 429
        assert error.code == "rate_limit_exceeded"
        assert error.body()["error"]["type"] == "rate_limit_error"
        assert int(error.headers["Retry-After"]) > 0
    rejects = incidents.recent(100, kind=IncidentKind.QUOTA_REJECT)
    assert len(rejects) == 30
    assert {i.tenant for i in rejects} == {"team-a"}
    assert all(i.details["reason"] == "requests_per_minute" for i in rejects)
    assert (tmp_path / "incidents.jsonl").read_text().count("quota_reject") == 30


def test_retry_after_is_computed_from_the_sliding_window() -> None:
    clock = ManualClock(START)
    admission = Admission({"t": TenantLimits(requests_per_minute=2)}, [STANDARD], 10, clock)

    async def scenario() -> None:
        (await admission.admit("t", 1)).release()  # at 1000
        clock.now += 15
        (await admission.admit("t", 1)).release()  # at 1015
        clock.now += 5  # 1020: the first leaves the window at 1060
        with pytest.raises(APIError) as caught:
            await admission.admit("t", 1)
        assert caught.value.headers["Retry-After"] == "40"
        clock.now = 1060.5
        (await admission.admit("t", 1)).release()  # the first expired
        with pytest.raises(APIError) as caught:
            await admission.admit("t", 1)
        assert caught.value.headers["Retry-After"] == "15"  # the second leaves at 1075

    run(scenario)


def test_tokens_per_minute_reserve_then_settle_returns_unused() -> None:
    clock = ManualClock(START)
    admission = Admission({"t": TenantLimits(tokens_per_minute=1000)}, [STANDARD], 10, clock)

    async def scenario() -> None:
        first = await admission.admit("t", 400)
        clock.now += 10
        second = await admission.admit("t", 400)
        with pytest.raises(APIError) as caught:  # 800 reserved + 400 > 1000
            await admission.admit("t", 400)
        assert "tokens_per_minute" in caught.value.message
        assert caught.value.headers["Retry-After"] == "50"  # freeing `first` (t+60) suffices
        assert first.settle(100) == 300  # the answer was short: 300 tokens come back
        third = await admission.admit("t", 400)  # 100 + 400 + 400 = 900 fits now
        with pytest.raises(APIError):
            await admission.admit("t", 101)  # exactly 100 left
        last = await admission.admit("t", 100)
        assert second.settle(500) == 0  # a longer answer is charged in full
        with pytest.raises(RuntimeError):
            second.settle(1)
        for ticket in (first, second, third, last):
            ticket.release()
        clock.now += 60.1  # the whole window has passed
        (await admission.admit("t", 1000)).release()
        with pytest.raises(APIError) as caught:
            await admission.admit("t", 1001)  # larger than the quota itself
        assert caught.value.headers["Retry-After"] == "60"
        assert "too large" in caught.value.message

    run(scenario)


async def _hold_all(admission: Admission, jobs: list[tuple[str, str | None]]) -> int:
    """Run ``jobs`` (tenant, priority) concurrently, each holding its slot a few ticks;
    returns the peak number in flight observed by the jobs themselves."""
    inside = 0
    peak = 0

    async def job(tenant: str, priority: str | None) -> None:
        nonlocal inside, peak
        async with await admission.admit(tenant, 1, priority):
            inside += 1
            peak = max(peak, inside)
            await settle_tasks(3)
            inside -= 1

    await asyncio.gather(*(job(t, p) for t, p in jobs))
    return peak


def test_global_concurrency_cap_queues_and_serves_everyone() -> None:
    admission = Admission({}, [STANDARD], max_concurrent=3)
    peak = run(lambda: _hold_all(admission, [("t", None)] * 25))
    assert peak == 3
    assert admission.in_flight == 0 and admission.queued() == 0


def test_tenant_concurrency_cap_does_not_block_other_tenants() -> None:
    admission = Admission({"a": TenantLimits(max_concurrent=2)}, [STANDARD], max_concurrent=10)

    async def scenario() -> tuple[int, list[str]]:
        held = [await admission.admit("a", 1) for _ in range(2)]
        waiting = asyncio.ensure_future(admission.admit("a", 1))
        await settle_tasks()
        assert not waiting.done() and admission.queued() == 1
        other = await admission.admit("b", 1)  # a's cap is not b's
        assert admission.in_flight == 3
        held[0].release()
        third = await waiting
        peak = admission.in_flight
        for ticket in (held[1], other, third):
            ticket.release()
        return peak, [third.tenant]

    peak, tenants = run(scenario)
    assert peak == 3 and tenants == ["a"]


def test_high_priority_meets_its_queue_bound_while_low_is_rejected() -> None:
    high = PriorityClass("high", rank=10, max_queue=3, reserved_share=0.5)
    low = PriorityClass("standard", rank=0, max_queue=2)
    admission = Admission(
        {"vip": TenantLimits(priority="high"), "bulk": TenantLimits()}, [high, low], 4
    )

    async def scenario() -> None:
        lows = [await admission.admit("bulk", 1) for _ in range(2)]
        # Two slots are reserved for high: low traffic now queues, then is refused.
        queued_low = [asyncio.ensure_future(admission.admit("bulk", 1)) for _ in range(2)]
        await settle_tasks()
        assert admission.queued("standard") == 2
        with pytest.raises(APIError) as caught:
            await admission.admit("bulk", 1)
        assert caught.value.status_code == 429 and int(caught.value.headers["Retry-After"]) > 0
        # High priority still starts at once in the reserved capacity ...
        highs = [await admission.admit("vip", 1) for _ in range(2)]
        assert admission.in_flight == 4
        # ... and queues up to its own bound, not beyond.
        queued_high = [asyncio.ensure_future(admission.admit("vip", 1)) for _ in range(3)]
        await settle_tasks()
        with pytest.raises(APIError):
            await admission.admit("vip", 1)
        # A freed low slot goes to the high queue first (rank order).
        lows[0].release()
        await settle_tasks()
        assert [t.done() for t in queued_high] == [True, False, False]
        assert not any(t.done() for t in queued_low)
        for ticket in [*lows[1:], *highs]:
            ticket.release()
        await settle_tasks()
        assert all(t.done() for t in queued_high)
        for ticket in [t.result() for t in queued_high]:
            assert ticket.priority == "high"
            ticket.release()
        await settle_tasks()
        assert all(t.done() for t in queued_low)  # low is served once high is idle
        for task in queued_low:
            task.result().release()
        assert admission.in_flight == 0

    run(scenario)


def test_fifo_within_a_class_and_rank_order_across_classes() -> None:
    classes = [
        PriorityClass("high", rank=10),
        PriorityClass("standard"),
        PriorityClass("low", rank=-5),
    ]
    admission = Admission({"t": TenantLimits(priority="high")}, classes, max_concurrent=1)
    order: list[str] = []

    async def job(name: str, priority: str) -> None:
        async with await admission.admit("t", 1, priority):
            order.append(name)
            await settle_tasks(2)

    async def scenario() -> None:
        holder = await admission.admit("t", 1)
        tasks = []
        for name, priority in [
            ("s1", "standard"), ("l1", "low"), ("s2", "standard"), ("h1", "high"),
            ("s3", "standard"), ("h2", "high"), ("l2", "low"),
        ]:  # fmt: skip
            tasks.append(asyncio.ensure_future(job(name, priority)))
            await settle_tasks(1)  # enqueue in exactly this order
        holder.release()
        await asyncio.gather(*tasks)

    run(scenario)
    assert order == ["h1", "h2", "s1", "s2", "s3", "l1", "l2"]


def test_priority_can_be_lowered_but_never_raised() -> None:
    classes = [
        PriorityClass("high", rank=10),
        PriorityClass("standard"),
        PriorityClass("low", rank=-1),
    ]
    admission = Admission({"vip": TenantLimits(priority="high")}, classes, 4)

    async def scenario() -> list[str]:
        names = []
        for tenant, asked in [("t", "high"), ("t", "low"), ("vip", "low"), ("vip", None)]:
            ticket = await admission.admit(tenant, 1, asked)
            names.append(ticket.priority)
            ticket.release()
        with pytest.raises(APIError) as caught:
            await admission.admit("t", 1, "platinum")
        assert caught.value.status_code == 400
        return names

    assert run(scenario) == ["standard", "low", "low", "high"]


def test_queue_timeout_is_a_429_and_refunds_the_quota() -> None:
    patient = PriorityClass("standard", queue_timeout_s=0.05)
    clock = ManualClock(START)
    admission = Admission({"t": TenantLimits(requests_per_minute=2)}, [patient], 1, clock)

    async def scenario() -> None:
        holder = await admission.admit("t", 1)
        with pytest.raises(APIError) as caught:
            await admission.admit("t", 1)  # waits for the slot, gives up
        assert caught.value.status_code == 429 and "timed out" in caught.value.message
        assert admission.queued() == 0
        holder.release()
        # The timed-out request never ran, so its quota came back: one more fits.
        (await admission.admit("t", 1)).release()
        with pytest.raises(APIError):
            await admission.admit("t", 1)

    run(scenario)


def test_a_cancelled_waiter_leaves_the_queue_and_frees_nothing_it_never_held() -> None:
    admission = Admission({}, [STANDARD], 1)

    async def scenario() -> None:
        holder = await admission.admit("t", 1)
        waiting = asyncio.ensure_future(admission.admit("t", 1))
        await settle_tasks()
        waiting.cancel()
        await settle_tasks()
        assert waiting.cancelled() and admission.queued() == 0 and admission.in_flight == 1
        holder.release()
        holder.release()  # idempotent
        assert admission.in_flight == 0

    run(scenario)


def test_invalid_configurations_are_refused() -> None:
    with pytest.raises(ConfigError):
        Admission(
            {},
            [
                PriorityClass("high", rank=1, reserved_share=0.6),
                PriorityClass("standard", reserved_share=0.5),
            ],
            4,
        )
    with pytest.raises(ConfigError):
        Admission({"t": TenantLimits(priority="gold")}, [STANDARD], 4)
    with pytest.raises(ConfigError):
        TenantLimits(requests_per_minute=0)
    with pytest.raises(ConfigError):
        Admission({}, [STANDARD, STANDARD], 4)
