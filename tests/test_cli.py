"""The ``kvfactory`` CLI: sizes, settings precedence, one-line errors, and store commands on a
real store directory filled through the real ``ContextStore``."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kvfactory.cli import build_settings, main, parse_size
from kvfactory.config import Settings, human_bytes, load_settings
from kvfactory.errors import ConfigError
from kvfactory.store.codec import KVBlock
from kvfactory.store.factory import open_store
from kvfactory.store.keys import Namespace

MakeBlocks = Callable[..., list[KVBlock]]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1024", 1024),
        ("2GiB", 2 << 30),
        ("2gib", 2 << 30),
        ("500MB", 500_000_000),
        ("1.5G", 3 << 29),
        ("64 KiB", 64 << 10),
        ("3Ti", 3 << 40),
        ("10kb", 10_000),
        ("5e10", 50_000_000_000),  # the planner's bandwidths, now the same parser
        ("1PB", 10**15),
        ("2PiB", 2 << 50),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1", "2XB", "1.2.3G", "two", "5e", "1e400"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid size"):
        parse_size(text)


def test_human_bytes_is_binary_and_reads_back_with_parse_size() -> None:
    assert [human_bytes(n) for n in (None, 512, 2 << 30, 1.5 * (1 << 50))] == [
        "unbounded", "512 B", "2.0 GiB", "1.5 PiB"
    ]  # fmt: skip
    assert parse_size(human_bytes(2 << 30).replace(" ", "")) == 2 << 30


def test_load_settings_reads_human_sizes_from_file_env_and_overrides(tmp_path: Path) -> None:
    # not only through the CLI: load_settings is what the vLLM connector and sessions call
    config = tmp_path / "kvfactory.toml"
    config.write_text('disk_bytes = "3GiB"\nhost_reserve_bytes = "1MiB"\n')
    env = {"KVFACTORY_MEMORY_BYTES": "2GiB", "KVFACTORY_SHM_BYTES": "500MB"}
    settings = load_settings({"max_request_bytes": "8MiB"}, config_file=config, env=env)
    assert (settings.memory_bytes, settings.disk_bytes) == (2 << 30, 3 << 30)
    assert (settings.shm_bytes, settings.host_reserve_bytes) == (500 * 10**6, 1 << 20)
    assert settings.max_request_bytes == 8 << 20
    with pytest.raises(ConfigError, match=r"^KVFACTORY_DISK_BYTES: invalid size 'much'"):
        load_settings({}, env={"KVFACTORY_DISK_BYTES": "much"})
    config.write_text('disk_bytes = "lots"\n')
    with pytest.raises(ConfigError, match=r"kvfactory\.toml: disk_bytes: invalid size 'lots'"):
        load_settings({}, config_file=config, env={})


def test_settings_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    config = tmp_path / "kvfactory.toml"
    config.write_text("port = 1111\nchunk_tokens = 128\nmemory_bytes = 1000\n")
    env = {"KVFACTORY_PORT": "2222", "KVFACTORY_MEMORY_BYTES": "1GiB"}

    from_file = build_settings({}, config_file=config, env={})
    assert (from_file.port, from_file.chunk_tokens, from_file.memory_bytes) == (1111, 128, 1000)
    from_env = build_settings({"port": None}, config_file=config, env=env)
    assert (from_env.port, from_env.chunk_tokens, from_env.memory_bytes) == (2222, 128, 1 << 30)
    from_flags = build_settings({"port": 3333, "memory_bytes": "2MiB"}, config_file=config, env=env)
    assert (from_flags.port, from_flags.memory_bytes) == (3333, 2 << 20)
    assert build_settings({}, env={}).port == Settings().port


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["serve", "--memory-bytes", "lots"], {}, "invalid size 'lots'"),
        (["serve", "--bogus"], {}, "No such option"),
        (["serve", "--port", "http"], {}, "--port"),
        (["serve", "--chunk-tokens", "3"], {}, "chunk_tokens"),
        (["serve", "--config", "/nonexistent/kvfactory.toml"], {}, "config file not found"),
        (["serve"], {"KVFACTORY_PORT": "eighty"}, "port"),
        (["serve"], {"KVFACTORY_DISK_BYTES": "much"}, "KVFACTORY_DISK_BYTES"),
        (["serve", "--model", "/nonexistent/model"], {}, "model folder not found"),
        (["store", "explain"], {}, "--file"),
        (["serve", "--store-remote", "ftp://cache:1"], {}, "ftp://cache:1"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    argv: list[str],
    env: dict[str, str],
    needle: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KVFACTORY_STORE_DIR", str(tmp_path / "store"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert needle in err
    assert not (tmp_path / "store").exists()  # nothing was touched before failing


def test_console_entry_point_fails_cleanly_without_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvfactory", "serve", "--disk-bytes", "1 parsec"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: invalid size '1 parsec': use bytes or a unit like 500MB, 2GiB"
    ]


def _fill_store(
    store_dir: Path, namespace: Namespace, make_blocks: MakeBlocks, tokens: list[int]
) -> int:
    settings = Settings(
        store_dir=store_dir, memory_bytes=1 << 20, disk_bytes=1 << 24, admission="always",
        chunk_tokens=namespace.chunk_tokens,
    )  # fmt: skip
    blocks = make_blocks(tokens, namespace, payload_bytes=256)
    with open_store(settings) as store:
        store.put_many(blocks)
        assert store.flush(timeout=30)
    return len(blocks)


def _stats(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, int]:
    assert main(["store", "stats", "--store-dir", str(store_dir), "--json"]) == 0
    report: dict[str, int] = json.loads(capsys.readouterr().out)
    return report


def test_store_stats_and_clear_on_a_real_store(
    tmp_path: Path,
    namespace: Namespace,
    make_blocks: MakeBlocks,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store_dir = tmp_path / "store"
    stored = _fill_store(store_dir, namespace, make_blocks, list(range(16 * 3 + 5)))
    assert stored == 3
    report = _stats(store_dir, capsys)
    assert report["disk_blocks"] == 3 and report["disk_bytes"] > 3 * 256

    # a small configured budget must not trim what is on disk when only looking at it
    monkeypatch.setenv("KVFACTORY_DISK_BYTES", "1KiB")
    assert _stats(store_dir, capsys)["disk_blocks"] == 3
    monkeypatch.delenv("KVFACTORY_DISK_BYTES")

    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    assert main(["store", "clear", "--store-dir", str(store_dir)]) == 1
    assert "nothing deleted" in capsys.readouterr().err
    assert _stats(store_dir, capsys)["disk_blocks"] == 3

    assert main(["store", "clear", "--store-dir", str(store_dir), "--yes"]) == 0
    assert "deleted 3 blocks" in capsys.readouterr().out
    assert _stats(store_dir, capsys)["disk_blocks"] == 0


def test_store_commands_on_a_missing_store_do_not_create_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    assert main(["store", "stats", "--store-dir", str(missing)]) == 1
    assert "no context store" in capsys.readouterr().err
    assert not missing.exists()


@pytest.mark.slow
def test_store_explain_finds_the_prefix_stored_for_the_real_tokenizer(
    tmp_path: Path, make_blocks: MakeBlocks, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvfactory.engines.hf import load_fingerprint, load_tokenizer

    settings = Settings(store_dir=tmp_path / "store", chunk_tokens=16)
    text = (
        "Context memory keeps the KV cache of long prompts so the next request skips prefill. " * 3
    )
    tokens = list(load_tokenizer(settings)(text, add_special_tokens=True)["input_ids"])
    salt = b"tenant-salt-for-test"
    namespace = Namespace.create(load_fingerprint(settings), salt, "default")
    stored = _fill_store(settings.resolved_store_dir, namespace, make_blocks, tokens[:32])
    assert stored == 2
    base = [
        "store",
        "explain",
        text,
        "--store-dir",
        str(settings.resolved_store_dir),
        "--chunk-tokens",
        "16",
    ]

    assert main([*base, "--tenant-salt", salt.hex()]) == 0
    out = capsys.readouterr().out
    assert f"{len(tokens)} tokens" in out and "cached prefix on disk: 32 tokens" in out
    assert "never_stored" in out and "chunk 2" in out

    assert main([*base, "--tenant-salt", b"another tenant".hex()]) == 0
    assert "cached prefix on disk: 0 tokens" in capsys.readouterr().out


def test_serve_refuses_an_anonymous_server_off_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without API keys every client is the one anonymous tenant (its sessions, its KV):
    fine on loopback, refused on another interface unless asked for explicitly."""
    monkeypatch.setenv("KVFACTORY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KVFACTORY_API_KEYS", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "9"]) == 2
    assert "refusing to serve without API keys on 0.0.0.0" in capsys.readouterr().err
    assert not (tmp_path / "home" / "store").exists()  # nothing was opened


@pytest.mark.parametrize(
    ("host", "keyed", "allow", "refused"),
    [
        ("127.0.0.1", False, False, False),
        ("::1", False, False, False),
        ("localhost", False, False, False),
        ("0.0.0.0", False, False, True),
        ("10.1.2.3", False, False, True),
        ("myhost.example", False, False, True),
        ("0.0.0.0", True, False, False),
        ("0.0.0.0", False, True, False),
    ],
)
def test_which_servers_count_as_anonymously_exposed(
    host: str, keyed: bool, allow: bool, refused: bool
) -> None:
    from kvfactory.cli import refuse_anonymous_exposure

    settings = Settings(host=host, allow_anonymous=allow)
    if refused:
        with pytest.raises(ConfigError, match="refusing to serve without API keys"):
            refuse_anonymous_exposure(settings, keyed=keyed)
    else:
        refuse_anonymous_exposure(settings, keyed=keyed)
