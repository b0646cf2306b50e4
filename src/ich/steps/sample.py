"""Step 1, sample: RSNA long CSV -> work/labels.csv (wide, de-duplicated) -> work/sampled.csv.

The sample takes up to `sample.per_label` positives of each subtype (all of them where fewer
exist, as for epidural on RSNA) plus as many negatives, seeded.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ich.data import labels
from ich.errors import StepError
from ich.constants import LABELS, LABELS_CSV, SAMPLED_CSV
from ich.io import Timer, summary, write_csv
from ich.stamps import Stamp, reason, record

log = logging.getLogger("ich")


def stamps(cfg: dict) -> list[Stamp]:
    """Sampling depends on the labels CSV, the seed and the `sample` section."""
    work = Path(cfg["paths"]["work_dir"])
    return [Stamp("sample", work, settings={"seed": cfg["seed"], "sample": cfg["sample"]},
                  inputs=[Path(cfg["paths"]["labels_csv"])],
                  outputs=[work / LABELS_CSV, work / SAMPLED_CSV])]


def run(cfg: dict, force: bool = False) -> Path:
    """Write labels.csv and sampled.csv under paths.work_dir; return the path of sampled.csv."""
    work = Path(cfg["paths"]["work_dir"])
    source = Path(cfg["paths"]["labels_csv"])
    out_labels, out_sampled = work / LABELS_CSV, work / SAMPLED_CSV
    [stamp] = stamps(cfg)
    why = "forced" if force else reason(stamp)
    if why is None:
        log.info("sample: %s is up to date (use --force to redo)", out_sampled)
        return out_sampled
    log.info("sample: running (%s)", why)

    timer = Timer()
    try:
        table = labels.read_long_csv(source)
        wide = labels.long_to_wide(table, source=str(source))
    except labels.LabelError as err:
        raise StepError(str(err)) from err
    duplicates = labels.duplicate_row_count(table)
    if duplicates:
        log.info("sample: dropped %d duplicated rows of %s", duplicates, source)
    mismatched = labels.any_mismatches(wide)
    if len(mismatched):
        log.warning("sample: %d image(s) have `any` different from the OR of their subtypes, "
                    "e.g. %s; labels kept as given", len(mismatched), ", ".join(mismatched[:5]))
    sampled = labels.balanced_sample(wide, cfg["sample"]["per_label"], cfg["seed"],
                                         exclude=cfg["sample"]["exclude_ids"])
    write_csv(wide, out_labels)
    write_csv(sampled, out_sampled)

    before, after = labels.label_counts(wide), labels.label_counts(sampled)
    log.info("sample: %-18s %10s %10s", "label", "all", "sampled")
    for key in ("images", *LABELS, "negatives"):
        log.info("sample: %-18s %10d %10d", key, before[key], after[key])
    line = summary("sample", f"{after['images']:,} of {before['images']:,} images sampled "
                   f"({table.num_rows:,} CSV rows)", table.num_rows, "rows", timer)
    record(stamp, line)
    return out_sampled
