"""Tenants from the factory config: hashed keys resolve, plaintext is never stored or taken."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvfactory.cli import app
from kvfactory.errors import ConfigError
from kvfactory.gateway.errors import APIError
from kvfactory.gateway.tenancy import TenantResolver, hash_api_key
from kvfactory.gateway.tenant_config import load_tenancy, parse_tenancy

SECRET = bytes(range(32))
KEY_A = "kvf-team-a-secret"
KEY_B = "kvf-team-b-secret"

CONFIG_TOML = f"""
[admission]
max_concurrent = 4

[priority.high]
rank = 10
max_queue = 2
queue_timeout_s = 5
reserved_share = 0.25

[tenants.team-a]
key_sha256 = "{hash_api_key(KEY_A)}"
requests_per_minute = 3
tokens_per_minute = 5000
max_concurrent = 2
priority = "high"

[tenants.team-b]
key_sha256 = ["{hash_api_key(KEY_B)}", "{hash_api_key("kvf-old-b")}"]
"""


def _write(tmp_path: Path, text: str = CONFIG_TOML) -> Path:
    path = tmp_path / "factory.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_hash_is_sha256_hex_of_the_trimmed_key() -> None:
    assert hash_api_key(KEY_A) == hashlib.sha256(KEY_A.encode()).hexdigest()
    assert hash_api_key(f"  {KEY_A}\n") == hash_api_key(KEY_A)
    with pytest.raises(ValueError):
        hash_api_key("  ")


def test_hashed_keys_resolve_to_tenants_with_server_derived_salts(tmp_path: Path) -> None:
    tenancy = load_tenancy(_write(tmp_path))
    resolver = tenancy.resolver(SECRET)
    assert resolver.requires_key and resolver.tenants == {"team-a", "team-b"}
    a = resolver.resolve(f"Bearer {KEY_A}")
    assert a.name == "team-a"
    assert resolver.resolve("Bearer kvf-old-b").name == "team-b"  # rotation: both keys work
    assert resolver.resolve(f"bearer {KEY_B}").salt == resolver.salt_for("team-b")
    assert a.salt != resolver.salt_for("team-b")
    # The same tenant from plaintext env config and from hashed config gets the same salt.
    assert TenantResolver(SECRET, {KEY_A: "team-a"}).resolve(f"Bearer {KEY_A}").salt == a.salt
    for bad in (None, "Bearer nope", KEY_A, f"Basic {KEY_A}"):
        with pytest.raises(APIError) as caught:
            resolver.resolve(bad)
        assert caught.value.status_code == 401


def test_plaintext_never_stored(tmp_path: Path) -> None:
    tenancy = load_tenancy(_write(tmp_path))
    resolver = tenancy.resolver(SECRET)
    held = repr(tenancy) + repr(vars(resolver))
    for key in (KEY_A, KEY_B):
        assert key not in held
        assert key.encode() not in b"".join(resolver._tenant_by_key_digest)
    with pytest.raises(ConfigError, match="hashed"):
        parse_tenancy({"tenants": {"t": {"api_key": "sk-plain"}}})
    with pytest.raises(ConfigError) as caught:
        parse_tenancy({"tenants": {"t": {"key_sha256": "sk-plaintext-pasted-here"}}})
    assert "sk-plaintext" not in str(caught.value)  # a mistake is never echoed to logs


def test_limits_and_classes_reach_admission(tmp_path: Path) -> None:
    tenancy = load_tenancy(_write(tmp_path))
    assert [c.name for c in tenancy.classes] == ["high", "standard"]  # standard is implied
    admission = tenancy.admission(clock=lambda: 0.0)
    assert admission.limits_for("team-a").requests_per_minute == 3
    assert admission.limits_for("team-b").priority == "standard"

    async def scenario() -> None:
        for _ in range(3):
            (await admission.admit("team-a", 10)).release()
        with pytest.raises(APIError) as caught:
            await admission.admit("team-a", 10)
        assert caught.value.status_code == 429

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"tenants": {"t": {"requests_per_minut": 5}}}, "requests_per_minut"),
        ({"tenants": {"t": {"requests_per_minute": 0}}}, "requests_per_minute"),
        ({"tenants": {"t": {"priority": "gold"}}}, "gold"),
        ({"priority": {"high": {"reserved_share": 1.5}}}, "reserved_share"),
        (
            {
                "admission": {"max_concurrent": 2},
                "priority": {"h": {"rank": 1, "reserved_share": 0.9}},
            },
            "reserved",
        ),
        (
            {"tenants": {"a": {"key_sha256": "ab" * 32}, "b": {"key_sha256": "AB" * 32}}},
            "two tenants",
        ),
        ({"tenants": "nope"}, "table"),
        ({"tenants": {"t": {"store_bytes": "2 parsecs"}}}, r"tenants\.t\] store_bytes"),
        ({"tenants": {"t": {"store_bytes": -1}}}, "negative"),
    ],
)
def test_config_errors_are_one_clear_line(config: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_tenancy(config)


def test_tenants_cli_hash_new_and_check(tmp_path: Path) -> None:
    runner = CliRunner()
    hashed = runner.invoke(app, ["tenants", "hash-key"], input=f"{KEY_A}\n")
    assert hashed.exit_code == 0, hashed.output
    assert hashed.output.strip() == hash_api_key(KEY_A)

    made = runner.invoke(app, ["tenants", "new-key", "team-c"])
    assert made.exit_code == 0, made.output
    key = made.output.split("): ", 1)[1].split()[0]
    assert f'key_sha256 = "{hash_api_key(key)}"' in made.output
    table = made.output[made.output.index("[tenants.team-c]") :]
    assert key not in table  # the config snippet holds only the digest
    resolver = parse_tenancy({"tenants": {"team-c": {"key_sha256": hash_api_key(key)}}})
    assert resolver.resolver(SECRET).resolve(f"Bearer {key}").name == "team-c"

    checked = runner.invoke(app, ["tenants", "check", str(_write(tmp_path))])
    assert checked.exit_code == 0, checked.output
    assert "team-a" in checked.output and "priority high: rank 10" in checked.output

    broken = runner.invoke(
        app, ["tenants", "check", str(_write(tmp_path, "[tenants.x]\nkey = 'k'\n"))]
    )
    assert broken.exit_code == 1
    missing = runner.invoke(app, ["tenants", "check", str(tmp_path / "absent.toml")])
    assert missing.exit_code == 1 and "cannot read" in missing.output


def test_store_bytes_are_parsed_like_the_cli_sizes() -> None:
    tenancy = parse_tenancy(
        {"tenants": {"a": {"store_bytes": "2GiB"}, "b": {"store_bytes": 1000}, "c": {}}}
    )
    assert tenancy.store_budgets() == {"a": 2 << 30, "b": 1000}
