"""One driver per sweep (nptm.orchestrator.lease): the lease on a local path and on S3 (moto's
server on 127.0.0.1, tests/s3_server.py), and two drivers of one sweep end to end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nptm.orchestrator.errors import UsageError
from nptm.orchestrator.lease import (
    LEASE_ENV,
    Holder,
    LeaseHeld,
    LeaseLost,
    SweepLease,
    hold,
    refuse_if_held,
    take,
)
from nptm.trainables.storage import resolve_storage
from tests.sweep_helpers import ROOT, cli_in_process, copy_storage, plan_stage_ids, trials

HERE = f"host {socket.gethostname()}, pid {os.getpid()}, since "


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def storage(request, tmp_path: Path) -> str:
    """A storage root: a local path, or a bucket of its own on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "runs")
    server = request.getfixturevalue("s3_server")
    return server.uri(f"{server.bucket(f'lease-{uuid.uuid4().hex[:12]}')}/runs")


def _until(ready: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _overwrite(storage: str, lease: SweepLease, data: bytes) -> None:
    """A write of the lease behind its holder's back."""
    fs, _, _ = resolve_storage(storage)
    with fs.open_output_stream(lease.path) as out:
        out.write(data)


def test_a_second_driver_is_refused_naming_the_holder(storage: str) -> None:
    first = SweepLease(storage, "s1")
    before = time.time()
    assert first.acquire() is None  # it was free
    stored = first.current()
    assert stored == first.holder
    assert (stored.host, stored.pid) == (socket.gethostname(), os.getpid())
    assert stored.expires == stored.since + 60 and stored.since >= before  # LEASE_S
    with pytest.raises(LeaseHeld) as refused:
        SweepLease(storage, "s1").acquire()
    assert isinstance(refused.value, UsageError)  # exit 2
    assert refused.value.holder == first.holder
    message = str(refused.value)
    assert message.startswith(f"sweep 's1' is being run by another driver: {HERE}")
    assert "its lease expires at " in message and "sweeps/s1/run/lease.json" in message
    with pytest.raises(LeaseHeld):
        refuse_if_held(storage, "s1")
    assert SweepLease(storage, "s2").acquire() is None  # another sweep of the storage is free
    first.release()
    assert first.current() is None
    assert SweepLease(storage, "s1").acquire() is None  # free again


def test_renewal_pushes_the_expiry_ahead(storage: str) -> None:
    lease = SweepLease(storage, "s", duration=60)
    lease.acquire()
    since = lease.holder.since
    before = time.time()
    lease.renew()
    after = time.time()
    stored = lease.current()
    assert before + 60 <= stored.expires <= after + 60 and stored.since == since
    assert stored == lease.holder


@pytest.mark.parametrize("damaged", [False, True])
def test_an_expired_lease_is_taken_over_and_its_holder_has_lost_it(
    storage: str, damaged: bool, caplog: pytest.LogCaptureFixture
) -> None:
    killed = SweepLease(storage, "s", duration=0.2)  # never renewed, as after a SIGKILL
    killed.acquire()
    if damaged:  # a lease that does not read: nobody's
        _overwrite(storage, killed, b'{"host": "tru')
    _until(lambda: time.time() > killed.holder.expires)
    taker = SweepLease(storage, "s")
    previous = taker.acquire()
    assert previous == (None if damaged else killed.holder)
    told = "an unreadable lease" if damaged else f"the lease of {HERE}"
    assert f"sweep 's': took over {told}" in caplog.text and "not renewed in time" in caplog.text
    with pytest.raises(LeaseLost, match=f"another driver took the lease over: {HERE}"):
        killed.renew()
    killed.release()  # not its own any more: left alone
    assert taker.current() == taker.holder


@pytest.mark.parametrize("before", ["free", "expired"])
def test_drivers_starting_together_one_takes_the_lease(storage: str, before: str) -> None:
    if before == "expired":
        dead = SweepLease(storage, "race", duration=0.1)
        dead.acquire()
        _until(lambda: time.time() > dead.holder.expires)
    leases = [SweepLease(storage, "race") for _ in range(4)]
    start = threading.Barrier(len(leases), timeout=60)
    for lease in leases:  # each reads the lease before any of them writes it: all race to write
        _read_then_wait(lease, start)
    refused: list[Holder] = []

    def driver(lease: SweepLease) -> None:
        try:
            lease.acquire()
        except LeaseHeld as err:
            refused.append(err.holder)

    threads = [threading.Thread(target=driver, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [lease.holder for lease in leases if lease.holder is not None]
    assert len(winners) == 1 and refused == [winners[0]] * (len(leases) - 1)
    assert leases[0].current() == winners[0]


def _read_then_wait(lease: SweepLease, others: threading.Barrier) -> None:
    """The lease's first read waits for `others` once it has read (later reads do not)."""
    obj = lease._object
    read = obj.read

    def first_read():
        found = read()
        obj.read = read
        others.wait()
        return found

    obj.read = first_read


def test_a_held_lease_is_renewed_until_released(tmp_path: Path) -> None:
    storage = str(tmp_path)  # the renewals are `renew`'s, tested on S3 too
    with hold(storage, "s", duration=0.3) as lease:
        first = lease.current()
        _until(lambda: lease.current().expires > first.expires)  # renewed by its thread
        assert lease.current().since == first.since
    assert SweepLease(storage, "s").current() is None  # released


def test_a_held_lease_is_reentrant_within_its_thread_only(tmp_path: Path) -> None:
    storage = str(tmp_path)
    with hold(storage, "s") as lease:
        with hold(storage, "s") as inner:  # this thread's again: the same holding
            assert inner is lease
            refuse_if_held(storage, "s")  # its own: no refusal
        assert lease.current() == lease.holder  # the inner release kept it
        elsewhere: list[BaseException] = []
        other = threading.Thread(target=lambda: _refused(storage, elsewhere))
        other.start()
        other.join()
        assert [type(e) for e in elsewhere] == [LeaseHeld]  # another thread: another driver
    assert lease.current() is None


def test_a_lease_held_through_one_path_is_reentrant_through_another(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "runs")
    with hold(tmp_path / "runs", "s") as lease, hold(tmp_path / "link", "s") as inner:
        assert inner is lease


def _refused(storage: str, out: list[BaseException]) -> None:
    try:
        take(storage, "s").release()
    except LeaseHeld as err:
        out.append(err)


def test_a_holder_whose_lease_is_taken_over_is_told_and_leaves_it(tmp_path: Path) -> None:
    storage = str(tmp_path)  # `renew` finds a taken-over lease on S3 too (the takeover test)
    lost = threading.Event()
    reasons: list[str] = []

    def on_lost(reason: str) -> None:
        reasons.append(reason)
        lost.set()

    other = Holder("elsewhere", 1, time.time(), time.time() + 60, "other")
    with hold(storage, "s", duration=0.6, on_lost=on_lost) as lease:
        _overwrite(storage, lease, other.encode())  # taken over: this one could not renew it
        assert lost.wait(60)
    assert len(reasons) == 1
    assert reasons[0].startswith(
        "sweep 's': another driver took the lease over: host elsewhere, pid 1, since "
    )
    assert lease.current() == other  # its release left the other's lease alone


def test_a_holder_that_cannot_renew_before_its_lease_expires_is_told(tmp_path: Path) -> None:
    lost = threading.Event()
    reasons: list[str] = []

    def on_lost(reason: str) -> None:
        reasons.append(reason)
        lost.set()

    with hold(tmp_path, "s", duration=0.3, on_lost=on_lost) as lease:

        def unreachable(*args: object) -> None:
            raise OSError("storage unreachable")

        lease._object.put = unreachable  # every renewal fails from now on
        assert lost.wait(60)
    assert reasons == ["sweep 's': the lease expires unrenewed (storage unreachable)"]


def test_a_driver_that_lost_its_lease_stops_as_on_sigterm(monkeypatch) -> None:
    from nptm.orchestrator.lease import _stop_the_driver
    from nptm.orchestrator.signals import StopSignals

    monkeypatch.setenv("TUNE_DISABLE_SIGINT_HANDLER", "1")  # StopSignals sets it: put back after
    with StopSignals() as stop:  # a sweep's orderly stop
        _stop_the_driver("sweep 's': another driver took the lease over")
        _until(lambda: stop.signum is not None)
    assert stop.signum == signal.SIGTERM


def test_the_lease_duration_from_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(LEASE_ENV, "2.5")
    assert SweepLease(tmp_path, "s").duration == 2.5
    for bad in ("abc", "0", "-1", "inf"):
        monkeypatch.setenv(LEASE_ENV, bad)
        with pytest.raises(UsageError, match=f"{LEASE_ENV}='{bad}': the lease must last"):
            SweepLease(tmp_path, "s")


def test_a_storage_that_cannot_hold_the_lease_is_a_usage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(UsageError, match=f"sweep 's': cannot take its lease: .*{blocker}"):
        take(blocker / "runs", "s")


@pytest.mark.slow
def test_a_bucket_that_does_not_exist_is_a_usage_error(s3_server) -> None:
    with pytest.raises(UsageError) as refused:
        take(s3_server.uri("no-such-bucket/runs"), "s")
    message = str(refused.value)
    assert message.startswith(
        "sweep 's': cannot take its lease: s3://no-such-bucket/runs/sweeps/s/run/lease.json: "
    )
    assert "NoSuchBucket" in message


# -- two drivers of one sweep, end to end ----------------------------------------------------

# SIGINT ends it (KeyboardInterrupt) whatever disposition the process inherits.
HOLDER = """\
import signal, sys, time
from nptm.orchestrator.lease import hold
signal.signal(signal.SIGINT, signal.default_int_handler)
try:
    with hold(sys.argv[1], sys.argv[2]):
        print("held", flush=True)
        time.sleep(600)
except KeyboardInterrupt:
    pass
"""


@pytest.fixture
def holder() -> Iterator[Callable[[Path, str, str], subprocess.Popen]]:
    """Starts a driver of a sweep in a process of its own, holding the sweep's lease as
    `run_sweep` does (for `NPTM_LEASE_S` seconds), once it holds it; ends any left at the end."""
    procs: list[subprocess.Popen] = []

    def start(storage: Path, sweep: str, lease_s: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(ROOT), LEASE_ENV: lease_s}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(storage), sweep], stdout=subprocess.PIPE,
            text=True, env=env,
        ))  # fmt: skip
        assert procs[-1].stdout is not None and procs[-1].stdout.readline() == "held\n"
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _files(storage: Path) -> dict[str, tuple[int, int]]:
    """Every file under `storage` but the lease's own, with its size and modification time."""
    return {
        str(p.relative_to(storage)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in storage.rglob("*")
        if p.is_file() and ".lease.json" not in p.name and p.name != "lease.json"
    }


@pytest.mark.slow
def test_a_second_driver_is_refused_and_a_killed_drivers_lease_taken_over(
    ray_node, tiny_sweep, holder, tmp_path: Path
) -> None:
    storage = copy_storage(tiny_sweep.storage, tmp_path / "runs")  # a finished tiny sweep
    lease_file = storage / "sweeps/tiny/run/lease.json"
    argv = ["sweep", str(tiny_sweep.grid), "--storage", str(storage), "--address",
            ray_node.address, "--no-report"]  # fmt: skip
    # A driver runs the sweep: a second one is refused, naming it, and writes nothing.
    running = holder(storage, "tiny", "60")
    before = _files(storage)
    refused = cli_in_process(argv)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"host {socket.gethostname()}, pid {running.pid}, since " in refused.stderr
    assert "its lease expires at " in refused.stderr and str(lease_file) in refused.stderr
    assert _files(storage) == before  # no row, MLflow run or run record
    running.send_signal(signal.SIGINT)  # its orderly end releases the lease
    running.wait(60)
    assert not lease_file.exists()

    # A driver killed without a chance to release its lease: the sweep waits for its expiry.
    killed = holder(storage, "tiny", "1")
    killed.kill()
    killed.wait(60)
    left = json.loads(lease_file.read_text())
    assert left["pid"] == killed.pid
    _until(lambda: time.time() > left["expires"])
    rerun = cli_in_process(argv)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"took over the lease of host {socket.gethostname()}, pid {killed.pid}" in rerun.stderr
    stages = plan_stage_ids(tiny_sweep.grid)
    assert f"executed 0, reused {len(stages)}" in rerun.stdout, rerun.stdout
    rows = trials(storage)
    assert rows.stage_id.is_unique and set(rows.stage_id) == stages
    assert not lease_file.exists()  # released at the end
