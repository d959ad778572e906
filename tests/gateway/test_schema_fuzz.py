"""Schemathesis over every route of a real ``kvfactory serve`` (SmolLM2, sessions on):
generated valid and invalid requests from the server's own OpenAPI document, and not one
may be answered with a 5xx.

Bounded for CI on 2 cores: ``MAX_EXAMPLES`` per operation, and a generated completion asks
for at most ``MAX_NEW_TOKENS`` (a chat without ``max_tokens`` would otherwise fill the
whole 8k context window).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from serve_process import embedded_server

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 40
MAX_NEW_TOKENS = 4
_GENERATING = ("/v1/chat/completions", "/v1/completions")


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with embedded_server(tmp_path_factory.mktemp("fuzz")) as server:
        try:
            yield server.base_url
        finally:
            print(server.log.read_text(errors="replace")[-3000:])


def _short(body: Any) -> None:
    """Keep a valid generated completion short; wrong-typed values stay as generated."""
    if not isinstance(body, dict):
        return
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is None or (type(value) is int and value > MAX_NEW_TOKENS):
            body[field] = MAX_NEW_TOKENS


def _fuzz(operation: Any, mode: GenerationMode, failures: list[str]) -> int:
    """Run ``MAX_EXAMPLES`` generated cases of ``operation``; returns how many were sent."""
    sent = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        phases=[Phase.generate],
    )
    def run(case: Any) -> None:
        nonlocal sent
        if case.operation.path in _GENERATING:
            _short(case.body)
        sent += 1
        case.call_and_validate(checks=[not_a_server_error], timeout=120)

    try:
        run()
    except Unsatisfiable:  # nothing invalid to generate (e.g. a free-form string path)
        pass
    except Exception as exc:  # hypothesis re-raises the shrunk failure: record and go on
        failures.append(f"{mode.value} {operation.label}: {str(exc)[:2000]}")
    return sent


def test_no_route_answers_5xx(base_url: str) -> None:
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the OpenAPI document is invalid: {result.err()}"
        operations.append(result.ok())
    paths = {operation.path for operation in operations}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/sessions"} <= paths, paths
    failures: list[str] = []
    sent = 0
    for operation in operations:
        for mode in GenerationMode:
            sent += _fuzz(operation, mode, failures)
    print(f"schemathesis: {len(operations)} operations, {sent} requests, {len(failures)} failed")
    assert not failures, "\n\n".join(failures)
