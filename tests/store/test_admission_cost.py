"""Admission policies (always, second_hit) and the load-or-recompute cost model."""

from __future__ import annotations

import math
import threading

import pytest

from kvfactory._types import BlockKey
from kvfactory.store.admission import AlwaysAdmit, SecondHitAdmission
from kvfactory.store.cost import CostModel
from kvfactory.store.policy import make_admission_policy
from kvfactory.store.tiers.base import TransferCost


def key(name: str) -> BlockKey:
    return BlockKey(name.encode().ljust(32, b"."))


BLOCK_BYTES = 5_900_000  # one SmolLM2-135M chunk of 256 tokens
DISK = TransferCost(latency_s=1e-4, bytes_per_s=1.5e9)


def test_always_admits_everything() -> None:
    policy = make_admission_policy("always")
    assert isinstance(policy, AlwaysAdmit)
    assert all(policy.admit(key(str(i)), "disk") for i in range(5))


def test_second_hit_admits_on_second_offer_per_tier() -> None:
    policy = make_admission_policy("second_hit")
    assert isinstance(policy, SecondHitAdmission)
    assert policy.admit(key("a"), "disk") is False
    assert policy.admit(key("a"), "remote") is False  # tiers are remembered separately
    assert policy.admit(key("b"), "disk") is False
    assert policy.admit(key("a"), "disk") is True
    assert policy.admit(key("a"), "remote") is True
    assert policy.admit(key("c"), "disk") is False


def test_second_hit_ghost_set_is_bounded_oldest_forgotten() -> None:
    policy = make_admission_policy("second_hit", ghost_entries=2)
    for name in ("a", "b", "c"):
        assert policy.admit(key(name), "disk") is False
    assert len(policy) == 2  # type: ignore[arg-type]
    assert policy.admit(key("a"), "disk") is False  # forgotten: counts as a first offer
    assert policy.admit(key("c"), "disk") is True
    with pytest.raises(ValueError, match="ghost_entries"):
        SecondHitAdmission(ghost_entries=0)


def test_second_hit_is_thread_safe() -> None:
    policy = SecondHitAdmission(ghost_entries=10_000)
    admitted: list[int] = []
    lock = threading.Lock()

    def offer(worker: int) -> None:
        count = sum(policy.admit(key(f"k{i}"), "disk") for i in range(500))
        with lock:
            admitted.append(count)

    threads = [threading.Thread(target=offer, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Each key: the first offer records it, the second admits and forgets, and so on.
    assert sum(admitted) == 500 * 4


def test_fresh_cost_model_never_refuses_a_hit() -> None:
    model = CostModel()
    assert model.seconds_per_token is None
    assert model.recompute_seconds(256) == math.inf
    glacial = TransferCost(latency_s=3600.0, bytes_per_s=1.0)
    assert model.prefer_load(glacial, BLOCK_BYTES, 1)


def test_configured_cost_model_compares_transfer_and_recompute() -> None:
    model = CostModel(seconds_per_token=1e-3)
    assert model.recompute_seconds(256) == pytest.approx(0.256)
    assert model.prefer_load(DISK, BLOCK_BYTES, 256)  # 4 ms load vs 256 ms prefill
    slow_link = TransferCost(latency_s=1e-3, bytes_per_s=1e6)  # ~5.9 s
    assert not model.prefer_load(slow_link, BLOCK_BYTES, 256)
    exact = TransferCost(latency_s=0.0, bytes_per_s=BLOCK_BYTES / 0.256)
    assert model.prefer_load(exact, BLOCK_BYTES, 256)  # a tie loads


def test_observations_update_an_ewma() -> None:
    model = CostModel(smoothing=0.5)
    model.observe_recompute(100, 1.0)
    assert model.seconds_per_token == pytest.approx(0.01)
    model.observe_recompute(100, 2.0)
    assert model.seconds_per_token == pytest.approx(0.015)
    assert model.observations == 2
    configured = CostModel(seconds_per_token=0.02, smoothing=0.25)
    configured.observe_recompute(10, 0.0)
    assert configured.seconds_per_token == pytest.approx(0.015)


def test_observations_are_thread_safe() -> None:
    model = CostModel(smoothing=0.3)

    def observe() -> None:
        for _ in range(200):
            model.observe_recompute(50, 0.1)

    threads = [threading.Thread(target=observe) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert model.observations == 1600
    assert model.seconds_per_token == pytest.approx(0.002)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"seconds_per_token": 0.0}, "seconds_per_token"), ({"smoothing": 0.0}, "smoothing")],
)
def test_cost_model_rejects_bad_settings(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CostModel(**kwargs)


@pytest.mark.parametrize(("tokens", "seconds"), [(0, 1.0), (10, -1.0), (10, math.nan)])
def test_cost_model_rejects_bad_observations(tokens: int, seconds: float) -> None:
    model = CostModel()
    with pytest.raises(ValueError):
        model.observe_recompute(tokens, seconds)
    assert model.observations == 0
