"""Run by the *reference* Python (albumentations 1.0.3 + OpenCV, a side environment; never imported by hias_nb):
apply each recorded CCA operation with albumentations' own functions, the parameters hias_nb drew.

    REFERENCE_PYTHON strong_view_albumentations.py CASES.npz OPS.json OUT.npz
"""

import json
import sys

import albumentations.augmentations.functional as F
import numpy as np

JITTER = {
    "brightness": F.adjust_brightness_torchvision,
    "contrast": F.adjust_contrast_torchvision,
    "saturation": F.adjust_saturation_torchvision,
    "hue": F.adjust_hue_torchvision,
}


def apply(name: str, img: np.ndarray, p: dict) -> np.ndarray:
    if name == "color_jitter":  # ColorJitter.apply: the four sub-operations in the drawn order
        for sub in p["order"]:
            img = JITTER[sub](img, p[sub])
        return img
    if name == "gaussian_blur":  # GaussianBlur(blur_limit=(3, 41), sigma_limit=0)
        return F.gaussian_blur(img, p["ksize"], 0)
    if name == "random_contrast":  # RandomContrast(limit=(0, 3)): brightness 0, brightness_by_max
        return F.brightness_contrast_adjust(img, p["alpha"], 0, True)
    if name == "random_brightness":  # RandomBrightness(limit=0.5)
        return F.brightness_contrast_adjust(img, 1, p["beta"], True)
    if name == "posterize":
        return F.posterize(img, p["bits"])
    if name == "equalize":
        return F.equalize(img, mode="cv", by_channels=True)
    if name == "solarize":
        return F.solarize(img, p["threshold"])
    if name == "to_gray":
        return F.to_gray(img)
    raise ValueError(name)


def main() -> None:
    cases, ops, out = sys.argv[1:4]
    images = np.load(cases)["images"]  # [N,H,W,3] uint8
    records = json.loads(open(ops).read())
    result = np.stack([apply(r["name"], images[i].copy(), r["params"]) for i, r in enumerate(records)])
    np.savez(out, images=result)


if __name__ == "__main__":
    main()
