"""ich.evaluation.report (plots + markdown) and ich.report_path."""

import json
import re

import numpy as np
import pandas as pd

from ich.constants import EVAL_DIR, LABELS, METRICS_JSON, REPORT_MD
from ich.evaluation.metrics import evaluate_all
from ich.evaluation.report import fmt, md_table, pick_examples, write_report
from ich.report_path import main as report_path_main


def _data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = np.zeros((n, 6), dtype=int)
    y[:, 1:] = rng.random((n, 5)) < 0.25
    y[:, 0] = y[:, 1:].max(axis=1)
    p = np.clip(0.4 * y + 0.6 * rng.random((n, 6)), 0, 1)
    y[:, 1] = 0  # no epidural in this test split: its AUCs are undefined
    return y, p


def _links(text):
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def test_report_files_links_and_numbers(tmp_path):
    y, p = _data()
    metrics = evaluate_all(y, p, {label: 0.5 for label in LABELS})
    history = tmp_path / "history"
    history.mkdir()
    pd.DataFrame({"epoch": [0, 1], "loss": [0.9, 0.6], "auc": [0.6, 0.7], "val_loss": [1.0, 0.8],
                  "val_auc": [0.5, 0.66]}).to_csv(history / "stage2_finetune.csv", index=False)
    images = np.random.default_rng(1).integers(0, 256, (4, 24, 24, 3)).astype(np.uint8)
    rows = pick_examples(y, 4, seed=0)
    out = write_report(tmp_path / "eval", metrics, y, p, history, images, [f"ID_{r}" for r in rows], rows,
                       data_counts={"test": {"images": len(y), "patients": 7}}, threshold_method="f1",
                       settings={"image size": "32 px"})
    assert out == tmp_path / "eval" / REPORT_MD
    text = out.read_text()
    links = _links(text)
    assert set(links) == {"roc.png", "pr.png", "confusion.png", "training.png", "examples.png"}
    for link in links:
        assert (out.parent / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = metrics["labels"]
    c = m["any"]["confusion"]
    assert (f"| any | {m['any']['roc_auc']:.3f} | {m['any']['pr_auc']:.3f} | 0.500 | "
            f"{m['any']['accuracy']:.3f} | {m['any']['precision']:.3f} | {m['any']['recall']:.3f} | "
            f"{m['any']['specificity']:.3f} | {m['any']['f1']:.3f} | {c['tp']} | {c['fp']} | "
            f"{c['fn']} | {c['tn']} | {m['any']['support']} |") in text
    assert "| epidural | n/a | n/a |" in text
    assert f"| RSNA weighted log loss | {metrics['overall']['rsna_weighted_log_loss']:.5f} |" in text
    assert "0.04383" in text and "Research use only" in text
    assert "maximum F1" in text and "| image size | 32 px |" in text
    assert "| stage2_finetune | 2 | 0.660 | 0.8000 |" in text


def test_report_without_history_or_examples(tmp_path):
    y, p = _data(seed=3)
    metrics = evaluate_all(y, p, {label: 0.4 for label in LABELS})
    out = write_report(tmp_path, metrics, y, p, history_dir=tmp_path / "absent")
    assert set(_links(out.read_text())) == {"roc.png", "pr.png", "confusion.png"}
    assert not (tmp_path / "training.png").exists()
    assert "No training history" in out.read_text()


def test_pick_examples_mixes_positives_and_negatives():
    y, _ = _data(n=40, seed=2)
    rows = pick_examples(y, 6, seed=0)
    assert len(rows) == len(set(rows)) == 6
    assert y[rows, 0].sum() == 3
    assert pick_examples(y, 6, seed=0) == rows
    assert pick_examples(y[:0], 6) == []


def test_md_table_and_fmt():
    assert md_table(["a", "b"], [["x", 1.5]]) == ["| a | b |", "|---|---:|", "| x | 1.5 |"]
    assert fmt(None) == "n/a" and fmt(0.12345) == "0.123"


def test_report_path_prints_path_and_auc(tmp_path, capsys):
    run = tmp_path / "run"
    (run / EVAL_DIR).mkdir(parents=True)
    (run / EVAL_DIR / REPORT_MD).write_text("# r\n")
    (run / EVAL_DIR / METRICS_JSON).write_text(json.dumps({"labels": {"any": {"roc_auc": 0.95312}}}))
    assert report_path_main(["--set", f"paths.run_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert out == f"Report: {(run / EVAL_DIR / REPORT_MD).resolve()}\nTest AUC (any): 0.953\n"
    assert report_path_main(["--set", f"paths.run_dir={tmp_path / 'none'}"]) == 2
    assert "ich evaluate" in capsys.readouterr().err
