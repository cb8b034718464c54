"""JSON log lines, one event per line, with the `extra=` fields of each call.

Callers never pass secrets: credentials travel as `access_key_id` (an identifier
CloudTrail also logs), tokens as their fingerprint.

The audit logger writes a line for every credential issued, so a line must be
cheap: `configure()` turns off what logging would gather for nothing (the caller's
frame, thread, process), and the formatter reuses its JSON encoder and the text of
the current second. Each line is still written to stderr as soon as it is made:
nothing is held back, so a crash loses no audit line.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from datetime import datetime, timezone
from typing import Any

# What logging itself puts on a record; everything else came from `extra=`.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_encode = json.JSONEncoder(default=str).encode


def describe(exc: BaseException, *, limit: int = 200) -> str:
    """An exception as one short line for a log field or a readiness reason: its type and
    the first line of its text. Some libraries put whole responses in their messages."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class RateLimited:
    """A logger's lines at a bounded rate: `per_second` on average, `burst` at once; the
    rest are counted, and the next line let through says how many were left out.

    For lines any caller can cause (a refused token, a closed connection): an attacker
    must not be able to fill the node's disk or drown the lines that matter."""

    def __init__(self, logger: logging.Logger, *, per_second: float = 10.0, burst: int = 50) -> None:
        self._logger = logger
        self._per_second = per_second
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = time.monotonic()
        self.suppressed = 0  # lines left out since the last one let through

    def log(self, level: int, message: str, *args: Any, **kwargs: Any) -> None:
        if not self._logger.isEnabledFor(level):
            return
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._per_second)
        self._at = now
        if self._tokens < 1.0:
            self.suppressed += 1
            return
        self._tokens -= 1.0
        if self.suppressed:
            message = f"{message} (and {self.suppressed} similar lines not logged: rate limit)"
            self.suppressed = 0
        self._logger.log(level, message, *args, **kwargs)


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second: tuple[int, str] = (-1, "")  # (epoch second, its ISO text without the offset)

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self._time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if value is not None and key not in _RECORD_FIELDS:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return _encode(line)

    def _time(self, created: float) -> str:
        """`datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="milliseconds")`,
        to the character, with the date and time formatted once per second."""
        # Rounded to the microsecond half to even, as datetime.fromtimestamp() does.
        fraction, whole = math.modf(created)
        micros = round(fraction * 1e6)
        if micros >= 1_000_000:
            whole, micros = whole + 1, micros - 1_000_000
        second, text = self._second
        if second != whole:
            second = int(whole)
            text = datetime.fromtimestamp(second, timezone.utc).isoformat(timespec="seconds")[:-6]
            self._second = (second, text)
        return f"{text}.{micros // 1000:03d}+00:00"


class WithoutRequestDetail(logging.Filter):
    """aiohttp's protocol errors (an oversized header, say) quote the raw request in
    their exception text; a token there would reach the log. Keep only the kind."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.msg} ({type(record.exc_info[1]).__name__})"
        record.exc_info = None
        record.exc_text = None
        return True


def configure(level: str) -> None:
    # None of these reach a line (JsonFormatter writes no file, line, function, thread
    # or process), and gathering them is most of what a log call costs: the caller's
    # frame is found by walking the stack. This is the logging HOWTO's advice.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if sys.version_info >= (3, 12):
        logging.logAsyncioTasks = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.getLogger("aiohttp.server").addFilter(WithoutRequestDetail())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # botocore's debug output would include request bodies, which hold the token.
    logging.getLogger("botocore").setLevel(max(logging.INFO, root.level))
    logging.getLogger("aiobotocore").setLevel(max(logging.INFO, root.level))
