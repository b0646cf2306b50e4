"""Grids of plot panels with a fixed layout, for the evaluation reports (report.md, report.html).

Matplotlib's constrained layout measures every tick label of every panel at each draw, and
`bbox_inches="tight"` draws the figure once more to crop it: on a 2-core machine that was over
half of `ich evaluate` (21 six-panel figures, ~1 s each). The panels here all carry the same
furniture (a title, tick labels, an axis label on each side), so margins fixed in inches fit
them at any grid size, and a figure is drawn once.
"""

from __future__ import annotations

from matplotlib.figure import Figure

# Inches around and between panels: left holds the y tick labels and y label, bottom the x
# tick labels and x label, top the figure title; a gap holds the next panel's labels and title.
LEFT, RIGHT, BOTTOM, TOP = 0.7, 0.3, 0.6, 0.65
GAP_X, GAP_Y = 0.75, 0.8


def panel_grid(rows: int, cols: int, panel: tuple[float, float], title: str,
               title_size: float = 12) -> tuple[Figure, list]:
    """A figure of rows x cols panels, each `panel` (width, height) inches, under `title`.

    Out: (figure, its axes row by row). The figure has no layout engine: save it without
    bbox_inches="tight" (ich.evaluation.report.save_png knows).
    """
    width = LEFT + RIGHT + cols * panel[0] + (cols - 1) * GAP_X
    height = BOTTOM + TOP + rows * panel[1] + (rows - 1) * GAP_Y
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=LEFT / width, right=1 - RIGHT / width,
                        bottom=BOTTOM / height, top=1 - TOP / height,
                        wspace=GAP_X / panel[0], hspace=GAP_Y / panel[1])
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    fig.suptitle(title, fontsize=title_size, y=1 - 0.2 / height, va="top")
    return fig, axes
