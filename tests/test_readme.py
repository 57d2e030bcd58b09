"""README's set-up commands are the ones CI and users run: ``.ci/run`` runs the demo command, then ends with the test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_setup_is_two_commands_and_ci_runs_the_second() -> None:
    commands = setup_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    demo, tests = commands
    assert demo.endswith("orthotune demo") and tests.endswith("python -m pytest -q -n auto --dist loadgroup")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == tests, f".ci/run must end with README's test command {tests!r}, got {ci[-1]!r}"


def test_ci_runs_the_demo_command_as_written_in_a_fresh_venv() -> None:
    demo, _ = setup_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    fresh = [i for i, line in enumerate(ci) if line.startswith("python3 -m venv .ci-demo-venv")]
    runs = [i for i, line in enumerate(ci) if line.strip() == f"( . .ci-demo-venv/bin/activate && {demo} )"]
    assert fresh and runs and fresh[0] < runs[0], f".ci/run must run README's first command {demo!r} in a fresh venv"
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "/.ci-demo-venv/" in ignored and "/.ci-venv/" in ignored, "CI's venvs must not show up as repository files"
