"""Medical image I/O on the real DICOM / NIfTI fixtures, with pydicom / nibabel as reference."""

import shutil

import numpy as np
import pytest

from conftest import shared
from medvl.data.imageio import (WINDOW_PRESETS, apply_window, load_dicom_series, load_medical,
                                to_pil, to_unit_range)
from medvl.errors import MedvlUserError

pydicom = pytest.importorskip("pydicom")
from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: E402


def test_ct_hounsfield_units():
    f = shared("medical_formats", "pydicom", "CT_small.dcm")
    img = load_medical(f)
    ds = pydicom.dcmread(f)
    assert img.kind == "image" and img.modality == "CT" and img.meta["units"] == "HU"
    assert float(ds.RescaleIntercept) == -1024.0 and float(ds.RescaleSlope) == 1.0
    np.testing.assert_array_equal(img.array, ds.pixel_array.astype(np.float32) - 1024.0)
    np.testing.assert_array_equal(img.array, apply_modality_lut(ds.pixel_array, ds).astype(np.float32))
    assert img.spacing == pytest.approx((0.661468, 0.661468))


def test_rescale_slope_not_one():
    f = shared("medical_formats", "pydicom_data", "MR2_UNCI.dcm")
    ds = pydicom.dcmread(f)
    img = load_medical(f)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(img.array, expected, rtol=1e-6)


@pytest.mark.parametrize("name", [("pydicom", "MR_small.dcm"), ("nibabel", "0.dcm"), ("pydicom_data", "MR2_UNCI.dcm")])
def test_file_window_matches_pydicom_voi_lut(name):
    f = shared("medical_formats", *name)
    ds = pydicom.dcmread(f)
    img = load_medical(f)
    ref = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    # pydicom maps the window onto the stored range (signed or not), rescaled like the data
    bits = int(ds.BitsStored)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (0, 2 ** bits - 1)
    if "RescaleSlope" in ds:
        lo, hi = (v * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for v in (lo, hi))
    ref01 = (ref - lo) / (hi - lo)
    np.testing.assert_allclose(to_unit_range(img), ref01, atol=1e-4)


def test_window_presets_and_monochrome1():
    ct = load_medical(shared("medical_formats", "pydicom", "CT_small.dcm"))
    lung = to_unit_range(ct, "lung")
    np.testing.assert_allclose(lung, apply_window(ct.array, *WINDOW_PRESETS["lung"]))
    assert 0.0 <= lung.min() and lung.max() <= 1.0
    c, w = WINDOW_PRESETS["bone"]
    np.testing.assert_allclose(to_unit_range(ct, (c, w)), to_unit_range(ct, "bone"))
    with pytest.raises(MedvlUserError, match="unknown window preset"):
        to_unit_range(ct, "liverish")
    cr = load_medical(shared("medical_formats", "pydicom_data", "RG1_UNCI.dcm"))
    assert cr.meta["photometric"] == "MONOCHROME1"
    np.testing.assert_allclose(to_unit_range(cr), 1.0 - apply_window(cr.array, *cr.meta["window"]), atol=1e-6)


def test_colour_ultrasound():
    us = load_medical(shared("medical_formats", "pydicom_data", "US1_UNCI.dcm"))
    assert us.array.shape == (480, 640, 3) and us.modality == "US"
    assert to_pil(us).size == (640, 480)


def test_multiframe_dicom(tmp_path):
    src = shared("medical_formats", "pydicom", "CT_small.dcm")
    ds = pydicom.dcmread(src)
    arr = ds.pixel_array
    frames = np.stack([arr, arr + 10, arr + 20]).astype(arr.dtype)
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    ds.SliceThickness = 5.0
    ds.save_as(tmp_path / "mf.dcm")
    v = load_medical(tmp_path / "mf.dcm")
    assert v.kind == "volume" and v.shape == (3, 128, 128)
    np.testing.assert_array_equal(v.array[2], arr.astype(np.float32) + 20 - 1024)
    assert v.spacing[0] == 5.0


def test_dicom_series_sorted_by_position(tmp_path):
    src = shared("medical_formats", "pydicom", "CT_small.dcm")
    for k, z in enumerate([30.0, 10.0, 20.0]):  # written out of order
        ds = pydicom.dcmread(src)
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelData = (ds.pixel_array + int(z)).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(tmp_path / f"slice{k}.dcm")
    v = load_dicom_series(tmp_path)
    assert v.shape == (3, 128, 128) and v.spacing[0] == pytest.approx(10.0)
    base = pydicom.dcmread(src).pixel_array.astype(np.float32) - 1024
    for i, z in enumerate([10, 20, 30]):
        np.testing.assert_array_equal(v.array[i], base + z)
    assert load_medical(tmp_path).shape == (3, 128, 128)


def test_nifti_reoriented_to_canonical(tmp_path):
    nib = pytest.importorskip("nibabel")
    f = shared("medical_formats", "nibabel", "anatomical.nii")
    img = load_medical(f)
    canon = nib.as_closest_canonical(nib.load(str(f)))
    ref = canon.get_fdata(dtype=np.float32).transpose(2, 1, 0)[:, ::-1, ::-1]
    np.testing.assert_array_equal(img.array, ref)
    assert img.kind == "volume" and img.spacing == (2.0, 2.0, 2.0)
    # the same physical volume stored flipped (LAS instead of RAS) loads identically
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    ras = np.diag([2.0, 3.0, 4.0, 1.0])
    las = ras.copy()
    las[0, 0] = -2.0
    las[0, 3] = 2.0 * 3  # x index i maps to x = 6 - 2i: same voxels as RAS with i reversed
    nib.save(nib.Nifti1Image(data, ras), tmp_path / "ras.nii.gz")
    nib.save(nib.Nifti1Image(data[::-1].copy(), las), tmp_path / "las.nii.gz")
    a, b = load_medical(tmp_path / "ras.nii.gz"), load_medical(tmp_path / "las.nii.gz")
    np.testing.assert_array_equal(a.array, b.array)
    assert a.shape == (6, 5, 4) and a.spacing == (4.0, 3.0, 2.0)


def test_nifti_4d_needs_a_frame():
    f = shared("medical_formats", "nibabel", "example4d.nii.gz")
    with pytest.raises(MedvlUserError, match="4D .*frame=N"):
        load_medical(f)
    assert load_medical(f, frame=1).shape == (24, 96, 128)


def test_npy_volume_and_image(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((1, 8, 16, 16), np.float32))  # M3D's [1, D, H, W]
    np.save(tmp_path / "i.npy", np.zeros((16, 20), np.uint8))
    assert load_medical(tmp_path / "v.npy").kind == "volume"
    assert load_medical(tmp_path / "v.npy").shape == (8, 16, 16)
    assert load_medical(tmp_path / "i.npy").kind == "image"


def test_png_16bit_and_jpeg(tmp_path):
    from PIL import Image
    a = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 13) % 4096
    Image.fromarray(a).save(tmp_path / "x16.png")
    img = load_medical(tmp_path / "x16.png")
    assert img.array.dtype == np.uint16 and img.array.max() == a.max()
    x = to_unit_range(img)
    assert x.min() == 0.0 and x.max() == 1.0


# ---- bad input -------------------------------------------------------------------------

def test_truncated_jpeg(tmp_path):
    src = shared("vqa_rad", "images", "synpic54610.jpg")
    data = src.read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(MedvlUserError, match=r"t\.jpg.*(truncated|corrupt)"):
        load_medical(tmp_path / "t.jpg")


def test_corrupt_and_missing_files(tmp_path):
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(MedvlUserError, match="c.png"):
        load_medical(tmp_path / "c.png")
    (tmp_path / "c.dcm").write_bytes(b"not a dicom at all")
    with pytest.raises(MedvlUserError, match="c.dcm"):
        load_medical(tmp_path / "c.dcm")
    with pytest.raises(MedvlUserError, match="not found"):
        load_medical(tmp_path / "nope.png")
    (tmp_path / "p.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(MedvlUserError, match="p.npy"):
        load_medical(tmp_path / "p.npy")


def test_dicom_without_pixel_data(tmp_path):
    ds = pydicom.dcmread(shared("medical_formats", "pydicom", "CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(MedvlUserError, match="nopix.dcm.*no pixel data"):
        load_medical(tmp_path / "nopix.dcm")


def test_nifti_not_3d(tmp_path):
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), tmp_path / "flat.nii")
    with pytest.raises(MedvlUserError, match="flat.nii.*3D volume is required"):
        load_medical(tmp_path / "flat.nii")


def test_size_limits_checked_before_decoding(tmp_path):
    from PIL import Image
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")  # 81 Mpx, a few kB on disk
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    with pytest.raises(MedvlUserError, match="over the limit"):
        load_medical(tmp_path / "bomb.png")
    ds = pydicom.dcmread(shared("medical_formats", "pydicom", "CT_small.dcm"))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 1000  # a lying header
    ds.save_as(tmp_path / "liar.dcm")
    with pytest.raises(MedvlUserError, match="size limit"):
        load_medical(tmp_path / "liar.dcm")


def test_dicom_series_mixed_series(tmp_path):
    src = shared("medical_formats", "pydicom", "CT_small.dcm")
    shutil.copy(src, tmp_path / "a.dcm")
    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.save_as(tmp_path / "b.dcm")
    with pytest.raises(MedvlUserError, match="mixes 2 series"):
        load_medical(tmp_path)
