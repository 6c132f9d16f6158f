"""Configuration: config.yaml, ECASHBOT_ overrides, and one clear line for a bad key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def test_the_shipped_config_yaml_loads() -> None:
    cfg = load_config(REPO / "config.yaml")
    assert cfg.mints == ["http://127.0.0.1:3338"]
    assert cfg.default_model in cfg.models
    assert all(isinstance(m.output_msat_per_1k, int) for m in cfg.models.values())


def test_environment_overrides_nested_keys_and_json_lists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ECASHBOT_MINTS", '["http://127.0.0.1:4000/", "https://Mint.Example.com"]')
    monkeypatch.setenv("ECASHBOT_HTTP__PORT", "9090")
    monkeypatch.setenv("ECASHBOT_WALLET__PATH", "/var/lib/ecashbot")
    cfg = load_config(REPO / "config.yaml")
    assert cfg.mints == ["http://127.0.0.1:4000", "https://mint.example.com"]
    assert cfg.http.port == 9090
    assert cfg.http.host == "127.0.0.1"  # the rest of the section still comes from the file
    assert str(cfg.wallet.path) == "/var/lib/ecashbot"


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"ECASHBOT_HTTP__PORT": "abc"}, "http.port"),
        ({"ECASHBOT_MINTS": "[]"}, "mints"),
        ({"ECASHBOT_DEFAULT_MODEL": "gpt-5"}, "default_model"),
        ({"ECASHBOT_LIMITS__MIN_OUTPUT_TOKENS": "-3"}, "limits.min_output_tokens"),
    ],
)
def test_a_bad_setting_names_its_key(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], key: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "config.yaml")
    assert "\n" not in str(info.value)
    assert key in str(info.value) or env.get("ECASHBOT_DEFAULT_MODEL", "@") in str(info.value)


def test_unknown_key_in_yaml_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("mints: [http://127.0.0.1:3338]\nhttp:\n  prot: 1\n")
    with pytest.raises(ConfigError, match=r"http\.prot"):
        load_config(p)


def test_serve_with_bad_config_exits_with_one_line(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("mints: [http://127.0.0.1:3338]\nhttp:\n  port: seventy\n")
    out = subprocess.run(
        [sys.executable, "-m", "bot", "serve", "--config", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "http.port" in lines[0], out.stderr
