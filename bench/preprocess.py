"""Benchmark: the preprocess step against a sequential notebook-style loop, same DICOMs, same run.

Data: phantom head CT slices at 512x512 with RSNA storage quirks, from ich.synth, or from
tests/alt_rsna.py where ich.synth is not importable. Baseline, one process, the way Kaggle
notebooks do it: pydicom.dcmread + pixel_array, slope/intercept (with the 12-bit fix), the
same three windows in float64, skimage.transform.resize, PIL PNG save. Step: ich.steps.preprocess
with workers=auto, end to end (worker start-up included). Each runs in its own subprocess;
prints images/s, peak RSS and the ratio. The step's peak RSS is its parent plus its workers
(each worker's peak is bounded by the largest one, from RUSAGE_CHILDREN).

    .venv/bin/python bench/preprocess.py [--images 200] [--size 512] [--image-size 256] [--workers auto]

Worker start-up (~0.5 s of imports per process) is a fixed cost: the speed-up grows with the
number of images (try --images 1000). On a busy machine, CPU ms/image is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PEAK_RSS = """
def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

BASELINE = PEAK_RSS + """
import json, sys, time, warnings
from pathlib import Path
import numpy as np, pydicom, skimage.transform
from PIL import Image
warnings.simplefilter("ignore")
files, out = sorted(Path(sys.argv[1]).glob("*.dcm")), Path(sys.argv[2])
size, windows = int(sys.argv[3]), json.loads(sys.argv[4])
t, ok = time.perf_counter(), 0
for f in files:
    try:
        ds = pydicom.dcmread(f)
        px = ds.pixel_array.astype(np.float64)
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        if ds.BitsStored == 12 and ds.PixelRepresentation == 0 and intercept > -100:
            px += 1000
            px[px >= 4096] -= 4096
            intercept = -1000
        hu = px * slope + intercept
        rgb = np.stack([np.clip((hu - (c - w / 2)) / w, 0, 1) for c, w in windows], axis=-1)
        rgb = skimage.transform.resize(rgb, (size, size), anti_aliasing=True)
        Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(out / f"{f.stem}.png")
        ok += 1
    except Exception:
        pass
print(json.dumps({"seconds": time.perf_counter() - t, "ok": ok, "rss_mb": peak_rss_mb()}))
"""

STEP = PEAK_RSS + """
import json, logging, resource, sys, time
from ich import config
from ich.steps import preprocess
logging.basicConfig(level=logging.WARNING)
cfg = config.load(None, [f"paths.work_dir={sys.argv[1]}", f"preprocess.image_size={sys.argv[2]}",
                         f"preprocess.workers={sys.argv[3]}"])
t = time.perf_counter()
preprocess.run(cfg, force=True)
seconds = time.perf_counter() - t
ok = sum(1 for _ in open(preprocess.Path(sys.argv[1]) / "images.csv")) - 1
workers = config.resolve_workers(cfg["preprocess"]["workers"])
child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "ok": ok, "rss_mb": peak_rss_mb(), "worker_rss_mb": child,
                  "workers": workers}))
"""


def make_dicoms(root: Path, n_images: int, size: int) -> tuple[Path, str]:
    """Write about n_images phantom slices; return their folder and the generator used."""
    slices = 20
    patients = max(1, -(-n_images // slices))
    try:
        from ich.synth import generate
    except ImportError:
        sys.path.insert(0, str(REPO / "tests"))
        from alt_rsna import write_alt_rsna

        truth = write_alt_rsna(root, n_patients=patients, slices=slices, size=size)
        return truth["dicom_dir"], "tests/alt_rsna.py"
    generate(root, patients=patients, slices=slices, seed=0, size=size)
    return root / "stage_2_train", "ich.synth"


def run_python(code: str, *args: str) -> dict:
    """Run `code` in a fresh interpreter; return the JSON it prints last plus its wall time."""
    start, cpu_before = time.perf_counter(), _children_cpu()
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, check=False)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu_before
    if done.returncode != 0:
        raise SystemExit(f"benchmark subprocess failed:\n{done.stderr}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), process_seconds=wall, cpu_seconds=cpu)


def _children_cpu() -> float:
    """User + system CPU seconds of finished child processes (and theirs): robust to a busy machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    """Make the DICOMs, run both pipelines on them, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512, help="DICOM side in pixels")
    parser.add_argument("--image-size", type=int, default=256, help="output PNG side")
    parser.add_argument("--workers", default="auto")
    args = parser.parse_args()
    from machine import describe  # bench/machine.py, beside this script

    print(describe(), flush=True)

    from ich import config

    cfg = config.load(None, [])
    windows = [cfg["preprocess"]["windows"][name] for name in cfg["preprocess"]["channels"]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source, generator = make_dicoms(tmp / "data", args.images, args.size)
        files = sorted(source.glob("*.dcm"))[:args.images]
        work = tmp / "work"
        (work / "dicom").mkdir(parents=True)
        for f in files:
            (work / "dicom" / f.name).symlink_to(f)
        (tmp / "baseline").mkdir()
        base = run_python(BASELINE, work / "dicom", tmp / "baseline", args.image_size, json.dumps(windows))
        step = run_python(STEP, work, args.image_size, args.workers)
    print(f"{len(files)} DICOMs {args.size}x{args.size} ({generator}) -> {args.image_size}px RGB PNG; "
          f"{step['workers']} workers")
    report(len(files), base, step)


def report(n: int, base: dict, step: dict) -> None:
    """Print seconds, images/s, CPU per image and peak RSS side by side, and the ratios."""
    step_total = step["rss_mb"] + step["workers"] * step["worker_rss_mb"]
    print("loop: the conversion alone (the step's run(), worker start-up included); process: the "
          "whole command, interpreter and imports included; CPU: all processes, whole command")
    print(f"{'':22}{'loop s':>8}{'img/s':>8}{'process s':>11}{'img/s':>8}{'CPU ms/img':>12}{'ok':>6}"
          "   peak RSS")
    for name, r, rss in (("notebook (1 process)", base, f"{base['rss_mb']:.0f} MB"),
                         ("ich preprocess", step,
                          f"{step['rss_mb']:.0f} MB parent + {step['workers']} x <= "
                          f"{step['worker_rss_mb']:.0f} MB workers (<= {step_total:.0f} MB)")):
        print(f"{name:22}{r['seconds']:8.2f}{n / r['seconds']:8.1f}{r['process_seconds']:11.2f}"
              f"{n / r['process_seconds']:8.1f}{r['cpu_seconds'] / n * 1000:12.1f}{r['ok']:6d}   {rss}")
    print(f"speed-up: {base['seconds'] / step['seconds']:.1f}x (loop), "
          f"{base['process_seconds'] / step['process_seconds']:.1f}x (process), "
          f"{base['cpu_seconds'] / step['cpu_seconds']:.1f}x less CPU per image")


if __name__ == "__main__":
    main()
