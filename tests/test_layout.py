"""nptm.trainables.layout: every path under a storage root, and the one name rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from nptm.search_spaces import GridError, parse_grid
from nptm.trainables.layout import Layout, check_sweep_name


def test_local_layout(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    assert layout.local and layout.root == str(tmp_path)
    assert layout.stage_file("abc123", "model.pt") == f"{tmp_path}/stages/abc123/model.pt"
    assert (
        layout.table_file("s1", "stages", "abc123") == f"{tmp_path}/sweeps/s1/stages/abc123.parquet"
    )
    assert layout.report_dir("s1") == f"{tmp_path}/sweeps/s1/report"
    assert layout.snapshot_file("s1", "stages") == f"{tmp_path}/sweeps/s1/stages.parquet"
    assert layout.stage_index_dir == f"{tmp_path}/stages/_index"
    assert layout.mlflow_db == f"{tmp_path}/mlflow.db"
    assert layout.ray_dir == f"{tmp_path}/_ray"


def test_uri_layout_needs_no_connection() -> None:
    # Nothing here may resolve the bucket: there is no network in the tests.
    layout = Layout("s3://bucket/prefix/")
    assert layout.mlflow_db is None
    assert layout.ray_dir == "s3://bucket/prefix/_ray"
    assert layout.report_location("s1") == "s3://bucket/prefix/sweeps/s1/report"
    assert layout.sweep_location("s1") == "s3://bucket/prefix/sweeps/s1"
    # Options in the URI's query stay at its end (pyarrow and Ray read them there).
    query = "endpoint_override=127.0.0.1:9000&scheme=http"
    with_query = Layout(f"s3://bucket/prefix?{query}")
    assert with_query.ray_dir == f"s3://bucket/prefix/_ray?{query}"
    assert with_query.report_location("s1") == f"s3://bucket/prefix/sweeps/s1/report?{query}"


@pytest.mark.parametrize("name", ["..", "a/b", "/abs", "", ".hidden", "sp ace", "a..b"])
def test_one_name_rule_for_sweeps_stages_and_artifacts(tmp_path: Path, name: str) -> None:
    layout = Layout(tmp_path)
    for call in (
        lambda: check_sweep_name(name),
        lambda: layout.sweep_dir(name),
        lambda: layout.stage_dir(name),
        lambda: layout.stage_file("abc123", name),
    ):
        with pytest.raises(ValueError, match="name"):
            call()


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("a", True),
        ("0quick-start_2", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("Quickstart", False),
        ("a.b", False),
        ("-a", False),
        ("../a", False),
    ],
)
def test_a_sweep_name_is_what_a_grid_accepts(tmp_path: Path, name: str, valid: bool) -> None:
    """1-64 lowercase letters, digits, '_' or '-', from a letter or digit: for a grid's `name`
    and for every path, experiment and run a sweep's name becomes."""
    layout = Layout(tmp_path)
    if valid:
        assert check_sweep_name(name) == name
        assert layout.sweep_dir(name) == f"{tmp_path}/sweeps/{name}"
        return
    for call in (lambda: check_sweep_name(name), lambda: layout.sweep_location(name)):
        with pytest.raises(ValueError, match="sweep name"):
            call()
    axes = {"dataset": "digits", "model": "resnet20", "schedule": "ft", "budget": 1, "seed": 0}
    axes["pruner"] = {"name": "magnitude", "ratio": 0.5}
    with pytest.raises(GridError) as err:
        parse_grid({"name": name, "axes": axes})
    assert err.value.field == "name"
