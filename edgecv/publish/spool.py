"""Durable store-and-forward spool: SQLite in WAL mode (standard library).

Every event is written here before it is published and deleted only when the broker acknowledged
it, so events survive broker outages and crashes. The spool is bounded in bytes: past the bound
the oldest events are dropped and counted (never silently).
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger("edgecv.spool")


class SpoolError(Exception):
    """The spool cannot be opened or written (one line naming the path)."""


@dataclass(frozen=True)
class SpoolItem:
    seq: int
    camera: str
    event_id: str
    topic: str
    payload: bytes  # JSON of the event, without publish-time fields


class Spool:
    def __init__(self, path: str | os.PathLike, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=5.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, camera TEXT NOT NULL,"
                " event_id TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL, size INTEGER NOT NULL)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            row = self._db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM events").fetchone()
        except (sqlite3.Error, OSError) as e:
            raise SpoolError(f"spool {self.path}: cannot open: {e}") from None
        self._bytes, self._count = int(row[0]), int(row[1])
        self.dropped = self._meta("dropped")
        if self._count:
            log.info("spool %s: %d events waiting from an earlier run", self.path, self._count)

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def put(self, camera: str, event_id: str, topic: str, payload: bytes) -> int:
        """Store one event durably; returns its sequence number. Drops the oldest past the bound."""
        size = len(payload) + len(topic) + len(event_id) + 64
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                cur = self._db.execute(
                    "INSERT INTO events (camera, event_id, topic, payload, size) VALUES (?, ?, ?, ?, ?)",
                    (camera, event_id, topic, payload, size),
                )
                self._bytes += size
                self._count += 1
                dropped = self._enforce_bound()
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise SpoolError(f"spool {self.path}: cannot write: {e}") from None
            if dropped:
                log.warning("spool %s: over %d bytes, dropped %d oldest events (%d dropped in all)",
                            self.path, self.max_bytes, dropped, self.dropped)
            return int(cur.lastrowid)

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        row = self._db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM events").fetchone()
        self._bytes, self._count = int(row[0]), int(row[1])

    def _enforce_bound(self) -> int:
        dropped = 0
        while self._bytes > self.max_bytes and self._count > 1:
            rows = self._db.execute("SELECT seq, size FROM events ORDER BY seq LIMIT 64").fetchall()
            for seq, size in rows:
                if self._bytes <= self.max_bytes or self._count <= 1:
                    break
                self._db.execute("DELETE FROM events WHERE seq=?", (seq,))
                self._bytes -= size
                self._count -= 1
                dropped += 1
        if dropped:
            self.dropped += dropped
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('dropped', ?)", (self.dropped,))
        return dropped

    def next_items(self, after_seq: int, limit: int) -> list[SpoolItem]:
        """Events in order of arrival with seq > after_seq."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, camera, event_id, topic, payload FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [SpoolItem(int(r[0]), r[1], r[2], r[3], bytes(r[4])) for r in rows]

    def ack(self, seq: int) -> None:
        """The broker has the event: forget it."""
        with self._lock:
            try:
                row = self._db.execute("SELECT size FROM events WHERE seq=?", (seq,)).fetchone()
                if row:
                    self._db.execute("DELETE FROM events WHERE seq=?", (seq,))
            except sqlite3.Error as e:
                log.error("spool %s: cannot delete acknowledged event: %s", self.path, e)
                return
            if row:
                self._bytes -= int(row[0])
                self._count -= 1

    @property
    def depth(self) -> int:
        return self._count

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass


def default_spool_path(node_id: str, configured: Optional[str]) -> Path:
    """`mqtt.spool.path` if set, else $EDGECV_STATE_DIR, else $XDG_STATE_HOME/edgecv (~/.local/state/edgecv)."""
    if configured:
        base = Path(os.path.expanduser(configured))
    elif os.environ.get("EDGECV_STATE_DIR"):
        base = Path(os.environ["EDGECV_STATE_DIR"])
    else:
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "edgecv"
    return base / f"{node_id}.spool.sqlite"
