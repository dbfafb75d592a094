"""The README stays true: every setting the program reads is documented, and vice versa."""

from __future__ import annotations

import re

from service.settings import env_names
from tests.procs import ROOT


def test_every_setting_is_in_the_readme_table() -> None:
    """Each COREFLEET_* variable read by the code has a row in README's settings table."""
    readme = (ROOT / "README.md").read_text()
    table = set(re.findall(r"^\| `(COREFLEET_[A-Z0-9_]+)` \|", readme, flags=re.MULTILINE))
    assert env_names() - table == set(), "settings missing from the README table"
    assert table - env_names() == set(), "README documents settings the code never reads"


def test_the_readme_test_command_is_what_ci_runs() -> None:
    """.ci/run runs exactly the test command README gives."""
    readme = (ROOT / "README.md").read_text()
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command.endswith("uv run --locked pytest")
    assert command in readme
