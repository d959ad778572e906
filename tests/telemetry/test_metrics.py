"""Re-exporting another process's metric families under the store's own names."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvfactory.telemetry.metrics import (
    STORE_SERIES,
    Metrics,
    StoreMetrics,
    families_with_prefix,
    render_families,
)


def vllm_text(model: str) -> str:
    registry = CollectorRegistry()
    labels = ["model_name", "engine", "tier"]
    hits = Counter("vllm:kvfactory_store_hits", "Blocks served", labels, registry=registry)
    hits.labels(model, "0", "disk").inc(3)
    size = Gauge("vllm:kvfactory_store_tier_bytes", "Bytes held", labels, registry=registry)
    size.labels(model, "0", "disk").set(5)
    Counter("vllm:num_preemptions", "Preemptions", registry=registry).inc()
    return generate_latest(registry).decode()


def samples(text: bytes) -> dict[tuple[str, str], float]:
    return {
        (sample.name, sample.labels.get("model_name", "")): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def test_prefixed_families_are_renamed_and_others_left_out() -> None:
    families = families_with_prefix(vllm_text("m"), "vllm:")
    names = {family.name for family in families}
    assert names == {"kvfactory_store_hits", "kvfactory_store_tier_bytes", "num_preemptions"}
    assert not any(name.endswith("_created") for name in names)
    assert families_with_prefix(vllm_text("m"), "sglang:") == []


def test_families_of_several_engines_render_as_one_family_each() -> None:
    families = families_with_prefix(vllm_text("a"), "vllm:")
    families += families_with_prefix(vllm_text("b"), "vllm:")
    text = render_families(f for f in families if f.name.startswith("kvfactory_store_"))
    assert text.count(b"# TYPE kvfactory_store_hits") == 1
    assert samples(text) == {
        ("kvfactory_store_hits_total", "a"): 3.0,
        ("kvfactory_store_hits_total", "b"): 3.0,
        ("kvfactory_store_tier_bytes", "a"): 5.0,
        ("kvfactory_store_tier_bytes", "b"): 5.0,
    }


def test_store_metrics_are_made_from_the_series_table() -> None:
    registry = CollectorRegistry()
    metrics = StoreMetrics(registry)
    for spec in STORE_SERIES:
        metric = getattr(metrics, spec.attribute)
        assert isinstance(metric, Counter if spec.kind == "counter" else Gauge)
    metrics.hits.labels("memory").inc()
    assert registry.get_sample_value("kvfactory_store_hits_total", {"tier": "memory"}) == 1.0


def test_exported_families_merge_into_the_registrys_own() -> None:
    metrics = Metrics()  # a gateway: its store families exist but hold no series
    exported = families_with_prefix(vllm_text("m"), "vllm:")
    text = metrics.render([f for f in exported if f.name.startswith("kvfactory_store_")])
    assert text.count(b"# TYPE kvfactory_store_hits_total counter") == 1
    assert samples(text)[("kvfactory_store_hits_total", "m")] == 3.0
    assert metrics.render() == metrics.render([])
