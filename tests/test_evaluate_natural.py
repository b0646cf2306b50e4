"""Natural prevalence (ich.steps.evaluate_natural): every axial slice of the test patients,
from the header index and the source DICOMs, scored with the run's stages."""

import numpy as np
import pandas as pd
import pytest

from ich import config
from ich.constants import LABELS
from ich.data.dicom import read_hu
from ich.data.windowing import hu_to_rgb
from ich.errors import StepError
from ich.evaluation.inference import load_cascade
from ich.steps import index as index_step
from ich.steps import sample as sample_step
from ich.steps.evaluate_natural import natural_slices, score_natural
from ich.synth import generate
from tiny_cascade import expected_probs, expected_series, save_tiny_cascade

SIZE = 16
WINDOWS = [(80, 200), (40, 80), (600, 2800)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("natural")
    data = generate(root / "synth", patients=3, slices=5, seed=4, workers=1, size=64)
    cfg = config.load(None, [f"paths.labels_csv={data / 'stage_2_train.csv'}",
                             f"paths.dicom_dir={data / 'stage_2_train'}",
                             f"paths.work_dir={root / 'work'}", "index.workers=1"])
    index_step.run(cfg)
    sample_step.run(cfg)
    return cfg, root


def test_every_slice_of_the_chosen_patients_scored_by_series(work, tmp_path):
    cfg, root = work
    work_dir = root / "work"
    index = pd.read_parquet(work_dir / "index.parquet")
    patient = sorted(index["patient_id"].unique())[0]
    rows = natural_slices(work_dir, {patient})
    assert set(rows["patient_id"]) == {patient}
    assert len(rows) == (index["patient_id"] == patient).sum()   # synth writes axial slices only
    labels = pd.read_csv(work_dir / "labels.csv").set_index("image_id")
    np.testing.assert_array_equal(rows[list(LABELS)].to_numpy(), labels.loc[rows["image_id"], list(LABELS)].to_numpy())

    run = load_cascade(save_tiny_cascade(tmp_path / "run", image_size=SIZE, sequence=True))
    dicom_dir = cfg["paths"]["dicom_dir"]
    table, studies, failed = score_natural(run, rows, dicom_dir, batch_size=4, workers=1)
    assert failed == 0 and len(table) == len(rows)
    files = [f"{dicom_dir}/{f}" for f in rows["file"]]
    expected = expected_probs(np.stack([hu_to_rgb(read_hu(f)[0], WINDOWS, SIZE) for f in files]))
    np.testing.assert_allclose(table[[f"{l}_prob" for l in LABELS]].to_numpy(), expected, atol=1e-4)
    # One row per study; a study's probability is the sequence stage's over its series.
    assert sorted(studies["study_id"]) == sorted(rows["study_id"].unique())
    for _, study in studies.iterrows():
        in_study = (rows["study_id"] == study["study_id"]).to_numpy()
        assert study["n_slices"] == in_study.sum()
        np.testing.assert_allclose(study[list(LABELS)].to_numpy(float), expected_series(expected[in_study]), atol=1e-4)
        assert study["any_true"] == rows.loc[in_study, "any"].max()


def test_without_the_index_it_names_the_step(tmp_path):
    with pytest.raises(StepError, match="ich index"):
        natural_slices(tmp_path, {"ID_x"})
