"""Waiting for new log entries: the sequencer's NOTIFY, with a poll as the fallback.

A NOTIFY is only a hint: its payload is never trusted (readers always re-read
the table), a lost one only costs a poll interval, and a broken listening
connection is reopened on the next wait. On SQLite there is no NOTIFY and a
wait is a plain sleep.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import sqlalchemy as sa

from herald.schema.queries import QUERIES

__all__ = ["Waker"]

log = logging.getLogger("herald.wakeup")


class Waker:
    """One listening connection, opened lazily, reopened after a failure."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._conn: Any = None

    def _listen(self) -> Any:
        if self._conn is None:
            raw = self.engine.raw_connection()
            conn = raw.driver_connection
            # Detached: the pool never gets this connection back, so a LISTEN
            # never leaks into a pooled connection used for something else.
            raw.detach()
            if conn is None:
                raise RuntimeError("the engine gave no driver connection to listen on")
            conn.rollback()  # the pool's pre-ping may have left a transaction open
            conn.autocommit = True
            conn.execute(QUERIES["listen"])
            self._conn = conn
        return self._conn

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a notification; True if one came."""
        if self.engine.dialect.name != "postgresql":
            time.sleep(timeout)
            return False
        try:
            conn = self._listen()
            # notifies() returns after the first notification or the timeout.
            return any(True for _ in conn.notifies(timeout=timeout, stop_after=1))
        except Exception as exc:  # noqa: BLE001 - any failure means: reconnect next time
            log.warning("listening connection failed (%s); polling until it reconnects", exc)
            self.close()
            time.sleep(min(timeout, 0.5))
            return False

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                log.debug("closing the listening connection failed", exc_info=True)
            self._conn = None
