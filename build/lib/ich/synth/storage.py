"""How a phantom slice is stored: the RSNA tag set and its storage variants.

In: an int16 HU image, a `Storage` variant and the slice's ids and geometry. Out: a pydicom
Dataset laid out like the RSNA files (same tags in the same order, same file meta, Explicit
VR Little Endian, uncompressed, no InstanceNumber/SliceLocation/SliceThickness), written
atomically by `write`.

Variants seen in the real data, chosen per study:
- int16_pad:  signed 16-bit, intercept -1024, raw -2000 outside a circular field of view
- int16:      signed 16-bit, intercept -1024
- uint12:     unsigned 12-bit, intercept -1024
- uint12_1000 / int16_1000: intercept -1000
- uint12_bug: unsigned 12-bit with intercept 0 or 1 while the pixels hold HU wrapped into 12
  bits; the community fix (px + 1000, minus 4096 where >= 4096, intercept -1000) recovers HU.
Independently: decimal strings ("-1024.000000", "35.000000") and 2-valued zero-padded
windows ("[00040, 00040]").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom import config as dicom_config
from pydicom import dcmwrite
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from ich.io import atomic_path

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLEMENTATION_UID = "1.2.40.0.13.1.1.1"
PAD_RAW = -2000
# name: (bits stored, signed, intercept). The bug variant's intercept is drawn from {0, 1}.
VARIANTS = {
    "int16_pad": (16, True, -1024),
    "int16": (16, True, -1024),
    "uint12": (12, False, -1024),
    "uint12_1000": (12, False, -1000),
    "int16_1000": (16, True, -1000),
    "uint12_bug": (12, False, 0),
}
# Studies per variant in every 20: a shuffled deck keeps even small sets varied.
DECK = {"int16_pad": 6, "int16": 3, "uint12": 6, "uint12_1000": 1, "int16_1000": 1,
        "uint12_bug": 3}
WINDOWS = ((40, 80), (35, 135), (30, 80), (47, 80), (40, 150), (36, 80))


@dataclass(frozen=True)
class Storage:
    """One study's storage variant and tag formatting."""

    variant: str
    intercept: int
    decimal: bool         # DS values written like "-1024.000000"
    multi_window: bool    # WindowCenter/Width as two zero-padded values
    window: tuple[int, int]

    @property
    def bits_stored(self) -> int:
        return VARIANTS[self.variant][0]

    @property
    def signed(self) -> bool:
        return VARIANTS[self.variant][1]

    @property
    def hu_range(self) -> tuple[int, int]:
        """HU the variant can hold (the bug variant's fix maps raw 0..4095 to -1000..3095)."""
        if self.variant == "uint12_bug":
            return -1000, 3095
        if self.signed:
            return -32768 + self.intercept, 32767 + self.intercept
        return self.intercept, 4095 + self.intercept

    def describe(self) -> str:
        """Short text for tables, e.g. 'uint12;intercept=-1024;window=2'."""
        parts = [self.variant, f"intercept={self.intercept}"]
        if self.decimal:
            parts.append("decimal")
        if self.multi_window:
            parts.append("window=2")
        return ";".join(parts)


def storage_deck(rng: np.random.Generator, n: int) -> list[str]:
    """`n` variant names drawn from shuffled decks in the DECK proportions."""
    names: list[str] = []
    while len(names) < n:
        deck = [name for name, count in DECK.items() for _ in range(count)]
        rng.shuffle(deck)
        names.extend(deck)
    return names[:n]


def sample_storage(rng: np.random.Generator, variant: str) -> Storage:
    """Tag formatting for a study stored as `variant`: ~15 % decimal strings, ~half 2-valued
    windows."""
    intercept = int(rng.integers(0, 2)) if variant == "uint12_bug" else VARIANTS[variant][2]
    decimal = bool(rng.random() < 0.15)
    multi = bool(rng.random() < 0.58) and not decimal
    window = WINDOWS[int(rng.integers(len(WINDOWS)))]
    return Storage(variant, intercept, decimal, multi, window)


def fov_mask(rows: int, cols: int) -> np.ndarray:
    """Bool image of the scanner's circular field of view, inscribed in the image."""
    i = np.arange(rows) - (rows - 1) / 2
    j = np.arange(cols) - (cols - 1) / 2
    return (i[:, None] ** 2 + j[None, :] ** 2) <= (min(rows, cols) / 2) ** 2


def stored_hu(hu: np.ndarray, storage: Storage) -> np.ndarray:
    """The HU a correct reader gets back from the file: `hu` clipped to what the variant can
    hold, and -3024 outside the field of view of the padded variant. int32."""
    lo, hi = storage.hu_range
    out = np.clip(hu.astype(np.int32), lo, hi)
    if storage.variant == "int16_pad":
        out[~fov_mask(*hu.shape)] = PAD_RAW + storage.intercept
    return out


def encode(hu: np.ndarray, storage: Storage) -> np.ndarray:
    """Raw stored pixel values (int16 or uint16) for an integer HU image."""
    value = stored_hu(hu, storage)
    if storage.variant == "uint12_bug":
        # Wrapped into 12 bits; the known fix adds 1000 and unwraps values >= 4096.
        return np.mod(value, 4096).astype(np.uint16)
    raw = value - storage.intercept
    if storage.variant == "int16_pad":
        raw[~fov_mask(*hu.shape)] = PAD_RAW
    return raw.astype(np.int16 if storage.signed else np.uint16)


def _ds(value: float, decimal: bool) -> str:
    """A DS string as the RSNA files write them: '-125.000000' or the short '-125'."""
    if decimal:
        return f"{value:.6f}"
    text = np.format_float_positional(round(float(value), 8), trim="-")
    return text if len(text) <= 16 else f"{value:.10g}"


def _window(value: int, storage: Storage):
    if storage.multi_window:
        return [f"{value:05d}"] * 2
    return f"{value:.6f}" if storage.decimal else str(value)


@dataclass(frozen=True)
class SliceTags:
    """The identifying and geometric tags of one slice."""

    image_id: str
    patient_id: str
    study_id: str
    series_id: str
    media_uid: str                # file meta MediaStorageSOPInstanceUID (a numeric UID)
    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    spacing: float


def build_dataset(raw: np.ndarray, storage: Storage, tags: SliceTags) -> Dataset:
    """A Dataset with exactly the RSNA tag set, in the RSNA order, holding `raw`."""
    ids_ok = dicom_config.IGNORE  # the RSNA 'ID_...' UIDs are invalid by design
    rows, cols = raw.shape
    d = storage.decimal
    ds = Dataset()
    elements = [
        (0x00080018, "UI", tags.image_id, ids_ok),
        (0x00080060, "CS", "CT", None),
        (0x00100020, "LO", tags.patient_id, None),
        (0x0020000D, "UI", tags.study_id, ids_ok),
        (0x0020000E, "UI", tags.series_id, ids_ok),
        (0x00200010, "SH", "", None),
        (0x00200032, "DS", [_ds(x, d) for x in tags.position], None),
        (0x00200037, "DS", [_ds(x, d) for x in tags.orientation], None),
        (0x00280002, "US", 1, None),
        (0x00280004, "CS", "MONOCHROME2", None),
        (0x00280010, "US", rows, None),
        (0x00280011, "US", cols, None),
        (0x00280030, "DS", [_ds(tags.spacing, d)] * 2, None),
        (0x00280100, "US", 16, None),
        (0x00280101, "US", storage.bits_stored, None),
        (0x00280102, "US", storage.bits_stored - 1, None),
        (0x00280103, "US", 1 if storage.signed else 0, None),
        (0x00281050, "DS", _window(storage.window[0], storage), None),
        (0x00281051, "DS", _window(storage.window[1], storage), None),
        (0x00281052, "DS", f"{storage.intercept:.6f}" if d else str(storage.intercept), None),
        (0x00281053, "DS", "1.000000" if d else "1", None),
        (0x7FE00010, "OW", np.ascontiguousarray(raw).astype(raw.dtype.newbyteorder("<")).tobytes(), None),
    ]
    for tag, vr, value, mode in elements:
        ds.add(DataElement(tag, vr, value, validation_mode=mode))
    meta = FileMetaDataset()
    meta.FileMetaInformationGroupLength = 0  # pydicom fills in the real length on writing
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = tags.media_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "dcm4che-1.4.38"
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    return ds


def write(ds: Dataset, path) -> None:
    """Write `ds` to `path` atomically, keeping its own file meta (not derived from the
    dataset, as in the RSNA files)."""
    with atomic_path(path) as tmp:
        dcmwrite(tmp, ds, enforce_file_format=False)
