"""Step 1, sample: RSNA long CSV -> work/labels.csv (wide, de-duplicated) -> work/sampled.csv.

The sample takes up to `sample.per_label` positives of each subtype (all of them where fewer
exist, as for epidural on RSNA) plus as many negatives, seeded (`sample.unit: image`), or whole
series until each label reaches that many slices (`sample.unit: series`, for the sequence
stage). With `sample.context` offsets, each sampled slice brings its neighbours in its series
(from work/index.parquet, the index step) as context-only rows. sampled.csv has a `target`
column: 1 for the sample (training targets), 0 for context rows (copied and preprocessed so
they can be gathered as neighbouring-slice inputs, never trained on or evaluated as targets).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ich.data import labels
from ich.errors import StepError
from ich.constants import INDEX_PARQUET, LABELS, LABELS_CSV, SAMPLED_CSV
from ich.io import Timer, summary, write_csv
from ich.stamps import Stamp, must_run, record

log = logging.getLogger("ich")


def _needs_index(cfg: dict) -> bool:
    return bool(cfg["sample"]["context"]) or cfg["sample"]["unit"] == "series"


def stamps(cfg: dict) -> list[Stamp]:
    """Sampling depends on the labels CSV, the seed, the `sample` section and, for context or
    whole series, the header index."""
    work = Path(cfg["paths"]["work_dir"])
    inputs = [Path(cfg["paths"]["labels_csv"])]
    if _needs_index(cfg):
        inputs.append(work / INDEX_PARQUET)
    return [Stamp("sample", work, settings={"seed": cfg["seed"], "sample": cfg["sample"]},
                  inputs=inputs, outputs=[work / LABELS_CSV, work / SAMPLED_CSV])]


def run(cfg: dict, force: bool = False) -> Path:
    """Write labels.csv and sampled.csv under paths.work_dir; return the path of sampled.csv."""
    work = Path(cfg["paths"]["work_dir"])
    source = Path(cfg["paths"]["labels_csv"])
    out_labels, out_sampled = work / LABELS_CSV, work / SAMPLED_CSV
    index_path = work / INDEX_PARQUET
    needs_index = _needs_index(cfg)
    [stamp] = stamps(cfg)
    if not must_run("sample", stamp, force, out_sampled):
        return out_sampled

    timer = Timer()
    try:
        wide, rows, duplicates = labels.read_wide(source)
    except labels.LabelError as err:
        raise StepError(str(err)) from err
    if duplicates:
        log.info("sample: dropped %d duplicated rows of %s", duplicates, source)
    mismatched = labels.any_mismatches(wide)
    if len(mismatched):
        log.warning("sample: %d image(s) have `any` different from the OR of their subtypes, "
                    "e.g. %s; labels kept as given", len(mismatched), ", ".join(mismatched[:5]))
    index = _read_index(index_path) if needs_index else None
    sc = cfg["sample"]
    if sc["unit"] == "series":
        series = wide["image_id"].map(index.set_index("image_id")["series_id"])
        sampled = labels.series_sample(wide, series, sc["per_label"], cfg["seed"], exclude=sc["exclude_ids"])
        log.info("sample: %d whole series taken", series[wide["image_id"].isin(set(sampled["image_id"]))].nunique())
    else:
        sampled = labels.balanced_sample(wide, sc["per_label"], cfg["seed"], exclude=sc["exclude_ids"])
    table, unlabelled = labels.add_context(sampled, wide, index, sc["context"]) if index is not None \
        else (sampled.assign(target=1), 0)
    write_csv(wide, out_labels)
    write_csv(table, out_sampled)
    context = table[table["target"] == 0]
    if sc["context"]:
        size = _bytes(Path(cfg["paths"]["dicom_dir"]), index, context["image_id"])
        log.info("sample: %d context slices added (offsets %s) for %d targets: %.1f MB of DICOM to "
                 "copy (%.1f%% more than the targets' own slices)%s", len(context), sc["context"],
                 len(sampled), size / 1e6, 100.0 * len(context) / max(len(sampled), 1),
                 f"; {unlabelled} neighbours without labels left out" if unlabelled else "")

    before, after = labels.label_counts(wide), labels.label_counts(sampled)
    log.info("sample: %-18s %10s %10s", "label", "all", "sampled")
    for key in ("images", *LABELS, "negatives"):
        log.info("sample: %-18s %10d %10d", key, before[key], after[key])
    line = summary("sample", f"{after['images']:,} of {before['images']:,} images sampled"
                   f"{f' + {len(context):,} context slices' if sc['context'] else ''} "
                   f"({rows:,} CSV rows)", rows, "rows", timer)
    record(stamp, line)
    return out_sampled


def _read_index(path: Path):
    """The header index, or a StepError saying to run the index step."""
    import pandas as pd

    if not path.is_file():
        raise StepError(f"{path} not found: sample.context and sample.unit=series need the header "
                        "index; run `ich index` first")
    return pd.read_parquet(path, columns=["image_id", "file", "series_id", "position", "rank",
                                          "series_size"])


def _bytes(root: Path, index, image_ids) -> int:
    """Bytes on disk of the source files of `image_ids` (missing files count 0)."""
    files = index.set_index("image_id")["file"]
    total = 0
    for image_id in image_ids:
        try:
            total += (root / files[image_id]).stat().st_size
        except (KeyError, OSError):
            continue
    return total
