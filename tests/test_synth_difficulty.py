"""ich synth --difficulty and --masks: easy is the original set, hard is harder, masks match labels."""

import cv2
import numpy as np
import pandas as pd
import pytest

from ich.data.dicom import read_hu
from ich.errors import StepError
from ich.synth import generate
from ich.synth.hardness import parse_difficulty


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("difficulty")
    generate(root / "default", patients=4, slices=6, seed=3, workers=1, size=64)
    generate(root / "easy", patients=4, slices=6, seed=3, workers=1, size=64, difficulty="easy")
    generate(root / "hard", patients=4, slices=6, seed=3, workers=1, size=64, difficulty=1.0, masks=True)
    return root


def test_easy_is_the_original_set_byte_for_byte(sets):
    default = sorted((sets / "default" / "stage_2_train").glob("*.dcm"))
    easy = sorted((sets / "easy" / "stage_2_train").glob("*.dcm"))
    assert [f.name for f in default] == [f.name for f in easy]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(default, easy))


def test_masks_match_the_labels(sets):
    truth = pd.read_csv(sets / "hard" / "truth.csv")
    for row in truth.itertuples():
        mask = cv2.imread(str(sets / "hard" / "masks" / f"{row.image_id}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and mask.shape == (row.rows, row.columns)
        assert int(mask.max()) < 2 ** 5  # one bit per subtype
        # Every drawn bleed carries a label, every label a drawn bleed.
        assert bool(mask.any()) == bool(row.any), row.image_id


def test_difficulty_names_and_range():
    assert parse_difficulty("hard") == 1.0 and parse_difficulty("0.25") == 0.25
    with pytest.raises(ValueError, match="must lie in"):
        parse_difficulty(2)
    with pytest.raises(StepError, match="difficulty"):
        generate("/nonexistent-never-written", patients=1, slices=1, seed=0, difficulty="extreme")
