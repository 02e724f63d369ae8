"""Moving whole tables between files on disk and a storage level: import (bulk load) and export (dump).

Reads and writes files only through tables.py and rows only through the level's batched contract;
never row by row.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from hps_server.storage.base import DEFAULT_CHUNK_ROWS, KeyChunk, StorageLevel
from hps_server.tables import TableFileError, TableFormat, read_table, write_table

log = logging.getLogger(__name__)

# Import chunk size in bytes: large enough that each RocksDB SST file is worth an ingest, small enough
# to keep a chunk's copy of the rows well within memory.
IMPORT_CHUNK_BYTES = 64 << 20


def _counted(chunks: Iterable[KeyChunk], rows: int, description: str, progress: bool) -> Iterator[KeyChunk]:
    """Passes the chunks through, advancing a progress bar on a terminal."""
    with tqdm(
        total=rows,
        desc=description,
        unit="rows",
        unit_scale=True,
        disable=not (progress and sys.stderr.isatty()),
    ) as bar:
        for chunk in chunks:
            yield chunk
            bar.update(len(chunk[0]))


def import_table(
    level: StorageLevel,
    table: str,
    source: str | Path,
    dim: int,
    *,
    progress: bool = True,
    chunk_rows: int | None = None,
) -> int:
    """Validates the table files at `source` and bulk-loads them into `table` (created when absent).

    Returns rows loaded. `chunk_rows` None: about IMPORT_CHUNK_BYTES of rows per chunk.
    """
    try:
        files = read_table(source, dim)
    except TableFileError as e:
        raise e.of_table(table) from None
    if files.rows == 0 and table in level.tables() and (held := level.size(table)):
        # An empty folder is an accident far more often than a wish to drop every row.
        raise TableFileError(files.path, f"holds no rows; importing it would empty {table} ({held} rows)")
    level.create_table(table, dim)
    chunk_rows = chunk_rows or max(1, IMPORT_CHUNK_BYTES // (dim * 4 + 8))
    chunks = _counted(files.chunks(chunk_rows), files.rows, f"import {table}", progress)
    rows = level.load(table, chunks)
    # The folder's name only: logs carry no server paths.
    log.info("imported %d rows of %s from the folder %r (%s format)", rows, table, files.path.name, files.format)
    return rows


def export_table(
    level: StorageLevel,
    table: str,
    dest: str | Path,
    *,
    format: TableFormat = "hps",
    progress: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> int:
    """Writes every row of `table` into a new table folder at `dest`; returns rows written."""
    chunks = _counted(level.dump(table, chunk_rows), level.size(table), f"export {table}", progress)
    rows = write_table(dest, chunks, level.dim(table), format)
    log.info("exported %d rows of %s to %s (%s format)", rows, table, dest, format)
    return rows
