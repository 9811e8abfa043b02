"""Every value of a grid (and of the command line) is checked before the first stage: a hostile
value exits 2 with a message naming its field path and value, and nothing is written.

One table per class of hostile input: numbers past what a run survives (bounds), values that
must compare equal once canonical (ratios at 6 decimals, -0.0), YAML that composes but does not
construct or nests too deeply, `pretrain.from` files that are not weights, validation cost, and
the command line's own guards (--max-retries, report --out, a plugin ending the process).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import yaml

from nptm.orchestrator.cli import main
from nptm.orchestrator.planner import build_plan
from nptm.search_spaces import GridError, loader, parse_grid
from nptm.search_spaces.schema import MAX_TRIALS_LIMIT, SEED_LIMIT
from nptm.trainables.models import build_model
from nptm.trainables.recipe import MAX_EPOCHS, MAX_STEPS

BASE = """\
name: bounds
resources: {executor: inline, cpus_per_worker: 1}
pretrain: {epochs: 4, milestones: [2, 3]}
axes:
  dataset: digits
  model: resnet20
  pruner: [{name: magnitude, ratio: 0.5}]
  schedule: [ft]
  budget: 2
  seed: 0
"""


def _validate(tmp_path: Path, capsys, *overrides: str, text: str = BASE) -> tuple[int, str]:
    """`nptm validate grid.yaml OVERRIDES` in this process, in an empty directory: (exit
    status, stderr); asserts that it wrote nothing."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(text)
    before = sorted(os.listdir(tmp_path))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        rc = main(["validate", str(grid), *overrides])
    finally:
        os.chdir(cwd)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written
    return rc, capsys.readouterr().err


def _refused(tmp_path: Path, capsys, overrides, field: str, value: str, **kw) -> str:
    """Asserts exit 2 naming `field` (a path that ends in "..." is matched as a prefix) and
    `value`, without a traceback; returns stderr."""
    rc, err = _validate(tmp_path, capsys, *overrides, **kw)
    assert rc == 2, err
    named = f": {field.removesuffix('...')}" if field.endswith("...") else f": {field}: "
    assert named in err, err
    assert value in err, err
    assert "Traceback" not in err
    return err


def test_the_base_grid_is_valid(tmp_path: Path, capsys) -> None:
    rc, err = _validate(tmp_path, capsys)
    assert rc == 0, err


# --- bounds: (overrides, field path, the value as the message shows it) ----------------------

_SEEDS_2000 = "[" + ",".join(map(str, range(2000))) + "]"
_BUDGETS_1000 = "[" + ",".join(map(str, range(1, 1001))) + "]"

BOUNDS = {
    # epochs: every epoch is a row and a slice of each per-step lr curve
    "budget 1e9": (["axes.budget=1000000000"], "axes.budget", "1000000000"),
    "budget past MAX_EPOCHS": ([f"axes.budget=[2, {MAX_EPOCHS + 1}]"], "axes.budget[1]",
                               str(MAX_EPOCHS + 1)),
    "budget 0": (["axes.budget=0"], "axes.budget", "0"),
    "budget a float": (["axes.budget=2.5"], "axes.budget", "2.5"),
    "pretrain.epochs 1e12": (["pretrain.epochs=1000000000000"], "pretrain.epochs",
                             "1000000000000"),
    "pretrain.digits.epochs past": ([f"pretrain.digits.epochs={MAX_EPOCHS + 1}"],
                                    "pretrain.digits.epochs", str(MAX_EPOCHS + 1)),
    # optimizer steps of one run: epochs x ceil(training samples / batch)
    "pretraining steps": (["pretrain.batch_size=1", "pretrain.epochs=100000",
                           "pretrain.milestones=[50000]"], "pretrain.epochs", f"{MAX_STEPS:,}"),
    "retraining steps": (["pretrain.batch_size=1", "axes.budget=50000"], "axes.budget",
                         "50000"),
    "batch size 1e9": (["pretrain.batch_size=1000000000"], "pretrain.batch_size", "1000000000"),
    "milestones 101": (["pretrain.epochs=200", f"pretrain.milestones={list(range(1, 102))}"],
                       "pretrain.milestones", "at most 100"),
    # seeds: torch.manual_seed(seed * 2**20 + epoch) must stay in range
    "seed 2**44": ([f"axes.seed={2**44}"], "axes.seed", str(2**44)),
    "seed 2**32": ([f"axes.seed=[0, {SEED_LIMIT}]"], "axes.seed[1]", str(SEED_LIMIT)),
    "seed -1": (["axes.seed=-1"], "axes.seed", "-1"),
    "shared seed 2**63": (["seeds.shared_seed=9223372036854775808"], "seeds.shared_seed",
                          "9223372036854775808"),
    # finite floats everywhere
    "pretrain lr inf": (["pretrain.lr=.inf"], "pretrain.lr", "inf"),
    "pretrain lr nan": (["pretrain.lr=.nan"], "pretrain.lr", "nan"),
    "pretrain digits lr -inf": (["pretrain.digits.lr=-.inf"], "pretrain.digits.lr", "-inf"),
    "pretrain lr 1e300": (["pretrain.lr=1.0e+300"], "pretrain.lr", "1e+300"),
    "pretrain gamma nan": (["pretrain.gamma=.nan"], "pretrain.gamma", "nan"),
    "pretrain momentum inf": (["pretrain.momentum=.inf"], "pretrain.momentum", "inf"),
    "weight decay 1e300": (["pretrain.weight_decay=1.0e+300"], "pretrain.weight_decay",
                           "1e+300"),
    "warmup nan": (["pretrain.warmup_fraction=.nan"], "pretrain.warmup_fraction", "nan"),
    "override lr inf": (["axes.overrides.lr=[.inf]"], "axes.overrides.lr[0]", "inf"),
    "override lr 1e300": (["axes.overrides.lr=[1.0e+300]"], "axes.overrides.lr[0]", "1e+300"),
    "ratio nan": (["axes.pruner[0].ratio=.nan"], "axes.pruner[0].ratio", "nan"),
    "ratio 1.5": (["axes.pruner[0].ratio=[0.5, 1.5]"], "axes.pruner[0].ratio[1]", "1.5"),
    "ratio rounds to 1": (["axes.pruner[0].ratio=0.9999999"], "axes.pruner[0].ratio",
                          "0.9999999"),
    "min_keep rounds to 0": (["axes.pruner[0].min_keep=1.0e-9"], "axes.pruner[0].min_keep",
                             "1e-09"),
    "val_fraction rounds to 0": (["data.val_fraction=1.0e-7"], "data.val_fraction", "1e-07"),
    "val_fraction holds out nothing": (["data.val_fraction=0.0001"], "data.val_fraction",
                                       "0.0001"),
    "val_fraction inf": (["data.val_fraction=.inf"], "data.val_fraction", "inf"),
    # resources: Ray's granularity is 0.0001, and a sane most
    "cpus 1e-6": (["resources.cpus_per_worker=0.000001"], "resources.cpus_per_worker",
                  "1e-06"),
    "cpus finer than 1e-4": (["resources.cpus_per_worker=0.00015"],
                             "resources.cpus_per_worker", "0.00015"),
    "cpus 1e9": (["resources.cpus_per_worker=1000000000"], "resources.cpus_per_worker",
                 "1000000000"),
    "gpus 1e-5": (["resources.gpus_per_worker=0.00001"], "resources.gpus_per_worker", "1e-05"),
    "gpus inf": (["resources.gpus_per_worker=.inf"], "resources.gpus_per_worker", "inf"),
    "workers 1e6": (["resources.executor=train", "resources.workers_per_trial=1000000"],
                    "resources.workers_per_trial", "1000000"),
    "max_concurrent 1e9": (["resources.max_concurrent=1000000000"],
                           "resources.max_concurrent", "1000000000"),
    # sizes
    "max_trials 1e23": (["max_trials=100000000000000000000000"], "max_trials",
                        "100000000000000000000000"),
    "max_trials past the limit": ([f"max_trials={MAX_TRIALS_LIMIT + 1}"], "max_trials",
                                  str(MAX_TRIALS_LIMIT + 1)),
    "rounds 1e9": (["iterative.rounds=1000000000"], "iterative.rounds", "1000000000"),
    "axes past the limit": ([f"axes.seed={_SEEDS_2000}", f"axes.budget={_BUDGETS_1000}"],
                            "axes", "2,000,000 trials"),
    # include trials are bounded like the axes
    "include budget 1e9": (["include=[{dataset: digits, model: resnet20, pruner: magnitude, "
                            "ratio: 0.5, schedule: ft, budget: 1000000000, seed: 0}]"],
                           "include[0].budget", "1000000000"),
    "include seed 2**40": (["include=[{dataset: digits, model: resnet20, pruner: magnitude, "
                            f"ratio: 0.5, schedule: ft, budget: 2, seed: {2**40}}}]"],
                           "include[0].seed", str(2**40)),
    "include ratio rounds to 1": (["include=[{dataset: digits, model: resnet20, "
                                   "pruner: magnitude, ratio: 0.99999999, schedule: ft, "
                                   "budget: 2, seed: 0}]"], "include[0].ratio", "0.99999999"),
    "include ratio inf": (["include=[{dataset: digits, model: resnet20, pruner: magnitude, "
                           "ratio: .inf, schedule: ft, budget: 2, seed: 0}]"],
                          "include[0].ratio", "inf"),
}  # fmt: skip


@pytest.mark.parametrize(("overrides", "field", "value"), BOUNDS.values(), ids=BOUNDS.keys())
def test_a_value_no_run_survives_is_refused(tmp_path, capsys, overrides, field, value) -> None:
    _refused(tmp_path, capsys, overrides, field, value)


def test_a_bound_itself_is_accepted(tmp_path: Path, capsys) -> None:
    """The bounds are inclusive where they say so: the largest seed, a 0.0001 CPU share."""
    most = [f"axes.seed={SEED_LIMIT - 1}", "resources.cpus_per_worker=0.0001"]
    rc, err = _validate(tmp_path, capsys, *most, "resources.gpus_per_worker=0")
    assert rc == 0, err


def test_scratch_b_longer_than_a_run_survives_is_refused_at_planning(tmp_path, capsys) -> None:
    """scratch_b's length, T x base / pruned MACs, is known only when the plan counts MACs."""
    rc, err = _validate(
        tmp_path, capsys, "axes.pruner=[{name: l1_filter, ratio: 0.99}]",
        "axes.schedule=[scratch_b]", "pretrain.epochs=90000", "pretrain.milestones=[5]",
    )  # fmt: skip
    assert rc == 2 and ": axes.schedule: 'scratch_b' retrains" in err, err
    assert f"more than the {MAX_EPOCHS:,} one run may train" in err


# --- canonical values: equal targets are equal -----------------------------------------------


def _grid(**axes_or_sections) -> dict:
    data = yaml.safe_load(BASE)
    for key, value in axes_or_sections.items():
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data["axes"][key] = value
    return data


def test_near_duplicate_ratios_collide_after_rounding(tmp_path, capsys) -> None:
    """0.5 and 0.5000001 would be two stage chains both labelled ratio=0.5, pooled as four
    seeds in the report: refused, naming both entries (ratios compare at 6 decimals)."""
    err = _refused(tmp_path, capsys, ["axes.pruner[0].ratio=[0.5, 0.5000001]"],
                   "axes.pruner[0].ratio[1]", "0.5000001 (rounded to 6 decimals: 0.5)")  # fmt: skip
    assert "listed twice (also at axes.pruner[0].ratio[0])" in err
    err = _refused(tmp_path, capsys, ["axes.pruner[0].ratio=[0.0, -0.0]"],
                   "axes.pruner[0].ratio[1]", "listed twice")  # fmt: skip
    err = _refused(tmp_path, capsys, ["axes.overrides.lr=[0.1, 0.1000000001]"],
                   "axes.overrides.lr[1]", "0.1000000001 is listed twice")  # fmt: skip


def test_negative_zero_is_zero_and_ratios_are_rounded() -> None:
    ids = {}
    for zero in (0.0, -0.0):
        grid = parse_grid(
            _grid(pruner=[{"name": "magnitude", "ratio": [zero, 0.1234567]}],
                  pretrain__momentum=zero),
            "g.yaml",
        )  # fmt: skip
        plan = build_plan(grid)
        ids[zero] = set(plan.stages)
        ratios = [t.ratio for t in plan.trials]
        assert ratios == [0.0, 0.123457] and str(ratios[0]) == "0.0"
        assert (
            grid.recipe("digits").momentum == 0.0 and str(grid.recipe("digits").momentum) == "0.0"
        )
    assert ids[0.0] == ids[-0.0]  # the same stage ids


def test_include_and_exclude_values_are_rounded_like_the_axes() -> None:
    trial = {"dataset": "digits", "model": "resnet20", "pruner": "magnitude", "ratio": 0.5000001,
             "schedule": "ft", "budget": 2, "seed": 0}  # fmt: skip
    grid = parse_grid(_grid(schedule=["ft", "clr"]) | {"include": [trial]}, "g.yaml")
    assert len(build_plan(grid).trials) == 2  # the include is the axes' own ratio-0.5 trial
    excluded = _grid(schedule=["ft", "clr"]) | {"exclude": [{"ratio": 0.5000001, "schedule": "ft"}]}
    assert [t.schedule for t in build_plan(parse_grid(excluded, "g.yaml")).trials] == ["clr"]


# --- YAML that composes but does not construct, or nests too deeply ---------------------------

_DEEP = "x: " + "[" * 3000 + "]" * 3000 + "\n"
_BLOCK = "".join("  " * i + f"k{i}:\n" for i in range(40)) + "  " * 40 + "v\n"
_ALIASES = "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 40))

YAML_CASES = {
    "!!bool maybe": (BASE.replace("name: bounds", 'name: !!bool "maybe"'), "name",
                     "'maybe' (line 1) is not a valid !!bool"),
    "merge 5": (BASE + "<<: 5\n", "<<", "merges a scalar"),
    "merge a list of scalars": (BASE + "<<: [1, 2]\n", "<<", "merges a scalar"),
    "unhashable key": (BASE + "? [x, y]\n: 1\n", "(top level)", "a key (line 11) is a list"),
    "mapping key": (BASE + "data: {? {a: 1} : 2}\n", "data", "is a mapping"),
    "3,000 levels": (BASE + _DEEP, "x[0]...", "nests deeper than 32 levels"),
    "40 block levels": (BASE + _BLOCK, "k0.k1.k2...", "nests deeper than 32 levels"),
    "aliases nesting 40 deep": (BASE + _ALIASES, "a39[0][0]...", "nests deeper than 32 levels"),
    "recursive alias": (BASE + "r: &r [*r]\n", "r[0][0]...", "nests deeper than 32 levels"),
    "!!int abc": (BASE.replace("budget: 2", "budget: !!int abc"), "axes.budget",
                  "'abc' (line 9) is not a valid !!int"),
    "!!float x": (BASE.replace("budget: 2", "budget: !!float x"), "axes.budget",
                  "not a valid !!float"),
    "bad date": (BASE.replace("seed: 0", "seed: 2020-13-45"), "axes.seed",
                 "not a valid !!timestamp: month must be in 1..12"),
    "int of 5,000 digits": (BASE.replace("seed: 0", "seed: " + "9" * 5000), "axes.seed",
                            "not a valid !!int"),
    "!!seq on a scalar": (BASE.replace("seed: 0", "seed: !!seq 0"), "axes.seed",
                          "tag '!!seq' (line 10) does not fit a scalar"),
    "!!str on a list": (BASE.replace("seed: 0", "seed: !!str [0]"), "axes.seed",
                        "tag '!!str' (line 10) does not fit a list"),
    "!!merge as a value": (BASE.replace("seed: 0", "seed: !!merge x"), "axes.seed",
                           "does not fit"),
    "python tag": (BASE + "x: !!python/object/apply:os.system [ls]\n", "x", "is not allowed"),
}  # fmt: skip


@pytest.mark.parametrize("fast", [True, False], ids=["libyaml", "pure-python"])
@pytest.mark.parametrize(("text", "field", "message"), YAML_CASES.values(), ids=YAML_CASES.keys())
def test_yaml_that_does_not_construct_exits_2_naming_the_field(
    tmp_path, capsys, monkeypatch, fast, text, field, message
) -> None:
    if not fast:
        monkeypatch.setattr(loader, "_FAST_LOADER", None)
    elif loader._FAST_LOADER is None:
        pytest.skip("PyYAML without libyaml")
    _refused(tmp_path, capsys, [], field, message, text=text)


def test_a_command_line_override_is_read_with_the_same_guards(tmp_path, capsys) -> None:
    _refused(tmp_path, capsys, ["axes.seed=" + "[" * 100 + "]" * 100], "override axes.seed",
             "nests deeper than 32 levels")  # fmt: skip
    _refused(tmp_path, capsys, ['name=!!bool "maybe"'], "override name", "not a valid !!bool")


# --- pretrain.from: a regular, readable, loadable file -----------------------------------------


def _from_grid(source: str) -> str:
    return BASE.replace("pretrain: {", f"pretrain: {{from: {source!r}, ")


@pytest.mark.timeout(60)  # a FIFO once made `validate` wait forever
def test_pretrain_from_anything_but_weights_is_refused(tmp_path, capsys) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    a_list = tmp_path / "list.pt"
    torch.save([1, 2, 3], a_list)
    nan = tmp_path / "nan.pt"
    state = build_model("resnet20", "digits", seed=0).state_dict()
    state["fc.weight"][0, 0] = float("nan")
    torch.save(state, nan)
    cases = [
        (empty, "is empty (0 bytes)"),
        (text, "is not a file torch.save wrote"),
        (fifo, "is a FIFO (named pipe), not a regular weights file"),
        ("/dev/zero", "is a character device, not a regular weights file"),
        (tmp_path, "is a directory"),
        (tmp_path / "missing.pt", "no such file"),
        ("ftp://example.org/w.pt", "ftp:// is not a supported URI scheme"),
        ("nosuch+scheme://x/w.pt", "is not a supported URI scheme"),
        (a_list, "holds a list, not a state_dict"),
        (nan, "entry 'fc.weight' holds NaN or infinite values"),
    ]
    for source, message in cases:
        started = time.monotonic()
        _refused(tmp_path, capsys, [], "pretrain.from", message, text=_from_grid(str(source)))
        assert time.monotonic() - started < 30, source


def test_pretrain_from_a_path_with_a_nul_byte_is_refused(tmp_path, capsys) -> None:
    grid = _grid() | {"pretrain": {"from": "/tmp/a\0b.pt", "epochs": 4, "milestones": [2, 3]}}
    with pytest.raises(GridError) as err:
        parse_grid(grid, "g.yaml")
    assert err.value.field == "pretrain.from" and "is not a valid path" in str(err.value)


# --- validation cost: bounded by the grid's size, not its product ----------------------------


def _product_grid(n: int, **extra) -> dict:
    return {"name": "cost", "axes": {"dataset": ["digits"], "model": ["resnet20"],
            "pruner": [{"name": "magnitude", "ratio": 0.5}], "schedule": ["ft"],
            "budget": list(range(1, n + 1)), "seed": list(range(n))}, **extra}  # fmt: skip


def test_a_huge_product_with_an_exclude_rule_is_refused_at_once() -> None:
    """20,000 seeds x 20,000 budgets and one exclude rule: counted arithmetically and refused
    before any rule is walked (it took 8 s at 1,200 x 1,200 and did not end at 20,000)."""
    data = _product_grid(20_000, exclude=[{"seed": 0, "budget": 1}])
    started = time.perf_counter()
    with pytest.raises(GridError) as err:
        parse_grid(data, "g.yaml")
    elapsed = time.perf_counter() - started
    assert err.value.field == "axes", str(err.value)
    assert "400,000,000 trials before any exclude rule" in str(err.value)
    assert "max_trials = 5,000" in str(err.value)
    assert elapsed < 0.5, f"{elapsed:.2f}s"


def test_the_same_grid_from_a_file_is_refused_quickly(tmp_path, capsys) -> None:
    """The same through `nptm validate`: reading 40,000 numbers is the cost (libyaml)."""
    text = yaml.safe_dump(_product_grid(20_000, exclude=[{"seed": 0, "budget": 1}]))
    started = time.perf_counter()
    rc, err = _validate(tmp_path, capsys, text=text)
    assert rc == 2 and ": axes: the axes multiply to 400,000,000" in err, err
    assert time.perf_counter() - started < (5 if loader._FAST_LOADER else 20)


def test_many_exclude_rules_are_counted_without_walking_the_product() -> None:
    """1,000 x 1,000 (the limit) with 2,000 rules over both axes: exact count, then max_trials."""
    rules = [{"seed": i, "budget": i + 1} for i in range(1000)]
    rules += [{"seed": i, "budget": 1000 - i} for i in range(1000)]
    started = time.perf_counter()
    grid = parse_grid(_product_grid(1000, exclude=rules), "g.yaml")
    assert grid.space.count() == 1000 * 1000 - 2000
    with pytest.raises(GridError) as err:
        build_plan(grid)
    assert err.value.field == "max_trials" and "998,000 trials" in str(err.value)
    assert time.perf_counter() - started < 10


# --- the command line -------------------------------------------------------------------------


def test_max_retries_is_bounded(tmp_path: Path, capsys) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(BASE)
    storage = tmp_path / "runs"
    for bad in ("-1", "101", "x"):
        with pytest.raises(SystemExit) as exit_:
            main(["sweep", str(grid), "--storage", str(storage), "--max-retries", bad])
        assert exit_.value.code == 2
        assert "argument --max-retries" in capsys.readouterr().err
    assert not storage.exists()


def test_sweep_of_a_bad_grid_writes_nothing(tmp_path: Path, capsys) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(BASE)
    storage = tmp_path / "runs"
    rc = main(["sweep", str(grid), "--storage", str(storage), "axes.budget=1000000000"])
    assert rc == 2 and ": axes.budget: 1000000000" in capsys.readouterr().err
    assert not storage.exists()


def test_report_out_copies_only_the_report(tmp_path: Path, capsys) -> None:
    from nptm.results.store import SweepStore
    from tests.test_tracking import stage

    storage = tmp_path / "storage"
    store = SweepStore(storage, "s1")
    for seed in range(2):
        store.write_stage(*stage(f"t{seed}", seed=seed, acc=0.9 + seed / 100))
    out = tmp_path / "out"
    (out / "private").mkdir(parents=True)
    (out / ".env").write_text("AWS_SECRET_ACCESS_KEY=hunter2\n")
    (out / "private" / "notes.txt").write_text("mine\n")

    assert main(["report", "s1", "--storage", str(storage), "--out", str(out)]) == 0, (
        capsys.readouterr().err
    )
    stored = storage / "sweeps" / "s1" / "report"
    names = {p.relative_to(stored).as_posix() for p in stored.rglob("*")}
    assert "report.md" in names and not {".env", "private", "private/notes.txt"} & names
    # the copy holds the same report, and the user's files stay
    assert (out / "report.md").read_text() == (stored / "report.md").read_text()
    assert (out / ".env").exists() and (out / "private" / "notes.txt").exists()


_EXITING_PLUGIN = "raise SystemExit(0)\n"
_EXITING_BUILD = """\
from nptm.trainables import plugins
from nptm.trainables.catalog import ModelInfo


def build(info, in_channels, num_classes):
    raise SystemExit(0)


def convs(model):
    return []


plugins.register_model(ModelInfo("bounds_exit_model", "fake", 8, build="{mod}:build",
                                 prunable_convs="{mod}:convs"))
"""


def test_a_plugin_ending_the_process_is_a_usage_error(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "bounds_exiting_plugin.py").write_text(_EXITING_PLUGIN)
    err = _refused(tmp_path, capsys, ["plugins=[bounds_exiting_plugin]"], "plugins[0]",
                   "module 'bounds_exiting_plugin' raised SystemExit(0)")  # fmt: skip
    assert "a plugin must not end the process" in err
    # ... or when one of its functions is dry-called
    (tmp_path / "bounds_exit_build.py").write_text(_EXITING_BUILD.format(mod="bounds_exit_build"))
    _refused(tmp_path, capsys, ["plugins=[bounds_exit_build]", "axes.model=bounds_exit_model"],
             "axes.model", "raised SystemExit(0)")  # fmt: skip
    # `nptm sweep` too: exit 2, no storage
    grid = tmp_path / "grid.yaml"
    storage = tmp_path / "runs"
    rc = main(["sweep", str(grid), "--storage", str(storage), "plugins=[bounds_exiting_plugin]"])
    assert rc == 2 and "raised SystemExit(0)" in capsys.readouterr().err
    assert not storage.exists()


@pytest.mark.timeout(60)  # a FIFO as the grid file would make `validate` wait forever
def test_a_grid_path_that_is_no_regular_file_is_refused(tmp_path: Path, capsys) -> None:
    fifo = tmp_path / "grid.yaml"
    os.mkfifo(fifo)
    big = tmp_path / "big.yaml"
    big.write_text(BASE + "#" * (16 * 2**20) + "\n")
    for path, message in (
        (fifo, "is not a regular file"),
        ("/dev/zero", "is not a regular file"),
        (big, "a grid file is at most 16,777,216"),
        (tmp_path, "is a directory"),
        ("a\0b.yaml", "is not a valid path"),
    ):
        assert main(["validate", str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_a_data_root_with_a_nul_byte_is_refused(tmp_path: Path, capsys) -> None:
    _refused(tmp_path, capsys, ['data.root="/data\\0x"'], "data.root", "holds a NUL character")
