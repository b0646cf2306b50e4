"""report.html: every section is there, every image is embedded, nothing points outside."""

import base64
import re

import numpy as np

from ich.constants import LABELS
from ich.evaluation import html
from ich.evaluation.metrics import evaluate_all, evaluate_table


def _report(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    y = np.zeros((n, 6), int)
    y[:, 1:] = rng.random((n, 5)) < 0.3
    y[:, 0] = y[:, 1:].max(axis=1)
    p = np.clip(0.4 * y + 0.6 * rng.random((n, 6)), 0, 1)
    groups = (np.arange(n) // 3).astype(str)
    thresholds = {label: 0.5 for label in LABELS}
    slices = evaluate_all(y, p, thresholds, groups=groups, bootstrap=100, seed=1)
    ys, ps = y[::3].astype(float), p[::3]
    ys[0, 1] = np.nan  # an unknown label in one study
    studies = evaluate_table(ys, ps, thresholds, groups[::3], bootstrap=100, seed=1)
    example = html.png_bytes(html.plot_confusion(html.Level("x", ["any"], ys[:, :1], ps[:, :1], groups[::3],
                                                             studies, 0, 0)))
    report = html.Report(
        title="Test <report>", test_set="60 test images",
        levels=[html.Level("test images", list(LABELS), y.astype(float), p, groups, slices, 100, 1),
                html.Level("studies", list(LABELS), ys, ps, groups[::3], studies, 100, 1)],
        model_card={"stage1": "EfficientNetV2B0 -> any", "thresholds": "any 0.500"},
        examples=[html.Example(example, "ID_1 any p=0.9")], notes=["a note"])
    return html.write_html(tmp_path / "report.html", report)


def test_every_section_and_every_image_embedded(tmp_path):
    text = _report(tmp_path).read_text()
    for section in html.SECTIONS:
        assert f'<section id="{section}">' in text, section
    assert html.DISCLAIMER in text and "Test &lt;report&gt;" in text
    sources = re.findall(r'<img[^>]*src="([^"]+)"', text)
    # ROC, PR, reliability and confusion per level (2 levels) and the Grad-CAM example.
    assert len(sources) == 4 * 2 + 1
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # Self-contained: no link, script, stylesheet or URL that needs the network.
    assert not re.search(r"(src|href)=\"(?!data:)", text)
    assert "<script" not in text and "http" not in text
    # The CI of the any ROC AUC is shown beside its value.
    assert re.search(r"<td>\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]</td>", text)
