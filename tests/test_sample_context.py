"""Context sampling: the balanced targets stay as they were, their neighbours come along as
context-only rows (target 0); the series mode takes whole series; split follows patients."""

import numpy as np
import pandas as pd
import pytest

from ich import config as config_mod
from ich.data.index import neighbours
from ich.data.labels import series_sample
from ich.steps import index as index_step
from ich.steps import sample as sample_step
from ich.synth import generate


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctx")
    generate(root / "synth", patients=6, slices=8, seed=1, workers=1, size=64)
    return root


def _cfg(root, work, **sample):
    cfg = config_mod.load(None, [f"paths.labels_csv={root / 'synth' / 'stage_2_train.csv'}",
                                 f"paths.dicom_dir={root / 'synth' / 'stage_2_train'}",
                                 f"paths.work_dir={work}", "index.workers=1", "sample.exclude_ids=[]",
                                 "sample.per_label=3"])
    cfg["sample"].update(sample)
    return cfg


def test_context_rows_are_the_targets_neighbours(phantoms, tmp_path):
    plain = pd.read_csv(sample_step.run(_cfg(phantoms, tmp_path / "plain")))
    assert plain["target"].eq(1).all()
    cfg = _cfg(phantoms, tmp_path / "ctx", context=[-1, 1])
    with pytest.raises(Exception, match="run `ich index` first"):
        sample_step.run(cfg)
    index_step.run(cfg)
    table = pd.read_csv(sample_step.run(cfg))
    targets, context = table[table["target"] == 1], table[table["target"] == 0]
    # The targets are exactly the sample without context.
    assert targets["image_id"].tolist() == plain["image_id"].tolist()
    index = pd.read_parquet(tmp_path / "ctx" / "index.parquet")
    links = neighbours(index, targets["image_id"].tolist(), [-1, 1])
    expected = set(links["neighbour_id"]) - set(targets["image_id"])
    assert set(context["image_id"]) == expected and len(context) > 0
    truth = pd.read_csv(phantoms / "synth" / "truth.csv").set_index("image_id")
    for column in ("any", "subdural"):
        assert (context.set_index("image_id")[column] == truth.loc[context["image_id"], column]).all()


def test_series_unit_takes_whole_series_until_each_label_is_reached(phantoms, tmp_path):
    cfg = _cfg(phantoms, tmp_path, unit="series")
    index_step.run(cfg)
    table = pd.read_csv(sample_step.run(cfg))
    index = pd.read_parquet(tmp_path / "index.parquet").set_index("image_id")
    series = index.loc[table["image_id"], "series_id"]
    sizes = series.value_counts()
    assert (sizes == index.groupby("series_id").size()[sizes.index]).all()  # whole series only


def test_series_sample_by_hand():
    wide = pd.DataFrame({"image_id": [f"ID_{i}" for i in range(6)],
                         "any": [1, 1, 0, 0, 1, 0], "epidural": [1, 0, 0, 0, 0, 0],
                         "intraparenchymal": [0, 1, 0, 0, 1, 0], "intraventricular": 0,
                         "subarachnoid": 0, "subdural": 0})
    series = pd.Series(["A", "A", "B", "B", "C", np.nan])
    got = series_sample(wide, series, per_label=1, seed=0)
    # Epidural lives only in series A and the negatives only in B: whatever the seeded order,
    # both are taken whole; the row without a series never is.
    assert {"ID_0", "ID_1", "ID_2", "ID_3"} <= set(got["image_id"]) and "ID_5" not in set(got["image_id"])
    taken = set(series[wide["image_id"].isin(got["image_id"])])
    assert set(got["image_id"]) == set(wide["image_id"][series.isin(taken)])
