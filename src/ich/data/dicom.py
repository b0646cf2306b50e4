"""Read one CT DICOM file into Hounsfield units, with the RSNA storage quirks fixed.

In: a path to a single-frame greyscale CT DICOM (uncompressed or compressed; compressed
syntaxes decode through pydicom's plugins: GDCM for JPEG Lossless and JPEG-LS, pylibjpeg-openjpeg
for JPEG 2000, pydicom itself for RLE; all permissive licences). Out: `read_hu(path)` returns a float32
2-D array in HU and a small dict of metadata; anything unusable raises `DicomError`, a
ValueError whose message says why (the caller names the file).

MONOCHROME1 images are accepted and NOT inverted: HU come from the Modality LUT (slope and
intercept) applied to the stored values, which comes before, and is independent of, the
photometric interpretation (PS3.3 C.11: MONOCHROME1 only says how to display the result).
Inverting would give wrong HU. The storage note records it.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# The RSNA 12-bit intercept bug: files with these tags hold HU wrapped into 12 bits.
_FIX_BITS_STORED = 12
_FIX_MAX_INTERCEPT = -100.0
_FIX_OFFSET = 1000
_FIX_WRAP = 4096
_FIX_INTERCEPT = -1000.0

# RSNA stores PatientID/StudyInstanceUID/... as `ID_<hex>`, not valid UIDs: pydicom warns
# (and logs) for every file. Silence exactly that message, nothing else.
_RSNA_UID_WARNING = r"Invalid value for VR UI: 'ID_[0-9a-fA-F]+'"
_UNCOMPRESSED_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # Implicit, Explicit VR LE


class DicomError(ValueError):
    """A DICOM file that cannot be turned into a CT slice in HU; the message says why."""


class _RsnaUidLogFilter(logging.Filter):
    """Drop pydicom's log record for RSNA `ID_...` UIDs (pydicom logs as well as warns)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Invalid value for VR UI: 'ID_")


_pydicom_logger = logging.getLogger("pydicom")
if not any(isinstance(f, _RsnaUidLogFilter) for f in _pydicom_logger.filters):
    _pydicom_logger.addFilter(_RsnaUidLogFilter())


def needs_intercept_fix(bits_stored: int, pixel_representation: int, intercept: float) -> bool:
    """True for the RSNA 12-bit bug: unsigned 12-bit pixels with an intercept above -100 HU."""
    return (bits_stored == _FIX_BITS_STORED and pixel_representation == 0
            and intercept > _FIX_MAX_INTERCEPT)


def to_hu(pixels: np.ndarray, slope: float, intercept: float, bits_stored: int,
          pixel_representation: int) -> np.ndarray:
    """Stored pixel values -> float32 HU (slope * px + intercept), with the RSNA 12-bit fix.

    Pixels are widened (int32 for the fix, float32 for the rescale) before any arithmetic:
    NumPy 2 keeps uint16 arithmetic in uint16, so `uint16 + (-1024)` would wrap instead of
    going negative.
    """
    pixels = np.asarray(pixels)
    if needs_intercept_fix(bits_stored, pixel_representation, intercept):
        # px + 1000 lies in [1000, 5095] for 12-bit px, so "subtract 4096 where >= 4096" is a
        # bitwise AND with 4095: branch-free, where a boolean mask costs ~2 ms per 512x512 slice.
        pixels = (pixels.astype(np.int32) + _FIX_OFFSET) & (_FIX_WRAP - 1)
        intercept = _FIX_INTERCEPT
    hu = pixels.astype(np.float32)
    if slope != 1:
        hu *= np.float32(slope)
    hu += np.float32(intercept)
    return hu


def slice_position(position, orientation) -> float:
    """ImagePositionPatient projected on the slice normal (row x column direction); NaN if absent."""
    if position is None or orientation is None or len(position) != 3 or len(orientation) != 6:
        return math.nan
    ori = np.asarray([float(v) for v in orientation])
    normal = np.cross(ori[:3], ori[3:])
    return float(np.dot(normal, [float(v) for v in position]))


def storage_note(bits_stored: int, signed: bool, intercept: float, slope: float, fixed: bool,
                 transfer_syntax: str = "", photometric: str = "MONOCHROME2") -> str:
    """Short text describing how the pixels were stored, e.g. 'int16;intercept=-1024'."""
    parts = [f"{'int' if signed else 'uint'}{bits_stored}"]
    parts.append(f"intercept-fix(was {intercept:g})" if fixed else f"intercept={intercept:g}")
    if slope != 1:
        parts.append(f"slope={slope:g}")
    if transfer_syntax:
        parts.append(transfer_syntax)
    if photometric == "MONOCHROME1":
        parts.append("MONOCHROME1")
    return ";".join(parts)


def read_hu(path: str | Path, max_bytes: int | None = None) -> tuple[np.ndarray, dict]:
    """Read a CT DICOM file -> (float32 HU array (rows, columns), metadata dict).

    Metadata: image_id (SOPInstanceUID, else the file stem), patient_id, study_id, series_id,
    position (along the slice normal, NaN if absent), rows, columns, pixel_spacing (row spacing
    in mm, NaN if absent), window_center / window_width (first value, NaN if absent) and
    storage (see `storage_note`). Raises DicomError for anything unusable, before reading a
    byte of a file larger than `max_bytes`. Failures of the machine (disk, I/O, memory; see
    ich.compute.is_machine_error) are raised as they are: they say nothing about the file.
    A file without the 128-byte preamble and 'DICM' marker is still read if it parses as DICOM.
    """
    import pydicom

    from ich import faults
    from ich.compute import is_machine_error

    path = Path(path)
    faults.check("decode", path.stem)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_RSNA_UID_WARNING, category=UserWarning)
        try:
            if max_bytes is not None and (size := path.stat().st_size) > max_bytes:
                raise DicomError(f"larger than {max_bytes / 2 ** 20:g} MB ({size / 2 ** 20:,.0f} MB); "
                                 "raise preprocess.max_file_mb to read it")
            try:
                ds = pydicom.dcmread(path)
            except pydicom.errors.InvalidDicomError:
                # No preamble/marker: many exporters write bare datasets. force=True parses
                # them; a non-DICOM then fails below for want of the tags a CT slice needs.
                ds = pydicom.dcmread(path, force=True)
                if "PixelData" not in ds and "SOPClassUID" not in ds:
                    raise DicomError("not a DICOM file (no 'DICM' marker after the 128-byte "
                                     "preamble, and it does not parse as a dataset)") from None
            return _dataset_to_hu(ds, path)
        except DicomError:
            raise
        except Exception as err:  # noqa: BLE001 - any parse failure of a damaged file is per-file
            if is_machine_error(err):
                raise
            if isinstance(err, OSError):
                raise DicomError(f"cannot read the file ({err})") from err
            raise DicomError(f"damaged DICOM ({type(err).__name__}: {err})") from err


def _dataset_to_hu(ds, path: Path) -> tuple[np.ndarray, dict]:
    # PixelData is the last element: without it the file is header-only or cut short, and
    # checking it first keeps a truncated header from being reported as a missing tag.
    if "PixelData" not in ds:
        raise DicomError("no PixelData element (a header-only or truncated file)")
    modality = str(ds.get("Modality", "") or "")
    if modality != "CT":
        raise DicomError(f"modality {modality or 'missing'}, expected CT")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(f"colour image ({photometric or '?'}, {samples} samples per pixel); "
                         "expected greyscale MONOCHROME2")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DicomError(f"{frames} frames in one file; expected one slice per file")
    if ds.get("RescaleIntercept") in (None, ""):
        raise DicomError("no RescaleIntercept: cannot convert to HU")
    intercept = _first_float(ds.get("RescaleIntercept"), name="RescaleIntercept")
    slope = _slope(ds.get("RescaleSlope"))
    bits_stored = int(ds.get("BitsStored", 16))
    pixel_rep = int(ds.get("PixelRepresentation", 0))

    pixels = _pixels(ds)
    hu = to_hu(pixels, slope, intercept, bits_stored, pixel_rep)
    syntax = ds.file_meta.get("TransferSyntaxUID", "")
    compressed = syntax.keyword if syntax and syntax not in _UNCOMPRESSED_LE else ""
    spacing, spacing_note = _spacing(ds.get("PixelSpacing"))
    meta = {
        "image_id": str(ds.get("SOPInstanceUID", "") or path.stem),
        "patient_id": str(ds.get("PatientID", "") or ""),
        "study_id": str(ds.get("StudyInstanceUID", "") or ""),
        "series_id": str(ds.get("SeriesInstanceUID", "") or ""),
        "position": slice_position(ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")),
        "rows": int(hu.shape[0]),
        "columns": int(hu.shape[1]),
        "pixel_spacing": spacing,
        "window_center": _first_float(ds.get("WindowCenter"), default=math.nan),
        "window_width": _first_float(ds.get("WindowWidth"), default=math.nan),
        "storage": storage_note(bits_stored, bool(pixel_rep), intercept, slope,
                                needs_intercept_fix(bits_stored, pixel_rep, intercept),
                                compressed, photometric) + spacing_note,
    }
    return hu, meta


def _slope(value) -> float:
    """RescaleSlope: absent means 1; present, it must be a non-zero number (0 would make every
    pixel the intercept, and a guess of 1 for a garbled value would give wrong HU)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return 1.0
    slope = _first_float(value, name="RescaleSlope")
    if not math.isfinite(slope) or slope == 0:
        raise DicomError(f"RescaleSlope is {slope:g}; expected a non-zero number")
    return slope


def _spacing(value) -> tuple[float, str]:
    """(row spacing in mm or NaN, a storage-note suffix). A single value means square pixels:
    accepted, and noted as ';square-pixel-spacing' since PS3.3 asks for two."""
    if value is None or value == "":
        return math.nan, ""
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value]
    try:
        first = float(values[0]) if values else math.nan
    except (TypeError, ValueError):
        return math.nan, ";unreadable-pixel-spacing"
    return first, ";square-pixel-spacing" if len(values) == 1 else ""


def _pixels(ds) -> np.ndarray:
    """Stored pixel values as an integer array, as pydicom's pixel_array would give them.

    Uncompressed little-endian 16-bit data (all of RSNA) is read straight from the bytes,
    several times faster than pixel_array; everything else goes through pydicom's decoders.
    """
    rows, cols = int(ds.Rows), int(ds.Columns)
    syntax = ds.file_meta.get("TransferSyntaxUID", "")
    if syntax in _UNCOMPRESSED_LE and int(ds.get("BitsAllocated", 0)) == 16:
        data = ds.PixelData
        need = rows * cols * 2
        if len(data) < need:
            raise DicomError(f"pixel data truncated: {len(data)} of {need} bytes")
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        arr = np.frombuffer(data, dtype="<i2" if signed else "<u2", count=rows * cols)
        arr = arr.reshape(rows, cols)
        bits_stored = int(ds.get("BitsStored", 16))
        # Bits above BitsStored carry no value (PS3.5 8.1.1): sign-extend or clear them,
        # exactly as pydicom does.
        if bits_stored < 16 and signed:
            arr = np.right_shift(np.left_shift(arr, 16 - bits_stored), 16 - bits_stored)
        elif bits_stored < 16:
            arr = np.bitwise_and(arr, (1 << bits_stored) - 1)
        return arr
    try:
        arr = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - decoder errors come in many types
        from ich.compute import is_machine_error

        if is_machine_error(err):
            raise
        name = getattr(syntax, "name", str(syntax)) or "unknown transfer syntax"
        detail = " ".join(str(err).split())  # plugin errors span several lines
        raise DicomError(f"cannot decode pixel data ({name}): {detail}") from err
    if arr.ndim != 2:
        raise DicomError(f"pixel array has shape {arr.shape}; expected one 2-D slice")
    return arr


def _first_float(value, default: float | None = None, name: str = "") -> float:
    """A DS value, a decimal string or a MultiValue (take the first) as a float.

    Without a default, an empty or non-numeric value raises DicomError naming the tag.
    """
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0] if len(value) else None
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        if default is not None:
            return default
        raise DicomError(f"{name}: not a number ({value!r})") from err
