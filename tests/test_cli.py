"""The `nptm` command line: version, validate/plan/inspect output, README and CI agreement."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nptm.orchestrator.cli import main
from nptm.trainables import schedules
from nptm.trainables.recipe import DEFAULT_RECIPES
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


def test_schedules_prints_figure_1_for_a_small_budget(tmp_path: Path, capsys) -> None:
    """digits recipe: 30 epochs, lr 0.1, x0.1 at 15 and 23, global batch 64 over 1,437 images
    = 23 steps per epoch. Budget 10 = 230 steps."""
    assert main(["schedules", "--dataset", "digits", "--budget", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps_per_epoch"] == 23 and out["epochs"] == list(range(1, 11))
    assert set(out["schedules"]) == {"ft", "lrw", "wr", "slr", "clr", "scratch"}
    assert set(out["skipped"]) == {"scratch_e", "scratch_b"}
    lr = {name: curve["lr"] for name, curve in out["schedules"].items()}
    assert lr["ft"] == pytest.approx([0.001] * 10)  # the last pre-training lr
    # lrw replays pre-training epochs 20..29: 20-22 at 0.01, 23-29 at 0.001
    assert lr["lrw"] == pytest.approx([0.01] * 3 + [0.001] * 7) and lr["wr"] == lr["lrw"]
    # slr: warm-up over int(0.1 x 10) = 1 epoch at 0.001, then drops int(15/30 x 0.9 x 10) = 4
    # and int(23/30 x 0.9 x 10) = 6 epochs after it: from epochs 5 and 7.
    assert lr["slr"] == pytest.approx([0.001] + [0.1] * 4 + [0.01] * 2 + [0.001] * 3)
    for name, curve in out["schedules"].items():  # the recipe's momentum, but clr cycles it
        if name != "clr":
            assert curve["momentum"] == pytest.approx([0.9] * 10)

    # clr: torch's OneCycleLR built from the parameters the schedule is defined with
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.1, total_steps=230, pct_start=DEFAULT_RECIPES["digits"].warmup_fraction,
        anneal_strategy="cos", div_factor=schedules.CLR_DIV_FACTOR,
        final_div_factor=schedules.CLR_FINAL_DIV_FACTOR, three_phase=False, cycle_momentum=True,
        base_momentum=0.85, max_momentum=0.95,
    )  # fmt: skip
    reference = []
    for _ in range(230):
        reference.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
        opt.step()
        one_cycle.step()
    assert lr["clr"] == pytest.approx([r[0] for r in reference[::23]], rel=1e-9)
    clr_momentum = out["schedules"]["clr"]["momentum"]
    assert clr_momentum == pytest.approx([r[1] for r in reference[::23]], rel=1e-9)

    # the text table shows the same numbers; --plot writes a PNG
    png = tmp_path / "fig1.png"
    assert main(["schedules", "--dataset", "digits", "--budget", "10", "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "23 steps" in text and "scratch_b: not shown" in text
    row7 = next(line.split() for line in text.splitlines() if line.strip().startswith("7 "))
    # "7", then "lr / momentum" per schedule: ft, lrw, wr, slr, ...
    assert [row7[1], row7[4], row7[10], row7[12]] == ["0.001", "0.001", "0.01", "0.9"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_schedules_bad_input_exits_2(capsys) -> None:
    assert main(["schedules", "--dataset", "mnist", "--budget", "10"]) == 2
    assert "unknown dataset 'mnist'" in capsys.readouterr().err
    assert main(["schedules", "--dataset", "digits", "--budget", "0"]) == 2
    assert "budget: 0" in capsys.readouterr().err


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


def test_every_command_positional_and_option_has_help_in_the_order_a_user_meets_them(
    capsys,
) -> None:
    import argparse

    from nptm.orchestrator.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(sub.choices) == [
        "validate", "plan", "sweep", "status", "report", "best", "inspect", "schedules",
        "sync-mlflow",
    ]  # fmt: skip
    listed = [a.dest for a in sub._choices_actions]
    assert listed == list(sub.choices) and all(a.help for a in sub._choices_actions)
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help and action.help.strip(), f"nptm {name} {action.dest}: no help"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "pruning" in text and "lazily" not in text
    assert re.findall(r"^    ([a-z-]+)", text, re.M) == listed  # listed in that order


def test_a_closed_pipe_ends_the_command_quietly() -> None:
    # `nptm schedules ... | head -1`: the reader leaves after one line.
    done = subprocess.run(
        f"{sys.executable} -m nptm.orchestrator schedules --dataset cifar10 --budget 160 | head -1",
        shell=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.stdout.startswith("cifar10: retraining budget 160 epochs")
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
