"""The report figures' fixed layout: every label inside the picture, no panel over another."""

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from ich.constants import LABELS
from ich.evaluation import html, report
from ich.evaluation.figures import panel_grid
from ich.evaluation.metrics import evaluate_table


def _level(n_labels: int):
    rng = np.random.default_rng(3)
    y = (rng.random((48, 6)) < 0.35).astype(float)
    y[:, 0] = y[:, 1:].max(axis=1)
    p = np.clip(0.4 * y + 0.6 * rng.random((48, 6)), 0, 1)
    labels = list(LABELS)[:n_labels]
    groups = np.arange(48) // 4
    metrics = evaluate_table(y[:, :n_labels], p[:, :n_labels], {k: 0.5 for k in labels}, groups,
                             labels=labels, bootstrap=20, seed=0)
    return html.Level("slices", labels, y[:, :n_labels], p[:, :n_labels], groups, metrics, 20, 0)


def _boxes(fig):
    """(figure box, [(axes, box of the axes with its labels and title)]) in display pixels."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    return fig.bbox, renderer, [(ax, ax.get_tightbbox(renderer)) for ax in fig.axes if ax.axison]


def _check(fig):
    canvas, renderer, panels = _boxes(fig)
    title = fig._suptitle.get_window_extent(renderer)
    for box in [title] + [b for _, b in panels]:
        assert box.x0 >= canvas.x0 - 1 and box.x1 <= canvas.x1 + 1, (box, canvas)
        assert box.y0 >= canvas.y0 - 1 and box.y1 <= canvas.y1 + 1, (box, canvas)
    for i, (_, a) in enumerate(panels):
        assert not a.overlaps(title), "a panel runs into the figure title"
        for _, b in panels[i + 1:]:
            # Touching edges are fine; a label inside the next panel is not.
            overlap_x = min(a.x1, b.x1) - max(a.x0, b.x0)
            overlap_y = min(a.y1, b.y1) - max(a.y0, b.y0)
            assert overlap_x <= 2 or overlap_y <= 2, (a, b)


@pytest.mark.parametrize("n_labels", [1, 2, 6])
def test_html_figures_fit_for_any_number_of_labels(n_labels):
    level = _level(n_labels)
    for fig in (html.plot_curves(level, "roc"), html.plot_curves(level, "pr"),
                html.plot_reliability(level), html.plot_confusion(level)):
        assert fig.get_layout_engine() is None  # laid out once, not at every draw
        _check(fig)


def test_markdown_report_figures_fit():
    level = _level(6)
    for fig in (report.plot_roc(level.y_true, level.y_prob, level.metrics),
                report.plot_pr(level.y_true, level.y_prob, level.metrics),
                report.plot_confusion(level.metrics)):
        _check(fig)


def test_panel_grid_sizes_the_figure_from_its_panels():
    fig, axes = panel_grid(2, 3, (3.0, 2.5), "t")
    width, height = fig.get_size_inches()
    # 0.7 + 0.3 around, two 0.75 gaps; 0.6 + 0.65 around, one 0.8 gap.
    assert width == pytest.approx(0.7 + 0.3 + 3 * 3.0 + 2 * 0.75)
    assert height == pytest.approx(0.6 + 0.65 + 2 * 2.5 + 0.8)
    first = axes[0].get_position()
    assert first.width * width == pytest.approx(3.0)
    assert first.height * height == pytest.approx(2.5)
    assert len(axes) == 6


def test_report_figures_bench_baseline_is_laid_out_by_matplotlib():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import report_figures

    level = _level(6)
    fixed, baseline = report_figures.figures(level), report_figures.figures(level)
    assert len(fixed) == 7 and [cropped for _, cropped in fixed].count(True) == 3
    assert report_figures.draw_all(fixed, constrained=False) > 0
    assert report_figures.draw_all(baseline, constrained=True) > 0
    # The constrained layout moved the panels (the baseline is not the fixed layout timed twice).
    first = fixed[0][0].axes[0].get_position().bounds
    moved = baseline[0][0].axes[0].get_position().bounds
    assert first != pytest.approx(moved, abs=1e-3)
