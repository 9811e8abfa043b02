"""The index of stored outcomes (nptm.trainables.stage_index): a sweep starts from one listing and
the index, reads only outcomes that are new or changed, and never trusts an entry whose
outcome.json was deleted, garbled or rewritten."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import nptm.trainables.stage_index as index_mod
from nptm.trainables.artifacts import ArtifactStore
from nptm.trainables.stage import EpochMetrics, StageOutcome


def _outcome(sid: str, acc: float = 0.5, status: str = "ok") -> StageOutcome:
    epochs = (EpochMetrics(1, 0.1, 1.0, 0.4, 1.1, 0.45, 1.2, acc, 2.5, 1000),)
    return StageOutcome(sid, "retrain", status, test_acc=acc, epochs=epochs)  # type: ignore[arg-type]


def _ids(n: int) -> list[str]:
    return [f"{i:016x}" for i in range(n)]


@pytest.fixture
def outcome_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The outcome.json files the index module reads (its one read function, counted)."""
    read: list[str] = []
    real = index_mod.read_bytes

    def read_bytes(fs, path):
        if path.endswith("/outcome.json"):
            read.append(path.rsplit("/", 2)[1])
        return real(fs, path)

    monkeypatch.setattr(index_mod, "read_bytes", read_bytes)
    return read


def _store_outcomes(root: Path, ids: list[str]) -> ArtifactStore:
    store = ArtifactStore(str(root))
    for i, sid in enumerate(ids):
        store.write_outcome(_outcome(sid, acc=i / 100))
    return store


def test_a_missing_index_is_rebuilt_from_the_outcomes(tmp_path: Path, outcome_reads) -> None:
    ids = _ids(20)
    _store_outcomes(tmp_path, ids)
    wanted = [*ids, "feedfacefeedface"]  # one stage never ran
    found, files = ArtifactStore(str(tmp_path)).stored_outcomes(wanted)
    assert sorted(found) == ids and sorted(outcome_reads) == ids  # no index yet: all read
    assert found[ids[7]] == _outcome(ids[7], acc=0.07)
    assert files.has(ids[0], "outcome.json") and not files.has(ids[0], "model.pt")

    outcome_reads.clear()
    again, _ = ArtifactStore(str(tmp_path)).stored_outcomes(wanted)
    assert again == found and outcome_reads == []  # everything from the index

    for path in (tmp_path / "stages" / "_index").iterdir():
        path.unlink()  # lost: rebuilt on the next start, at today's cost
    again, _ = ArtifactStore(str(tmp_path)).stored_outcomes(wanted)
    assert again == found and sorted(outcome_reads) == ids
    outcome_reads.clear()
    assert ArtifactStore(str(tmp_path)).stored_outcomes(wanted)[0] == found
    assert outcome_reads == []


def test_an_entry_is_not_trusted_once_its_outcome_changed(tmp_path: Path, outcome_reads) -> None:
    ids = _ids(4)
    store = _store_outcomes(tmp_path, ids)
    store.stored_outcomes(ids)  # indexed
    deleted, garbled, rewritten, kept = ids
    (tmp_path / "stages" / deleted / "outcome.json").unlink()
    (tmp_path / "stages" / garbled / "outcome.json").write_bytes(b"\x80\x81\xfe garbage {")
    store.write_outcome(_outcome(rewritten, acc=0.99))
    outcome_reads.clear()
    found, _ = ArtifactStore(str(tmp_path)).stored_outcomes(ids)
    # As without an index: the deleted and garbled ones are gone, the rewritten one is new.
    assert sorted(found) == sorted([rewritten, kept])
    assert found[rewritten].test_acc == pytest.approx(0.99)
    assert sorted(outcome_reads) == sorted([garbled, rewritten])  # the listing showed a change


def test_invalidate_drops_the_entry(tmp_path: Path, outcome_reads) -> None:
    (sid,) = _ids(1)
    store = _store_outcomes(tmp_path, [sid])
    store.stored_outcomes([sid])
    store.invalidate(sid)  # as a trial that found this stage's payload damaged
    assert store.index.entries() == {}  # dropped, not merely stale
    assert ArtifactStore(str(tmp_path)).stored_outcomes([sid])[0] == {}
    # Recomputed: the new outcome is read and indexed again.
    store.write_outcome(_outcome(sid, acc=0.7))
    found, _ = ArtifactStore(str(tmp_path)).stored_outcomes([sid])
    assert found[sid].test_acc == pytest.approx(0.7)
    assert list(ArtifactStore(str(tmp_path)).index.entries()) == [sid]


def test_the_driver_batches_index_writes(tmp_path: Path, monkeypatch, outcome_reads) -> None:
    monkeypatch.setattr(index_mod, "FLUSH_ENTRIES", 10)
    monkeypatch.setattr(index_mod, "CONSOLIDATE_FILES", 3)
    ids = _ids(45)
    store = _store_outcomes(tmp_path, ids)
    index_dir = tmp_path / "stages" / "_index"
    for sid in ids:  # as the driver accepts each finished stage
        store.index_outcome(store.read_outcome(sid))
    # 4 batches of 10 written, merged into one when there were more than 3 files; 5 wait.
    assert len(list(index_dir.iterdir())) == 1
    assert len(store.index.entries()) == 40
    store.flush_index()
    outcome_reads.clear()
    found, _ = ArtifactStore(str(tmp_path)).stored_outcomes(ids)
    assert sorted(found) == ids and outcome_reads == []


def test_concurrent_writers_and_consolidations_lose_no_entry(tmp_path: Path, monkeypatch) -> None:
    """Four processes' worth of writers, each adding entries and merging the index while the
    others do the same: every entry survives, and no file is ever read half written."""
    monkeypatch.setattr(index_mod, "FLUSH_ENTRIES", 3)
    monkeypatch.setattr(index_mod, "CONSOLIDATE_FILES", 2)
    ids = _ids(80)
    store = _store_outcomes(tmp_path, ids)
    errors: list[BaseException] = []

    def writer(part: list[str]) -> None:
        try:
            mine = ArtifactStore(str(tmp_path))  # its own index object, as another process
            for sid in part:
                mine.index_outcome(store.read_outcome(sid))
            mine.flush_index()
            mine.index.consolidate()
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(ids[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    entries = ArtifactStore(str(tmp_path)).index.entries()
    assert sorted(entries) == ids
    assert all(e.outcome and e.stamp for e in entries.values())


def test_a_foreign_outcome_is_set_aside_and_its_stage_not_done(tmp_path: Path) -> None:
    from types import SimpleNamespace

    a, b, c = _ids(3)
    store = _store_outcomes(tmp_path, [a, b, c])
    store.stored_outcomes([a, b, c])  # indexed
    stage = tmp_path / "stages"
    (stage / b / "outcome.json").write_bytes((stage / a / "outcome.json").read_bytes())
    plan = {a: SimpleNamespace(kind="retrain"), b: SimpleNamespace(kind="retrain"),
            c: SimpleNamespace(kind="prune")}  # fmt: skip
    fresh = ArtifactStore(str(tmp_path))
    found, _ = fresh.stored_outcomes(plan)
    # b holds a's outcome; c is stored as a retrain but planned as a prune: neither is done.
    assert sorted(found) == [a]
    reasons = {d.stage_id: d.reason for d in fresh.damaged}
    assert reasons == {b: f"the outcome of stage {a}, not of {b}",
                       c: f"the outcome of a retrain stage; {c} is a prune"}  # fmt: skip
    assert not (stage / b / "outcome.json").exists()
    assert len(list((stage / b).glob("_outcome.json.damaged-*"))) == 1
    assert ArtifactStore(str(tmp_path)).read_outcome(b) is None


def test_a_damaged_index_file_is_set_aside(tmp_path: Path, outcome_reads) -> None:
    ids = _ids(3)
    _store_outcomes(tmp_path, ids).stored_outcomes(ids)
    (part,) = (tmp_path / "stages" / "_index").glob("*.parquet")
    part.write_bytes(part.read_bytes()[:-20])
    outcome_reads.clear()
    store = ArtifactStore(str(tmp_path))
    found, _ = store.stored_outcomes(ids)
    assert sorted(found) == ids and sorted(outcome_reads) == ids  # read from the outcomes
    assert [d.file for d in store.damaged] == [str(part)] and not part.exists()
    outcome_reads.clear()
    assert ArtifactStore(str(tmp_path)).stored_outcomes(ids)[0] == found  # indexed anew
    assert outcome_reads == []
