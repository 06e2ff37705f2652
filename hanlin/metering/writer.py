"""A background thread that writes usage rows, so request handlers never wait on the database."""

from __future__ import annotations

import logging
import queue
import threading
import time

from hanlin.metering.store import MeteringStore, UsageRecord

logger = logging.getLogger("hanlin.metering")


class UsageWriter:
    """Queue rows with submit(); a daemon thread commits them one transaction each, retrying transient failures.

    A row that still fails after `attempts` tries is logged at ERROR level with its full contents and counted
    in `failed`; the thread carries on. Closing the writer does not close the store.
    """

    def __init__(self, store: MeteringStore, attempts: int = 5, retry_delay: float = 0.05) -> None:
        self.store = store
        self.attempts = attempts
        self.retry_delay = retry_delay  # doubled after every failed try
        self.written = 0
        self.failed = 0
        self._queue: queue.SimpleQueue[UsageRecord | None] = queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="hanlin-usage-writer", daemon=True)
        self._thread.start()

    def submit(self, record: UsageRecord) -> None:
        """Queue a row; never blocks, never raises."""
        try:
            with self._idle:
                if self._closed:
                    logger.error("usage writer is closed; usage row not recorded: %r", record)
                    return
                self._pending += 1
                self._queue.put(record)
        except Exception:
            logger.exception("usage row not recorded: %r", record)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row submitted so far has been written (or logged as failed); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Flush, then stop the thread."""
        self.flush(timeout)
        with self._idle:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)  # rows submitted before this are still written first
        self._thread.join(timeout)

    def _run(self) -> None:
        while (record := self._queue.get()) is not None:
            try:
                self._write(record)
            except Exception:  # a bug of ours must not stop the thread
                self.failed += 1
                logger.exception("usage row not recorded: %r", record)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _write(self, record: UsageRecord) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                self.store.record_usage(record)
                self.written += 1
                return
            except Exception as error:
                if attempt == self.attempts or not self.store.is_transient(error):
                    self.failed += 1
                    logger.error("usage row not recorded after %d attempt(s): %s: %r", attempt, error, record)
                    return
                logger.warning("usage write failed (attempt %d of %d), retrying: %s", attempt, self.attempts, error)
                time.sleep(self.retry_delay * 2 ** (attempt - 1))
