import numpy as np
import pytest

from medvl.data.imageio import MedicalImage
from medvl.data.transforms import CLIP_MEAN, CLIP_STD, preprocess_2d, preprocess_3d
from medvl.errors import MedvlUserError


def test_preprocess_2d_pad_keeps_aspect():
    img = MedicalImage(np.full((100, 200), 255, np.uint8), "image")
    x = preprocess_2d(img, 64, mode="pad", mean=(0, 0, 0), std=(1, 1, 1))
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    assert np.allclose(x[:, 16:48, :], 1.0) and np.allclose(x[:, :16, :], 0.0)  # 32-px band, padded


@pytest.mark.parametrize("mode", ["resize", "crop", "pad"])
def test_preprocess_2d_modes_and_normalisation(mode):
    img = MedicalImage(np.zeros((50, 80, 3), np.uint8), "image")
    x = preprocess_2d(img, (32, 48), mode=mode)
    assert x.shape == (3, 32, 48)
    if mode != "pad":
        np.testing.assert_allclose(x[:, 0, 0], -np.array(CLIP_MEAN) / np.array(CLIP_STD), rtol=1e-5)


def test_preprocess_2d_windowed_ct():
    hu = np.linspace(-1000, 1000, 64 * 64, dtype=np.float32).reshape(64, 64)
    img = MedicalImage(hu, "image", modality="CT")
    x = preprocess_2d(img, 64, window=(40, 400), mean=(0, 0, 0), std=(1, 1, 1))
    assert x.min() == 0.0 and x.max() == 1.0 and x.shape == (3, 64, 64)


def test_preprocess_3d_shape_clip_and_spacing():
    vol = MedicalImage(np.random.default_rng(0).normal(0, 500, (20, 40, 40)).astype(np.float32),
                       "volume", spacing=(5.0, 1.0, 1.0))
    x = preprocess_3d(vol, (8, 32, 32), window="abdomen")
    assert x.shape == (1, 8, 32, 32) and x.min() >= 0 and x.max() <= 1
    z = preprocess_3d(vol, (8, 16, 16), clip=(-100, 100), spacing=(2.0, 2.0, 2.0), normalise="zscore")
    assert abs(float(z.mean())) < 1e-4
    with pytest.raises(MedvlUserError, match="needs a"):
        preprocess_3d(MedicalImage(np.zeros((4, 4), np.float32), "image"))
