"""Fast checks of the gateway's pieces that need no server: parsing, error mapping, tenants."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from kvfactory.engines.hf.errors import EngineOverloadedError, GenerationFailedError
from kvfactory.errors import ConfigError, ContextLengthExceededError, ModelNotFoundError
from kvfactory.gateway.errors import APIError, to_api_error
from kvfactory.gateway.schemas import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)
from kvfactory.gateway.tenancy import SECRET_FILE, TenantResolver, load_server_secret

MESSAGES = [{"role": "user", "content": "hi"}]


def _chat(**fields: object) -> bytes:
    return json.dumps({"model": "m", "messages": MESSAGES, **fields}).encode()


def _parse_error(raw: bytes) -> APIError:
    with pytest.raises(APIError) as caught:
        parse_request(raw, ChatCompletionRequest)
    return caught.value


def test_unknown_fields_are_ignored_and_defaults_follow_openai() -> None:
    request = parse_request(_chat(frobnicate=True, user="u1"), ChatCompletionRequest)
    sampling = request.sampling(prompt_tokens=10, context_window=100)
    assert sampling.max_tokens == 90  # no limit: the rest of the context window
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (1.0, 1.0, 0)
    completion = parse_request(b'{"model": "m", "prompt": "x"}', CompletionRequest)
    assert completion.sampling(1, 100).max_tokens == DEFAULT_COMPLETION_MAX_TOKENS


def test_max_completion_tokens_wins_and_stop_accepts_str_or_list() -> None:
    request = parse_request(
        _chat(max_tokens=5, max_completion_tokens=7, stop="END"), ChatCompletionRequest
    )
    assert request.sampling(1, 100).max_tokens == 7
    assert request.sampling(1, 100).stop == ("END",)
    listed = parse_request(_chat(stop=["a", "b"]), ChatCompletionRequest)
    assert listed.sampling(1, 100).stop == ("a", "b")


def test_malformed_json_is_a_400_with_openai_shape() -> None:
    error = _parse_error(b'{"model": ')
    assert error.status_code == 400
    body = error.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stop": 5}, "stop"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_wrong_types_name_the_field(fields: dict[str, object], param: str) -> None:
    error = _parse_error(_chat(**fields))
    assert error.status_code == 400
    assert error.param == param
    assert param in error.message


def test_missing_model_is_named() -> None:
    error = _parse_error(json.dumps({"messages": MESSAGES}).encode())
    assert error.param == "model" and "Missing" in error.message


def test_unsupported_knobs_are_rejected_not_ignored() -> None:
    for fields, param in (({"n": 2}, "n"), ({"logprobs": True}, "logprobs")):
        request = parse_request(_chat(**fields), ChatCompletionRequest)
        with pytest.raises(APIError) as caught:
            request.check_supported()
        assert caught.value.param == param


def test_text_content_parts_are_joined_and_images_rejected() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    request = parse_request(
        _chat(messages=[{"role": "user", "content": parts}]), ChatCompletionRequest
    )
    assert request.chat_messages()[0].content == "ab"
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    request = parse_request(
        _chat(messages=[{"role": "user", "content": image}]), ChatCompletionRequest
    )
    with pytest.raises(APIError):
        request.chat_messages()


def test_engine_and_request_errors_map_to_openai_statuses() -> None:
    overloaded = to_api_error(EngineOverloadedError(waiting=8, max_queue=8))
    assert overloaded.status_code == 429
    assert overloaded.headers["Retry-After"] == "1"
    too_long = to_api_error(
        ContextLengthExceededError(prompt_tokens=9000, max_tokens=10, context_window=8192)
    )
    assert (too_long.status_code, too_long.code) == (400, "context_length_exceeded")
    assert "8192" in too_long.message and "9000" in too_long.message
    missing = to_api_error(ModelNotFoundError("x", ["m"]))
    assert (missing.status_code, missing.code) == (404, "model_not_found")
    failed = to_api_error(GenerationFailedError("boom"))
    assert (failed.status_code, failed.type) == (500, "server_error")
    assert "boom" in failed.message
    bug = to_api_error(ZeroDivisionError("oops"))
    assert bug.status_code == 500 and "ZeroDivisionError" in bug.message


def test_server_secret_is_created_once_private_and_reused(tmp_path: Path) -> None:
    first = load_server_secret(tmp_path, env={})
    assert load_server_secret(tmp_path, env={}) == first
    assert stat.S_IMODE((tmp_path / SECRET_FILE).stat().st_mode) == 0o600
    assert load_server_secret(tmp_path, env={"KVFACTORY_SERVER_SECRET": "s"}) != first


def test_tenants_get_distinct_stable_salts_and_keys_are_enforced(tmp_path: Path) -> None:
    open_resolver = TenantResolver.from_env(tmp_path, env={})
    default = open_resolver.resolve(None)
    assert default.name == "default"
    assert open_resolver.resolve("Bearer anything") == default
    assert TenantResolver.from_env(tmp_path, env={}).resolve(None).salt == default.salt

    keyed = TenantResolver.from_env(tmp_path, env={"KVFACTORY_API_KEYS": "k1=team-a,k2=team-b"})
    team_a, team_b = keyed.resolve("Bearer k1"), keyed.resolve("bearer k2")
    assert (team_a.name, team_b.name) == ("team-a", "team-b")
    assert len({team_a.salt, team_b.salt, default.salt}) == 3
    for header in (None, "Bearer nope", "k1"):
        with pytest.raises(APIError) as caught:
            keyed.resolve(header)
        assert (caught.value.status_code, caught.value.code) == (401, "invalid_api_key")


def test_bad_api_key_spec_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key=tenant"):
        TenantResolver.from_env(tmp_path, env={"KVFACTORY_API_KEYS": "justakey"})
