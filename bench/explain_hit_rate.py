"""Benchmark: how often the Grad-CAM peak falls inside the drawn blood, against a random point,
on `ich synth --masks` phantoms (the baseline in the same run).

    .venv/bin/python bench/explain_hit_rate.py                        # hand-weighted blood detector
    .venv/bin/python bench/explain_hit_rate.py --model runs/demo      # a trained run's stage 1
    .venv/bin/python bench/explain_hit_rate.py --model runs/demo --patients 40 --labels any subdural

Prints, over the slices positive for each label: the hit rate of the heatmap peak, the expected
hit rate of a point drawn uniformly in the image and inside the head, their ratio, and the
median distance from the peak to the nearest blood pixel. The
detector (tests/blood_detector.py) is a pooled-then-dense model with hand-set weights that
responds to blood brightness away from bone; with --model the run's own stages are explained
(`any` by stage 1, a subtype by stage 2; the phantoms get the run's windows, image size and
neighbouring slices). With --model every feature stride of --strides is measured twice on the
same cell maps: cells placed at their receptive-field centres (what ich does,
ich.evaluation.feature_maps) and placed as a plain image resize would (cell i in the middle of
its block of `stride` pixels: what ich did before), so each change is measured on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
BATCH = 16


def main() -> None:
    """Parse the arguments, make the phantoms, explain and print the hit rates."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="run directory (default: the hand-weighted blood detector)")
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--size", type=int, default=128, help="phantom image side (px)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--labels", nargs="+", default=["any"], help="labels to explain (--model only)")
    parser.add_argument("--strides", nargs="+", type=int, default=[32, 16, 8],
                        help="feature strides to compare (explain.feature_stride; --model only)")
    args = parser.parse_args()
    # RSNA's (and ich synth's) "ID_..." UIDs are not valid UIs: pydicom warns once per file read.
    warnings.filterwarnings("ignore", message="Invalid value for VR UI")
    from machine import describe  # bench/machine.py, beside this script

    print(describe(), flush=True)

    from blood_detector import build_blood_detector, lesion_slices

    from ich.evaluation import explain
    from ich.synth import generate

    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "synth", patients=args.patients, slices=args.slices, seed=args.seed,
                        workers=1, size=args.size, masks=True)
        if not args.model:
            images, masks, heads, _ = lesion_slices(root, args.size)
            heats = explain.gradcam(build_blood_detector(args.size), images, 0)
            print(f"Grad-CAM of any, the hand-weighted blood detector, {_counted(masks)} at {args.size} px "
                  f"({args.patients} phantom patients, seed {args.seed}):")
            _print_rates(None, None, masks, heads)
            _print_rates("Grad-CAM", heats, masks, heads)
            return
        from ich.evaluation.cascade_file import to_model_input
        from ich.evaluation.inference import load_cascade
        from ich.steps.explain import label_output

        cascade = load_cascade(Path(args.model))
        size = cascade.image_size
        for label in args.labels:
            images, masks, heads, ids = lesion_slices(root, size, label)
            if not len(images):
                print(f"{label}: no positive phantom slice")
                continue
            x = to_model_input(context_inputs(root, ids, cascade.spec, size), size)
            model, column = label_output(cascade, label)
            print(f"Grad-CAM of {label} ({model.name} of {args.model}, input offsets {list(cascade.spec.offsets)}), "
                  f"{_counted(masks)} at {size} px ({args.patients} phantom patients, seed {args.seed}):")
            _print_rates(None, None, masks, heads)
            for stride in args.strides:
                for way, heats in placements(model, x, column, stride).items():
                    _print_rates(way, heats, masks, heads)


def placements(model, x, column: int, stride: int) -> dict:
    """{description: heatmaps (N, S, S)} of output `column` at `stride`, from one set of cell
    maps: placed at the receptive-field centres, and as a plain image resize would place them."""
    import numpy as np

    from ich.evaluation import explain, feature_maps

    chosen = feature_maps.targets(model, stride)
    cams = [explain.cell_maps(model, x[k:k + BATCH], column, chosen) for k in range(0, len(x), BATCH)]
    cams = [np.concatenate(per_target) for per_target in zip(*cams)]
    side = x.shape[1]
    out = {}
    for way in ("centres", "resize"):
        heat = 0.0
        for target, cam in zip(chosen, cams):
            if way == "resize":   # cv2.resize's half-pixel mapping: cell i centred on s i + s / 2 - 0.5
                axes = [feature_maps.Axis(side / n, side / n / 2 - 0.5) for n in cam.shape[1:3]]
                target = dataclasses.replace(target, rows=axes[0], cols=axes[1])
            heat = heat + explain.place(cam, target, x.shape[1:3])
        cells = "+".join(f"{c.shape[1]}x{c.shape[2]}" for c in cams)
        out[f"stride {stride} ({cells} cells), {way}"] = explain.normalise(heat)
    return out


def _counted(masks) -> str:
    """'N positive slices, L lesions' (a lesion: one connected region of a slice's mask)."""
    import cv2
    import numpy as np

    lesions = sum(cv2.connectedComponents(m.astype(np.uint8))[0] - 1 for m in masks)
    return f"{len(masks)} positive slices ({lesions} lesions)"


def _print_rates(what, heats, masks, heads) -> None:
    """One line: the hit rate of `heats` (or, with what None, the random baselines)."""
    from ich.evaluation import explain

    if what is None:
        print(f"  random point: in the image {explain.random_hit_rate(masks):.3f}, "
              f"inside the head {explain.random_hit_rate(masks, heads):.3f}")
        return
    hit = explain.hit_rate(heats, masks)
    in_head = explain.random_hit_rate(masks, heads)
    print(f"  {what}: peak inside the blood {hit:.3f} (x{hit / max(in_head, 1e-12):.1f} a random point in the head), "
          f"median {_median_distance(heats, masks):.1f} px from it", flush=True)


def _median_distance(heats, masks) -> float:
    """Median over slices of the distance (px) from the heatmap peak to the nearest blood pixel."""
    import numpy as np

    from ich.evaluation import explain

    return float(np.median([np.sqrt(((np.argwhere(m) - explain.peak(h)) ** 2).sum(axis=1)).min()
                            for h, m in zip(heats, masks)]))


def context_inputs(root: Path, ids: list[str], spec, size: int):
    """Model inputs of the slices `ids` with their neighbours at the model's slice offsets,
    found as ich finds them (series and position from the headers; the edge slice repeats)."""
    import numpy as np
    import pydicom

    from blood_detector import WINDOWS
    from ich.data.dicom import read_hu
    from ich.data.inputs import neighbour_rows
    from ich.data.windowing import hu_to_rgb

    paths = sorted((root / "stage_2_train").glob("*.dcm"))
    with warnings.catch_warnings():   # RSNA's (and ich synth's) "ID_..." UIDs are not valid UIs
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
        headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    where = {path.stem: k for k, path in enumerate(paths)}
    rows = neighbour_rows([h.SeriesInstanceUID for h in headers],
                          [float(h.ImagePositionPatient[2]) for h in headers], spec.offsets)
    needed = sorted({int(r) for image_id in ids for r in rows[where[image_id]]})
    slot = {r: k for k, r in enumerate(needed)}
    slices = np.stack([hu_to_rgb(read_hu(paths[r])[0], WINDOWS, size) for r in needed])
    index = np.array([[slot[int(r)] for r in rows[where[image_id]]] for image_id in ids])
    return spec.gather(slices, index)


if __name__ == "__main__":
    main()
