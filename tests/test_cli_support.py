"""``cli_support.fail``: the one error line every command group prints."""

from __future__ import annotations

import pytest

from kvfactory.cli_support import USAGE_EXIT_CODE, fail


def test_fail_prints_one_line_on_stderr_and_carries_the_exit_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    exit_ = fail("bad value\n  for field x [type=int]", USAGE_EXIT_CODE)
    captured = capsys.readouterr()
    assert exit_.exit_code == USAGE_EXIT_CODE
    assert (captured.out, captured.err) == ("", "error: bad value for field x [type=int]\n")


def test_fail_never_wraps_and_never_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert fail("x" * 500).exit_code == 1
    assert capsys.readouterr().err == f"error: {'x' * 500}\n"
    fail("  \n ")
    assert capsys.readouterr().err == "error: failed\n"
