"""Every `llamascope` command in the README runs: the offline ones for real, in the order the
README gives them (the store `inspect` writes is what `show` reads). Commands that need a GPU
or the real Hub are listed with the test that runs the same code path here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamascope_sdk.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
#: README commands that cannot run here, and where the same code path is tested.
ELSEWHERE = {
    "--device cuda": "test_real_model_walkthrough.py (same CLI path on CPU, SAE via the fake Hub)",
    "convert LXTC-8x": "test_convert_circuit_tracer.py (the 32-layer set from synthetic transcoders)",
    "--endpoint": "test_explain_cli.py (the same CLI path against the scripted fake endpoint)",
    "llamascope serve": "a server that runs until stopped; the serve tests start it",
    "llamascope bench": "test_benchmark_run.py (same library path on a tiny Llama; CLI refusals tested there)",
    "llamascope trace": "test_trace_cli.py (same CLI path on SmolLM2, transcoder folders) and "
                        "test_trace_demo.py (the demo set); minutes on a CPU",
}


def readme_commands() -> list[str]:
    """``llamascope ...`` lines of the README's bash blocks (continuations joined)."""
    text = README.read_text(encoding="utf-8")
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("llamascope "):
                lines.append(line)
    return lines


def test_readme_has_the_commands_this_test_runs() -> None:
    cmds = readme_commands()
    assert len(cmds) >= 15, cmds
    assert any(c.startswith("llamascope inspect") for c in cmds)
    assert any("--chat" in c for c in cmds)


@pytest.mark.smollm
def test_every_offline_readme_command_runs(smollm2, tmp_path, monkeypatch, corpus_dir) -> None:
    monkeypatch.chdir(tmp_path)
    text = "\n\n".join((corpus_dir / "tinyshakespeare.txt").read_text().split("\n\n")[:40])
    for name in ("text.txt", "my_text.txt"):
        Path(name).write_text(text)
    ran = []
    runner = CliRunner()
    for line in readme_commands():
        if any(key in line for key in ELSEWHERE):
            continue
        argv = shlex.split(line)[1:]
        if argv[0] in ("steer", "ablate"):
            argv += ["-n", "4"]  # the last -n wins: keep generation short
        if "--tokens" in argv:
            argv[argv.index("--tokens") + 1] = "300"
        if argv[0] == "eval":
            argv[argv.index("--context") + 1] = "128"
        res = runner.invoke(app, argv)
        assert res.exit_code == 0, (line, res.output[-2000:])
        ran.append(argv[0])
    assert {"steer", "ablate", "encode", "list", "info", "eval", "cards", "inspect", "show",
            "search"} <= set(ran)
    assert Path("feats/pages/index.html").is_file() and Path("out/cards/demo/README.md").is_file()
