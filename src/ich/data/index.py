"""The header index: one row per DICOM file, its ids and where it lies in its series.

In: DICOM headers (a pydicom Dataset read without pixel data, or a path to read one from).
Out: rows with INDEX_COLUMNS; `rank_series` orders each series along its slice normal;
`neighbours` links a slice to the slices at given offsets in its series; `group_for_predict`
sorts arbitrary files into axial image series and names why the others are left out.

The RSNA CSV has neither patients nor positions: only the headers link a slice to its
neighbours and its patient. Slices are ordered by ImagePositionPatient projected on the slice
normal (row direction x column direction of ImageOrientationPatient), which is right for
tilted gantries too, where the z coordinate of the position is not the distance between
slices. Everything here but `read_header` is pure.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement

from ich import faults

# pandas is imported inside the table functions: worker processes that only read headers
# (`read_header`) then start without its import time and memory.

# The columns of index.parquet, in order.
INDEX_COLUMNS = ("image_id", "file", "sop_uid", "patient_id", "study_id", "series_id", "modality",
                 "image_type", "orientation", "normal_x", "normal_y", "normal_z", "position",
                 "rows", "columns", "pixel_spacing", "rank", "series_size")
FAILURE_COLUMNS = ("image_id", "file", "reason")
# Only these tags are parsed; pixel data is never read.
HEADER_TAGS = ("SOPInstanceUID", "Modality", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
               "ImageType", "ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns",
               "PixelSpacing")
# An image whose slice normal is within this angle of the body axis is axial. Gantry tilts
# reach ~30 degrees (the GE series in the shared data: 18.5), sagittal and coronal reformats
# lie at 90 degrees.
AXIAL_MAX_ANGLE_DEG = 40.0
# ImageType values that mark a scout / localizer / topogram, never a slice of the head.
LOCALIZER_TYPES = ("LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM")
_TAG = {k: tag_for_keyword(k) for k in HEADER_TAGS + ("BitsAllocated", "SamplesPerPixel")}
_KEYWORD = {tag: keyword for keyword, tag in _TAG.items()}
_VR = {keyword: dictionary_VR(tag) for keyword, tag in _TAG.items()}
_PIXEL_DATA = 0x7FE00010
_TRANSFER_SYNTAX = 0x00020010
_IMPLICIT_LE = "1.2.840.10008.1.2"
# Little-endian syntaxes parse_header walks: implicit, explicit, and the encapsulated
# (compressed) ones, whose header is explicit VR little endian too. Others go to pydicom.
_WALKABLE = (_IMPLICIT_LE, "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
             "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
             "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
             "1.2.840.10008.1.2.5")
# Explicit VRs with a 2-byte reserved field and a 4-byte length.
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNPACK_TAG = struct.Struct("<HH").unpack_from
_UNPACK_U16 = struct.Struct("<H").unpack_from
_UNPACK_U32 = struct.Struct("<I").unpack_from
_FIRST_READ = 4096      # RSNA headers end at ~700 bytes
_MAX_HEADER = 1 << 22   # a header longer than this goes to pydicom
_PIXEL_TAG_LE = bytes.fromhex("e07f1000")
_PIXEL_TAG_BE = bytes.fromhex("7fe00010")
_UNDEFINED_LENGTH = 0xFFFFFFFF
_UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
_RSNA_UID_WARNING = r"Invalid value for VR UI: 'ID_[0-9a-fA-F]+'"


class HeaderError(ValueError):
    """A file whose header cannot be indexed; the message says why."""


def header_row(values: dict, file: str) -> dict:
    """The index row of one header read from `file` (a relative name).

    `values`: keyword -> value (a string, a list of strings for multi-valued tags, an int
    for US tags, None when absent), as `dataset_values` or `parse_header` give them.
    `image_id` is the file name without `.dcm` (the id the labels CSV and every later step
    use); `sop_uid` is the SOPInstanceUID. Missing geometry gives NaN position and normal, so
    the row is still indexed but cannot be ordered. `rank` and `series_size` are filled in by
    `rank_series`.
    """
    name = Path(file).name
    image_id = name[:-4] if name.lower().endswith(".dcm") else name
    orientation = _floats(values.get("ImageOrientationPatient"), 6)
    position = _floats(values.get("ImagePositionPatient"), 3)
    normal = slice_normal(orientation)
    spacing = _floats(values.get("PixelSpacing"), 2)
    image_type = values.get("ImageType")
    if image_type is not None and not isinstance(image_type, str):
        image_type = "\\".join(str(v) for v in image_type)
    located = position is not None and orientation is not None
    return {
        "image_id": image_id,
        "file": file,
        "sop_uid": _text(values.get("SOPInstanceUID")),
        "patient_id": _text(values.get("PatientID")),
        "study_id": _text(values.get("StudyInstanceUID")),
        "series_id": _text(values.get("SeriesInstanceUID")),
        "modality": _text(values.get("Modality")),
        "image_type": _text(image_type),
        "orientation": "" if orientation is None else "\\".join(f"{round(v, 6) + 0.0:.6g}" for v in orientation),
        "normal_x": normal[0], "normal_y": normal[1], "normal_z": normal[2],
        "position": float(sum(n * p for n, p in zip(normal.tolist(), position))) if located else math.nan,
        "rows": _int(values.get("Rows")),
        "columns": _int(values.get("Columns")),
        "pixel_spacing": math.nan if spacing is None else spacing[0],
        "rank": -1,
        "series_size": 0,
    }


def dataset_values(ds) -> dict:
    """keyword -> value of the index's tags in a pydicom Dataset (see `_value`)."""
    little = getattr(ds, "original_encoding", (None, True))[1] is not False
    return {keyword: _value(ds, keyword, little) for keyword in _TAG}


def parse_header(data: bytes) -> tuple[dict, str, int, int, int]:
    """Walk the elements of a DICOM file's first bytes, up to its PixelData element.

    Returns (values as `header_row` takes them, transfer syntax UID, offset of the PixelData
    element, its header length, its value length). A plain loop over the element headers: no
    value is converted but the dozen the index needs, so it is several times faster than
    pydicom's reader (bench/index.py). Raises `_Unsupported` for what it leaves to pydicom
    (big-endian or deflated syntaxes, undefined-length sequences before the pixel data) and
    `_Incomplete` when `data` ends before the PixelData element.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        raise _Unsupported("no DICM marker")
    values: dict = {}
    syntax = ""
    pos, end = 132, len(data)
    explicit = True
    while True:
        if pos + 8 > end:
            raise _Incomplete(pos)
        group, element = _UNPACK_TAG(data, pos)
        if group != 2 and not syntax:
            raise _Unsupported("no transfer syntax in the file meta")
        if group != 2 and pos > 132 and explicit and syntax == _IMPLICIT_LE:
            explicit = False
        if explicit or group == 2:
            vr = data[pos + 4:pos + 6]
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise _Incomplete(pos)
                length, header = _UNPACK_U32(data, pos + 8)[0], 12
            else:
                length, header = _UNPACK_U16(data, pos + 6)[0], 8
        else:
            vr = b""
            length, header = _UNPACK_U32(data, pos + 4)[0], 8
        tag = (group << 16) | element
        if tag == _PIXEL_DATA:
            return values, syntax, pos, header, length
        if length == _UNDEFINED_LENGTH:
            raise _Unsupported("undefined-length element before the pixel data")
        start = pos + header
        if start + length > end:
            raise _Incomplete(pos)
        if tag == _TRANSFER_SYNTAX:
            syntax = data[start:start + length].decode("latin-1").strip("\x00 ")
            if syntax not in _WALKABLE:
                raise _Unsupported(f"transfer syntax {syntax}")
        keyword = _KEYWORD.get(tag)
        if keyword is not None:
            raw = data[start:start + length]
            if (vr or _VR[keyword].encode()) == b"US":
                values[keyword] = _UNPACK_U16(raw, 0)[0] if length >= 2 else None
            else:
                text = raw.decode("latin-1").strip("\x00 ")
                values[keyword] = text.split("\\") if "\\" in text else (text or None)
        pos = start + length


def read_header(path: str | Path, root: str | Path | None = None) -> dict:
    """Read one file's header without pixel data -> its index row (see `header_row`).

    `root`: the folder names are relative to (the file name alone when None). The header is
    walked by `parse_header` where it can be, else read by pydicom (stopping before the pixel
    data, parsing only the index's tags). Raises HeaderError for a file that is not DICOM, is
    cut short, or has no whole pixel data.
    """
    path = Path(path)
    file = path.relative_to(root).as_posix() if root is not None else path.name
    faults.check("header", path.stem)   # tests: a header reader that crashes or hangs
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            data = handle.read(_FIRST_READ)
            try:
                while True:
                    try:
                        values, syntax, start, header, length = parse_header(data)
                        break
                    except _Incomplete:
                        if len(data) >= size or len(data) >= _MAX_HEADER:
                            raise
                        data += handle.read(len(data))
            except (_Unsupported, _Incomplete):
                values, syntax, start, header, length = _pydicom_header(handle, size)
    except OSError as err:
        raise HeaderError(f"cannot read the file ({err})") from err
    _check_pixel_data(values, syntax, size - start - header, length)
    try:
        return header_row(values, file)
    except Exception as err:  # noqa: BLE001 - a tag of the wrong shape or type
        raise HeaderError(f"unusable header value ({type(err).__name__}: {err})") from err


def _pydicom_header(handle, size: int) -> tuple[dict, str, int, int, int]:
    """The slow path of read_header: pydicom's reader, same results as parse_header."""
    import pydicom

    handle.seek(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_RSNA_UID_WARNING, category=UserWarning)
        try:
            ds = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=list(_TAG))
        except pydicom.errors.InvalidDicomError as err:
            raise HeaderError("not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from err
        except Exception as err:  # noqa: BLE001 - a damaged header fails in many ways, per file
            raise HeaderError(f"damaged DICOM header ({type(err).__name__}: {err})") from err
    # dcmread stops right before the PixelData tag (or at the end of a file cut short).
    start = handle.tell()
    head = handle.read(12)
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if len(head) < 8 or head[:4] not in (_PIXEL_TAG_LE, _PIXEL_TAG_BE):
        raise HeaderError(f"no pixel data: the file ends or changes after {start} bytes of header "
                          "(cut short?)")
    big = head[:4] == _PIXEL_TAG_BE
    order = "big" if big else "little"
    if head[4:6] in (b"OB", b"OW"):    # explicit VR: 2 reserved bytes, then a 4-byte length
        length, header = int.from_bytes(head[8:12], order), 12
    else:                              # implicit VR: the 4-byte length follows the tag
        length, header = int.from_bytes(head[4:8], order), 8
    return dataset_values(ds), syntax, start, header, length


def _check_pixel_data(values: dict, syntax: str, available: int, length: int) -> None:
    """Raise HeaderError unless the pixel data is whole: at least Rows x Columns x bytes per
    sample for uncompressed data (encapsulated data has an undefined length: only present)."""
    if length == _UNDEFINED_LENGTH:
        return
    needed = (_int(values.get("Rows")) * _int(values.get("Columns"))
              * max(_int(values.get("SamplesPerPixel")), 1) * _int(values.get("BitsAllocated")) // 8)
    if available < min(length, needed) or (0 < length < needed and syntax in _UNCOMPRESSED):
        raise HeaderError(f"pixel data cut short: {max(available, 0)} bytes in the file, "
                          f"Rows x Columns needs {needed}")


class _Unsupported(Exception):
    """parse_header leaves this file to pydicom."""


class _Incomplete(Exception):
    """parse_header needs more of the file."""


def slice_normal(orientation: Sequence[float] | None) -> np.ndarray:
    """Unit normal (row x column direction) of an ImageOrientationPatient; NaN when absent or
    degenerate."""
    if orientation is None:
        return np.full(3, math.nan)
    # Plain floats: np.cross costs more than the rest of a header row.
    a, b, c, d, e, f = (float(v) for v in orientation[:6])
    normal = (b * f - c * e, c * d - a * f, a * e - b * d)
    norm = math.sqrt(sum(v * v for v in normal))
    if not norm > 1e-6:
        return np.full(3, math.nan)
    return np.array(normal) / norm


def rank_series(index: pd.DataFrame) -> pd.DataFrame:
    """A copy of `index` with `rank` (0 = lowest position, per series) and `series_size`.

    Rows without a position (or without a series) get rank -1. Equal positions are ordered
    by image_id so the ranking is deterministic.
    """
    out = index.copy()
    valid = out["position"].notna() & (out["series_id"].fillna("") != "")
    ranked = out.loc[valid, ["series_id", "position", "image_id"]].sort_values(
        ["series_id", "position", "image_id"], kind="stable")
    out["rank"] = -1
    out["series_size"] = 0
    out.loc[ranked.index, "rank"] = ranked.groupby("series_id", sort=False).cumcount().to_numpy()
    sizes = ranked.groupby("series_id")["image_id"].transform("size")
    out.loc[ranked.index, "series_size"] = sizes.to_numpy()
    out["rank"] = out["rank"].astype(np.int32)
    out["series_size"] = out["series_size"].astype(np.int32)
    return out


def neighbours(index: pd.DataFrame, image_ids, offsets: Sequence[int]) -> pd.DataFrame:
    """For each of `image_ids`, the image at each slice offset in its ranked series.

    Returns columns image_id, offset, neighbour_id (one row per id and offset, ids in the
    order given). Past the ends of a series the edge slice repeats, so a neighbour always
    exists; an id that is not ranked (no position) is its own neighbour at every offset.
    """
    import pandas as pd

    ranked = index[index["rank"] >= 0]
    key = dict(zip(zip(ranked["series_id"], ranked["rank"]), ranked["image_id"]))
    info = index.set_index("image_id")[["series_id", "rank", "series_size"]]
    rows = []
    for image_id in image_ids:
        series, rank, size = info.loc[image_id] if image_id in info.index else ("", -1, 0)
        for offset in offsets:
            if rank < 0:
                rows.append((image_id, int(offset), image_id))
                continue
            target = min(max(int(rank) + int(offset), 0), int(size) - 1)
            rows.append((image_id, int(offset), key[(series, target)]))
    return pd.DataFrame(rows, columns=["image_id", "offset", "neighbour_id"])


def orientation_class(normal: Sequence[float]) -> str:
    """'axial', 'coronal', 'sagittal' or 'oblique' from a slice normal (patient LPS axes);
    'unknown' without one."""
    n = np.abs(np.asarray(normal, dtype=float))
    if not np.isfinite(n).all() or n.sum() == 0:
        return "unknown"
    if n[2] >= math.cos(math.radians(AXIAL_MAX_ANGLE_DEG)):
        return "axial"
    if n[1] >= math.cos(math.radians(AXIAL_MAX_ANGLE_DEG)):
        return "coronal"
    if n[0] >= math.cos(math.radians(AXIAL_MAX_ANGLE_DEG)):
        return "sagittal"
    return "oblique"


def skip_reason(row: dict | pd.Series) -> str:
    """Why a file cannot be a slice of an axial head CT series ('' when it can): what
    `not_axial_reason` or else `unordered_reason` says."""
    return not_axial_reason(row) or unordered_reason(row)


def not_axial_reason(row: dict | pd.Series) -> str:
    """Why a file is known not to be an axial CT image slice ('' when it is or may be): another
    modality, a localizer or scout, or a sagittal, coronal or oblique image."""
    modality = str(row.get("modality") or "")
    if modality and modality != "CT":
        return f"modality {modality}, not CT"
    image_type = str(row.get("image_type") or "").upper()
    marker = next((t for t in LOCALIZER_TYPES if t in image_type.split("\\")), None)
    if marker:
        return f"localizer (ImageType {image_type})"
    kind = orientation_class(_normal(row))
    if kind not in ("axial", "unknown"):
        return f"{kind} image, not axial (ImageOrientationPatient {row.get('orientation')})"
    return ""


def unordered_reason(row: dict | pd.Series) -> str:
    """Why a slice cannot be placed in a series ('' when it can): no orientation, position or
    series id. Such a slice can still be scored on its own."""
    if orientation_class(_normal(row)) == "unknown":
        return "no ImageOrientationPatient: cannot tell axial slices from reformats"
    position = row.get("position")
    if position is None or not math.isfinite(float(position)):
        return "no ImagePositionPatient: cannot order the slice in its series"
    if not str(row.get("series_id") or ""):
        return "no SeriesInstanceUID: cannot group the slice"
    return ""


def _normal(row) -> list[float]:
    return [math.nan if v is None else float(v)
            for v in (row.get("normal_x"), row.get("normal_y"), row.get("normal_z"))]


def group_for_predict(rows: pd.DataFrame | list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Header rows of arbitrary files -> (kept, skipped).

    kept: the axial CT image slices, grouped by study and series and sorted by position along
    the slice normal, with `rank` and `series_size` per series. skipped: every other file with
    its `reason` (localizers and scouts, sagittal/coronal/oblique reformats, other modalities,
    files without the geometry to order them). Both keep the input columns.
    """
    import pandas as pd

    frame = pd.DataFrame(rows).reset_index(drop=True)
    if frame.empty:
        empty = pd.DataFrame(columns=list(frame.columns) + ["reason"])
        return frame, empty
    reasons = frame.apply(skip_reason, axis=1) if len(frame) else pd.Series([], dtype=str)
    skipped = frame[reasons != ""].assign(reason=reasons[reasons != ""])
    kept = rank_series(frame[reasons == ""])
    kept = kept.sort_values(["study_id", "series_id", "rank"], kind="stable", ignore_index=True)
    return kept, skipped.reset_index(drop=True)


def _value(ds, keyword: str, little: bool = True):
    """A tag's value without pydicom's conversion and validation of every element read.

    Read from the raw bytes where the element is still raw (the usual case after dcmread):
    strings decoded and split on backslashes, US as an int. Converting through pydicom
    validates each UI and DS value (and logs a warning for every RSNA `ID_...` UID), which
    costs more than reading the file. An element set in code passes through as its value.
    """
    elem = ds.get_item(_TAG[keyword])
    if elem is None:
        return None
    if not isinstance(elem, RawDataElement):
        return elem.value
    raw = elem.value
    if raw is None or len(raw) == 0:
        return None
    vr = elem.VR or dictionary_VR(elem.tag)
    if vr == "US":
        return int.from_bytes(raw[:2], "little" if little else "big")
    text = raw.decode("latin-1").strip("\x00 ")
    return text.split("\\") if "\\" in text else text


def _floats(value, n: int) -> tuple[float, ...] | None:
    """A multi-valued DS tag as n floats, or None when absent, short or not numeric."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        value = str(value).split("\\")
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(values) < n or not all(math.isfinite(v) for v in values[:n]):
        return None
    return values[:n]


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
