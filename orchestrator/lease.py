"""One driver per sweep: the lease a sweep's driver holds in the sweep's storage while it runs.

``<storage>/sweeps/<sweep>/run/lease.json`` names its holder: host, pid, since when, and when
the lease expires. `nptm sweep` takes it before it writes anything (nptm.orchestrator.sweep),
renews it from a daemon thread every `LEASE_S` / 3 seconds and deletes it when it ends
(finished, failed, or stopped by SIGINT / SIGTERM). Another driver of the same sweep is
refused (`LeaseHeld`, a UsageError: exit 2) naming the holder. A lease not renewed by its
expiry (a driver killed by SIGKILL, a host lost) is taken over, with a warning naming whose it
was: a killed driver blocks a rerun for at most `LEASE_S` seconds, or until its lease.json is
deleted by hand. A holder that finds its lease taken over (it could not renew it in time)
stops its sweep. Within one thread taking the lease is re-entrant: `nptm sweep
--until-conclusive` holds it across its rounds, each a `run_sweep` that takes it again.

Every change is conditional on the version its writer read, so two drivers never both hold
the lease:

- a local path (or file://): each read-compare-write runs under an flock of the hidden
  ``.lease.json.lock`` beside it (on NFS, Linux maps flock to NFS byte-range locks);
- s3://: conditional requests through boto3, as pyarrow.fs cannot make them: create with
  ``If-None-Match: *``; renew, take over and delete with ``If-Match: <ETag>`` (AWS S3, MinIO
  and moto honour them; on a store that ignores them the lease is best effort, as below);
- other URIs (gs://, hdfs://, abfs://): best effort through pyarrow.fs: read, compare, write,
  and read back; two drivers starting within the same moment can both win.

Expiry compares the holder's clock with the reader's: hosts must keep their clocks within a
few seconds of each other (NTP).
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any
from urllib.parse import parse_qs

import pyarrow as pa
import pyarrow.fs as pafs

from nptm.orchestrator.errors import UsageError
from nptm.trainables.layout import Layout
from nptm.trainables.storage import StorageError, atomic_write_bytes, read_bytes

log = logging.getLogger(__name__)

# A killed driver blocks a rerun of its sweep for at most this long after its last renewal.
# A live one renews every third of it, and after a failed renewal tries again every twelfth:
# storage that does not answer for half a minute (an object store's retries) costs no sweep.
LEASE_S = 60.0
LEASE_ENV = "NPTM_LEASE_S"  # overrides LEASE_S (seconds): tests, or a store that is slow
LEASE_FILE = "lease.json"
_TRIES = 5  # takes that lost a race to another driver's change before giving up
_STORAGE_ERRORS = (OSError, pa.ArrowException)


def lease_seconds() -> float:
    """`LEASE_S`, or the positive number of seconds in $NPTM_LEASE_S (UsageError otherwise)."""
    raw = os.environ.get(LEASE_ENV)
    if raw is None:
        return LEASE_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise UsageError(f"{LEASE_ENV}={raw!r}: the lease must last a positive number of seconds")
    return value


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


@dataclass(frozen=True)
class Holder:
    """What lease.json says: who holds the lease, and until when."""

    host: str
    pid: int
    since: float  # when it took the lease
    expires: float  # unless renewed
    owner: str  # this holding's own id: tells two holdings by one process apart

    def __str__(self) -> str:
        left = self.expires - time.time()
        when = f"expires at {_when(self.expires)} (in {left:.0f} s)"
        if left < 0:
            when = f"expired at {_when(self.expires)} ({-left:.0f} s ago)"
        return f"host {self.host}, pid {self.pid}, since {_when(self.since)}; its lease {when}"

    def encode(self) -> bytes:
        return json.dumps({"format": 1, **asdict(self)}, indent=1).encode()

    @classmethod
    def decode(cls, data: bytes) -> Holder | None:
        """The holder in `data`, or None if it is not a lease (damaged, another format)."""
        try:
            d = json.loads(data)
            return cls(str(d["host"]), int(d["pid"]), float(d["since"]), float(d["expires"]),
                       str(d["owner"]))  # fmt: skip
        except (ValueError, TypeError, KeyError):
            return None


class LeaseHeld(UsageError):
    """Another driver holds the sweep's lease: this one must not run the sweep."""

    def __init__(self, sweep: str, holder: Holder, location: str) -> None:
        super().__init__(
            f"sweep {sweep!r} is being run by another driver: {holder}, unless that driver "
            f"renews it ({location}). Wait for that sweep to end, or stop it. A driver killed "
            "without releasing its lease (SIGKILL, a lost host) holds the sweep until the lease "
            "expires; once sure that driver is gone, deleting the lease frees the sweep at once"
        )
        self.holder = holder


class LeaseLost(RuntimeError):
    """This driver's lease was taken over by another driver (or deleted)."""


class SweepLease:
    """One driver's lease on one sweep in `storage`: `acquire`, `renew`, `release`."""

    def __init__(
        self, storage: str | os.PathLike[str], sweep: str, duration: float | None = None
    ) -> None:
        layout = Layout(storage)
        self.sweep = sweep
        self.path = layout.run_file(sweep, LEASE_FILE)  # inside layout.fs; checks the name
        self.location = layout.location("sweeps", sweep, "run", LEASE_FILE)  # as a user names it
        self.duration = lease_seconds() if duration is None else duration
        self.holder: Holder | None = None  # ours, while we hold it
        self._version: Any = None  # of what we last wrote: the condition of our next change
        self._layout = layout

    @property
    def key(self) -> tuple[str, str]:
        """The lease's file, whatever path names it (a local one through a symlink)."""
        return self._layout.fs.type_name, (
            os.path.realpath(self.path) if self._layout.local else self.path
        )

    @functools.cached_property
    def _object(self) -> _FileObject | _S3Object:
        fs = self._layout.fs
        if fs.type_name == "s3":
            return _S3Object(fs, self.path, self._layout.storage)
        return _FileObject(fs, self.path, self._layout.local)

    def current(self) -> Holder | None:
        """Whoever lease.json names now (an unreadable one: None), expired or not."""
        found = self._object.read()
        return None if found is None else Holder.decode(found[0])

    def acquire(self) -> Holder | None:
        """Take the lease: returns the expired holder it took over from, if any. Raises
        LeaseHeld while another driver's lease has not expired."""
        for _ in range(_TRIES):
            found = self._object.read()
            previous = None if found is None else Holder.decode(found[0])
            now = time.time()
            if previous is not None and previous.expires > now:
                raise LeaseHeld(self.sweep, previous, self.location)
            mine = Holder(socket.gethostname(), os.getpid(), now, now + self.duration,
                          uuid.uuid4().hex)  # fmt: skip
            version = self._object.put(None if found is None else found[1], mine.encode())
            if version is None:  # another driver changed it since we read it: look again
                continue
            self.holder, self._version = mine, version
            if found is not None:
                whose = "an unreadable lease" if previous is None else f"the lease of {previous}"
                log.warning(
                    "sweep %r: took over %s, not renewed in time: its driver was killed or "
                    "lost its host (%s)", self.sweep, whose, self.location,
                )  # fmt: skip
            return previous
        raise UsageError(f"sweep {self.sweep!r}: other drivers kept changing {self.location}")

    def renew(self) -> None:
        """Push the expiry `duration` ahead. Raises LeaseLost if it is not ours any more."""
        if self.holder is None:
            raise LeaseLost(f"sweep {self.sweep!r}: the lease is not held")
        mine = replace(self.holder, expires=time.time() + self.duration)
        version = self._object.put(self._version, mine.encode())
        if version is None:
            holder = self.current()
            what = "its lease was deleted"
            if holder is not None:
                what = f"another driver took the lease over: {holder}"
            raise LeaseLost(f"sweep {self.sweep!r}: {what} ({self.location})")
        self.holder, self._version = mine, version

    def release(self) -> None:
        """Delete the lease if it is still ours; a storage error leaves it to expire."""
        if self.holder is None:
            return
        holder, self.holder = self.holder, None
        try:
            if not self._object.delete(self._version):
                log.warning("sweep %r: the lease was taken over before its release", self.sweep)
        except _STORAGE_ERRORS as err:
            log.warning(
                "sweep %r: could not release the lease %s (%s); it expires at %s",
                self.sweep, self.location, err, _when(holder.expires),
            )  # fmt: skip


# -- the lease's file, read and changed on a condition ---------------------------------------


class _FileObject:
    """lease.json through pyarrow.fs. Version: its bytes. Local: every change under an flock;
    elsewhere best effort (compare, write, read back)."""

    def __init__(self, fs: pafs.FileSystem, path: str, local: bool) -> None:
        self.fs, self.path, self.local = fs, path, local

    def read(self) -> tuple[bytes, bytes] | None:
        data = read_bytes(self.fs, self.path)
        return None if data is None else (data, data)

    def put(self, expected: bytes | None, data: bytes) -> bytes | None:
        """Write `data` if the file holds `expected` (None: if there is none); its version,
        or None if it did not."""
        with self._locked():
            found = self.read()
            if (found and found[1]) != expected:
                return None
            atomic_write_bytes(self.fs, self.path, data)
            found = self.read()
        return data if found is not None and found[0] == data else None

    def delete(self, expected: bytes) -> bool:
        with self._locked():
            found = self.read()
            if found is None or found[1] != expected:
                return False
            self.fs.delete_file(self.path)
        return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self.local:
            yield
            return
        import fcntl

        directory, name = self.path.rsplit("/", 1)
        os.makedirs(directory, exist_ok=True)
        fd = os.open(f"{directory}/.{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes, or the process dies
            yield
        finally:
            os.close(fd)


class _S3Object:
    """lease.json on S3 through boto3's conditional requests. Version: its ETag."""

    # Gone; changed since read; another conditional write to it under way.
    _CONFLICT = frozenset({"NoSuchKey", "PreconditionFailed", "ConditionalRequestConflict"})

    def __init__(self, fs: pafs.S3FileSystem, path: str, storage: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors = (BotoCoreError, ClientError)
        self.bucket, self.key = path.split("/", 1)
        # The URI's options, as pyarrow read them (nptm.trainables.layout); credentials come
        # from the environment, as pyarrow's do.
        query = {k: v[-1] for k, v in parse_qs(storage.partition("?")[2]).items()}
        endpoint = query.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
        self.client = _s3_client(endpoint, fs.region or None)

    def read(self) -> tuple[bytes, str] | None:
        got = self._request("get_object", frozenset({"NoSuchKey"}))
        return None if got is None else (got["Body"].read(), got["ETag"])

    def put(self, expected: str | None, data: bytes) -> str | None:
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        got = self._request("put_object", self._CONFLICT, Body=data, **condition)
        return None if got is None else got["ETag"]

    def delete(self, expected: str) -> bool:
        return self._request("delete_object", self._CONFLICT, IfMatch=expected) is not None

    def _request(self, method: str, refused: frozenset[str], **kwargs: Any) -> Any:
        """boto3's answer, None if S3 answered an error code in `refused`; other errors as
        the OSError a pyarrow.fs call raises."""
        try:
            return getattr(self.client, method)(Bucket=self.bucket, Key=self.key, **kwargs)
        except self._errors as err:
            response = getattr(err, "response", None) or {}  # a ClientError's
            if response.get("Error", {}).get("Code") in refused:
                return None
            raise OSError(f"s3://{self.bucket}/{self.key}: {err}") from err


@functools.cache
def _s3_client(endpoint: str | None, region: str | None) -> Any:
    import boto3
    from botocore.config import Config

    # Path-style addressing: what S3-compatible stores at an endpoint of their own expect; and
    # no checksum headers where S3 does not ask for them (some such stores refuse them).
    config = Config(
        s3={"addressing_style": "path"} if endpoint else {},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=region, config=config
    )


# -- holding it while a driver runs ----------------------------------------------------------


def _stop_the_driver(reason: str) -> None:
    """The lease is someone else's now: stop this driver's sweep as SIGTERM would."""
    log.error("%s: stopping this driver", reason)
    _thread.interrupt_main(signal.SIGTERM)


class _Renewer(threading.Thread):
    """Renews the lease every third of its duration until stopped; tells `on_lost` once the
    lease is another driver's, or cannot be renewed before it expires."""

    def __init__(self, lease: SweepLease, on_lost: Callable[[str], None]) -> None:
        super().__init__(name=f"nptm-lease-{lease.sweep}", daemon=True)
        self.lease, self.on_lost = lease, on_lost
        self._stopped = threading.Event()

    def run(self) -> None:
        period = wait = self.lease.duration / 3
        while not self._stopped.wait(wait):
            try:
                self.lease.renew()
                wait = period
            except LeaseLost as err:
                self.on_lost(str(err))
                return
            except Exception as err:  # the storage did not answer: again soon
                wait = period / 4
                holder = self.lease.holder
                if holder is None or time.time() + wait >= holder.expires:
                    self.on_lost(f"sweep {self.lease.sweep!r}: the lease expires unrenewed ({err})")
                    return
                log.warning("sweep %r: could not renew the lease: %s", self.lease.sweep, err)

    def stop(self) -> None:
        self._stopped.set()
        if self is not threading.current_thread():
            self.join()


@dataclass
class _Holding:
    lease: SweepLease
    renewer: _Renewer
    thread: int  # the thread that took it: takes from it again are re-entrant
    count: int = 1


_holdings: dict[tuple[str, str], _Holding] = {}
_holdings_lock = threading.Lock()


class Hold:
    """One take of a sweep's lease (`take`); `release` gives that take back."""

    def __init__(self, holding: _Holding) -> None:
        self.lease = holding.lease
        self._holding: _Holding | None = holding

    def release(self) -> None:
        holding, self._holding = self._holding, None
        if holding is None:
            return
        with _holdings_lock:
            holding.count -= 1
            if holding.count:
                return
            del _holdings[holding.lease.key]
        holding.renewer.stop()
        holding.lease.release()


def take(
    storage: str | os.PathLike[str],
    sweep: str,
    *,
    duration: float | None = None,
    on_lost: Callable[[str], None] = _stop_the_driver,
) -> Hold:
    """Take the sweep's lease and keep it renewed until `Hold.release`. Re-entrant within a
    thread: a take inside one the same thread holds shares it, and only the outermost release
    gives the lease up (`nptm sweep --until-conclusive` holds it across its rounds, each a
    `run_sweep` that takes it too). Raises LeaseHeld (exit 2) while another driver (another
    process, or another thread of this one) holds it; UsageError if the storage cannot hold it.
    `on_lost` is told if the lease is lost while held (default: the driver stops as on SIGTERM).
    """
    with _usable(sweep, "take"):
        lease = SweepLease(storage, sweep, duration)
        with _holdings_lock:
            holding = _holdings.get(lease.key)
            if holding is not None and holding.thread == threading.get_ident():
                holding.count += 1
                return Hold(holding)
        lease.acquire()
    holding = _Holding(lease, _Renewer(lease, on_lost), threading.get_ident())
    with _holdings_lock:
        _holdings[lease.key] = holding
    holding.renewer.start()
    return Hold(holding)


@contextlib.contextmanager
def hold(storage: str | os.PathLike[str], sweep: str, **kwargs: Any) -> Iterator[SweepLease]:
    """`take` while inside."""
    held = take(storage, sweep, **kwargs)
    try:
        yield held.lease
    finally:
        held.release()


def refuse_if_held(storage: str | os.PathLike[str], sweep: str) -> None:
    """Raise LeaseHeld if another driver holds the sweep's lease now: a look, taking nothing,
    so that a second driver is refused before it starts a local Ray (`take` decides)."""
    with _usable(sweep, "read"):
        lease = SweepLease(storage, sweep)
        with _holdings_lock:
            holding = _holdings.get(lease.key)
        if holding is not None and holding.thread == threading.get_ident():
            return
        holder = lease.current()
    if holder is not None and holder.expires > time.time():
        raise LeaseHeld(sweep, holder, lease.location)


@contextlib.contextmanager
def _usable(sweep: str, what: str) -> Iterator[None]:
    """A storage that cannot hold the lease: UsageError, naming why."""
    try:
        yield
    except (*_STORAGE_ERRORS, StorageError) as err:
        raise UsageError(f"sweep {sweep!r}: cannot {what} its lease: {err}") from err
