"""ich.evaluation.inference: loading a saved cascade and the cascade probabilities."""

import json

import numpy as np
import pytest

from ich.constants import CASCADE_JSON, LABELS, STAGE2_MODEL
from ich.evaluation.inference import load_cascade, n_batches
from tiny_cascade import expected_probs, red_images, save_tiny_cascade


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return save_tiny_cascade(tmp_path_factory.mktemp("run"), image_size=16)


def test_conditional_stage_is_multiplied_by_its_given_label(run_dir):
    class Constant:  # a stage model that predicts fixed probabilities
        def __init__(self, values):
            self.values = np.asarray(values, dtype=np.float32)

        def predict_on_batch(self, x):
            return np.tile(self.values, (len(x), 1))

    cascade = load_cascade(run_dir)
    cascade.models = {"stage1": Constant([0.5]), "stage2": Constant([1.0, 0.5, 0.2, 0.0, 0.9])}
    out = cascade.predict_inputs(np.zeros((2, 16, 16, 3), np.float32))
    np.testing.assert_allclose(out, [[0.5, 0.5, 0.25, 0.1, 0.0, 0.45]] * 2, rtol=1e-6)


def test_stage_conditional_on_a_later_label_is_rejected(tmp_path):
    run = save_tiny_cascade(tmp_path / "run")
    meta = json.loads((run / CASCADE_JSON).read_text())
    meta["stages"].reverse()
    (run / CASCADE_JSON).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="no earlier stage"):
        load_cascade(run)


def test_predict_matches_hand_computed(run_dir):
    cascade = load_cascade(run_dir)
    images = red_images([0, 60, 128, 200, 255])
    probs = cascade.predict(images, batch_size=2)
    assert probs.shape == (5, len(LABELS)) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected_probs(images), atol=1e-5)
    assert (probs[:, 1:] <= probs[:, :1] + 1e-7).all()
    # Float input in [0, 1] and a different batch size give the same numbers.
    again = cascade.predict(images.astype(np.float32) / 255, batch_size=32)
    np.testing.assert_allclose(again, probs, atol=1e-6)


def test_predict_resizes_to_model_size(run_dir):
    cascade = load_cascade(run_dir)
    images = red_images([30, 220], size=40)  # the red channel is constant, so its mean survives resizing
    np.testing.assert_allclose(cascade.predict(images), expected_probs(images), atol=1e-5)


def test_predict_empty_and_bad_input(run_dir):
    cascade = load_cascade(run_dir)
    assert cascade.predict(np.zeros((0, 16, 16, 3), np.uint8)).shape == (0, 6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cascade.predict(np.full((1, 16, 16, 3), 255.0, np.float32))
    with pytest.raises(ValueError, match=r"\(N, S, S, 3\)"):
        cascade.predict(np.zeros((2, 16, 16), np.uint8))


def test_thresholds_and_size_from_json(run_dir):
    cascade = load_cascade(run_dir)
    assert cascade.image_size == 16
    assert cascade.thresholds == {label: 0.5 for label in LABELS}


def test_n_batches():
    assert [n_batches(n, 4) for n in (0, 1, 4, 5, 9)] == [0, 1, 1, 2, 3]


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=CASCADE_JSON):
        load_cascade(tmp_path)
    run = save_tiny_cascade(tmp_path / "run")
    (run / STAGE2_MODEL).unlink()
    with pytest.raises(FileNotFoundError, match=STAGE2_MODEL):
        load_cascade(run)


def test_wrong_label_order_rejected(tmp_path):
    run = save_tiny_cascade(tmp_path / "run", labels=list(reversed(LABELS)))
    with pytest.raises(ValueError, match="labels"):
        load_cascade(run)
    meta = json.loads((run / CASCADE_JSON).read_text())
    assert meta["labels"][0] == "subdural"
