"""Hemorrhages and their look-alikes as 3-D objects in the phantom head.

In: a random generator, the subtypes a patient has and the patient's `Head`. Out: lesion
objects whose `mask(grid, regions, z)` rasterises their cross-section on the slice z mm above
the skull base (a bool image, or None where they do not reach). Each hemorrhage lives in its
anatomical compartment: epidural and subdural against the inner skull (lens vs. crescent),
intraparenchymal in the brain, intraventricular in the ventricles, subarachnoid in the
sulci and basal cisterns. Calcifications (pineal, choroid plexus, basal ganglia, falx) are
small and brighter than blood (> 100 HU): hemorrhage look-alikes that carry no label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ich.synth.anatomy import LANDMARKS, Grid, Head, Regions, ellipse

# A slice is positive for a subtype when that lesion covers at least this area on it; smaller
# cuts are not drawn at all, so every blood pixel on an image belongs to a label.
MIN_AREA_MM2 = 25.0
# Fraction of patients with each subtype (a patient may have several). Epidural is rarest.
KIND_FRACTIONS = {"epidural": 0.12, "intraparenchymal": 0.30, "intraventricular": 0.22,
                  "subarachnoid": 0.30, "subdural": 0.32}


def _wrap(angle: np.ndarray | float):
    """Angle difference folded into [-pi, pi)."""
    return (angle + math.pi) % (2 * math.pi) - math.pi


def _z_profile(z: float, zc: float, half: float) -> float:
    """1 at the lesion's centre height, 0 at +- half and beyond."""
    q = (z - zc) / half
    return 1.0 - q * q if abs(q) < 1.0 else 0.0


@dataclass(frozen=True)
class Extra:
    """Epidural (lens) or subdural (crescent) blood against the inner skull at angle theta."""

    kind: str
    theta: float          # centre direction, rad
    extent: float         # angular half-width, rad
    thickness: float      # maximum thickness, mm
    zc: float             # centre height above the skull base, mm
    half_height: float    # mm
    hu: float

    def mask(self, grid: Grid, regions: Regions, z: float) -> np.ndarray | None:
        """Bool image of the lesion on slice z, or None where it does not reach."""
        p = _z_profile(z, self.zc, self.half_height)
        if p <= 0:
            return None
        q = np.abs(_wrap(grid.theta - self.theta)) / self.extent
        if self.kind == "epidural":
            # Biconvex: thickest in the middle, tapering fast; the dura holds it together.
            thick = self.thickness * math.sqrt(p) * (1.0 - q * q)
        else:
            # Crescent: nearly even thickness along a long stretch of the convexity.
            thick = self.thickness * p ** 0.35 * (1.0 - q ** 3)
        return regions.cavity & (regions.d_in < thick)

    def evolve(self, rng: np.random.Generator) -> "Extra":
        """The same lesion on a follow-up scan: smaller and a little less dense."""
        return replace(self, thickness=self.thickness * rng.uniform(0.5, 1.0),
                       hu=max(self.hu - rng.uniform(0, 10), 50.0))


@dataclass(frozen=True)
class Parenchymal:
    """Intraparenchymal hematoma: an irregular ellipsoid in the brain with an edema rim."""

    cu: float
    cv: float
    ru: float
    rv: float
    zc: float
    half_height: float
    rot: float
    lobes: tuple              # ((k, amplitude, phase), ...) irregular outline
    edema: float              # rim width, mm
    hu: float
    kind: str = "intraparenchymal"

    def _radius(self, grid: Grid, z: float, grow: float):
        p = _z_profile(z, self.zc, self.half_height)
        if p <= 0:
            return None
        r = math.sqrt(p) + grow
        e = ellipse(grid, self.cu, self.cv, self.ru * r * 1.3, self.rv * r * 1.3, self.rot)
        if e is None:
            return None
        box = e[0]
        du, dv = grid.u[box] - self.cu, grid.v[box] - self.cv
        c, s = math.cos(self.rot), math.sin(self.rot)
        du, dv = c * du + s * dv, -s * du + c * dv
        ang = np.arctan2(dv, du)
        edge = np.ones_like(ang)
        for k, amp, phase in self.lobes:
            edge += amp * np.cos(k * ang + phase)
        inside = np.hypot(du / self.ru, dv / self.rv) <= r * edge
        return box, inside

    def mask(self, grid: Grid, regions: Regions, z: float) -> np.ndarray | None:
        """Bool image of the clot on slice z, or None where it does not reach."""
        return self._full(grid, regions, self._radius(grid, z, 0.0))

    def edema_mask(self, grid: Grid, regions: Regions, z: float) -> np.ndarray | None:
        """Bool image of the clot plus its hypodense rim."""
        return self._full(grid, regions, self._radius(grid, z, self.edema / self.ru))

    @staticmethod
    def _full(grid: Grid, regions: Regions, local) -> np.ndarray | None:
        if local is None:
            return None
        out = np.zeros(grid.u.shape, bool)
        box, inside = local
        out[box] = inside & regions.brain[box]
        return out

    def evolve(self, rng: np.random.Generator) -> "Parenchymal":
        """The same clot on a follow-up scan: shrinking and fading."""
        f = rng.uniform(0.6, 1.0)
        return replace(self, ru=self.ru * f, rv=self.rv * f, half_height=self.half_height * f,
                       hu=max(self.hu - rng.uniform(0, 12), 50.0))


@dataclass(frozen=True)
class Ventricular:
    """Intraventricular blood layering in the dependent (posterior) part of the ventricles."""

    side: float           # +1 / -1 one side, 0 both
    level: float          # blood fills the ventricles posterior of v = level (mm)
    zc: float
    half_height: float
    hu: float
    kind: str = "intraventricular"

    def mask(self, grid: Grid, regions: Regions, z: float) -> np.ndarray | None:
        """Bool image of the blood on slice z, or None where it does not reach."""
        if _z_profile(z, self.zc, self.half_height) <= 0:
            return None
        m = regions.ventricles & (grid.v > self.level)
        if self.side:
            m &= grid.u * self.side > -2.0
        return m

    def evolve(self, rng: np.random.Generator) -> "Ventricular":
        """Follow-up: less blood, lower level."""
        return replace(self, level=self.level + rng.uniform(0, 10),
                       hu=max(self.hu - rng.uniform(0, 10), 50.0))


@dataclass(frozen=True)
class Subarachnoid:
    """Subarachnoid blood: widened sulci and surface CSF in a sector of the convexity, or the
    basal cisterns and Sylvian fissures."""

    basal: bool
    theta: float
    extent: float
    width: float          # width of the blood-filled sulci, mm
    zc: float
    half_height: float
    hu: float
    kind: str = "subarachnoid"

    def mask(self, grid: Grid, regions: Regions, z: float) -> np.ndarray | None:
        """Bool image of the blood on slice z, or None where it does not reach."""
        if _z_profile(z, self.zc, self.half_height) <= 0:
            return None
        if self.basal:
            return regions.cisterns.copy()
        half = max(self.width, grid.spacing) / 2
        sector = np.abs(_wrap(grid.theta - self.theta)) < self.extent
        sulci = (regions.arc < half) & (regions.d_brain < 0.9 * regions.sulcus_depth)
        surface = regions.cavity & (regions.d_brain < 0.6)
        return sector & (surface | (sulci & regions.brain))

    def evolve(self, rng: np.random.Generator) -> "Subarachnoid":
        """Follow-up: thinner and fainter."""
        return replace(self, width=self.width * rng.uniform(0.6, 1.0),
                       hu=max(self.hu - rng.uniform(0, 10), 48.0))


@dataclass(frozen=True)
class Calcification:
    """A small very bright ellipsoid: physiological calcification, no label."""

    cu: float
    cv: float
    ru: float
    rv: float
    zc: float
    half_height: float
    hu: float
    kind: str = "calcification"

    def mask(self, grid: Grid, regions: Regions, z: float) -> np.ndarray | None:
        """Bool image of the calcification on slice z, or None where it does not reach."""
        p = _z_profile(z, self.zc, self.half_height)
        if p <= 0:
            return None
        r = math.sqrt(p)
        e = ellipse(grid, self.cu, self.cv, max(self.ru * r, grid.spacing * 0.6),
                    max(self.rv * r, grid.spacing * 0.6))
        if e is None:
            return None
        out = np.zeros(grid.u.shape, bool)
        out[e[0]] = e[1] & regions.cavity[e[0]]
        return out

    def evolve(self, rng: np.random.Generator) -> "Calcification":
        """Calcifications do not change between scans."""
        return self


def sample_lesions(rng: np.random.Generator, kinds: tuple[str, ...], head: Head) -> list:
    """One hemorrhage per subtype in `kinds` (subdural sometimes bilateral), placed and
    sized for `head`; some subdurals and subarachnoids are subtle (thin, nearly isodense)."""
    lesions = []
    H = head.height
    for kind in kinds:
        if kind == "epidural":
            side = rng.choice([0.0, math.pi])
            theta = side + rng.normal(0, 0.35) if rng.random() < 0.8 else -math.pi / 2 + rng.normal(0, 0.4)
            lesions.append(Extra(kind, float(theta), float(rng.uniform(0.28, 0.45)),
                                 float(rng.uniform(8, 17)), float(rng.uniform(0.35, 0.72) * H),
                                 float(rng.uniform(13, 22)), float(rng.uniform(62, 88))))
        elif kind == "subdural":
            subtle = rng.random() < 0.15
            sides = [rng.choice([0.0, math.pi])]
            if rng.random() < 0.15:
                sides.append(sides[0] + math.pi)
            for side in sides:
                lesions.append(Extra(
                    kind, float(side + rng.normal(0, 0.35)), float(rng.uniform(0.6, 1.2)),
                    float(rng.uniform(3, 5) if subtle else rng.uniform(5, 12)),
                    float(rng.uniform(0.42, 0.75) * H), float(rng.uniform(18, 36)),
                    float(rng.uniform(52, 60) if subtle else rng.uniform(60, 82))))
        elif kind == "intraparenchymal":
            ang = rng.uniform(0, 2 * math.pi)
            frac = math.sqrt(rng.uniform(0, 1)) * 0.5
            ru = rng.uniform(7, 20)
            lobes = tuple((k, float(rng.uniform(0, amp)), float(rng.uniform(0, 2 * math.pi)))
                          for k, amp in ((2, 0.15), (3, 0.1), (5, 0.04)))
            lesions.append(Parenchymal(
                float(frac * 0.75 * head.a * math.cos(ang)), float(frac * 0.8 * head.b * math.sin(ang)),
                float(ru), float(ru * rng.uniform(0.7, 1.3)), float(rng.uniform(0.3, 0.72) * H),
                float(max(ru * rng.uniform(0.8, 1.2), 8.0)), float(rng.uniform(0, math.pi)), lobes,
                float(rng.uniform(1.5, 5.0)), float(rng.uniform(60, 85))))
        elif kind == "intraventricular":
            side = float(rng.choice([0.0, 1.0, -1.0], p=[0.5, 0.25, 0.25]))
            level = -40.0 if rng.random() < 0.3 else rng.uniform(-5, 22) * head.kv
            lesions.append(Ventricular(side, float(level), float(rng.uniform(0.42, 0.52) * H),
                                       float(rng.uniform(16, 30)), float(rng.uniform(55, 82))))
        elif kind == "subarachnoid":
            basal = rng.random() < 0.4
            subtle = rng.random() < 0.2
            lesions.append(Subarachnoid(
                bool(basal), float(rng.uniform(-math.pi, math.pi)), float(rng.uniform(0.5, 1.1)),
                float(rng.uniform(1.8, 3.2)),
                float((rng.uniform(0.22, 0.32) if basal else rng.uniform(0.45, 0.85)) * H),
                float(rng.uniform(12, 24) if basal else rng.uniform(15, 32)),
                float(rng.uniform(50, 58) if subtle else rng.uniform(58, 80))))
        else:
            raise ValueError(f"unknown hemorrhage subtype {kind!r}")
    return lesions


def sample_mimics(rng: np.random.Generator, head: Head) -> list[Calcification]:
    """Calcifications a patient may carry, with or without hemorrhage."""
    out = []
    H = head.height
    for name, p in (("pineal", 0.5), ("choroid_plexus", 0.4), ("basal_ganglia", 0.1)):
        if rng.random() >= p:
            continue
        u, v, t = LANDMARKS[name]
        r = rng.uniform(1.5, 3.5)
        for side in ((1.0, -1.0) if u else (1.0,)):
            out.append(Calcification(side * u * head.ku, v * head.kv, float(r),
                                     float(r * rng.uniform(0.8, 1.3)), float(t * H),
                                     float(rng.uniform(3, 7)), float(rng.uniform(110, 400))))
    if rng.random() < 0.15:  # a falx plaque: thin, along the midline, high up
        out.append(Calcification(0.0, float(rng.uniform(-40, 40)), 1.0, float(rng.uniform(4, 9)),
                                 float(rng.uniform(0.6, 0.8) * H), float(rng.uniform(4, 8)),
                                 float(rng.uniform(150, 500))))
    return out
