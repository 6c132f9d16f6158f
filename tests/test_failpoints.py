"""Failpoints: the spec parser, and that ``every:N`` crashes on the N-th pass, for certain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bot.failpoints import Rule, parse


def test_parse_reads_probabilities_and_counts() -> None:
    assert parse("") == {}
    assert parse("after_redeem=0.5, after_answer=every:40,after_settle") == {
        "after_redeem": Rule(p=0.5),
        "after_answer": Rule(every=40),
        "after_settle": Rule(p=1.0),
    }


@pytest.mark.parametrize(
    "spec", ["nowhere=0.1", "after_answer=1.5", "after_answer=every:0", "after_answer=x"]
)
def test_parse_refuses_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        parse(spec)


def _passes(n: int, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = (
        "from bot import failpoints\n"
        f"for i in range({n}):\n"
        "    failpoints.hit('after_answer')\n"
        "    print(i + 1, flush=True)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_every_n_crashes_on_the_nth_pass_of_one_process() -> None:
    run = _passes(5, {"ECASHBOT_FAILPOINTS": "after_answer=every:3"})
    assert run.returncode == -signal.SIGKILL
    assert run.stdout.split() == ["1", "2"]
    assert "failpoint after_answer: SIGKILL" in run.stderr


def test_every_n_counts_across_restarts_in_the_counts_dir(tmp_path: Path) -> None:
    env = {
        "ECASHBOT_FAILPOINTS": "after_answer=every:3",
        "ECASHBOT_FAILPOINTS_COUNTS": str(tmp_path),
    }
    codes = [_passes(1, env).returncode for _ in range(6)]
    assert codes == [0, 0, -signal.SIGKILL, 0, 0, -signal.SIGKILL]
    assert (tmp_path / "after_answer").read_bytes() == b"." * 6


def test_unset_failpoints_never_crash() -> None:
    run = _passes(200, {"ECASHBOT_FAILPOINTS": ""})
    assert run.returncode == 0
    assert len(run.stdout.split()) == 200
