"""ich.data.dicom: HU conversion by hand, every RSNA storage variant, real files, bad files."""

import logging
import math
import socket
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from alt_rsna import read_back, write_alt_rsna
from ich.data.dicom import DicomError, needs_intercept_fix, read_hu, slice_position, to_hu


# ---- pure helpers, hand-computed ------------------------------------------------------------

def test_to_hu_signed_16_bit():
    px = np.array([-2000, 0, 1024, 1064], dtype=np.int16)
    np.testing.assert_array_equal(to_hu(px, 1, -1024, 16, 1), [-3024, -1024, 0, 40])


def test_to_hu_unsigned_does_not_wrap():
    # NumPy 2: uint16 + (-1024) would wrap to 64512 without the cast to float first
    px = np.array([0, 1024, 4095], dtype=np.uint16)
    hu = to_hu(px, 1, -1024, 12, 0)
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, [-1024, 0, 3071])


def test_to_hu_slope():
    np.testing.assert_array_equal(to_hu(np.array([5, 10], np.int16), 2.0, -10, 16, 1), [0, 10])


@pytest.mark.parametrize("intercept", [0, 1, -99])
def test_to_hu_12_bit_intercept_fix(intercept):
    # stored = HU mod 4096; fix: +1000, subtract 4096 from values >= 4096, intercept -1000
    px = np.array([3096, 0, 35, 1000, 3095], dtype=np.uint16)
    np.testing.assert_array_equal(to_hu(px, 1, intercept, 12, 0), [-1000, 0, 35, 1000, 3095])


def test_needs_intercept_fix_only_where_it_applies():
    assert needs_intercept_fix(12, 0, 0) and needs_intercept_fix(12, 0, 1)
    assert needs_intercept_fix(12, 0, -99.5)
    assert not needs_intercept_fix(12, 0, -100)      # strictly above -100
    assert not needs_intercept_fix(12, 0, -1024)     # the normal 12-bit files
    assert not needs_intercept_fix(12, 1, 0)         # signed
    assert not needs_intercept_fix(16, 0, 0)         # 16-bit
    assert not needs_intercept_fix(16, 1, 0)         # the GE series: signed, already HU
    np.testing.assert_array_equal(to_hu(np.array([-1500, 35], np.int16), 1, 0, 16, 1), [-1500, 35])


def test_slice_position():
    assert slice_position([1, 2, 3], [1, 0, 0, 0, 1, 0]) == 3
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    # normal = row x column = (0, sin, cos): 10 * 0.5 + 20 * 0.866025 = 22.3205
    assert slice_position([0, 10, 20], [1, 0, 0, 0, c, -s]) == pytest.approx(22.320508)
    assert math.isnan(slice_position(None, [1, 0, 0, 0, 1, 0]))
    assert math.isnan(slice_position([1, 2, 3], None))


# ---- the independent RSNA-format files ------------------------------------------------------

@pytest.fixture(scope="module")
def alt(tmp_path_factory):
    return write_alt_rsna(tmp_path_factory.mktemp("alt"), n_patients=4, slices=3, size=32)


NOTES = {"int16": "int16;intercept=-1024", "uint12": "uint12;intercept=-1024",
         "int16_nonsquare": "int16;intercept=-1000"}


def test_every_storage_variant_gives_exact_hu(alt):
    seen = set()
    for image_id, truth in alt["hu"].items():
        hu, meta = read_hu(alt["dicom_dir"] / f"{image_id}.dcm")
        variant = alt["variant"][image_id]
        seen.add(variant)
        np.testing.assert_array_equal(hu, truth, err_msg=f"{image_id} ({variant})")
        expected = alt["meta"][image_id]
        assert meta["image_id"] == image_id
        for key in ("patient_id", "study_id", "series_id", "rows", "columns"):
            assert meta[key] == expected[key], key
        assert meta["position"] == pytest.approx(expected["position"], abs=1e-4)
        assert meta["pixel_spacing"] == pytest.approx(expected["pixel_spacing"])
        if variant == "uint12_bug":
            assert meta["storage"].startswith("uint12;intercept-fix")
        else:
            assert meta["storage"].startswith(NOTES[variant])
        # WindowCenter as MultiValue ['00040', '00040'] or as the string '35.000000'
        assert meta["window_center"] == (35.0 if variant == "uint12" else 40.0)
    assert seen == {"int16", "uint12", "uint12_bug", "int16_nonsquare"}
    assert read_hu(alt["dicom_dir"] / f"{alt['compressed'][0]}.dcm")[1]["storage"].endswith(
        "JPEG2000Lossless")


def test_fast_pixel_path_matches_pydicom(alt, real_dicom_paths):
    """read_hu reads uncompressed pixels itself: it must agree with pydicom's pixel_array."""
    paths = [alt["dicom_dir"] / f"{i}.dcm" for i in alt["hu"]] + real_dicom_paths
    paths.append(Path(get_testdata_file("CT_small.dcm")))
    for path in paths:
        ds = read_back(path)
        expected = to_hu(ds.pixel_array, float(ds.RescaleSlope), float(ds.RescaleIntercept),
                         ds.BitsStored, ds.PixelRepresentation)
        np.testing.assert_array_equal(read_hu(path)[0], expected, err_msg=str(path))


@pytest.fixture
def real_dicom_paths():
    from conftest import shared_data_dir

    root = shared_data_dir()
    return sorted((root / "real_dicom").glob("*/*.dcm")) if root else []


@pytest.mark.parametrize("kind,reason", [("truncated", "pixel data truncated"),
                                         ("not_dicom", "not a DICOM file"),
                                         ("mr", "modality MR"),
                                         ("no_pixels", "no PixelData")])
def test_bad_files_raise_with_a_reason(alt, kind, reason):
    image_id = next(i for i, k in alt["bad"].items() if k == kind)
    with pytest.raises(DicomError, match=reason):
        read_hu(alt["dicom_dir"] / f"{image_id}.dcm")


def test_missing_file_is_a_dicom_error(tmp_path):
    with pytest.raises(DicomError, match="cannot read"):
        read_hu(tmp_path / "nope.dcm")


def test_rsna_uid_warning_silenced_but_others_kept(alt, tmp_path, caplog):
    path = alt["dicom_dir"] / f"{next(iter(alt['hu']))}.dcm"
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        read_hu(path)
    assert not [w for w in caught if "ID_" in str(w.message)]
    assert "ID_" not in caplog.text
    ds = read_back(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.SOPInstanceUID = "1.2.bad-uid"
    ds.save_as(tmp_path / "other.dcm")
    with pytest.warns(UserWarning, match="1.2.bad-uid"):
        read_hu(tmp_path / "other.dcm")


# ---- real scanner files (skip where absent) -------------------------------------------------

def test_real_rsna_samples(real_dicom_dir):
    paths = sorted((real_dicom_dir / "rsna_samples").glob("*.dcm"))
    assert len(paths) == 5
    notes = set()
    for path in paths:
        hu, meta = read_hu(path)
        notes.add(meta["storage"])
        centre = hu[206:306, 206:306]
        assert 20 <= np.median(centre) <= 50, path.name          # brain parenchyma
        assert ((hu > -1010) & (hu < -990)).sum() > 1000, path.name   # air around the head
        assert hu.max() > 1000, path.name                           # skull
        assert meta["image_id"] == path.stem and meta["patient_id"].startswith("ID_")
        assert not math.isnan(meta["position"])
    assert notes == {"int16;intercept=-1024", "uint12;intercept=-1024"}   # the fix never fires


def test_real_ge_series_untouched(real_dicom_dir):
    paths = sorted((real_dicom_dir / "ge_head_series").glob("*.dcm"))
    positions = []
    for path in paths:
        hu, meta = read_hu(path)
        ds = read_back(path)
        np.testing.assert_array_equal(hu, ds.pixel_array.astype(np.float32))   # intercept 0
        assert meta["storage"] == "int16;intercept=0"
        assert hu.min() == -1500
        positions.append(meta["position"])
    assert len(set(positions)) == len(paths) == 28


# ---- pydicom's own files, offline only ------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def offline_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} not available offline (install pydicom-data)")
    return Path(path)


def test_pydicom_ct_small(no_network):
    hu, meta = read_hu(offline_file("CT_small.dcm"))
    assert hu.shape == (128, 128) and meta["storage"] == "int16;intercept=-1024"


@pytest.mark.parametrize("name,reason", [("MR_small.dcm", "modality MR"),
                                         ("SC_rgb.dcm", "modality OT")])
def test_pydicom_non_ct_files_fail(no_network, name, reason):
    with pytest.raises(DicomError, match=reason):
        read_hu(offline_file(name))


def _variant_of_ct_small(tmp_path: Path, **tags) -> Path:
    ds = pydicom.dcmread(offline_file("CT_small.dcm"))
    for key, value in tags.items():
        setattr(ds, key, value)
    path = tmp_path / "variant.dcm"
    ds.save_as(path)
    return path


def _tiny_ct(tmp_path: Path, raw: list[int], bits_stored: int, signed: int, intercept,
             slope="1") -> Path:
    """A 2x2 CT built on CT_small with these raw 16-bit words as pixel data."""
    ds = pydicom.dcmread(offline_file("CT_small.dcm"))
    ds.Rows, ds.Columns = 2, 2
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, signed
    ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    ds.PixelData = np.array(raw, dtype="<u2").tobytes()
    ds.save_as(tmp_path / "tiny.dcm")
    return tmp_path / "tiny.dcm"


def test_bits_above_bits_stored_are_ignored(no_network, tmp_path):
    # unsigned 12-bit with junk in the top 4 bits: 0xF064 -> 100, 0x1FFF -> 4095
    path = _tiny_ct(tmp_path, [0xF064, 0x1FFF, 0x0000, 0x8400], 12, 0, -1024)
    np.testing.assert_array_equal(read_hu(path)[0], [[-924, 3071], [-1024, 0]])
    # signed 12-bit: 0x0FFF is -1, 0x07FF is 2047, 0x0800 is -2048 (sign-extended)
    path = _tiny_ct(tmp_path, [0x0FFF, 0x07FF, 0x0800, 0x0000], 12, 1, "0")
    np.testing.assert_array_equal(read_hu(path)[0], [[-1, 2047], [-2048, 0]])


def test_rescale_tags_as_strings_and_multivalue(no_network, tmp_path):
    # intercept as a 2-valued MultiValue, slope as a decimal string: HU = 2.0 * px - 1000
    path = _tiny_ct(tmp_path, [0, 500, 1000, 1020], 16, 1, ["-1000.000000", "-1000"], "2.000000")
    assert type(read_back(path).RescaleIntercept).__name__ == "MultiValue"
    hu, meta = read_hu(path)
    np.testing.assert_array_equal(hu, [[-1000, 0], [1000, 1040]])
    assert meta["storage"] == "int16;intercept=-1000;slope=2"


def test_colour_ct_fails(no_network, tmp_path):
    path = _variant_of_ct_small(tmp_path, SamplesPerPixel=3, PhotometricInterpretation="RGB")
    with pytest.raises(DicomError, match="colour image"):
        read_hu(path)


def test_monochrome1_is_not_inverted(no_network, tmp_path):
    plain, _ = read_hu(offline_file("CT_small.dcm"))
    hu, meta = read_hu(_variant_of_ct_small(tmp_path, PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_array_equal(hu, plain)
    assert meta["storage"].endswith("MONOCHROME1")


def test_truncated_ct_fails(no_network, tmp_path):
    data = offline_file("CT_small.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-5000])
    with pytest.raises(DicomError, match="truncated"):
        read_hu(tmp_path / "cut.dcm")
    (tmp_path / "cut_header.dcm").write_bytes(data[:700])
    with pytest.raises(DicomError, match="header-only or truncated"):
        read_hu(tmp_path / "cut_header.dcm")


def test_jpeg2000_head_ct_decodes(no_network):
    reference, _ = read_hu(offline_file("693_UNCR.dcm"))          # real 512x512 head CT slice
    lossless, meta = read_hu(offline_file("693_J2KR.dcm"))
    np.testing.assert_array_equal(lossless, reference)
    assert "JPEG2000Lossless" in meta["storage"]
    # the lossy file is another slice; its uncompressed twin holds what the decoder must give
    lossy, _ = read_hu(offline_file("693_J2KI.dcm"))
    np.testing.assert_array_equal(lossy, read_hu(offline_file("693_UNCI.dcm"))[0])


def test_rle_ct_decodes(no_network, tmp_path):
    ds = pydicom.dcmread(offline_file("CT_small.dcm"))
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm")
    hu, meta = read_hu(tmp_path / "rle.dcm")
    np.testing.assert_array_equal(hu, read_hu(offline_file("CT_small.dcm"))[0])
    assert "RLELossless" in meta["storage"]


def test_jpeg_ls_decodes(no_network, tmp_path):
    # No CT in JPEG-LS ships with pydicom; relabel the MR one (the codec does not care).
    ds = pydicom.dcmread(offline_file("MR_small_jpeg_ls_lossless.dcm"))
    ds.Modality, ds.RescaleIntercept, ds.RescaleSlope = "CT", -1024, 1
    ds.save_as(tmp_path / "jls.dcm")
    hu, meta = read_hu(tmp_path / "jls.dcm")
    raw = pydicom.dcmread(offline_file("MR_small.dcm")).pixel_array
    np.testing.assert_array_equal(hu, raw.astype(np.float32) - 1024)
    assert "JPEGLSLossless" in meta["storage"]


@pytest.fixture
def only_permissive_decoders(monkeypatch):
    """Hide pylibjpeg's GPL-3.0 libjpeg plugin where it is installed: the default install has
    none, so JPEG Lossless and JPEG-LS must decode through GDCM (BSD) alone."""
    from pydicom.pixels import decoders

    for decoder in (decoders.JPEGLosslessDecoder, decoders.JPEGLosslessSV1Decoder,
                    decoders.JPEGLSLosslessDecoder, decoders.JPEGLSNearLosslessDecoder):
        kept = {name: plugin for name, plugin in decoder._available.items() if name != "pylibjpeg"}
        monkeypatch.setattr(decoder, "_available", kept)
        assert "gdcm" in kept, "python-gdcm is a dependency of ich: pip install python-gdcm"


def _to_jpeg_lossless(source: Path, target: Path) -> Path:
    """Re-encode `source` as JPEG Lossless (process 14, SV1) with GDCM: pydicom cannot encode it."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return target


def test_jpeg_lossless_ct_decodes_without_gpl_plugin(no_network, only_permissive_decoders, tmp_path):
    source = offline_file("CT_small.dcm")
    hu, meta = read_hu(_to_jpeg_lossless(source, tmp_path / "jpll.dcm"))
    np.testing.assert_array_equal(hu, read_hu(source)[0])   # lossless: the very same HU
    assert meta["storage"].endswith("JPEGLosslessSV1")


def test_shipped_jpeg_lossless_file_decodes_without_gpl_plugin(no_network, only_permissive_decoders,
                                                                tmp_path):
    # pydicom-data's JPEG Lossless file is NM, 1024x256, 16-bit; relabel it CT as above.
    ds = pydicom.dcmread(offline_file("JPEG-LL.dcm"))
    ds.Modality, ds.RescaleIntercept, ds.RescaleSlope = "CT", 0, 1
    ds.save_as(tmp_path / "jpll.dcm")
    hu, meta = read_hu(tmp_path / "jpll.dcm")
    assert hu.shape == (1024, 256) and meta["storage"].endswith("JPEGLosslessSV1")
    assert hu.min() == 0 and hu.max() == 278   # what GDCM and pylibjpeg-libjpeg both decode


def test_jpeg_ls_decodes_without_gpl_plugin(no_network, only_permissive_decoders, tmp_path):
    test_jpeg_ls_decodes(no_network, tmp_path)


def test_undecodable_compressed_file_fails(no_network, tmp_path):
    ds = pydicom.dcmread(offline_file("693_J2KR.dcm"))
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 200])
    ds.save_as(tmp_path / "broken.dcm")
    with pytest.raises(DicomError, match="cannot decode pixel data"):
        read_hu(tmp_path / "broken.dcm")
