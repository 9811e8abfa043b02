"""The `nptm` command line: version, validate/plan/inspect output, README and CI agreement."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from orchestrator.cli import main
from tests.sweep_helpers import ROOT, nptm, write_grid


def test_version_and_module_entry_point() -> None:
    result = nptm("--version", timeout=60)
    assert result.returncode == 0 and re.fullmatch(r"nptm \d+\.\d+\.\d+\S*\n", result.stdout)


def test_plan_json_counts_match_hand_computed_values(tmp_path: Path, capsys) -> None:
    # 2 pruners x 3 schedules x 1 budget x 1 seed = 6 trials; 1 pretrain of 4 epochs, 2 prunes,
    # 6 retrains of 2 epochs: planned 4 + 12 = 16, naive 6 x (4 + 2) = 36.
    grid = write_grid(tmp_path / "tiny.yaml")
    assert main(["plan", str(grid), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trials"] == 6
    assert summary["stages"] == {"pretrain": 1, "prune": 2, "retrain": 6}
    assert summary["epochs"]["planned"] == 16 and summary["epochs"]["naive"] == 36
    assert main(["sweep", str(grid), "--dry-run", "--json"]) == 0  # --dry-run = plan
    assert json.loads(capsys.readouterr().out) == summary


def test_inspect_reproduces_pfec_resnet56_b(capsys) -> None:
    args = ["inspect", "--dataset", "cifar10", "--model", "resnet56", "--pruner", "l1_filter"]
    assert main([*args, "--preset", "B", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # Li et al. (2017), Table 1: 8.5e5 -> 7.3e5 params, 1.25e8 -> 9.09e7 FLOPs (27.6% fewer).
    assert out["base"]["params"] == pytest.approx(8.5e5, rel=0.01)
    assert out["base"]["macs"] == pytest.approx(1.25e8, rel=0.01)
    assert out["pruned"]["params"] == pytest.approx(7.3e5, rel=0.02)
    assert out["pruned"]["macs"] == pytest.approx(9.09e7, rel=0.005)
    assert out["pruned"]["macs_reduction"] == pytest.approx(0.276, abs=0.001)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "--dataset", "digits", "--model", "vgg16"], "vgg16"),
        (["inspect", "--dataset", "cifar10", "--model", "resnet20", "--ratio", "0.5"], "--pruner"),
        (
            ["inspect", "--dataset", "cifar10", "--model", "resnet20", "--pruner", "magnitude",
             "--preset", "B"],
            "preset",
        ),
    ],
)  # fmt: skip
def test_bad_inspect_input_exits_2_with_a_message(argv, message, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def _commands_in(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if "python -m pytest" in line]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = _commands_in((ROOT / "README.md").read_text())
    ci = [c for c in _commands_in((ROOT / ".ci" / "run").read_text()) if not c.startswith("#")]
    assert len(readme) == 1 and ci == readme
