"""Study level: one row per study from its slices' rows.

In: a table with a study id column and per-slice (or per-series, with their slice counts)
probability and, for evaluation, 0/1 label columns. Out: one row per study, sorted by study id:
`n_slices` and, for every column, the maximum over the study's rows. For labels this is the study's truth (a study is positive for
a label when any of its slices is); for probabilities it is the plain-maximum study score, so a
study is called positive exactly when one of its slices is called positive at the same
threshold. Rows without a study id are left out (a PNG carries none).
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd


def aggregate_studies(table: pd.DataFrame, columns: Sequence[str], study: str = "study_id",
                      keep: Sequence[str] = (), slices: str | None = None) -> pd.DataFrame:
    """Per study: `study`, the first value of each `keep` column, n_slices, max of `columns`.
    n_slices counts the study's rows, or, with `slices` (rows that are series), sums that column."""
    frame = table[table[study].notna() & (table[study].astype(str) != "")]
    out_columns = [study, *keep, "n_slices", *columns]
    if frame.empty:
        return pd.DataFrame(columns=out_columns)
    grouped = frame.groupby(study, sort=True)
    out = grouped[list(columns)].max()
    out.insert(0, "n_slices", grouped.size() if slices is None else grouped[slices].sum())
    for name in reversed(list(keep)):
        out.insert(0, name, grouped[name].first())
    return out.reset_index()[out_columns]
