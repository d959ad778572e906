"""``tenant_store_bytes``: from ``[tenants.NAME] store_bytes`` in a server's config file
(the factory config's field) or the env's ``team=size`` pairs; sizes parsed like the CLI's."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvfactory.config import load_settings
from kvfactory.errors import ConfigError


def test_tenant_tables_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(
        '[kvfactory]\nmemory_bytes = 1024\n\n[tenants.team-a]\nstore_bytes = "2GiB"\n\n'
        "[tenants.team-b]\nstore_bytes = 4096\n"
    )
    settings = load_settings(config_file=config, env={})
    assert settings.tenant_store_bytes == {"team-a": 2 << 30, "team-b": 4096}
    assert settings.memory_bytes == 1024


def test_top_level_fields_with_tenant_tables(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('chunk_tokens = 64\n\n[tenants.t]\nstore_bytes = "1MB"\n')
    settings = load_settings(config_file=config, env={})
    assert settings.tenant_store_bytes == {"t": 10**6} and settings.chunk_tokens == 64


def test_env_pairs() -> None:
    env = {"KVFACTORY_TENANT_STORE_BYTES": "team-a=512MiB, team-b=1GB"}
    settings = load_settings(env=env)
    assert settings.tenant_store_bytes == {"team-a": 512 << 20, "team-b": 10**9}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[tenants.t]\nkey_sha256 = "ab"\n', "reads only store_bytes"),
        ('[tenants.t]\nstore_bytes = "lots"\n', "invalid size"),
        ("tenants = 3\n", "table of tables"),
    ],
)
def test_bad_tenant_tables_are_one_line(tmp_path: Path, text: str, match: str) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_settings(config_file=config, env={})
