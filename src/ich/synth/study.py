"""One scan of a phantom patient: geometry, the stack of slices, their labels.

In: a `Head`, its lesions and look-alikes, a `Geometry` (image size, pixel spacing, head
placement, gantry tilt, which heights the slices cut) and a random generator for the image
noise. Out: a `Scan` with the int16 HU volume, a per-slice mask of the visible blood,
the slice labels; `Geometry` gives each slice's ImagePositionPatient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ich.constants import SUBTYPES
from ich.synth.anatomy import Grid, Head, make_grid, render
from ich.synth.lesions import MIN_AREA_MM2, Parenchymal

SLICE_GAP = 5.0                   # mm between slices, along the slice normal
HU_MIN, HU_MAX = -1024, 3071      # what a 12-bit, intercept -1024 file can hold
NONSQUARE = (464 / 512, 436 / 512, 408 / 512)  # shorter side of the odd RSNA sizes
# Thin bleeds last: subarachnoid blood in a sulcus stays visible beside a subdural.
PAINT_ORDER = ("epidural", "subdural", "intraparenchymal", "intraventricular", "subarachnoid")


@dataclass(frozen=True)
class Geometry:
    """Where a series' slices lie, in the image and in the patient."""

    rows: int
    cols: int
    spacing: float        # mm per pixel
    ox: float             # head centre offset in the image, mm
    oy: float
    yaw: float            # in-plane head rotation, rad
    tilt: float           # gantry tilt, rad (0 = straight axial)
    z0: float             # height of the first slice above the skull base, mm
    table: tuple          # patient-space point the image centre of slice 0 maps to, mm
    noise: float          # image noise, HU standard deviation

    @property
    def orientation(self) -> tuple[float, ...]:
        """ImageOrientationPatient: rows along x, columns tilted about x."""
        return (1.0, 0.0, 0.0, 0.0, math.cos(self.tilt), -math.sin(self.tilt))

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal (row direction x column direction)."""
        return np.array([0.0, math.sin(self.tilt), math.cos(self.tilt)])

    def position(self, k: int) -> tuple[float, float, float]:
        """ImagePositionPatient (centre of the first pixel) of slice k."""
        row = np.array(self.orientation[:3])
        col = np.array(self.orientation[3:])
        corner = (np.array(self.table) - (self.cols - 1) / 2 * self.spacing * row
                  - (self.rows - 1) / 2 * self.spacing * col)
        return tuple(float(x) for x in corner + k * SLICE_GAP * self.normal)


def sample_geometry(rng: np.random.Generator, head: Head, size: int, slices: int,
                    nonsquare: bool) -> Geometry:
    """Draw one series' geometry. The field of view (pixel spacing ~0.42-0.5 mm at 512 px,
    sometimes wider) always holds the head; the slices cover the head from near the skull
    base up, or a band of it when there are too few slices for the whole head."""
    rows = cols = size
    if nonsquare:
        short = 2 * round(size * NONSQUARE[int(rng.integers(len(NONSQUARE)))] / 2)
        if rng.random() < 0.5:
            cols = short
        else:
            rows = short
    ox, oy = rng.uniform(-8, 8), rng.uniform(-10, 10)
    need = 2 * (head.max_radius + max(abs(ox), abs(oy)) + 4)
    fov = rng.uniform(260, 330) if rng.random() < 0.08 else rng.uniform(215, 256)
    spacing = max(round(fov), math.ceil(need)) / min(rows, cols)
    tilt = math.radians(rng.uniform(4, 20)) if rng.random() < 0.45 else 0.0
    span = (slices - 1) * SLICE_GAP
    if span <= head.height:
        z0 = rng.uniform(-5, head.height - span + 5)
    else:
        z0 = -rng.uniform(0.3, 0.7) * (span - head.height)
    table = (rng.uniform(-5, 5), rng.uniform(-30, 30), rng.uniform(-40, 120))
    return Geometry(rows, cols, float(spacing), float(ox), float(oy),
                    math.radians(rng.uniform(-7, 7)), tilt, float(z0), table,
                    float(rng.uniform(2.5, 5.5)))


@dataclass
class Scan:
    """A rendered series: HU volume, subtype masks and labels per slice."""

    geometry: Geometry
    hu: np.ndarray            # int16 (S, rows, cols)
    masks: np.ndarray         # uint8 (S, rows, cols), 1 << i where blood of SUBTYPES[i] shows
    labels: np.ndarray        # uint8 (S, len(SUBTYPES))


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma,
                            borderType=cv2.BORDER_REFLECT)


def _noise(rng: np.random.Generator, shape, sd: float, sigma: float = 0.8) -> np.ndarray:
    """Correlated noise like CT's: white noise blurred, rescaled to standard deviation sd."""
    white = rng.standard_normal(shape, dtype=np.float32)
    ksize = 2 * math.ceil(4 * sigma) + 1
    k = cv2.getGaussianKernel(ksize, sigma).ravel()
    return _blur(white, sigma) * np.float32(sd / float((k ** 2).sum()))


def render_slice(head: Head, grid: Grid, lesions: list, mimics: list, z: float,
                 noise_sd: float, rng: np.random.Generator,
                 artifacts=None) -> tuple[np.ndarray, np.ndarray, list]:
    """One slice at z mm above the skull base: (int16 HU, uint8 mask holding 1 << i where
    the blood of SUBTYPES[i] shows, label list in SUBTYPES order). `artifacts`
    (ich.synth.hardness.Artifacts, None for the easy phantoms) adds holder, streaks and
    stronger, coarser noise."""
    hu, regions = render(head, grid, z / head.height, z)
    min_pixels = MIN_AREA_MM2 / grid.spacing ** 2
    drawn = []
    for lesion in lesions:
        m = lesion.mask(grid, regions, z)
        if m is not None and np.count_nonzero(m) >= min_pixels:
            drawn.append((lesion, m))
    drawn.sort(key=lambda item: PAINT_ORDER.index(item[0].kind))
    # Edema first, so the clot and other bleeds paint over it.
    for lesion, _ in drawn:
        if isinstance(lesion, Parenchymal):
            hu[lesion.edema_mask(grid, regions, z)] = head.white - 10.0
    # Where bleeds overlap the later one shows; labels count what is visible.
    owner = np.zeros(hu.shape, np.uint8)
    for lesion, m in drawn:
        hu[m] = lesion.hu
        owner[m] = 1 << SUBTYPES.index(lesion.kind)
    labels = [0] * len(SUBTYPES)
    for i in range(len(SUBTYPES)):
        if drawn and np.count_nonzero(owner == (1 << i)) >= min_pixels:
            labels[i] = 1
    for mimic in mimics:
        m = mimic.mask(grid, regions, z)
        if m is not None:
            hu[m] = mimic.hu
    sigma = 0.8
    if artifacts is not None:
        artifacts.apply(hu, grid, regions, head, z / head.height)
        noise_sd, sigma = noise_sd * artifacts.noise_scale, artifacts.noise_sigma
    # Partial-volume blur (~0.35 mm), then noise; air stays near -1000 and is clipped.
    hu = _blur(hu, max(0.5, 0.35 / grid.spacing))
    hu += _noise(rng, hu.shape, noise_sd, sigma)
    out = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
    return out, owner, labels


def render_scan(head: Head, lesions: list, mimics: list, geometry: Geometry, slices: int,
                rng: np.random.Generator, artifacts=None) -> Scan:
    """Render every slice of one series (slice 0 lowest); `artifacts` as in render_slice."""
    g = geometry
    grid = make_grid(head, g.rows, g.cols, g.spacing, g.ox, g.oy, g.yaw)
    hu = np.empty((slices, g.rows, g.cols), np.int16)
    masks = np.empty((slices, g.rows, g.cols), np.uint8)
    labels = np.zeros((slices, len(SUBTYPES)), np.uint8)
    for k in range(slices):
        z = g.z0 + k * SLICE_GAP
        hu[k], masks[k], labels[k] = render_slice(head, grid, lesions, mimics, z, g.noise, rng,
                                                        artifacts)
    return Scan(geometry, hu, masks, labels)
