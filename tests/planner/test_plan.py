"""The capacity plan against hand-computed capacities, placements and errors."""

from __future__ import annotations

import pytest

from kvfactory.errors import ConfigError
from kvfactory.planner.hardware import HARDWARE_PRESETS, resolve_hardware
from kvfactory.planner.models import resolve_model
from kvfactory.planner.plan import ContextDistribution, PlanInputs, Workload, make_plan

MEAN = 10_000
KV_8B = 2 * 32 * 8 * 128 * 2  # bytes per token, bf16


def _inputs(sessions: int, **overrides: object) -> PlanInputs:
    fields: dict[str, object] = {
        "model": resolve_model("llama-3.1-8b"),
        "hardware": resolve_hardware("h100"),
        "workload": Workload(ContextDistribution.from_mean(MEAN, 4 * MEAN), sessions, 5.0),
    }
    fields.update(overrides)
    return PlanInputs(**fields)  # type: ignore[arg-type]


def test_llama_8b_on_h100_by_hand() -> None:
    plan = make_plan(_inputs(1000))
    weights = plan.inputs.model.params * 2
    assert plan.kv_bytes_per_token == KV_8B
    assert plan.session_bytes_mean == MEAN * KV_8B
    assert plan.session_bytes_p95 == 4 * MEAN * KV_8B
    assert (plan.gpus, plan.gpus_per_replica, plan.replicas) == (8, 1, 8)  # 16 GB fits 1 GPU
    hbm, dram, nvme = plan.tiers
    assert hbm.capacity_bytes == pytest.approx(8 * 80e9 * 0.9 - 8 * weights)
    assert hbm.sessions_fit == int((8 * 80e9 * 0.9 - 8 * weights) // (MEAN * KV_8B))
    assert dram.sessions_fit == int(8 * 250e9 * 0.8 // (MEAN * KV_8B))
    assert nvme.sessions_fit_p95 == int(8 * 3.84e12 * 0.9 // (4 * MEAN * KV_8B))
    recompute = 2 * plan.inputs.model.active_params / (989e12 * 0.4)
    assert plan.recompute_s_per_token == pytest.approx(recompute)
    assert dram.break_even_tokens == pytest.approx(1e-5 / (recompute - KV_8B / 64e9))
    assert dram.load_s == pytest.approx(1e-5 + MEAN * KV_8B / 64e9)
    assert all(t.load_wins for t in plan.tiers)

    one, ten = plan.placements
    assert one.sessions_per_tier == {
        "hbm": hbm.sessions_fit,
        "dram": 1000 - hbm.sessions_fit,
        "nvme": 0,
    }
    assert ten.sessions == 10_000 and ten.requests_per_s == 50.0
    assert ten.sessions_per_tier["dram"] == dram.sessions_fit
    assert ten.sessions_per_tier["nvme"] == 10_000 - hbm.sessions_fit - dram.sessions_fit
    assert ten.overflow_sessions == 0 and ten.prefill_utilization == 0.0
    assert ten.mean_restore_s > one.mean_restore_s


def test_overflow_is_recomputed() -> None:
    plan = make_plan(_inputs(5000, tiers=("hbm",)))
    one = plan.placements[0]
    assert one.overflow_sessions == 5000 - plan.tiers[0].sessions_fit > 0
    share = one.overflow_sessions / 5000
    expected = 5.0 * share * MEAN * 2 * plan.inputs.model.active_params / (8 * 989e12 * 0.4)
    assert one.prefill_utilization == pytest.approx(expected)


def test_mla_model_needs_a_multi_gpu_replica() -> None:
    deepseek = resolve_model("deepseek-v3")
    h200 = resolve_hardware("h200")
    plan = make_plan(_inputs(100, model=deepseek, hardware=h200, weight_dtype_bytes=1.0))
    assert plan.gpus_per_replica == 8  # 671 GB of fp8 weights: > 0.6 x 4 x 141 GB
    assert plan.kv_bytes_per_token == 61 * 576 * 2


def test_remote_tier_is_added_and_ordered_by_speed() -> None:
    plan = make_plan(_inputs(100_000, tiers=("hbm", "nvme"), remote_bytes=1e15))
    assert [t.name for t in plan.tiers] == ["hbm", "nvme", "remote"]
    ten = plan.placements[1]
    # the NIC (50 GB/s) restores faster than one NVMe drive (6.5 GB/s): remote fills first
    hbm, nvme, remote = plan.tiers
    assert remote.load_s < nvme.load_s
    assert ten.sessions_per_tier["remote"] == remote.sessions_fit == int(1e15 // (MEAN * KV_8B))
    assert ten.sessions_per_tier["nvme"] == nvme.sessions_fit  # the slowest fills last
    assert (
        ten.overflow_sessions
        == 1_000_000 - hbm.sessions_fit - remote.sessions_fit - nvme.sessions_fit
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": resolve_model("llama-3.1-405b"), "gpus": 1}, "do not fit"),
        ({"gpus_per_replica": 16}, "gpus per replica"),
        ({"tiers": ("hbm", "tape")}, "no tier 'tape'"),
        ({"mfu": 0.0}, "MFU"),
        ({"scales": (0.0,)}, "scales"),
    ],
)
def test_impossible_plans_are_config_errors(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_plan(_inputs(10, **overrides))


def test_inputs_validation_and_presets_cite_sources() -> None:
    with pytest.raises(ConfigError):
        Workload(ContextDistribution.from_mean(100), 0, 1.0)
    dist = ContextDistribution.from_samples([float(n) for n in range(1, 101)])
    assert (dist.mean_tokens, dist.p95_tokens) == (50.5, 95.0)
    for spec in HARDWARE_PRESETS.values():
        assert spec.sources and all(s.startswith("https://") for s in spec.sources)
        assert spec.tiers[0].name == "hbm"
