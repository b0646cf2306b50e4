"""Benchmark: how often the Grad-CAM peak of `any` falls inside the drawn blood, against a
random point, on `ich synth --masks` phantoms (the baseline in the same run).

    .venv/bin/python bench/explain_hit_rate.py                        # hand-weighted blood detector
    .venv/bin/python bench/explain_hit_rate.py --model runs/demo      # a trained run's stage 1
    .venv/bin/python bench/explain_hit_rate.py --patients 30 --size 128

Prints, over the any-positive slices: the hit rate of the heatmap peak, the expected hit rate
of a point drawn uniformly in the image and inside the head, and their ratio. The detector
(tests/blood_detector.py) is a pooled-then-dense model with hand-set weights that responds to
blood brightness away from bone; with --model the run's own stage 1 is explained (the phantoms
get its windows and image size).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    """Parse the arguments, make the phantoms, explain and print the hit rates."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="run directory (default: the hand-weighted blood detector)")
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--size", type=int, default=128, help="phantom image side (px)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    from machine import describe  # bench/machine.py, beside this script

    print(describe(), flush=True)

    from blood_detector import build_blood_detector, lesion_slices

    from ich.evaluation import explain
    from ich.synth import generate

    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "synth", patients=args.patients, slices=args.slices, seed=args.seed,
                        workers=1, size=args.size, masks=True)
        if args.model:
            from ich.evaluation.inference import load_cascade

            cascade = load_cascade(Path(args.model))
            size = cascade.image_size
            images, masks, heads, ids = lesion_slices(root, size)
            from ich.steps.explain import label_heatmaps

            heats = label_heatmaps(cascade, context_inputs(root, ids, cascade.spec, size), "any")
            what = f"stage 1 of {args.model} (input offsets {list(cascade.spec.offsets)})"
        else:
            size = args.size
            images, masks, heads, _ = lesion_slices(root, size)
            heats = explain.gradcam(build_blood_detector(size), images, 0)
            what = "the hand-weighted blood detector"
    hit = explain.hit_rate(heats, masks)
    uniform = explain.random_hit_rate(masks)
    in_head = explain.random_hit_rate(masks, heads)
    print(f"Grad-CAM of any, {what}, {len(images)} positive slices at {size} px "
          f"({args.patients} phantom patients, seed {args.seed}):")
    print(f"  peak inside the blood: {hit:.3f}")
    print(f"  random point in the image: {uniform:.3f} (x{hit / max(uniform, 1e-12):.0f}); "
          f"inside the head: {in_head:.3f} (x{hit / max(in_head, 1e-12):.1f})")


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
