"""Steps 1, 2 and 4 through the CLI on hand-made inputs: outputs, resume, missing files, errors."""

import os

import pandas as pd
import pytest
import yaml

from ich.cli import main
from ich.constants import LABELS, RSNA_ORDER

N_IMAGES = 30


@pytest.fixture
def dataset(tmp_path):
    """An RSNA-format folder: 30 images of 10 patients, 2 listed without files, 1 duplicated."""
    src = tmp_path / "rsna" / "stage_2_train"
    src.mkdir(parents=True)
    lines, images = ["ID,Label"], []
    for k in range(N_IMAGES):
        image_id = f"ID_{k:09x}"
        subtype = RSNA_ORDER[k % 5] if k % 3 else None
        labs = {s: int(s == subtype) for s in RSNA_ORDER[:5]}
        labs["any"] = int(subtype is not None)
        lines += [f"{image_id}_{s},{labs[s]}" for s in RSNA_ORDER]
        if k < 28:
            (src / f"{image_id}.dcm").write_bytes(b"x" * (100 + k))
        images.append({"image_id": image_id, "patient_id": f"ID_p{k % 10}", "study_id": f"ID_s{k % 10}"})
    lines += lines[1:7]  # a duplicated image block, as in the real file
    (tmp_path / "rsna" / "stage_2_train.csv").write_text("\n".join(lines) + "\n")
    cfg = {"paths": {"labels_csv": str(tmp_path / "rsna" / "stage_2_train.csv"), "dicom_dir": str(src),
                     "work_dir": str(tmp_path / "work"), "run_dir": str(tmp_path / "run")},
           "sample": {"per_label": 4, "exclude_ids": []}, "copy": {"workers": 4}}
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return tmp_path, config, pd.DataFrame(images)


def test_sample_copy_split(dataset, caplog):
    root, config, images = dataset
    work = root / "work"
    assert main(["sample", "--config", str(config)]) == 0
    labels = pd.read_csv(work / "labels.csv")
    assert len(labels) == N_IMAGES and list(labels.columns) == ["image_id", *LABELS]
    sampled = pd.read_csv(work / "sampled.csv")
    assert sampled["any"].eq(0).sum() == 4 and len(sampled) == 24  # 4 per subtype + 4 negatives
    assert (work / "config.resolved.yaml").is_file()

    assert main(["copy", "--config", str(config)]) == 0
    copied = sorted(p.name for p in (work / "dicom").iterdir())
    missing = pd.read_csv(work / "missing.csv")
    expected_missing = {"ID_00000001c", "ID_00000001d"} & set(sampled.image_id)
    assert set(missing.image_id) == expected_missing
    assert all("no file" in r for r in missing.reason)
    assert len(copied) == len(sampled) - len(expected_missing)
    first = work / "dicom" / copied[0]
    assert first.read_bytes() == (root / "rsna" / "stage_2_train" / copied[0]).read_bytes()

    # Resume: a truncated copy is redone, complete copies are left alone.
    first.write_bytes(b"x")
    mtime = (work / "dicom" / copied[1]).stat().st_mtime_ns
    assert main(["copy", "--config", str(config), "--force"]) == 0
    assert first.stat().st_size > 1
    assert (work / "dicom" / copied[1]).stat().st_mtime_ns == mtime

    # Preprocess's manifest, written by hand here: the copied images.
    kept = images[images.image_id.isin([c[:-4] for c in copied])]
    kept.assign(path=lambda d: "png/" + d.image_id + ".png").to_csv(work / "images.csv", index=False)
    assert main(["split", "--config", str(config)]) == 0
    splits = pd.read_csv(work / "splits.csv")
    assert set(splits.image_id) == set(kept.image_id)
    assert set(splits.split) == {"train", "val", "test"}
    assert splits.groupby("patient_id").split.nunique().max() == 1
    assert list(splits.columns[:3]) == ["image_id", "split", "patient_id"]

    caplog.clear()
    assert main(["split", "--config", str(config)]) == 0
    assert "up to date" in caplog.text


@pytest.mark.parametrize("mode", ["hardlink", "symlink"])
def test_copy_link_modes(dataset, mode):
    root, config, _ = dataset
    assert main(["sample", "--config", str(config)]) == 0
    assert main(["copy", "--config", str(config), "--set", f"copy.mode={mode}"]) == 0
    some = next((root / "work" / "dicom").iterdir())
    if mode == "symlink":
        assert some.is_symlink()
    else:
        assert os.stat(some).st_nlink == 2
    # Second run skips every file.
    assert main(["copy", "--config", str(config), "--set", f"copy.mode={mode}", "--force"]) == 0


def test_changed_config_reruns_sample(dataset):
    root, config, _ = dataset
    assert main(["sample", "--config", str(config)]) == 0
    assert main(["sample", "--config", str(config), "--set", "sample.per_label=2"]) == 0
    assert len(pd.read_csv(root / "work" / "sampled.csv")) == 12


def test_errors_are_clear_and_nonzero(dataset, caplog):
    root, config, _ = dataset
    assert main(["copy", "--config", str(config)]) == 2
    assert "run `ich sample` first" in caplog.text
    assert main(["sample", "--config", str(config), "--set", "paths.labels_csv=/nope.csv"]) == 2
    assert "/nope.csv not found" in caplog.text
    assert main(["sample", "--config", str(config), "--set", "sampel.x=1"]) == 2
    assert "unknown key" in caplog.text
    (root / "rsna" / "stage_2_train.csv").write_text("ID,Label\nID_0a_any,1\nID_0a_any,0\n")
    assert main(["sample", "--config", str(config)]) == 2
    assert "conflicting" in caplog.text
