"""Medical image I/O: PNG/JPEG, DICOM (files, multi-frame, series folders), NIfTI, .npy.

Every loader returns a :class:`MedicalImage`: the pixel array in physical units where the
file defines them (Hounsfield units for CT), the voxel spacing, and what was done.

Conventions (stated once, used everywhere in medvl):

* 2D images are ``[H, W]`` (grayscale) or ``[H, W, 3]`` (colour); volumes are ``[D, H, W]``.
* Volumes use the radiological display orientation that axial DICOM slices have: ``D``
  runs inferior -> superior, ``H`` anterior -> posterior (row 0 is anterior), ``W`` patient
  right -> left. NIfTI data are first reoriented to RAS+ (``nibabel.as_closest_canonical``)
  and then transposed and flipped into this layout; DICOM series are sorted along the
  slice normal by ImagePositionPatient.
* DICOM pixel values go through the Modality LUT (RescaleSlope / RescaleIntercept, via
  ``pydicom.pixels.apply_modality_lut``) so CT values are HU. Windowing is separate
  (:func:`apply_window`, DICOM PS3.3 C.11.2.1.2.1 linear function), because a model may
  want several windows of the same HU data. MONOCHROME1 (inverted grey scale, common in
  CR) is recorded in ``meta["photometric"]`` and inverted by :func:`to_unit_range`.
* Sizes are checked from the header before any pixel is decoded: ``max_pixels`` for 2D
  (default 64 Mpx: a 8k x 8k scan) and ``max_voxels`` for 3D (default 512 M voxels), so a
  decompression bomb or a corrupt header that claims absurd dimensions fails fast.

Every failure caused by the file raises :class:`MedvlUserError` naming the file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medvl.errors import MedvlUserError

MAX_PIXELS = 64_000_000
MAX_VOXELS = 512_000_000

#: (center, width) in HU; the usual radiology presets.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
    "soft_tissue": (50.0, 400.0),
}

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm"}
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}


@dataclass
class MedicalImage:
    """Decoded pixels plus what a model or a viewer needs to know about them."""

    array: np.ndarray  # [H, W], [H, W, 3] or [D, H, W]
    kind: str  # "image" or "volume"
    spacing: tuple[float, ...] | None = None  # mm, same axis order as array (2D: (dy, dx))
    modality: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


# ---- dispatch ---------------------------------------------------------------------

#: the largest image or volume file opened (a compressed NIfTI of MAX_VOXELS fits well within it)
MAX_IMAGE_BYTES = 8 << 30


def detect_kind(path: Path) -> str:
    """``dicom``, ``dicom-series``, ``nifti``, ``npy`` or ``pil`` from the name and magic bytes."""
    name = path.name.lower()
    if path.is_dir():
        return "dicom-series"
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return "nifti"
    if name.endswith(".npy"):
        return "npy"
    if path.suffix.lower() in DICOM_SUFFIXES:
        return "dicom"
    with open(path, "rb") as f:
        head = f.read(132)
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    return "pil"


def load_medical(path: str | Path, *, max_pixels: int = MAX_PIXELS, max_voxels: int = MAX_VOXELS,
                 frame: int | None = None) -> MedicalImage:
    """Load any supported file (or a folder holding one DICOM series).

    ``frame`` picks one volume of a 4D NIfTI (otherwise a 4D file is an error).
    """
    path = Path(path)
    if not path.exists():
        raise MedvlUserError("image file not found", path=path)
    if not path.is_dir():  # a folder is a DICOM series; anything else must be a regular file (a FIFO blocks)
        from medvl.data.textfile import check_input_file
        check_input_file(path, max_bytes=MAX_IMAGE_BYTES)
    kind = detect_kind(path)
    if kind == "nifti":
        img = load_nifti(path, max_voxels=max_voxels, frame=frame)
    elif kind == "npy":
        img = load_npy(path, max_pixels=max_pixels, max_voxels=max_voxels)
    elif kind == "dicom":
        img = load_dicom(path, max_pixels=max_pixels, max_voxels=max_voxels)
    elif kind == "dicom-series":
        img = load_dicom_series(path, max_voxels=max_voxels)
    else:
        img = load_pil(path, max_pixels=max_pixels)
    return _finite(img, path)


def _finite(img: MedicalImage, path: Path) -> MedicalImage:
    """Refuse NaN / infinite pixels: one NaN min-maxed blanks the whole image and an infinity turns every
    probability downstream into NaN, silently. The user decides how to fill them."""
    a = img.array
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a)
        if bad.any():
            raise MedvlUserError(f"{int(bad.sum()):,} of {a.size:,} pixel values are NaN or infinite; fill them "
                                 "(e.g. numpy.nan_to_num) before use", path=path)
    return img


# ---- PNG / JPEG / ... -------------------------------------------------------------

def load_pil(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> MedicalImage:
    """An ordinary image file. 16-bit grayscale PNGs keep their 16 bits."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            if w * h > max_pixels:
                raise MedvlUserError(f"image is {w}x{h} = {w * h:,} pixels, over the limit of "
                                     f"{max_pixels:,} (raise max_pixels if this is intended)", path=path)
            img.load()
    except MedvlUserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MedvlUserError(f"refused as a possible decompression bomb ({e})", path=path) from None
    except UnidentifiedImageError:
        raise MedvlUserError("not a readable image (unknown or corrupt format)", path=path) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MedvlUserError(f"corrupt or truncated image ({e})", path=path) from None
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.int32).astype(np.uint16 if mode.startswith("I;16") else np.int32)
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
    elif mode in ("L", "1"):
        arr = np.asarray(img.convert("L"))
    elif mode == "LA":
        arr = np.asarray(img.convert("L"))
    else:
        arr = np.asarray(img.convert("RGB"))
    return MedicalImage(arr, "image", meta={"path": str(path), "format": img.format, "mode": mode})


# ---- DICOM ------------------------------------------------------------------------

def _read_dicom_header(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        try:  # files without the 128-byte preamble are common from older scanners
            return pydicom.dcmread(path, force=True)
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise MedvlUserError(f"not a readable DICOM file ({e})", path=path) from None
    except Exception as e:  # noqa: BLE001
        raise MedvlUserError(f"not a readable DICOM file ({e})", path=path) from None


def _dicom_pixels(ds, path: Path, *, max_pixels: int, max_voxels: int) -> np.ndarray:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise MedvlUserError("DICOM file has no pixel data (a structured report, presentation "
                             "state or other non-image object?)", path=path)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if rows <= 0 or cols <= 0:
        raise MedvlUserError(f"DICOM header gives an empty image ({rows}x{cols})", path=path)
    n = rows * cols * frames * spp
    if (frames == 1 and rows * cols > max_pixels) or n > max_voxels:
        raise MedvlUserError(f"DICOM header claims {frames}x{rows}x{cols}x{spp} values, over the "
                             "size limit", path=path)
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - decoder errors come in many types
        msg = str(e)
        hint = ""
        if "plugin" in msg.lower() or "decod" in msg.lower():
            hint = " (compressed transfer syntax: pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg)"
        raise MedvlUserError(f"cannot decode DICOM pixel data: {msg}{hint}", path=path) from None
    return arr


def dicom_window(ds) -> tuple[float, float] | None:
    """(center, width) from WindowCenter / WindowWidth (first value when several)."""
    c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
    if c is None or w is None:
        return None
    c = c[0] if hasattr(c, "__len__") and not isinstance(c, str) else c
    w = w[0] if hasattr(w, "__len__") and not isinstance(w, str) else w
    try:
        return float(c), float(w)
    except (TypeError, ValueError):
        return None


def load_dicom(path: str | Path, *, max_pixels: int = MAX_PIXELS, max_voxels: int = MAX_VOXELS) -> MedicalImage:
    """One DICOM file: a 2D image, or a volume ``[D, H, W]`` when it is multi-frame."""
    from pydicom.pixels import apply_modality_lut

    path = Path(path)
    ds = _read_dicom_header(path)
    raw = _dicom_pixels(ds, path, max_pixels=max_pixels, max_voxels=max_voxels)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    colour = int(ds.get("SamplesPerPixel", 1) or 1) > 1
    if colour:
        arr = np.asarray(raw)
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space
            arr = convert_color_space(arr, photometric, "RGB")
    else:
        arr = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    has_rescale = "RescaleSlope" in ds or "RescaleIntercept" in ds
    modality = str(ds.get("Modality", "")) or None
    ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    spacing2 = (float(ps[0]), float(ps[1])) if ps is not None and len(ps) >= 2 and float(ps[0]) > 0 else None
    meta = {"path": str(path), "photometric": photometric, "window": dicom_window(ds),
            "units": "HU" if modality == "CT" and has_rescale else "modality",
            "bits_stored": int(ds.get("BitsStored", 8) or 8)}
    if frames > 1 and not colour or (colour and arr.ndim == 4):
        thick = ds.get("SliceThickness") or ds.get("SpacingBetweenSlices")
        spacing = (float(thick), *spacing2) if thick and spacing2 else None
        return MedicalImage(arr, "volume", spacing, modality, meta)
    return MedicalImage(arr, "image", spacing2, modality, meta)


def load_dicom_series(folder: str | Path, *, max_voxels: int = MAX_VOXELS) -> MedicalImage:
    """A folder of single-frame slices of one series -> volume ``[D, H, W]``.

    Slices are sorted by their position along the slice normal (ImageOrientationPatient x
    ImagePositionPatient), falling back to InstanceNumber; the slice spacing is the median
    distance between sorted positions. Files from more than one series are an error.
    """
    from pydicom.pixels import apply_modality_lut

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise MedvlUserError("folder holds no files (expected one DICOM series)", path=folder)
    slices = []
    for p in files:
        ds = _read_dicom_header(p)
        if "PixelData" not in ds:
            continue
        slices.append((p, ds))
    if not slices:
        raise MedvlUserError("no DICOM image slices in the folder", path=folder)
    uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(uids) > 1:
        raise MedvlUserError(f"folder mixes {len(uids)} series; give one series per folder", path=folder)
    rows, cols = int(slices[0][1].Rows), int(slices[0][1].Columns)
    if rows * cols * len(slices) > max_voxels:
        raise MedvlUserError("series is over the voxel limit", path=folder)

    def position(ds) -> float:
        iop, ipp = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
        if iop is not None and ipp is not None:
            normal = np.cross(np.array(iop[:3], float), np.array(iop[3:], float))
            return float(np.dot(normal, np.array(ipp, float)))
        return float(ds.get("InstanceNumber", 0) or 0)

    slices.sort(key=lambda t: position(t[1]))
    arrs = []
    for p, ds in slices:
        a = _dicom_pixels(ds, p, max_pixels=MAX_PIXELS, max_voxels=max_voxels)
        if a.shape != (rows, cols):
            raise MedvlUserError(f"slice is {a.shape}, the series is {(rows, cols)}", path=p)
        arrs.append(np.asarray(apply_modality_lut(a, ds), dtype=np.float32))
    vol = np.stack(arrs)  # [D, H, W]
    ds0 = slices[0][1]
    pos = [position(ds) for _, ds in slices]
    dz = float(np.median(np.diff(pos))) if len(pos) > 1 else float(ds0.get("SliceThickness", 1) or 1)
    ps = ds0.get("PixelSpacing")
    spacing = (abs(dz), float(ps[0]), float(ps[1])) if ps is not None else None
    modality = str(ds0.get("Modality", "")) or None
    meta = {"path": str(folder), "photometric": str(ds0.get("PhotometricInterpretation", "MONOCHROME2")),
            "window": dicom_window(ds0), "units": "HU" if modality == "CT" else "modality",
            "n_slices": len(slices)}
    return MedicalImage(vol, "volume", spacing, modality, meta)


# ---- NIfTI ------------------------------------------------------------------------

def load_nifti(path: str | Path, *, max_voxels: int = MAX_VOXELS, frame: int | None = None) -> MedicalImage:
    """A NIfTI volume, reoriented to RAS+ and laid out ``[D, H, W]`` (see module docstring)."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as e:  # noqa: BLE001 - nibabel raises several types for bad files
        raise MedvlUserError(f"not a readable NIfTI file ({e})", path=path) from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 4:
        if frame is None:
            raise MedvlUserError(f"NIfTI is 4D {shape}, not a 3D volume; pick one volume with frame=N "
                                 f"(0..{shape[3] - 1})", path=path)
        if not 0 <= frame < shape[3]:
            raise MedvlUserError(f"frame {frame} out of range 0..{shape[3] - 1}", path=path)
    elif len(shape) != 3:
        raise MedvlUserError(f"NIfTI has shape {shape}; a 3D volume is required", path=path)
    if int(np.prod(shape[:3])) > max_voxels:
        raise MedvlUserError(f"NIfTI volume {shape} is over the voxel limit", path=path)
    try:
        if len(img.shape) == 4:
            img = img.slicer[..., frame if frame is not None else 0]
        canon = nib.as_closest_canonical(img)
        data = np.asarray(canon.get_fdata(dtype=np.float32))
    except Exception as e:  # noqa: BLE001 - truncated gzip, short data block, ...
        raise MedvlUserError(f"cannot read NIfTI voxel data ({e})", path=path) from None
    zooms = canon.header.get_zooms()[:3]
    # RAS+ (x: L->R, y: P->A, z: I->S) -> [D=z I->S, H=y A->P, W=x R->L]
    vol = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    meta = {"path": str(path), "orientation": "RAS+ -> [D(I->S), H(A->P), W(R->L)]",
            "original_shape": list(img.shape), "frame": frame}
    return MedicalImage(vol, "volume", (float(zooms[2]), float(zooms[1]), float(zooms[0])), None, meta)


# ---- .npy -------------------------------------------------------------------------

def load_npy(path: str | Path, *, max_pixels: int = MAX_PIXELS, max_voxels: int = MAX_VOXELS) -> MedicalImage:
    """A NumPy array: ``[H, W]`` / ``[H, W, 3]`` image or ``[D, H, W]`` volume. Leading
    singleton axes (M3D's ``[1, D, H, W]``) are dropped. Pickled objects are refused."""
    path = Path(path)
    try:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise MedvlUserError(f"not a plain .npy array ({e})", path=path) from None
    except OSError as e:
        raise MedvlUserError(f"cannot read .npy file ({e})", path=path) from None
    shape = tuple(mm.shape)
    while len(shape) > 3 and shape[0] == 1:
        shape = shape[1:]
    n = int(np.prod(shape)) if shape else 0
    if n > max_voxels:
        raise MedvlUserError(f"array {shape} is over the size limit", path=path)
    arr = np.array(mm).reshape(shape)
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4):
        if arr.ndim == 2 and n > max_pixels:
            raise MedvlUserError(f"image {shape} is over the pixel limit", path=path)
        return MedicalImage(arr, "image", meta={"path": str(path)})
    if arr.ndim == 3:
        return MedicalImage(arr, "volume", meta={"path": str(path)})
    raise MedvlUserError(f"array has shape {shape}; expected [H, W], [H, W, 3] or [D, H, W]", path=path)


# ---- intensities ------------------------------------------------------------------

def resolve_window(window: str | Sequence[float] | None, img: MedicalImage | None = None
                   ) -> tuple[float, float] | None:
    """A window given as a preset name, ``"file"`` (the DICOM's own), or (center, width)."""
    if window is None:
        return None
    if isinstance(window, str):
        if window == "file":
            return img.meta.get("window") if img is not None else None
        try:
            return WINDOW_PRESETS[window]
        except KeyError:
            raise MedvlUserError(f"unknown window preset {window!r}; known: "
                                 f"{', '.join(WINDOW_PRESETS)}, file, or (center, width)") from None
    c, w = window
    return float(c), float(w)


def apply_window(arr: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI function (PS3.3 C.11.2.1.2.1) mapped to [0, 1], float32."""
    x = np.asarray(arr, dtype=np.float32)
    if width <= 1:
        return (x > center - 0.5).astype(np.float32)
    y = ((x - (center - 0.5)) / (width - 1.0)) + 0.5
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def to_unit_range(img: MedicalImage, window: str | Sequence[float] | None = None) -> np.ndarray:
    """Intensities in [0, 1] (float32), ready for a model or a screen.

    Order of choice: the ``window`` asked for; else the DICOM file's own window; else the
    full range for 8-bit data, or min-max for anything else (16-bit PNGs often hold 12
    bits, so dividing by 65535 would leave them dark). MONOCHROME1
    images are inverted so that bone is bright, as on every viewer.
    """
    arr = img.array
    win = resolve_window(window, img) if window is not None else img.meta.get("window")
    if win is not None and arr.ndim >= 2 and not (arr.ndim == 3 and img.kind == "image"):
        out = apply_window(arr, *win)
    elif arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    else:
        a = arr.astype(np.float32)
        lo, hi = float(a.min()), float(a.max())
        out = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    if img.meta.get("photometric") == "MONOCHROME1":
        out = 1.0 - out
    return out


def to_pil(img: MedicalImage, window: str | Sequence[float] | None = None, *, slice_index: int | None = None):
    """An 8-bit RGB PIL image for display or for Hugging Face processors.

    Volumes give their middle slice unless ``slice_index`` is set.
    """
    from PIL import Image

    x = to_unit_range(img, window)
    if img.kind == "volume":
        x = x[x.shape[0] // 2 if slice_index is None else slice_index]
    x8 = (np.clip(x, 0, 1) * 255.0 + 0.5).astype(np.uint8)
    if x8.ndim == 2:
        return Image.fromarray(x8, "L").convert("RGB")
    return Image.fromarray(x8[..., :3], "RGB")
