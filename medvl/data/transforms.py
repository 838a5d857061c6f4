"""Preprocessing from decoded medical images to model tensors, 2D and 3D.

2D (for CLIP / SigLIP / ViT encoders): intensities to [0, 1] with a window
(:func:`medvl.data.imageio.to_unit_range`), grayscale replicated to 3 channels, resized
so the longest side fits and padded to a square (``pad``, the default: no anatomy is
cropped away and the aspect ratio is kept, as LLaVA's "pad" image aspect does), or plain
``resize``, or ``crop`` (shortest side resized then centre crop, as CLIP's own
preprocessing). Then ``(x - mean) / std``.

3D (for volume encoders, following M3D / MedM-VL preprocessing): clip intensities (a
window preset or explicit (low, high) values in HU), optionally resample to a voxel
spacing in mm, resize to a fixed ``(D, H, W)`` with trilinear interpolation, normalise
(``minmax`` to [0, 1], ``zscore``, or ``none``). Output ``[1, D, H, W]`` float32.

Resizing uses PIL for 8-bit data and torch (``F.interpolate``, antialias) for float
data; both are in medvl's core dependencies.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medvl.data.imageio import MedicalImage, resolve_window, to_unit_range
from medvl.errors import MedvlUserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _as_medical(img) -> MedicalImage:
    if isinstance(img, MedicalImage):
        return img
    if isinstance(img, np.ndarray):
        return MedicalImage(img, "volume" if img.ndim == 3 and img.shape[-1] not in (3, 4) else "image")
    try:  # PIL image
        return MedicalImage(np.asarray(img.convert("RGB")), "image")
    except AttributeError:
        raise TypeError(f"expected MedicalImage, ndarray or PIL image, got {type(img).__name__}") from None


def _geometry(h: int, w: int, th: int, tw: int, mode: str) -> tuple[int, int, int, int]:
    """(resized h, resized w, top, left): where the resized image sits in the output.

    For ``pad`` the offsets are >= 0 (padding); for ``crop`` they are <= 0 (cropping).
    """
    if mode == "resize":
        return th, tw, 0, 0
    if mode == "pad":
        s = min(th / h, tw / w)
    elif mode == "crop":
        s = max(th / h, tw / w)
    else:
        raise MedvlUserError(f"unknown resize mode {mode!r} (pad, resize or crop)")
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    if mode == "crop":
        nh, nw = max(nh, th), max(nw, tw)
    return nh, nw, (th - nh) // 2, (tw - nw) // 2


def preprocess_2d(img, size: int | tuple[int, int] = 224, *, mode: str = "pad",
                  window: str | Sequence[float] | None = None,
                  mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                  pad_value: float = 0.0) -> np.ndarray:
    """A 2D image -> normalised float32 ``[3, H, W]``. A volume's middle slice is used.

    8-bit data with no window is resized by PIL on the 8-bit pixels (bilinear with
    antialiasing, what CLIP's own preprocessing does); anything else (HU, 16-bit) is
    windowed to [0, 1] first and resized in float32 with torch (bilinear, antialias), so
    no precision is lost to an 8-bit round trip. Grayscale is resized once and only then
    replicated to 3 channels.
    """
    m = _as_medical(img)
    th, tw = (size, size) if isinstance(size, int) else size
    arr = m.array
    if m.kind == "volume":
        arr = arr[arr.shape[0] // 2]
        m = MedicalImage(arr, "image", meta=m.meta)
    h, w = arr.shape[:2]
    nh, nw, top, left = _geometry(h, w, th, tw, mode)
    fast = arr.dtype == np.uint8 and window is None and m.meta.get("photometric") != "MONOCHROME1"
    if fast:
        from PIL import Image

        pil = Image.fromarray(arr if arr.ndim == 2 else arr[..., :3])
        r = np.asarray(pil.resize((nw, nh), Image.BILINEAR), dtype=np.float32) / 255.0  # [nh, nw(, 3)]
    else:
        import torch
        import torch.nn.functional as F

        x = to_unit_range(m, window)  # [h, w] or [h, w, 3] in [0, 1]
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        t = t[None] if t.ndim == 2 else t[..., :3].permute(2, 0, 1)  # [C, h, w]
        r = F.interpolate(t[None], size=(nh, nw), mode="bilinear", antialias=True,
                          align_corners=False)[0].clamp_(0, 1).numpy()
        r = r[0] if r.shape[0] == 1 else r.transpose(1, 2, 0)  # back to [nh, nw(, 3)]
    out = np.full((th, tw) + r.shape[2:], pad_value, dtype=np.float32)
    oy, ox, iy, ix = max(top, 0), max(left, 0), max(-top, 0), max(-left, 0)
    ch, cw = min(nh, th), min(nw, tw)
    out[oy:oy + ch, ox:ox + cw] = r[iy:iy + ch, ix:ix + cw]
    out = np.repeat(out[None], 3, axis=0) if out.ndim == 2 else out.transpose(2, 0, 1)  # [3, H, W]
    mean_a = np.asarray(mean, np.float32)[:, None, None]
    std_a = np.asarray(std, np.float32)[:, None, None]
    return (out - mean_a) / std_a


def preprocess_3d(vol, shape: Sequence[int] = (32, 256, 256), *,
                  window: str | Sequence[float] | None = None,
                  clip: Sequence[float] | None = None,
                  spacing: Sequence[float] | None = None,
                  normalise: str = "minmax") -> np.ndarray:
    """A volume -> float32 ``[1, D, H, W]``.

    ``window`` (preset or (center, width)) or ``clip`` ((low, high)) bounds intensities
    first; ``spacing`` (mm, ``(dz, dy, dx)``) resamples to that voxel size before the final
    resize to ``shape`` (so a fixed shape then covers a known field of view only if the
    crop is done by the caller; without ``spacing`` the whole volume is squeezed in).
    """
    import torch
    import torch.nn.functional as F

    m = _as_medical(vol)
    if m.kind != "volume" or m.array.ndim != 3:
        raise MedvlUserError(f"preprocess_3d needs a [D, H, W] volume, got shape {m.shape}",
                             path=m.meta.get("path"))
    x = m.array.astype(np.float32)
    if window is not None:
        c, w = resolve_window(window, m) or (None, None)
        if c is not None:
            x = np.clip(x, c - w / 2, c + w / 2)
    elif clip is not None:
        x = np.clip(x, clip[0], clip[1])
    t = torch.from_numpy(np.ascontiguousarray(x))[None, None]  # [1, 1, D, H, W]
    if spacing is not None:
        if m.spacing is None:
            raise MedvlUserError("cannot resample: the volume has no voxel spacing", path=m.meta.get("path"))
        size = [max(1, round(n * s / t_)) for n, s, t_ in zip(t.shape[2:], m.spacing, spacing)]
        t = F.interpolate(t, size=size, mode="trilinear", align_corners=False)
    t = F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=False)[0]  # [1, D, H, W]
    if normalise == "minmax":
        lo, hi = t.min(), t.max()
        t = (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)
    elif normalise == "zscore":
        sd = t.std()
        t = (t - t.mean()) / sd if sd > 0 else t - t.mean()
    elif normalise != "none":
        raise MedvlUserError(f"unknown normalise {normalise!r} (minmax, zscore or none)")
    return t.numpy()


def augment_batch(x, out_size: int, gen, *, crop_scale=(0.75, 1.0), rotate_degrees: float = 10.0,
                  hflip: float = 0.0):
    """Training augmentation for grey-scale medical images, batched on the tensor: random resized
    crop (mild scale range), small rotations, optional horizontal flip (off by default: captions
    name sides), no colour jitter. [B, 3, S, S] uint8 -> [B, 3, out, out] float in [0, 1]."""
    import math

    import torch
    import torch.nn.functional as F

    B, _, S, _ = x.shape
    xf = x.float() / 255.0
    lo, hi = crop_scale
    scale = lo + (hi - lo) * torch.rand(B, generator=gen)
    side = scale.sqrt()  # fraction of the side kept
    cx = (torch.rand(B, generator=gen) * 2 - 1) * (1 - side)
    cy = (torch.rand(B, generator=gen) * 2 - 1) * (1 - side)
    ang = (torch.rand(B, generator=gen) * 2 - 1) * math.radians(rotate_degrees)
    flip = torch.where(torch.rand(B, generator=gen) < hflip, -1.0, 1.0)
    cos, sin = torch.cos(ang) * side, torch.sin(ang) * side
    theta = torch.stack([torch.stack([cos * flip, -sin, cx], 1), torch.stack([sin * flip, cos, cy], 1)], 1)  # [B, 2, 3]
    grid = F.affine_grid(theta, (B, 3, out_size, out_size), align_corners=False)
    return F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def resize_batch(x, out_size: int):
    """[B, 3, S, S] uint8 -> [B, 3, out, out] float in [0, 1] (antialiased bilinear; evaluation)."""
    import torch.nn.functional as F
    return F.interpolate(x.float() / 255.0, size=(out_size, out_size), mode="bilinear", antialias=True,
                         align_corners=False)
