"""README's set-up commands are the ones CI and users run: ``.ci/run`` ends with the test command."""

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
    assert demo.endswith("orthotune demo") and tests.endswith("python -m pytest -q")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == tests, f".ci/run must end with README's test command {tests!r}, got {ci[-1]!r}"
