"""Log output of the `hps` command and its worker processes: readable text lines, or one JSON object per line.

It only formats what the code logs (time, level, logger, message, traceback; Python's warnings, as records
of their own), and in a worker process of `hps serve --processes N` the worker's index (a text line's
"worker I", a JSON line's "worker").
"""

from __future__ import annotations

import json
import logging
import warnings
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_TEXT_FORMAT = "%(asctime)s %(levelname)s worker {worker} %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """A record as one JSON line: time (UTC, ISO 8601), level, logger, message, the worker's index in a worker,
    and exception when there is one."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            line["worker"] = self.worker
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: int | str, log_format: LogFormat, worker: int | None = None) -> None:
    """Sends the root logger's records to stderr at `level`, as text lines or JSON lines; `worker`: the index of
    this worker process, on every line."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        handler.setFormatter(
            logging.Formatter(TEXT_FORMAT if worker is None else WORKER_TEXT_FORMAT.format(worker=worker))
        )
    logging.basicConfig(level=level, handlers=[handler])
    warnings.showwarning = _log_warning


def _log_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, *_: object, **__: object
) -> None:
    """A Python warning (NumPy's, say: a float16 reply's overflow to inf) as a log record in the chosen format,
    with no file path in it."""
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)
