"""RSNA labels: the long CSV to a wide table, and the balanced sampler.

In: `stage_2_train.csv` (`ID,Label`, IDs `ID_<hex>_<subtype>`, six rows per image, `any` last).
Out: a wide DataFrame, one row per image: `image_id` + LABELS (int8 0/1), sorted by image_id;
and a balanced sample of it.

The full RSNA CSV has 4.5 million rows: parsing goes through pyarrow (its CSV reader on blocks
of the file, vectorised string kernels) and numpy, never a Python loop per row, so it takes
seconds.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ich.constants import LABELS, RSNA_ORDER, SUBTYPES
from ich.data.arrays import name_bytes, sorted_unique

_ID_PATTERN = r"^(?P<image_id>ID_[0-9a-fA-F]+)_(?P<subtype>[a-z]+)$"
# Rows parsed at a time by long_to_wide: the parsed strings of one slice are all it holds at once.
_SLICE_ROWS = 500_000
# Bytes of CSV parsed at a time by read_wide (about 150,000 RSNA rows): the parsed strings of
# one block are all it holds of the file at once.
_BLOCK_BYTES = 4 * 2 ** 20


class LabelError(ValueError):
    """Labels that cannot be used as they are; the message names the rows or IDs at fault."""


def read_long_csv(path: str | Path) -> pa.Table:
    """Read an RSNA long-format CSV into an Arrow table with columns ID (string), Label (int8)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels CSV {path} not found; set paths.labels_csv to stage_2_train.csv")
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={"ID": pa.string(), "Label": pa.int8()}, include_columns=["ID", "Label"]))
    except (pa.ArrowInvalid, KeyError) as err:
        raise LabelError(f"{path}: expected an RSNA CSV with columns ID,Label ({err})") from err
    return table


def long_to_wide(table: pa.Table, source: str = "labels CSV") -> pd.DataFrame:
    """Pivot the long table to one row per image with columns image_id + LABELS.

    Exact duplicate rows are dropped (the RSNA file lists 4 images twice); the same
    (image, subtype) with two different labels is an error naming the IDs; an image without all
    six rows is an error too. Labels must be 0 or 1.

    Columnar and in slices of _SLICE_ROWS rows (issue 11: flat memory): each slice's IDs are
    parsed and reduced to fixed-width image-id bytes, a subtype code and the label, so only
    those compact columns of the whole file are ever held (about 80 MB at RSNA's 4.5M rows,
    where the parsed Arrow strings of the whole file took 600 MB more).
    """
    return _wide(_table_slices(table), source)[0]


def read_wide(path: str | Path) -> tuple[pd.DataFrame, int, int]:
    """`long_to_wide` of the RSNA CSV at `path`, read _BLOCK_BYTES of the file at a time (the
    CSV's Arrow table, 160 MB at RSNA's size, is never held whole). Returns (wide table, data
    rows, duplicated rows: those beyond the first of each repeated ID)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels CSV {path} not found; set paths.labels_csv to stage_2_train.csv")
    counts = {"rows": 0}

    def batches():
        names = None
        try:
            for block in _line_blocks(path, _BLOCK_BYTES):
                # The first block starts with the header; the others are given its names.
                read = pacsv.ReadOptions(use_threads=False, column_names=names)
                table = pacsv.read_csv(pa.py_buffer(block), read_options=read,
                                       convert_options=pacsv.ConvertOptions(
                                           column_types={"ID": pa.string(), "Label": pa.int8()},
                                           include_columns=["ID", "Label"]))
                if names is None:
                    names = _header(block)
                counts["rows"] += table.num_rows
                yield table.column("ID"), table.column("Label")
            if names is None:
                raise LabelError(f"{path}: empty file; expected an RSNA CSV with columns ID,Label")
            if not counts["rows"]:  # a header only: one empty slice, as long_to_wide gets
                yield pa.array([], pa.string()), pa.array([], pa.int8())
        except (pa.ArrowInvalid, KeyError) as err:
            raise LabelError(f"{path}: expected an RSNA CSV with columns ID,Label ({err})") from err

    wide, duplicates = _wide(batches(), str(path))
    return wide, counts["rows"], duplicates


def _line_blocks(path: Path, size: int):
    """The bytes of the file at `path` in blocks of about `size`, each ending at a line end
    (the last maybe without one). By hand, not pyarrow's streaming reader: that one reads
    ahead, and held most of RSNA's 120 MB file as parsed batches before the first was used.
    (Like pyarrow's default parsing, a quoted value never holds a line end.)"""
    with open(path, "rb") as handle:
        rest = b""
        while chunk := handle.read(size):
            data = rest + chunk
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                yield data[:cut]
        if rest:
            yield rest


def _header(block: bytes) -> list[str]:
    """The column names of the CSV header that starts `block` (a byte-order mark skipped)."""
    line = block.split(b"\n", 1)[0].decode("utf-8-sig").rstrip("\r")
    return next(csv.reader([line]))


def _table_slices(table: pa.Table):
    for start in range(0, max(table.num_rows, 1), _SLICE_ROWS):
        part = table.slice(start, _SLICE_ROWS)
        yield part.column("ID"), part.column("Label")


def _wide(slices, source: str) -> tuple[pd.DataFrame, int]:
    """The wide table of the long rows in `slices` ((ID, Label) arrays) and the number of
    duplicated rows."""
    image_ids, keys, label_sorted = _sorted_cells(slices, source)
    n_sub = len(RSNA_ORDER)
    same = keys[1:] == keys[:-1]
    duplicates = int(np.count_nonzero(same))
    conflict = same & (label_sorted[1:] != label_sorted[:-1])
    if conflict.any():
        bad_ids = sorted({image_ids[k // n_sub].decode() for k in keys[1:][conflict]})
        raise LabelError(f"{source}: conflicting duplicate labels for {len(bad_ids)} image(s): "
                         f"{', '.join(bad_ids[:10])}; fix or remove those rows")
    keep = np.concatenate([[True], ~same])[:len(keys)]   # [:0] for a header-only file
    keys, label_sorted = keys[keep], label_sorted[keep]
    del same, keep, conflict

    wide = np.full((len(image_ids), n_sub), -1, dtype=np.int8)
    wide[keys // n_sub, keys % n_sub] = label_sorted
    del keys, label_sorted
    incomplete = (wide < 0).any(axis=1)
    if incomplete.any():
        bad_ids = [i.decode() for i in image_ids[incomplete]]
        raise LabelError(f"{source}: {len(bad_ids)} image(s) lack some of the six subtype rows: "
                         f"{', '.join(bad_ids[:10])}")
    columns = [RSNA_ORDER.index(label) for label in LABELS]
    frame = pd.DataFrame(wide[:, columns], columns=list(LABELS))
    # Already sorted (sorted_unique). Through Arrow: bytes to strings without a Python object each.
    frame.insert(0, "image_id", pa.array(image_ids, type=pa.binary()).cast(pa.large_string()).to_pandas())
    return frame, duplicates


def _sorted_cells(slices, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The long rows of `slices` ((ID, Label) arrays, in file order) as sorted unique image ids
    (fixed-width bytes) and one key per row, image index * 6 + subtype code, sorted (stable),
    with the rows' labels in the same order."""
    uniques, inverses, codes, label_parts = [], [], [], []
    start = 0
    for ids, labels in slices:
        image_id, subtype, label = _parse_slice(ids, labels, start, source)
        start += len(ids)
        # Fixed-width bytes: np.unique sorts them like the strings (IDs are ASCII), no objects.
        unique, inverse = np.unique(image_id, return_inverse=True)
        uniques.append(unique)
        inverses.append(inverse.astype(np.int32))
        codes.append(subtype)
        label_parts.append(label)
    image_ids = sorted_unique(np.concatenate(uniques))
    image_idx = np.concatenate([np.searchsorted(image_ids, unique).astype(np.int32)[inverse]
                                for unique, inverse in zip(uniques, inverses)])
    del uniques, inverses
    sub_np = np.concatenate(codes)
    label_np = np.concatenate(label_parts)
    del codes, label_parts

    # One cell per (image, subtype): sort the cell keys; equal neighbours are duplicates.
    n_sub = len(RSNA_ORDER)
    dtype = np.int32 if len(image_ids) * n_sub < 2 ** 31 else np.int64
    keys = image_idx.astype(dtype) * n_sub + sub_np
    del image_idx, sub_np
    order = np.argsort(keys, kind="stable")
    keys, label_sorted = keys[order], label_np[order]
    del order, label_np
    return image_ids, keys, label_sorted


def _parse_slice(ids: pa.ChunkedArray, labels: pa.ChunkedArray, offset: int,
                 source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check one slice of the long table (data rows offset+1...); return its image ids as
    fixed-width bytes, subtype codes (index in RSNA_ORDER, int8) and labels (int8)."""
    if ids.null_count or labels.null_count:
        first = _first_index(pc.or_(pc.is_null(ids), pc.is_null(labels)))
        raise LabelError(f"{source}: empty ID or Label on data row {offset + first + 1}")
    parts = pc.extract_regex(ids, _ID_PATTERN)
    bad = pc.is_null(parts)
    if pc.any(bad).as_py():
        row = _first_index(bad)
        raise LabelError(f"{source}: data row {offset + row + 1} has ID {ids[row].as_py()!r}; "
                         "expected ID_<hex>_<subtype>")
    subtype_idx = pc.index_in(pc.struct_field(parts, "subtype"), value_set=pa.array(RSNA_ORDER))
    if subtype_idx.null_count:
        row = _first_index(pc.is_null(subtype_idx))
        raise LabelError(f"{source}: data row {offset + row + 1} has unknown subtype in "
                         f"{ids[row].as_py()!r}; expected one of {list(RSNA_ORDER)}")
    label_np = labels.to_numpy()
    if ((label_np != 0) & (label_np != 1)).any():
        row = int(np.flatnonzero((label_np != 0) & (label_np != 1))[0])
        raise LabelError(f"{source}: data row {offset + row + 1} has Label {label_np[row]}; "
                         "expected 0 or 1")
    # Fixed-width bytes straight from the Arrow buffers (not one Python string per row first).
    image_id = name_bytes(pc.struct_field(parts, "image_id"))
    return image_id, subtype_idx.to_numpy().astype(np.int8), label_np.astype(np.int8)


def duplicate_row_count(table: pa.Table) -> int:
    """Number of rows beyond the first for each repeated ID (the RSNA file has 24: 4 images x 6).

    Counted on the compact cell keys (one ID is one (image, subtype) cell), not by hashing the
    ID strings: Arrow's distinct count of RSNA's 4.5M IDs alone took 640 MB.
    """
    _, keys, _ = _sorted_cells(_table_slices(table), "labels CSV")
    return int(np.count_nonzero(keys[1:] == keys[:-1]))


def any_mismatches(wide: pd.DataFrame) -> pd.Series:
    """Image ids whose `any` differs from the OR of the subtypes (none in RSNA)."""
    derived = wide[list(SUBTYPES)].max(axis=1)
    return wide.loc[derived != wide["any"], "image_id"]


def balanced_sample(wide: pd.DataFrame, per_label: int, seed: int,
                    exclude: tuple[str, ...] | list[str] = ()) -> pd.DataFrame:
    """Up to `per_label` positives of each subtype (all where fewer exist) plus `per_label` negatives.

    Images drawn for several labels are kept once, so the sample is smaller than 6 x per_label
    (about 55k of RSNA's 752k at 10,000). Returns rows of `wide`, sorted by image_id.
    """
    rng = np.random.default_rng(seed)
    pool = wide[~wide["image_id"].isin(set(exclude))]
    chosen: list[np.ndarray] = []
    for label in SUBTYPES:
        chosen.append(_draw(pool.index[pool[label] == 1].to_numpy(), per_label, rng))
    chosen.append(_draw(pool.index[pool["any"] == 0].to_numpy(), per_label, rng))
    rows = np.unique(np.concatenate(chosen))
    return wide.loc[rows].sort_values("image_id", ignore_index=True)


def series_sample(wide: pd.DataFrame, series: pd.Series, per_label: int, seed: int,
                  exclude: tuple[str, ...] | list[str] = ()) -> pd.DataFrame:
    """Whole series, in a seeded random order, until each subtype has `per_label` positive
    slices and there are `per_label` negative slices (or the series run out).

    `series`: the series id of each row of `wide` (same index; NaN where unknown: those rows
    are never taken). A series is taken only while it adds to a label still short of its
    target, so the rarest labels decide how many series come along. Returns rows of `wide`,
    sorted by image_id.
    """
    rng = np.random.default_rng(seed)
    keep = ~wide["image_id"].isin(set(exclude)) & series.notna()
    frame = wide[keep].assign(_series=series[keep])
    columns = [*SUBTYPES, "negative"]
    frame = frame.assign(negative=(frame["any"] == 0).astype(np.int64))
    per_series = frame.groupby("_series")[columns].sum()
    order = per_series.index.to_numpy()[rng.permutation(len(per_series))]
    counts = per_series.loc[order].to_numpy()
    have = np.zeros(len(columns), np.int64)
    taken = []
    for name, adds in zip(order, counts):
        if (have >= per_label).all():
            break
        if ((have < per_label) & (adds > 0)).any():
            taken.append(name)
            have += adds
    rows = frame.index[frame["_series"].isin(set(taken))]
    return wide.loc[rows].sort_values("image_id", ignore_index=True)


def add_context(sampled: pd.DataFrame, wide: pd.DataFrame, index: pd.DataFrame,
                offsets) -> tuple[pd.DataFrame, int]:
    """The sample plus the neighbours of its slices at `offsets` as context-only rows.

    Returns (table, unlabelled): `sampled`'s rows with `target` 1, then every neighbour (from
    the ranked header `index`, see ich.data.index.neighbours) that is not already in the
    sample, with its labels from `wide` and `target` 0, sorted by image_id; `unlabelled`
    counts neighbours left out because `wide` has no labels for them. Context rows are copied
    and preprocessed so that they can be gathered as inputs, never trained on as targets.
    """
    from ich.data.index import neighbours

    table = sampled.assign(target=np.int8(1))
    if not len(offsets) or sampled.empty:
        return table, 0
    links = neighbours(index, sampled["image_id"].tolist(), list(offsets))
    extra = set(links["neighbour_id"]) - set(sampled["image_id"])
    labelled = wide[wide["image_id"].isin(extra)]
    context = labelled.assign(target=np.int8(0))
    table = pd.concat([table, context], ignore_index=True).sort_values("image_id", ignore_index=True)
    return table, len(extra) - len(labelled)


def label_counts(wide: pd.DataFrame) -> dict[str, int]:
    """{"images": N, <label>: positives for each of LABELS, "negatives": images with any 0}:
    the one count of a label table, for every summary and report."""
    counts = {"images": len(wide)}
    counts.update({label: int(wide[label].sum()) for label in LABELS})
    counts["negatives"] = int((wide["any"] == 0).sum())
    return counts


def _draw(candidates: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if len(candidates) <= n:
        return candidates
    return rng.choice(candidates, size=n, replace=False)


def _first_index(mask) -> int:
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False)))[0])
