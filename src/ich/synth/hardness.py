"""How hard a phantom set is: one `difficulty` in [0, 1] turns the realism up.

In: `difficulty` (0 = the original phantoms, byte for byte; 1 = the hardest), a random
generator of its own (so difficulty 0 draws nothing and changes nothing), a patient's head and
lesions. Out: smaller and fainter lesions (`harden_lesions`), extra hard negatives
(`extra_mimics`: calcifications near blood density), and per-scan `Artifacts` that
`render_slice` applies: stronger and coarser correlated noise, a head holder behind the head,
and beam-hardening streaks between the dense bones of the skull base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ich.synth.anatomy import BASE_TOP, Grid, Head, Regions
from ich.synth.lesions import Calcification, Extra, Parenchymal, Subarachnoid, Ventricular

NAMES = {"easy": 0.0, "medium": 0.5, "hard": 1.0}
BRAIN_HU = 35.0          # what a bleed fades towards as it becomes subtle (grey/white average)
HOLDER_HU = (150.0, 300.0)  # carbon-fibre / plastic shell of the head holder
PAD_HU = (-700.0, -400.0)   # foam pad between holder and scalp


def parse_difficulty(value) -> float:
    """'easy' | 'medium' | 'hard' or a number in [0, 1] -> float; ValueError otherwise."""
    if isinstance(value, str) and value.strip().lower() in NAMES:
        return NAMES[value.strip().lower()]
    try:
        d = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"difficulty {value!r}: expected easy, medium, hard or a number in [0, 1]") from err
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"difficulty {value!r}: must lie in [0, 1]")
    return d


@dataclass(frozen=True)
class Artifacts:
    """What the scanner and the table add to every slice of one scan."""

    noise_scale: float           # multiplies the scan's noise SD
    noise_sigma: float           # px; correlation length of the noise
    holder: tuple | None         # (gap mm, thickness mm, angular half-width rad, shell HU, pad HU)
    streaks: tuple               # ((angle rad, offset mm, width mm, HU change), ...) in the skull base

    def apply(self, hu: np.ndarray, grid: Grid, regions: Regions, head: Head, t: float) -> None:
        """Paint the holder and the streaks into a noise-free slice (in place)."""
        if self.holder is not None:
            gap, thick, half, shell, pad = self.holder
            s = _scale(t)
            if s > 0:
                # +v is posterior: the head rests on the holder with the back of the skull.
                behind = np.abs(((grid.theta - math.pi / 2) + math.pi) % (2 * math.pi) - math.pi) < half
                r = grid.rho - grid.radius * s      # mm outside the skin
                hu[behind & (r > 0) & (r < gap)] = pad
                hu[behind & (r >= gap) & (r < gap + thick)] = shell
        if self.streaks and t < BASE_TOP + 0.08:
            fade = float(np.clip((BASE_TOP + 0.08 - t) / 0.15, 0.0, 1.0))
            for angle, offset, width, change in self.streaks:
                d = np.abs(grid.u * math.sin(angle) - grid.v * math.cos(angle) - offset)
                line = regions.cavity & (d < width)
                hu[line] += change * fade


def _scale(t: float) -> float:
    from ich.synth.anatomy import HEAD_HALF, HEAD_T

    q = (t - HEAD_T) / HEAD_HALF
    return math.sqrt(1.0 - q * q) if abs(q) < 1.0 else 0.0


def sample_artifacts(rng: np.random.Generator, difficulty: float) -> Artifacts:
    """One scan's artifacts at `difficulty` (> 0)."""
    d = difficulty
    holder = None
    if rng.random() < 0.8 * d + 0.1:
        holder = (float(rng.uniform(2, 8)), float(rng.uniform(3, 6)), float(rng.uniform(0.6, 1.1)),
                  float(rng.uniform(*HOLDER_HU)), float(rng.uniform(*PAD_HU)))
    streaks = []
    for _ in range(int(rng.integers(0, 2 + round(4 * d)))):
        streaks.append((float(rng.uniform(-0.4, 0.4)), float(rng.normal(0, 15)),
                        float(rng.uniform(0.6, 2.0)),
                        float(rng.choice([-1.0, 1.0], p=[0.7, 0.3]) * rng.uniform(15, 15 + 45 * d))))
    return Artifacts(noise_scale=float(1.0 + d * rng.uniform(0.8, 1.6)),
                     noise_sigma=float(0.8 + d * rng.uniform(0.3, 0.8)),
                     holder=holder, streaks=tuple(streaks))


def harden_lesions(rng: np.random.Generator, lesions: list, difficulty: float) -> list:
    """The lesions smaller and fainter: sizes shrink by up to ~55 %, density fades towards
    brain by up to ~45 % at difficulty 1 (drawn per lesion, so some stay obvious)."""
    d = difficulty
    out = []
    for lesion in lesions:
        size = float(rng.uniform(1.0 - 0.55 * d, 1.0))
        fade = float(rng.uniform(0.0, 0.45 * d))
        hu = lesion.hu - fade * (lesion.hu - BRAIN_HU)
        if isinstance(lesion, Extra):
            lesion = replace(lesion, thickness=max(lesion.thickness * size, 2.0),
                             half_height=lesion.half_height * (0.5 + 0.5 * size), hu=hu)
        elif isinstance(lesion, Parenchymal):
            lesion = replace(lesion, ru=max(lesion.ru * size, 3.0), rv=max(lesion.rv * size, 3.0),
                             half_height=max(lesion.half_height * size, 5.0), hu=hu)
        elif isinstance(lesion, Subarachnoid):
            lesion = replace(lesion, width=max(lesion.width * size, 1.0), extent=lesion.extent * size,
                             half_height=lesion.half_height * (0.5 + 0.5 * size), hu=hu)
        elif isinstance(lesion, Ventricular):
            lesion = replace(lesion, half_height=lesion.half_height * (0.5 + 0.5 * size), hu=hu)
        out.append(lesion)
    return out


def extra_mimics(rng: np.random.Generator, head: Head, difficulty: float) -> list:
    """Hard negatives: small dense spots at 85-140 HU (calcified vessels, granulomas) anywhere
    in the brain, about 3 per patient at difficulty 1."""
    out = []
    H = head.height
    for _ in range(int(rng.poisson(3.0 * difficulty))):
        ang = rng.uniform(0, 2 * math.pi)
        frac = math.sqrt(rng.uniform(0, 1)) * 0.7
        r = float(rng.uniform(1.2, 3.0))
        out.append(Calcification(float(frac * 0.75 * head.a * math.cos(ang)),
                                 float(frac * 0.8 * head.b * math.sin(ang)), r, r,
                                 float(rng.uniform(0.3, 0.8) * H), float(rng.uniform(2, 5)),
                                 float(rng.uniform(85, 140))))
    return out
