"""Durable store-and-forward spool: SQLite in WAL mode (standard library).

Every event is written here before it is published and deleted only when the broker acknowledged
it, so events survive broker outages and crashes. The spool is bounded in bytes: past the bound
the oldest events are dropped and counted (never silently). A write that fails (disk full, I/O
error) raises `SpoolError` and is counted in `failed`; the caller decides what to do with the event.
An event the broker can never take (larger than its maximum packet size) is moved to the
`dead_letter` table, kept with the reason, so the events behind it flow.

One daemon per spool: the spool holds an exclusive lock (``<spool>.lock``, with the owner's pid) for as long
as it is open; a second daemon on the same spool gets a `SpoolError` naming the first one's pid.
"""
from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger("edgecv.spool")

DROP_LOG_INTERVAL_S = 10.0  # past the first drop, at most one summary line per interval


class SpoolError(Exception):
    """The spool cannot be opened or written (one line naming the path)."""


@dataclass(frozen=True)
class SpoolItem:
    seq: int
    camera: str
    event_id: str
    topic: str
    payload: bytes  # JSON of the event, without publish-time fields


def _reason(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class Spool:
    def __init__(self, path: str | os.PathLike, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.failed = 0  # events that could not be written (this run)
        self._lock = threading.Lock()
        self._db: Optional[sqlite3.Connection] = None
        self._drops_unlogged = 0
        self._acked_rows: dict[int, int] = {}  # seq -> size: acknowledged, not deleted yet (a write failed)
        self._acked_bytes = 0
        self._ack_failing = False
        self._last_drop_log = -1e9
        self._lock_fd: Optional[int] = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"spool {self.path}: cannot open: {_reason(e)}") from None
        self._take_lock()
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=5.0)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()
            if not mode or str(mode[0]).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot use write-ahead logging (journal mode {mode and mode[0]})")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, camera TEXT NOT NULL,"
                " event_id TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL, size INTEGER NOT NULL)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS dead_letter (seq INTEGER PRIMARY KEY, camera TEXT NOT NULL,"
                " event_id TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL, reason TEXT NOT NULL,"
                " at REAL NOT NULL)"
            )
            row = self._db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM events").fetchone()
            self.dropped = self._meta("dropped")  # oldest events removed past the bound (kept across runs)
            self.dead_letters = int(self._db.execute("SELECT COUNT(*) FROM dead_letter").fetchone()[0])
        except (sqlite3.Error, OSError) as e:
            if self._db is not None:
                self._db.close()
            self._release_lock()
            raise SpoolError(f"spool {self.path}: cannot open: {_reason(e)}") from None
        self._bytes, self._count = int(row[0]), int(row[1])
        if self._count:
            log.info("spool %s: %d events waiting from an earlier run", self.path, self._count)

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def _take_lock(self) -> None:
        """Exclusive for as long as this spool is open: a second daemon would send this one's events too."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise SpoolError(f"spool {self.path}: cannot open its lock file: {_reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            except OSError:
                owner = "unknown"
            os.close(fd)
            raise SpoolError(f"spool {self.path} is in use by another edgecv daemon (pid {owner}); "
                             "one daemon per spool (set mqtt.spool.path or node_id to run a second one)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.ftruncate(self._lock_fd, 0)
            except OSError:
                pass
            os.close(self._lock_fd)  # closing the descriptor releases the lock
            self._lock_fd = None

    def _meta(self, key: str) -> int:
        assert self._db is not None
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def put(self, camera: str, event_id: str, topic: str, payload: bytes) -> int:
        """Store one event durably; returns its sequence number. Drops the oldest past the bound.

        Raises SpoolError (counted in `failed`) when the event could not be written.
        """
        size = len(payload) + len(topic) + len(event_id) + 64
        with self._lock:
            if self._db is None:
                self.failed += 1
                raise SpoolError(f"spool {self.path}: cannot write: the spool is closed")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                if self._acked_rows:
                    self._delete_acked()
                cur = self._db.execute(
                    "INSERT INTO events (camera, event_id, topic, payload, size) VALUES (?, ?, ?, ?, ?)",
                    (camera, event_id, topic, payload, size),
                )
                dropped = self._enforce_bound(size)
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                self.failed += 1
                raise SpoolError(f"spool {self.path}: cannot write: {_reason(e)}") from None
            if self._acked_rows:
                self._after_delete()
            self._bytes += size - dropped[1]
            self._count += 1 - dropped[0]
            if dropped[0]:
                self.dropped += dropped[0]
                self._log_drops(dropped[0])
            return int(cur.lastrowid)

    def _log_drops(self, n: int) -> None:
        """Every drop is counted; the first is logged at once, then one summary line per interval."""
        self._drops_unlogged += n
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            self._flush_drop_log(now)

    def _flush_drop_log(self, now: float) -> None:
        if self._drops_unlogged:
            log.warning("spool %s: over its bound of %d bytes: dropped the %d oldest events (%d dropped in all)",
                        self.path, self.max_bytes, self._drops_unlogged, self.dropped)
            self._drops_unlogged = 0
            self._last_drop_log = now

    def _rollback(self) -> None:
        assert self._db is not None
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite may have rolled back already (disk full, I/O error)
        try:
            row = self._db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM events").fetchone()
            self._bytes, self._count = int(row[0]), int(row[1])
        except sqlite3.Error:
            pass

    def _enforce_bound(self, new_size: int) -> tuple[int, int]:
        """Inside the put transaction: delete the oldest events while over the bound (never the new one).

        Returns (events, bytes) deleted; the caller updates the counters once the transaction committed.
        """
        assert self._db is not None
        total = self._bytes - self._acked_bytes + new_size  # acknowledged rows were deleted in this transaction
        count = self._count - len(self._acked_rows) + 1
        if total <= self.max_bytes:
            return 0, 0
        n = freed = 0
        last_seq = None
        for seq, size in self._db.execute("SELECT seq, size FROM events ORDER BY seq"):
            if total - freed <= self.max_bytes or count - n <= 1:
                break
            n += 1
            freed += int(size)
            last_seq = seq
        if n:
            self._db.execute("DELETE FROM events WHERE seq <= ?", (last_seq,))
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('dropped', ?)", (self.dropped + n,))
        return n, freed

    def next_items(self, after_seq: int, limit: int) -> list[SpoolItem]:
        """Events in order of arrival with seq > after_seq."""
        with self._lock:
            if self._db is None:
                return []
            rows = self._db.execute(
                "SELECT seq, camera, event_id, topic, payload FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [SpoolItem(int(r[0]), r[1], r[2], r[3], bytes(r[4])) for r in rows]

    def dead_letter(self, seq: int, reason: str) -> bool:
        """Move an event the broker can never take to the dead-letter table (kept, with ``reason``), out of the
        way of the events behind it. Returns False when it could not be moved (it then stays in the queue)."""
        with self._lock:
            if self._db is None:
                return False
            try:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute("SELECT size FROM events WHERE seq=?", (seq,)).fetchone()
                if row is None:
                    self._db.execute("ROLLBACK")
                    return False
                self._db.execute(
                    "INSERT OR REPLACE INTO dead_letter (seq, camera, event_id, topic, payload, reason, at)"
                    " SELECT seq, camera, event_id, topic, payload, ?, ? FROM events WHERE seq=?",
                    (reason, time.time(), seq))
                self._db.execute("DELETE FROM events WHERE seq=?", (seq,))
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                log.error("spool %s: cannot set event %d aside: %s", self.path, seq, _reason(e))
                return False
            self._count -= 1
            self._bytes -= int(row[0])
            self.dead_letters += 1
            return True

    def dead_lettered(self) -> list[tuple[str, str]]:
        """(event id, reason) of the events set aside, oldest first."""
        with self._lock:
            if self._db is None:
                return []
            return [(r[0], r[1]) for r in self._db.execute("SELECT event_id, reason FROM dead_letter ORDER BY seq")]

    def ack(self, seq: int) -> None:
        """The broker has the event: forget it (see :meth:`ack_many`)."""
        self.ack_many([seq])

    def ack_many(self, seqs: Sequence[int]) -> None:
        """The broker has these events: forget them, in one transaction (one commit for all the acknowledgements
        the sender reaps at once, so the spool's lock is held briefly and the camera workers' writes wait less).

        When the rows cannot be deleted (disk full, I/O error) they are remembered as acknowledged (not counted
        in `depth`) and deleted with a later write; if the daemon stops first, they are published again on the
        next start (duplicates with the same ids, never a loss).
        """
        if not seqs:
            return
        with self._lock:
            if self._db is None:
                return
            sizes = self._sizes(seqs)
            if not sizes and not any(seq in self._acked_rows for seq in seqs):
                return
            self._acked_rows.update(sizes)
            self._acked_bytes = sum(self._acked_rows.values())
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._delete_acked()
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                if not self._ack_failing:
                    log.error("spool %s: cannot delete acknowledged events: %s (kept until a write works; "
                              "published again if the daemon stops first)", self.path, _reason(e))
                self._ack_failing = True
                return
            self._after_delete()

    def _sizes(self, seqs: Sequence[int]) -> dict[int, int]:
        """seq -> size of those of ``seqs`` still in the queue (none when they cannot be read)."""
        assert self._db is not None
        out: dict[int, int] = {}
        try:
            for i in range(0, len(seqs), 500):
                chunk = list(seqs[i:i + 500])
                out.update((int(seq), int(size)) for seq, size in self._db.execute(
                    f"SELECT seq, size FROM events WHERE seq IN ({','.join('?' * len(chunk))})", chunk))
        except sqlite3.Error:
            return {}
        return out

    def _delete_acked(self) -> None:
        """Inside a write transaction: delete the rows of acknowledged events."""
        assert self._db is not None
        seqs = list(self._acked_rows)
        for i in range(0, len(seqs), 500):
            chunk = seqs[i:i + 500]
            self._db.execute(f"DELETE FROM events WHERE seq IN ({','.join('?' * len(chunk))})", chunk)

    def _after_delete(self) -> None:
        """The transaction that deleted the acknowledged rows committed."""
        if self._ack_failing:
            log.info("spool %s: deleting acknowledged events works again", self.path)
            self._ack_failing = False
        self._count -= len(self._acked_rows)
        self._bytes -= self._acked_bytes
        self._acked_rows.clear()
        self._acked_bytes = 0

    @property
    def depth(self) -> int:
        """Events waiting for the broker's acknowledgement."""
        return self._count - len(self._acked_rows)

    @property
    def size_bytes(self) -> int:
        return self._bytes - self._acked_bytes

    def stats(self) -> dict[str, int]:
        """For the stats message: events waiting, their bytes, dropped past the bound (all runs), failed writes,
        set aside as undeliverable (dead letters, all runs)."""
        return {"depth": self.depth, "bytes": self.size_bytes, "dropped": self.dropped, "failed": self.failed,
                "dead_letter": self.dead_letters}

    def close(self) -> None:
        with self._lock:
            self._flush_drop_log(time.monotonic())
            if self._db is None:
                return
            if self._acked_rows:
                log.warning("spool %s: %d delivered events could not be deleted; they are published again on the "
                            "next start (same ids)", self.path, len(self._acked_rows))
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None
            self._release_lock()


def default_spool_path(node_id: str, configured: Optional[str]) -> Path:
    """`mqtt.spool.path` if set, else $EDGECV_STATE_DIR, else $STATE_DIRECTORY (systemd's StateDirectory=, its first
    folder), else $XDG_STATE_HOME/edgecv (~/.local/state/edgecv)."""
    if configured:
        base = Path(os.path.expanduser(configured))
    elif os.environ.get("EDGECV_STATE_DIR"):
        base = Path(os.environ["EDGECV_STATE_DIR"])
    elif os.environ.get("STATE_DIRECTORY"):
        base = Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    else:
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "edgecv"
    return base / f"{node_id}.spool.sqlite"
