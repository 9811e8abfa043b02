"""ArtifactStore: checksummed round trips, refusal of damaged files, atomic writes, counters."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from nptm.trainables.artifacts import ArtifactStore, CorruptArtifactError
from nptm.trainables.stage import EpochMetrics, StageOutcome
from nptm.trainables.storage import atomic_write_bytes, is_local_storage, resolve_storage

SID = "0123456789abcdef"


def _outcome(**kw: object) -> StageOutcome:
    return StageOutcome(SID, "retrain", "ok", **kw)  # type: ignore[arg-type]


def _payload() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "model": "resnet20",
        "epoch": 3,
        "plans": [{"kind": "mask", "ratio": 0.5}],
        "state_dict": {"w": torch.randn(4, 3, generator=gen), "b": torch.arange(4)},
    }


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_save_load_round_trip_with_independent_checksum(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    payload = _payload()
    digest = store.save(SID, "model", payload)
    data = (tmp_path / "stages" / SID / "model.pt").read_bytes()
    assert digest == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "stages" / SID / "model.pt.sha256").read_text() == digest
    loaded = store.load(SID, "model")
    assert loaded["model"] == "resnet20" and loaded["epoch"] == 3
    assert loaded["plans"] == payload["plans"]
    for key, tensor in payload["state_dict"].items():
        assert torch.equal(loaded["state_dict"][key], tensor)
    assert store.exists(SID, "model") and not store.exists(SID, "other")


@pytest.mark.parametrize("damage", ["truncate", "flip", "append"])
def test_damaged_payload_is_refused_naming_the_producing_stage(tmp_path: Path, damage) -> None:
    store = ArtifactStore(str(tmp_path))
    store.save(SID, "model", _payload())
    path = tmp_path / "stages" / SID / "model.pt"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data += b"\0"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="checksum mismatch") as err:
        store.load(SID, "model")
    assert err.value.stage_id == SID and err.value.name == "model"


@pytest.mark.parametrize("missing", ["model.pt.sha256", "model.pt"])
def test_missing_payload_or_sidecar_is_refused(tmp_path: Path, missing: str) -> None:
    store = ArtifactStore(str(tmp_path))
    store.save(SID, "model", _payload())
    (tmp_path / "stages" / SID / missing).unlink()
    with pytest.raises(CorruptArtifactError, match="missing") as err:
        store.load(SID, "model")
    assert err.value.stage_id == SID
    # exists() answers from the sidecar, written last: a payload alone is not an artifact.
    assert store.exists(SID, "model") is (missing == "model.pt")


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    for epoch in range(3):  # overwriting in place, as resume checkpoints do every epoch
        store.save(SID, "resume", {"epoch": epoch})
    store.write_outcome(_outcome())
    store.start_attempt(SID)
    names = _files(tmp_path)
    assert not [n for n in names if Path(n).name.startswith(".")], names
    assert store.load(SID, "resume")["epoch"] == 2


class _FailingFS:
    """A filesystem whose writes break after `fail_after` bytes or whose rename fails."""

    def __init__(self, fail: str) -> None:
        self._fs = pafs.LocalFileSystem()
        self._fail = fail

    def __getattr__(self, name: str):
        return getattr(self._fs, name)

    def open_output_stream(self, path: str):
        stream = self._fs.open_output_stream(path)
        if self._fail != "write":
            return stream

        class Broken:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                stream.close()

            def write(self, data: bytes) -> None:
                stream.write(data[: len(data) // 2])
                raise OSError(28, "No space left on device")

        return Broken()

    def move(self, src: str, dst: str) -> None:
        if self._fail == "move":
            raise OSError(5, "Input/output error")
        self._fs.move(src, dst)


@pytest.mark.parametrize("fail", ["write", "move"])
def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path, fail) -> None:
    target = tmp_path / "stages" / SID / "outcome.json"
    atomic_write_bytes(pafs.LocalFileSystem(), str(target), b'{"status": "ok"}')
    with pytest.raises(OSError):
        atomic_write_bytes(_FailingFS(fail), str(target), b'{"status": "failed", "x": 1}')
    assert target.read_bytes() == b'{"status": "ok"}'  # readers never see a torn file
    assert _files(tmp_path) == [f"stages/{SID}/outcome.json"]


def test_invalidate_forgets_the_outcome_but_keeps_the_weights(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    store.save(SID, "model", _payload())
    store.write_outcome(_outcome(test_acc=0.5))
    assert store.read_outcome(SID) == _outcome(test_acc=0.5)
    store.invalidate(SID)
    assert store.read_outcome(SID) is None
    assert store.exists(SID, "model")
    store.invalidate(SID)  # nothing to forget: no error
    store.invalidate("fedcba9876543210")


@pytest.mark.parametrize(
    "content",
    [
        b'{"status": "ok", "test_acc": 0.9',
        b"\x80\x81garbage",
        b"\xff\xfe{",
        b"[1, 2]",
        b"null",
        b'{"status": "ok"}',
        b'{"stage_id": "x", "kind": "retrain", "status": "finished"}',
    ],
    ids=["truncated", "not-utf8", "bom-garbage", "list", "null", "no-stage", "bad-status"],
)
def test_unreadable_outcome_means_not_done(tmp_path: Path, content: bytes) -> None:
    store = ArtifactStore(str(tmp_path))
    store.write_outcome(_outcome())
    (tmp_path / "stages" / SID / "outcome.json").write_bytes(content)
    assert store.read_outcome(SID) is None  # the stage is recomputed, never a crash


def test_attempts_count_every_start(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    assert store.attempts(SID) == 0  # no stage directory yet
    assert [store.start_attempt(SID) for _ in range(3)] == [1, 2, 3]
    store.save(SID, "model", _payload())
    store.write_outcome(_outcome(attempts=3))
    assert store.attempts(SID) == 3 and store.read_outcome(SID).attempts == 3


def test_outcome_round_trip_keeps_types_and_epochs(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    epoch = EpochMetrics(1, 0.1, 1.5, 0.4, None, None, 1.2, 0.5, 2.0, 64, 1.5)
    written = _outcome(test_acc=0.5, params=1000, structured=True, epochs=(epoch,))
    store.write_outcome(written)
    back = store.read_outcome(SID)
    assert back == written and back.epochs[0] == epoch
    assert back.kind == "retrain" and back.status.finished


def test_outcome_written_before_stage_outcome_is_read(tmp_path: Path) -> None:
    # The untyped layout of earlier versions: trial_id, stage_kind and epoch_rows.
    old = {
        "status": "diverged",
        "error": "training diverged",
        "trial_id": SID,
        "stage_kind": "pretrain",
        "test_acc": 0.25,
        "pretrain_id": SID,
        "epoch_rows": [
            {"epoch": 1, "lr": 0.1, "train_loss": 2.0, "train_acc": 0.2, "val_loss": None,
             "val_acc": None, "test_loss": 2.1, "test_acc": 0.25, "wall_s": 1.0, "samples": 10,
             "train_s": 0.5}
        ],
    }  # fmt: skip
    (tmp_path / "stages" / SID).mkdir(parents=True)
    (tmp_path / "stages" / SID / "outcome.json").write_text(json.dumps(old))
    back = ArtifactStore(str(tmp_path)).read_outcome(SID)
    assert back is not None and back.stage_id == SID and back.kind == "pretrain"
    assert back.status == "diverged" and back.status.finished and back.test_acc == 0.25
    assert [e.test_acc for e in back.epochs] == [0.25]


@pytest.mark.parametrize(
    ("stage_id", "name"),
    [("../etc", "model"), ("abc/def", "model"), (SID, "../model"), (SID, ".hidden"), ("", "x")],
)
def test_addresses_outside_a_stage_directory_are_refused(stage_id: str, name: str, tmp_path):
    store = ArtifactStore(str(tmp_path))
    with pytest.raises(ValueError, match=r"(stage id|artifact) name"):
        store.save(stage_id, name, {"x": 1})
    assert _files(tmp_path) == []


def test_file_uri_storage_is_the_local_directory(tmp_path: Path) -> None:
    uri = tmp_path.as_uri()
    assert uri.startswith("file:///") and is_local_storage(uri)
    fs, root, local = resolve_storage(uri)
    assert local
    assert isinstance(fs, pafs.LocalFileSystem) and root == str(tmp_path)
    store = ArtifactStore(uri)
    store.save(SID, "model", _payload())
    store.write_outcome(_outcome())
    assert (tmp_path / "stages" / SID / "model.pt").is_file()
    # The same bytes are reachable through the plain path.
    plain = ArtifactStore(str(tmp_path))
    assert plain.read_outcome(SID) == _outcome()
    assert torch.equal(plain.load(SID, "model")["state_dict"]["b"], torch.arange(4))


def test_relative_storage_resolves_against_the_working_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    fs, root, _ = resolve_storage("runs")
    assert root == str(tmp_path / "runs") and isinstance(fs, pafs.LocalFileSystem)
    assert not is_local_storage("s3://bucket/prefix")
    ArtifactStore("runs").write_outcome(_outcome())
    stored = json.loads((tmp_path / "runs" / "stages" / SID / "outcome.json").read_text())
    assert stored["stage_id"] == SID and stored["status"] == "ok"


def test_corrupt_artifact_error_survives_pickling() -> None:
    """Ray ships a worker's exception to the driver pickled: it must come back whole."""
    import pickle

    err = CorruptArtifactError(SID, "model", "checksum mismatch (truncated or altered)")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is CorruptArtifactError and str(back) == str(err)
    assert (back.stage_id, back.name, back.reason) == (SID, "model", err.reason)
