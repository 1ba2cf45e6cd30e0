"""Every command the README and docs/ show names a script that exists and flags it takes: a renamed
script or flag fails here instead of in a reader's terminal. (What each command does is tested by
the tests of that command; the cluster's and the GPU's are marked in the docs as not run here.)"""
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"python ((?:studies|benchmarks)/\w+\.py|-m reports)([^`|#'\n]*)")


def _commands():
    found = set()
    for page in PAGES:
        for script, rest in COMMAND.findall(page.read_text()):
            found.add((page.name, script, tuple(re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest))))
    return sorted(found)


@functools.cache
def _help(script):
    command = [sys.executable, "-m", "reports"] if script == "-m reports" else [sys.executable, str(ROOT / script)]
    result = subprocess.run([*command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=180,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, f"{script} --help failed: {result.stderr[-2000:]}"
    return result.stdout


def test_the_pages_show_commands():
    assert len(_commands()) > 20


@pytest.mark.slow
@pytest.mark.parametrize("page, script, flags", _commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_a_documented_command_names_a_script_and_flags_that_exist(page, script, flags):
    if script != "-m reports":
        assert (ROOT / script).is_file(), f"{page} shows {script}, which does not exist"
    unknown = [flag for flag in flags if flag not in _help(script)]
    assert not unknown, f"{page}: `python {script}` takes no {unknown}"
