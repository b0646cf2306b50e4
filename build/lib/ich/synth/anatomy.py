"""Phantom head anatomy: HU images of axial slices through a parametric head.

In: a `Head` (one patient's shape and tissue values), a `Grid` (the pixel coordinates of one
series in the head's own frame) and a height `t` (0 = skull base, 1 = vertex). Out: a float32
HU image of that slice and the `Regions` the lesions are drawn into.

Head frame, in mm: u runs left-right, v front-to-back (+v = posterior, the bottom of the
image), both centred on the head; theta = atan2(v, u). Every structure is a closed-form mask
on these coordinates, so a slice is a few dozen vectorised array operations and neighbouring
slices change smoothly with t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

AIR = -1000.0
# Below this height the skull base (petrous bones, clivus, sinuses) takes over.
BASE_TOP = 0.28
# Vertical profile of the head's cross-section: widest at HEAD_T, closing just above t = 1.
HEAD_T, HEAD_HALF = 0.35, 0.70
# Deep structures in the head frame for an average head (a = 71 mm, b = 88 mm):
# (u, v, semi_u, semi_v, rotation rad, t centre, t half-range). Mirrored where u != 0.
VENTRICLES = {
    "frontal_horn": (6.0, -18.0, 3.5, 10.0, 0.25, 0.47, 0.11),
    "body": (11.0, 6.0, 4.5, 16.0, -0.15, 0.56, 0.12),
    "atrium": (15.0, 26.0, 5.5, 9.0, -0.30, 0.45, 0.09),
    "temporal_horn": (27.0, -4.0, 2.2, 7.0, 0.0, 0.24, 0.06),
    "third": (0.0, 0.0, 1.6, 10.0, 0.0, 0.36, 0.08),
    "fourth": (0.0, 24.0, 6.0, 3.5, 0.0, 0.15, 0.07),
}
DEEP_GREY = {
    "lentiform": (19.0, -3.0, 5.0, 11.0, 0.35, 0.40, 0.10),
    "thalamus": (8.0, 12.0, 6.5, 9.0, 0.0, 0.36, 0.08),
}
BRAINSTEM = (0.0, 8.0, 12.0, 11.0, 0.0, 0.13, 0.17)
SUPRASELLAR = (0.0, -12.0, 10.0, 10.0, 0.0, 0.24, 0.06)
SYLVIAN = ((14.0, -12.0), (48.0, -2.0), 0.32, 0.10)  # segment ends (u, v), t centre, t half
# Where calcifications (hemorrhage look-alikes) sit: (u, v, t).
LANDMARKS = {
    "pineal": (0.0, 18.0, 0.38),
    "choroid_plexus": (15.0, 26.0, 0.46),
    "basal_ganglia": (19.0, -3.0, 0.40),
}


@dataclass(frozen=True)
class Head:
    """One patient's head: outline, layer thicknesses (mm), folding pattern and tissue HU."""

    a: float                      # left-right outer semi-axis at the widest level
    b: float                      # front-back outer semi-axis
    harmonics: tuple              # ((k, amplitude, phase), ...) bumps of the outline
    height: float                 # skull base to vertex
    scalp: float
    skull: float
    csf_layer: float              # subarachnoid space between skull and brain
    cortex: float
    ventricle_scale: float
    sulci: int                    # sulci around the circumference
    sulcus_width: float
    sulcus_depth: float
    sulcus_seed: float
    sulcus_wobble: float
    fissure_width: float
    grey: float
    white: float
    csf: float
    soft: float
    fat: float
    diploe: float
    cortical: float
    falx: float

    @property
    def ku(self) -> float:
        """Left-right scale of the deep structures against the average head."""
        return self.a / 71.0

    @property
    def kv(self) -> float:
        """Front-back scale of the deep structures against the average head."""
        return self.b / 88.0

    @property
    def max_radius(self) -> float:
        """Largest outer radius in any direction (mm), for sizing the field of view."""
        return max(self.a, self.b) * (1.0 + sum(abs(amp) for _, amp, _ in self.harmonics))


def sample_head(rng: np.random.Generator) -> Head:
    """Draw one patient's head: size, shape and tissue values vary between patients."""
    harmonics = tuple((k, float(rng.uniform(-1, 1) * amp), float(rng.uniform(0, 2 * math.pi)))
                      for k, amp in ((1, 0.03), (2, 0.015), (3, 0.02), (4, 0.012), (5, 0.008)))
    grey = rng.uniform(37, 44)
    return Head(
        a=float(rng.uniform(65, 75)), b=float(rng.uniform(81, 92)), harmonics=harmonics,
        height=float(rng.uniform(118, 138)), scalp=float(rng.uniform(3.5, 7.0)),
        skull=float(rng.uniform(5.0, 8.0)), csf_layer=float(rng.uniform(0.8, 2.4)),
        cortex=float(rng.uniform(2.3, 3.3)), ventricle_scale=float(rng.uniform(0.75, 1.5)),
        sulci=int(rng.integers(30, 42)), sulcus_width=float(rng.uniform(1.0, 2.0)),
        sulcus_depth=float(rng.uniform(10, 17)), sulcus_seed=float(rng.uniform(0, 100)),
        sulcus_wobble=float(rng.uniform(1.5, 3.0)), fissure_width=float(rng.uniform(1.2, 2.4)),
        grey=float(grey), white=float(grey - rng.uniform(9, 14)), csf=float(rng.uniform(2, 12)),
        soft=float(rng.uniform(30, 55)), fat=float(rng.uniform(-100, -70)),
        diploe=float(rng.uniform(600, 900)), cortical=float(rng.uniform(1300, 1650)),
        falx=float(rng.uniform(42, 52)),
    )


@dataclass(frozen=True)
class Grid:
    """Pixel coordinates of one series in the head frame, shared by all its slices."""

    rows: int
    cols: int
    spacing: float                # mm per pixel
    ox: float                     # head centre in the image, mm right of the image centre
    oy: float                     # ... and mm below it
    yaw: float                    # in-plane rotation of the head, rad
    u: np.ndarray
    v: np.ndarray
    rho: np.ndarray
    theta: np.ndarray
    radius: np.ndarray            # outer head radius towards each pixel at the widest level
    skull: np.ndarray             # skull thickness towards each pixel (mm)
    sulcus_phase: np.ndarray      # folding pattern's phase towards each pixel

    def box(self, cu: float, cv: float, r: float) -> tuple[slice, slice] | None:
        """Pixel rows/cols covering the disc of radius `r` mm around head point (cu, cv)."""
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        x = self.ox + c * cu - s * cv
        y = self.oy + s * cu + c * cv
        j = x / self.spacing + (self.cols - 1) / 2
        i = y / self.spacing + (self.rows - 1) / 2
        rp = r / self.spacing + 1
        i0, i1 = max(int(i - rp), 0), min(int(i + rp) + 2, self.rows)
        j0, j1 = max(int(j - rp), 0), min(int(j + rp) + 2, self.cols)
        if i0 >= i1 or j0 >= j1:
            return None
        return slice(i0, i1), slice(j0, j1)


def make_grid(head: Head, rows: int, cols: int, spacing: float, ox: float, oy: float,
              yaw: float) -> Grid:
    """Coordinates of a rows x cols image with `spacing` mm pixels, head centre at (ox, oy)
    mm from the image centre, rotated by `yaw` rad."""
    x = ((np.arange(cols, dtype=np.float32) - (cols - 1) / 2) * spacing - ox)[None, :]
    y = ((np.arange(rows, dtype=np.float32) - (rows - 1) / 2) * spacing - oy)[:, None]
    c, s = np.float32(math.cos(yaw)), np.float32(math.sin(yaw))
    u = c * x + s * y
    v = -s * x + c * y
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    cos_t, sin_t = np.cos(theta), np.sin(theta)
    radius = 1.0 / np.sqrt((cos_t / head.a) ** 2 + (sin_t / head.b) ** 2)
    bumps = np.ones_like(theta)
    for k, amp, phase in head.harmonics:
        bumps += amp * np.cos(k * theta + phase)
    radius *= bumps
    # The temporal squama (sides) is thinner than the frontal and occipital bone.
    skull = head.skull * (1.0 - 0.35 * cos_t ** 4)
    phase = (head.sulci * theta + 1.5 * np.sin(3 * theta + head.sulcus_seed)
             + 0.8 * np.sin(7 * theta + 2.0 * head.sulcus_seed))
    arrays = (np.ascontiguousarray(a, dtype=np.float32) for a in (u, v, rho, theta, radius, skull, phase))
    return Grid(rows, cols, float(spacing), float(ox), float(oy), float(yaw), *arrays)


@dataclass
class Regions:
    """Where lesions may go on one slice: masks (bool) and distance maps (float32, mm)."""

    cavity: np.ndarray            # inside the inner skull table, not skull-base bone
    brain: np.ndarray             # parenchyma with its sulci and ventricles
    d_in: np.ndarray              # depth below the inner skull surface
    d_brain: np.ndarray           # depth below the brain surface
    arc: np.ndarray               # distance from the nearest sulcus' centre line
    sulcus_depth: np.ndarray      # how deep that sulcus reaches
    ventricles: np.ndarray
    cisterns: np.ndarray          # basal cisterns and Sylvian fissures


def bump(t: float, centre: float, half: float) -> float:
    """Vertical profile of a structure: 1 at `centre`, falling to 0 at centre +- half."""
    q = (t - centre) / half
    return math.sqrt(1.0 - q * q) if abs(q) < 1.0 else 0.0


def head_scale(t: float, head: Head) -> tuple[float, float]:
    """(cross-section scale, obliquity) at height t. Obliquity > 1 where the skull surface
    runs nearly parallel to the slice, so scalp and bone look thicker in-plane (the vertex)."""
    q = (t - HEAD_T) / HEAD_HALF
    if abs(q) >= 1.0:
        return 0.0, 1.0
    s = math.sqrt(1.0 - q * q)
    slope = 0.5 * (head.a + head.b) * q / (HEAD_HALF * s) / head.height  # d radius / d z
    return s, min(math.sqrt(1.0 + slope * slope), 4.0)


def ellipse(grid: Grid, cu: float, cv: float, au: float, av: float, rot: float = 0.0):
    """(box, local bool mask) of an ellipse in the head frame, or None off the image."""
    box = grid.box(cu, cv, max(au, av))
    if box is None or au <= 0 or av <= 0:
        return None
    du, dv = grid.u[box] - cu, grid.v[box] - cv
    if rot:
        c, s = math.cos(rot), math.sin(rot)
        du, dv = c * du + s * dv, -s * du + c * dv
    return box, (du / au) ** 2 + (dv / av) ** 2 <= 1.0


def segment(grid: Grid, p: tuple[float, float], q: tuple[float, float], half_width: float):
    """(box, local bool mask) of a thick line segment p-q in the head frame, or None."""
    cu, cv = (p[0] + q[0]) / 2, (p[1] + q[1]) / 2
    length = math.hypot(q[0] - p[0], q[1] - p[1])
    box = grid.box(cu, cv, length / 2 + half_width)
    if box is None or half_width <= 0:
        return None
    du, dv = grid.u[box] - p[0], grid.v[box] - p[1]
    eu, ev = (q[0] - p[0]) / length, (q[1] - p[1]) / length
    along = np.clip(du * eu + dv * ev, 0.0, length)
    dist = np.hypot(du - along * eu, dv - along * ev)
    return box, dist <= half_width


def _structures(table: dict, head: Head, t: float):
    """Yield (u, v, semi_u, semi_v, rot) of each structure in `table` present at height t,
    mirrored to both sides, semi-axes shrunk by the vertical profile."""
    for cu, cv, au, av, rot, tc, th in table.values():
        p = bump(t, tc, th)
        if p <= 0.05:
            continue
        scale = math.sqrt(p)
        for side in ((1.0, -1.0) if cu else (1.0,)):
            yield side * cu * head.ku, cv * head.kv, au * scale, av * scale, side * rot


def _hash(k: np.ndarray, seed: float) -> np.ndarray:
    """A fixed pseudo-random number in [0, 1) per integer k (per-sulcus depth)."""
    x = np.sin(k.astype(np.float64) * 12.9898 + seed) * 43758.5453
    return (x - np.floor(x)).astype(np.float32)


def render(head: Head, grid: Grid, t: float, z: float) -> tuple[np.ndarray, Regions]:
    """HU image (float32, noise-free) of the slice at height t (z mm above the skull base)
    and its regions."""
    shape = grid.u.shape
    hu = np.full(shape, AIR, np.float32)
    s, oblique = head_scale(t, head)
    if s <= 0.0:
        zeros, none = np.zeros(shape, np.float32), np.zeros(shape, bool)
        return hu, Regions(none, none, zeros - 1.0, zeros - 1.0, zeros + 1e3, zeros, none, none)
    base = float(np.clip((BASE_TOP - t) / 0.2, 0.0, 1.0))
    scalp = head.scalp * oblique
    d_out = s * grid.radius - grid.rho                     # depth below the skin
    skull = grid.skull * np.float32(oblique * (1.0 + 0.8 * base))
    d_bone = d_out - scalp
    d_in = d_bone - skull

    hu[d_out > 0] = head.soft
    hu[(d_out > 0.35 * scalp) & (d_out < 0.65 * scalp)] = head.fat
    bone = (d_bone > 0) & (d_in <= 0)
    # Dense outer and inner tables around a softer diploe.
    depth = d_bone[bone] / skull[bone]
    hu[bone] = head.diploe + (head.cortical - head.diploe) * (2.0 * depth - 1.0) ** 2
    cavity = d_in > 0
    hu[cavity] = head.csf

    d_brain = d_in - head.csf_layer
    brain = d_brain > 0
    arc, sulcus_depth = _cortex(hu, head, grid, t, z, d_brain, brain)
    ventricles, cisterns = _deep(hu, head, grid, t, brain)

    if base > 0:
        _skull_base(hu, cavity, grid, head, base, s, scalp, t)
    brain &= cavity
    return hu, Regions(cavity, brain, d_in, d_brain, arc, sulcus_depth, ventricles & cavity,
                       cisterns & cavity)


def _cortex(hu: np.ndarray, head: Head, grid: Grid, t: float, z: float, d_brain: np.ndarray,
            brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paint white matter, the folded cortex, sulci and the interhemispheric fissure (in
    place); return (distance from the nearest sulcus' centre line, that sulcus' depth)."""
    # Sulci bend as they go deeper and drift slowly from slice to slice.
    phase = (grid.sulcus_phase + head.sulcus_wobble * np.sin(d_brain * 0.3 + 5 * grid.theta)
             + np.float32(0.04 * z))
    k = np.floor(phase / (2 * math.pi) + 0.5)
    arc = np.abs(phase - k * (2 * math.pi)) * grid.rho / head.sulci
    sulcus_depth = head.sulcus_depth * (0.35 + 0.65 * _hash(k, head.sulcus_seed))
    half = max(head.sulcus_width, grid.spacing) / 2
    ctx = head.cortex
    grey = (d_brain < ctx) | ((arc < half + ctx) & (d_brain < sulcus_depth + ctx))
    csf = (arc < half) & (d_brain < sulcus_depth)
    # Interhemispheric fissure: reaches in from front and back, splits the whole top.
    fissure_depth = 25.0 + 90.0 * float(np.clip((t - 0.55) / 0.2, 0.0, 1.0))
    fhalf = max(head.fissure_width, grid.spacing) / 2
    mid = np.abs(grid.u)
    grey |= (mid < fhalf + ctx) & (d_brain < fissure_depth + ctx)
    fissure = (mid < fhalf) & (d_brain < fissure_depth)
    hu[brain] = head.white
    hu[brain & grey] = head.grey
    hu[brain & (csf | fissure)] = head.csf
    hu[brain & fissure & (mid < 0.4)] = head.falx
    return arc, sulcus_depth


def _deep(hu: np.ndarray, head: Head, grid: Grid, t: float,
          brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paint deep grey nuclei, brainstem, cisterns and ventricles present at height t (in
    place); return the (ventricles, cisterns) masks."""
    ventricles = np.zeros(hu.shape, bool)
    cisterns = np.zeros(hu.shape, bool)
    for cu, cv, au, av, rot in _structures(DEEP_GREY, head, t):
        e = ellipse(grid, cu, cv, au, av, rot)
        if e is not None:
            hu[e[0]][e[1] & brain[e[0]]] = head.grey - 2.0
    p = bump(t, *BRAINSTEM[5:])
    if p > 0.05:
        cu, cv, au, av = BRAINSTEM[0], BRAINSTEM[1] * head.kv, BRAINSTEM[2] * p, BRAINSTEM[3] * p
        ring = ellipse(grid, cu, cv, au + 2.5, av + 2.5)  # the cisterns around the stem
        stem = ellipse(grid, cu, cv, au, av)
        if ring is not None:
            cisterns[ring[0]] |= ring[1] & brain[ring[0]]
        if stem is not None:
            hu[stem[0]][stem[1] & brain[stem[0]]] = head.white + 3.0
            cisterns[stem[0]] &= ~stem[1]
    p = bump(t, *SUPRASELLAR[5:])
    if p > 0.05:
        cu, cv = SUPRASELLAR[0], SUPRASELLAR[1] * head.kv
        e = ellipse(grid, cu, cv, 14.0, 14.0)
        if e is not None:
            du, dv = grid.u[e[0]] - cu, grid.v[e[0]] - cv
            star = np.hypot(du, dv) < SUPRASELLAR[2] * p * (1 + 0.3 * np.cos(5 * np.arctan2(dv, du) + 1.57))
            cisterns[e[0]] |= star & brain[e[0]]
    (pu, pv), (qu, qv), tc, th = SYLVIAN
    p = bump(t, tc, th)
    if p > 0.05:
        for side in (1.0, -1.0):
            seg = segment(grid, (side * pu * head.ku, pv * head.kv),
                          (side * qu * head.ku, qv * head.kv), max(1.3 * p, grid.spacing / 2))
            if seg is not None:
                cisterns[seg[0]] |= seg[1] & brain[seg[0]]
    hu[cisterns] = head.csf
    for cu, cv, au, av, rot in _structures(VENTRICLES, head, t):
        vs = head.ventricle_scale
        e = ellipse(grid, cu, cv, max(au * vs, grid.spacing / 2), av * vs, rot)
        if e is not None:
            ventricles[e[0]] |= e[1] & brain[e[0]]
    hu[ventricles] = head.csf
    return ventricles, cisterns


def _skull_base(hu: np.ndarray, cavity: np.ndarray, grid: Grid, head: Head, base: float,
                s: float, scalp: float, t: float) -> None:
    """Paint petrous bones, clivus and sinuses into the lowest slices (in place): the
    cranial cavity there is small and irregular, split by bone with air cells."""
    a_in = s * head.a - scalp - head.skull
    b_in = s * head.b - scalp - head.skull
    bone = np.zeros(hu.shape, bool)
    air = np.zeros(hu.shape, bool)
    for side in (1.0, -1.0):
        # Petrous ridges run from posterolateral to the clivus, splitting middle and
        # posterior fossae.
        seg = segment(grid, (side * 0.85 * a_in, 0.25 * b_in), (side * 0.15 * a_in, -0.12 * b_in),
                      7.0 * base)
        if seg is not None:
            box, m = seg
            bone[box] |= m
            # Mastoid air cells in the lateral part of the petrous bone.
            cells = (np.sin(grid.u[box] * 1.1) * np.sin(grid.v[box] * 1.3) > 0.55)
            air[box] |= m & cells & (np.abs(grid.u[box]) > 0.55 * a_in)
    clivus = ellipse(grid, 0.0, -8.0 * head.kv, 7.0 * base, 10.0 * base)
    if clivus is not None:
        bone[clivus[0]] |= clivus[1]
    low = float(np.clip((0.16 - t) / 0.1, 0.0, 1.0))
    if low > 0:
        sinus = ellipse(grid, 0.0, -24.0 * head.kv, 9.0 * low, 7.0 * low)
        if sinus is not None:
            air[sinus[0]] |= sinus[1]
        # Orbital roofs and ethmoid cells close off the front of the cavity.
        front = grid.v < -b_in * (0.98 - 0.4 * low)
        bone |= front
        air |= front & (np.sin(grid.u * 0.35 + head.sulcus_seed) * np.sin(grid.v * 0.45) > 0.3)
    bone &= cavity
    air &= bone
    hu[bone] = 0.5 * (head.diploe + head.cortical)
    hu[air] = -900.0
    cavity &= ~bone
