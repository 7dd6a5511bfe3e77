"""The documentation: the MkDocs site builds with --strict (a broken link, anchor, included file or
page outside the nav fails it), its generated reference pages cover every kind and every command, and
the README stays a front page whose links all resolve.

    python -m pytest -q tests/test_docs.py
    mkdocs build --strict -d /tmp/site        # the same build by hand (pip install -e ".[docs]")
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from raylm.cli import main
from raylm.kinds import KINDS

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 250
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def command_paths(group: click.Group, prefix: tuple[str, ...] = ("raylm",)):
    """Every command under the click group, as its full path: ("raylm", "jobs", "list")."""
    for name, command in group.commands.items():
        path = (*prefix, name)
        yield path
        if isinstance(command, click.Group):
            yield from command_paths(command, path)


def test_site_builds_strictly_with_every_kind_and_command(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip('mkdocs is not installed: pip install -e ".[docs]"')
    site = tmp_path / "site"
    # MkDocs-adjacent packages print a banner about MkDocs 2 on every build; it says nothing about ours.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"

    specs = (site / "reference" / "specs" / "index.html").read_text()
    missing = [kind for kind in KINDS if f'<h2 id="{kind}"' not in specs]
    assert not missing, f"the spec reference has no section for {missing}"

    cli = (site / "reference" / "cli" / "index.html").read_text()
    paths = list(command_paths(main))
    assert {path[1] for path in paths} >= {"run", "validate", "schema", "estimate", "generate", "jobs"}
    missing = [" ".join(path) for path in paths if f'id="{"-".join(path)}"' not in cli]
    assert not missing, f"the CLI reference has no section for {missing}"

    # The benchmarks page is BENCHMARKS.md, included whole: every section of it is on the page.
    sections = [line for line in (ROOT / "BENCHMARKS.md").read_text().splitlines() if line.startswith("## ")]
    page = (site / "benchmarks" / "index.html").read_text()
    assert len(sections) > 0 and page.count("<h2 ") == len(sections)


def test_readme_is_a_front_page_whose_links_resolve():
    text = README.read_text()
    lines = text.count("\n") + (not text.endswith("\n"))
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"
    )

    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor in the README itself
        path = target.split("#", 1)[0]
        if not (ROOT / path).exists():
            broken.append(target)
    assert not broken, f"README.md links to files that do not exist: {broken}"
    assert LINK.findall(text), "no links found: the link pattern is broken"
