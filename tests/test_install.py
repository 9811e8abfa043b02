"""The four folders install under one name, `nptm.*`: no top-level `results` (or any of the
other three) exists in an environment, so a user's own `results.py` shadows nothing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

OLD_NAMES = ("orchestrator", "trainables", "search_spaces", "results")


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_a_results_py_in_the_working_directory_shadows_nothing(tmp_path: Path) -> None:
    # A notebook directory with a module of its own called `results` (the reported clash).
    (tmp_path / "results.py").write_text(
        "raise ImportError('the notebook results.py was imported')\n"
    )
    (tmp_path / "orchestrator.py").write_text("raise ImportError('shadowed')\n")
    done = _python(
        "from nptm.results.api import load_sweep\n"
        "import nptm.orchestrator.cli, nptm.trainables.models, nptm.search_spaces\n"
        "print(load_sweep.__module__)",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "nptm.results.api"


@pytest.mark.parametrize("name", OLD_NAMES)
def test_the_old_top_level_names_do_not_exist(tmp_path: Path, name: str) -> None:
    done = _python(f"import {name}", tmp_path)
    assert done.returncode != 0
    assert f"No module named '{name}'" in done.stderr
