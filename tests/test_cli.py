"""The llamascope CLI through typer's CliRunner and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from llamascope_sdk.cli import app

runner = CliRunner()


def test_help_lists_commands() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("list", "info", "download", "encode", "steer", "ablate", "eval", "cards"):
        assert cmd in res.output


def test_list_json_has_256_and_filters() -> None:
    res = runner.invoke(app, ["list", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert len(rows) == 256
    res = runner.invoke(app, ["list", "--json", "--layer", "12", "--position", "tc"])
    rows = json.loads(res.output)
    assert [r["name"] for r in rows] == ["L12TC-8x", "L12TC-32x"]
    assert rows[0]["hook_point_in"] == "blocks.12.ln2.hook_normalized"


def test_info_offline_registry_facts() -> None:
    res = runner.invoke(app, ["info", "l15r_8x", "--offline", "--json"])
    assert res.exit_code == 0, res.output
    facts = json.loads(res.output)
    assert facts["repo_id"] == "OpenMOSS-Team/Llama3_1-8B-Base-LXR-8x"
    assert facts["subfolder"] == "Llama3_1-8B-Base-L15R-8x"
    assert facts["neuronpedia_url"] == "https://www.neuronpedia.org/llama3.1-8b/15-llamascope-res-32k"


def test_unknown_sae_is_one_line_with_suggestions() -> None:
    res = runner.invoke(app, ["info", "L12Q-8x", "--offline"])
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    assert "unknown position 'Q'" in res.output
    res = runner.invoke(app, ["info", "L12M-9x", "--offline"])
    assert res.exit_code == 1 and "unknown width" in res.output
    res = runner.invoke(app, ["info", "L21M-8xx", "--offline"])
    assert res.exit_code == 1


def test_unknown_name_suggests_closest() -> None:
    res = runner.invoke(app, ["info", "L12MM-8x", "--offline"])
    assert res.exit_code == 1
    assert "closest" in res.output or "unknown" in res.output


def test_debug_shows_traceback() -> None:
    res = runner.invoke(app, ["--debug", "info", "L99R-8x", "--offline"])
    assert res.exit_code != 0
    assert res.exception is not None and "layer 99" in str(res.exception)


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "llamascope_sdk", *args], capture_output=True,
                          text=True, env=full, timeout=300)


def test_subprocess_error_is_one_line_no_traceback() -> None:
    p = _run("info", "L32R-8x", "--offline")
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert p.stderr.startswith("error: layer 32 is out of range")


def test_subprocess_offline_cold_cache(tmp_path) -> None:
    p = _run("info", "L3R-8x", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert "offline" in p.stderr.lower()
    assert "hint:" in p.stderr
