"""A run's samples table read column by column from its Parquet file or parts, never whole.

The dashboard of a 10M-sample run reads a handful of columns (label, pred, correct, confidence, loss) and a page of
rows at a time; the whole table in pandas, with every metadata column, took several GB there. pyarrow reads one
column of every part, and a page of rows from the row groups that hold them. DuckDB answered the same lookups in
the same time at 10M rows (an id lookup 0.085 s against pyarrow's 0.12 s, a top-200 ranking 0.057 s against
numpy's 0.052 s), so it is not a dependency.
"""
from __future__ import annotations

import contextlib
import re
import threading
from pathlib import Path

import numpy as np
import pandas as pd


# the text of an integer id is its str(): "007" or "+7" names no integer id
_INTEGER_TEXT = re.compile(r"0|-?[1-9][0-9]*")


def strictly_increasing(values: np.ndarray) -> bool:
    """Whether each value is above the one before (so none repeats); one pass, no sort."""
    return len(values) < 2 or bool((values[1:] > values[:-1]).all())


def ids_unique(ids: np.ndarray) -> bool:
    """Whether no id repeats. Ids default to positions: increasing integers are unique at a glance (10 ms at 10M
    rows, against 0.5 s to 2 s hashed)."""
    if ids.dtype.kind in "iu" and strictly_increasing(ids):
        return True
    return len(pd.unique(ids)) == len(ids)


def are_positions(ids: np.ndarray, *, increasing: bool | None = None) -> bool:
    """Whether the ids are 0..N-1 in order, each its own row (the default ids). `increasing`, when known, spares
    the pass over them."""
    return ids.dtype.kind in "iu" and len(ids) > 0 and ids[0] == 0 and ids[-1] == len(ids) - 1 and (
        strictly_increasing(ids) if increasing is None else increasing)


def integer_ids(wanted, dtype) -> np.ndarray:
    """The ids in `wanted` that can name an integer id of `dtype`, as numbers of that type, in order. An integer
    array is taken as it is (a slice's members, a confusion cell's ids: millions at 10M rows); anything else is
    compared as text, so that "007", "+7" and "-0" name no id."""
    bounds = np.iinfo(dtype)  # a number outside the ids' type names none of them
    if isinstance(wanted, np.ndarray) and wanted.dtype.kind in "iu":
        if np.can_cast(wanted.dtype, dtype):
            return wanted.astype(dtype, copy=False)
        return wanted[(wanted >= bounds.min) & (wanted <= bounds.max)].astype(dtype)
    texts = (str(w) for w in wanted)
    return np.array([n for n in (int(w) for w in texts if _INTEGER_TEXT.fullmatch(w))
                     if bounds.min <= n <= bounds.max], dtype=dtype)


def positions_of(ids: np.ndarray, wanted, *, increasing: bool | None = None, index: pd.Index | None = None):
    """Row positions in the array `ids` of the ids in `wanted`, in the order of `wanted` (repeats kept), compared as
    text (a URL, a command line or a browser hands ids back as text or JSON numbers); unknown ids are left out.

    Integer ids are compared as numbers, by binary search where they increase (positions, the default ids: 10M
    rows need no index), else through `index` (a pd.Index of them; built here when not given). Other ids are
    indexed as text."""
    if ids.dtype.kind in "iu":
        numbers = integer_ids(wanted, ids.dtype)
        if increasing is None:
            increasing = strictly_increasing(ids)
        if increasing and are_positions(ids, increasing=increasing):
            # increasing integers from 0 to N - 1 are the positions themselves (the default ids): a slice of 5M
            # members of a 10M-row run is found without a search
            return numbers[numbers < len(ids)].astype(np.int64) if numbers.dtype.kind == "u" else \
                numbers[(numbers >= 0) & (numbers < len(ids))].astype(np.int64)
        if increasing:
            at = np.searchsorted(ids, numbers)
            inside = at < len(ids)
            at, numbers = at[inside], numbers[inside]
            return at[ids[at] == numbers].astype(np.int64)
        codes = (index if index is not None else pd.Index(ids)).get_indexer(numbers)
        return codes[codes >= 0].astype(np.int64)
    wanted = [str(w) for w in wanted]
    index = index if index is not None else pd.Index(pd.Series(np.asarray(ids)).astype(str))
    codes = index.get_indexer(pd.Series(wanted, dtype=object))
    return codes[codes >= 0].astype(np.int64)


class SampleTable:
    """The samples table of `files` (one file, or the parts in row order), read-only.

    `table[name]` is one column as pandas reads it (`pd.read_parquet(...)[name]`), read once and kept; `rows` reads
    the rows at some positions; `positions` finds rows by id. What a DataFrame of the whole table would answer, it
    answers for the columns asked for.
    """

    def __init__(self, files: list[Path], *, where=None, relpath: str = "samples.parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not files:
            raise ValueError(f"{relpath} holds no part-*.parquet files")
        self.files = [Path(f) for f in files]
        self._where, self._relpath = where, relpath
        metadata = [pq.read_metadata(f) for f in self.files]
        self._part_rows = np.array([m.num_rows for m in metadata], dtype=np.int64)
        self._part_starts = np.concatenate([[0], np.cumsum(self._part_rows)])
        # a part is written as its rows come: a column all missing in one part is typed null there (read_table_parts)
        self._schema = pa.unify_schemas([m.schema.to_arrow_schema() for m in metadata], promote_options="permissive")
        self._names = tuple(name for name in self._schema.names if name != "__index_level_0__")
        self._columns: dict[str, pd.Series] = {}
        self._id_text = None
        self._id_lookup = None  # integer ids: (values, whether they increase, their pd.Index once needed)
        self._lock = threading.RLock()  # sessions and the warm-up read one run's table at once

    def __len__(self) -> int:
        return int(self._part_starts[-1])

    @property
    def columns(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name) -> bool:
        return name in self._names

    def __getitem__(self, name: str) -> pd.Series:
        if name not in self:
            raise KeyError(name)
        with self._lock:
            if name not in self._columns:
                with self._damaged_on_error():
                    self._columns[name] = self._read_columns([name]).to_pandas()[name]
            return self._columns[name]

    def frame(self, columns) -> pd.DataFrame:
        """The named columns of every row (the ones an analysis reads), as a DataFrame sharing the kept columns."""
        return pd.DataFrame({name: self[name] for name in columns if name in self}, copy=False)

    def rows(self, positions) -> pd.DataFrame:
        """Every column of the rows at `positions` (in that order, indexed by position): the columns already read
        are taken from memory, the others from the row groups that hold the rows. A gallery page of a 10M-row run
        reads a few row groups of the columns it has not read, not the table."""
        import pyarrow as pa

        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"row positions must lie in 0..{len(self) - 1}")
        if not len(positions):
            return self._schema_of(self.columns).empty_table().to_pandas()
        with self._lock:
            kept = {name: self._columns[name] for name in self.columns if name in self._columns}
        unread = [name for name in self.columns if name not in kept]
        read = None
        if unread:
            with self._damaged_on_error():
                pieces, read_order = self._take(positions, unread)
                table = pa.concat_tables(pieces, promote_options="permissive").cast(self._schema_of(unread))
            back = np.empty(len(read_order), dtype=np.int64)  # the pieces hold the positions part by part
            back[read_order] = np.arange(len(read_order))
            read = table.to_pandas().iloc[back]
        # `.array` keeps each column's pandas dtype (categories, nullable numbers) through the take
        return pd.DataFrame({name: kept[name].array[positions] if name in kept else read[name].array
                             for name in self.columns}, index=positions)

    def _take(self, positions: np.ndarray, columns: list) -> tuple[list, np.ndarray]:
        """(one table of `columns` per part holding some of `positions`, which of `positions` each row of them
        is)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        pieces, order = [], []
        part_of = np.searchsorted(self._part_starts, positions, side="right") - 1
        for part in np.unique(part_of):
            wanted = np.flatnonzero(part_of == part)
            local = positions[wanted] - self._part_starts[part]
            file = pq.ParquetFile(self.files[part])
            group_rows = np.array([file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)])
            group_starts = np.concatenate([[0], np.cumsum(group_rows)])
            group_of = np.searchsorted(group_starts, local, side="right") - 1
            groups = np.unique(group_of)
            table = file.read_row_groups(groups.tolist(), columns=columns)
            # where each group read begins in `table`: the groups read are consecutive only among themselves
            begins = np.zeros(file.num_row_groups, dtype=np.int64)
            begins[groups] = np.concatenate([[0], np.cumsum(group_rows[groups])[:-1]])
            pieces.append(table.take(pa.array(begins[group_of] + local - group_starts[group_of])))
            order.append(wanted)
        return pieces, np.concatenate(order)

    def positions(self, ids) -> np.ndarray:
        """Row positions of `ids`, in their order, compared as text (`positions_of`); unknown ids are left out.
        Integer ids are looked up as numbers (by binary search where they increase, as positions do); text ids in
        one pass over them (0.12 s at 10M), with no index of 10M strings."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if pa.types.is_integer(self._schema.field("id").type):
            with self._lock:
                if self._id_lookup is None:
                    values = self["id"].to_numpy()
                    self._id_lookup = values, strictly_increasing(values), None
                values, increasing, index = self._id_lookup
                if not increasing and index is None:  # built once per table: 0.5 s at 10M rows
                    self._id_lookup = values, increasing, (index := pd.Index(values))
            return positions_of(values, ids, increasing=increasing, index=index)
        wanted = pa.array([str(i) for i in ids], type=pa.string())
        every = self._ids_as_text()
        rows = np.flatnonzero(pc.is_in(every, value_set=wanted).to_numpy(zero_copy_only=False))
        where = pc.drop_null(pc.index_in(wanted, value_set=every.take(pa.array(rows))))
        return rows[where.to_numpy(zero_copy_only=False).astype(np.int64)]

    def has_id(self, sample_id) -> bool:
        return len(self.positions([sample_id])) > 0

    def to_frame(self) -> pd.DataFrame:
        """The whole table, as `pd.read_parquet` gives it: for the analyses of a run, not for the dashboard."""
        return self.frame(self.columns)

    # -- reading
    def _schema_of(self, columns):
        import pyarrow as pa

        # pandas' metadata kept: a nullable Int64 or boolean column reads back as it was written
        return pa.schema([self._schema.field(name) for name in columns], metadata=self._schema.metadata)

    def _read_columns(self, columns):
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(f, columns=list(columns)) for f in self.files]
        return pa.concat_tables(tables, promote_options="permissive").cast(self._schema_of(columns))

    @contextlib.contextmanager
    def _damaged_on_error(self):
        """A file that fails to read, after the run was opened, is a damaged run: one line, as `run_checks` says."""
        from ..errors import first_line
        from .run_checks import damaged

        try:
            yield
        except Exception as exc:
            import pyarrow as pa

            if isinstance(exc, (KeyError, IndexError)) and not isinstance(exc, pa.ArrowException):
                raise  # a name or a position asked for wrongly, not a damaged file  # a damaged file fails in many ways; each means the same to the person
            raise damaged(self._relpath, self._where, first_line(exc, 120)) from exc

    def _ids_as_text(self):
        import pyarrow as pa

        with self._lock:
            if self._id_text is None:
                with self._damaged_on_error():
                    ids = self._read_columns(["id"]).column("id").combine_chunks()
                    # ids that are not text are compared as pandas writes them (a float id 1.0 is "1.0")
                    self._id_text = ids if ids.type == "string" else \
                        pa.array(self["id"].astype(str).to_numpy(dtype=object), type=pa.string())
            return self._id_text
