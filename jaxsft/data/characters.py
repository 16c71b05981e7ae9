"""A real source task that ships offline: 62 printed characters (0-9, A-Z, a-z) rendered from
the TrueType faces inside matplotlib's wheel, augmented at render time, as an image folder.

Whole faces are held out for validation, so the source's own top-1 measures generalisation to
an unseen typeface, not to another augmentation of a seen one. Everything is seeded: the same
arguments write the same bytes.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np

CHARACTERS = string.digits + string.ascii_uppercase + string.ascii_lowercase  # 62 classes
IMAGE_SIZE = 32
CANVAS = 64  # rendered at twice the size, then transformed and reduced
# Faces with every one of the 62 glyphs (the Display, STIX size/non-Unicode and math-symbol
# faces lack them). Four faces of distinct families are kept for validation only.
TRAIN_FACES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
    "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmtt10.ttf",
)
VAL_FACES = ("DejaVuSansMono-Bold.ttf", "DejaVuSerif-Italic.ttf", "STIXGeneralItalic.ttf",
             "cmss10.ttf")


def class_name(ch: str) -> str:
    """Folder name of a character: digit_7, upper_A, lower_a (safe on case-blind disks)."""
    kind = "digit" if ch.isdigit() else "upper" if ch.isupper() else "lower"
    return f"{kind}_{ch}"


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def render(ch: str, face: str, rng: np.random.Generator) -> np.ndarray:
    """One augmented 32x32 uint8 image of `ch` in `face`: white ink on black, as the digits."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    font = ImageFont.truetype(str(font_dir() / face), size=int(rng.integers(34, 46)))
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
    draw.text(((CANVAS - (right - left)) / 2 - left, (CANVAS - (bottom - top)) / 2 - top),
              ch, fill=255, font=font)
    if rng.random() < 0.3:  # a heavier stroke than the face's own
        canvas = canvas.filter(ImageFilter.MaxFilter(3))
    # Random affine about the centre: rotation, scale, shear, translation (output -> input map).
    angle = np.deg2rad(rng.uniform(-12, 12))
    scale = rng.uniform(0.8, 1.1)
    shear = rng.uniform(-0.25, 0.25)
    forward = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    forward = scale * forward @ np.array([[1.0, shear], [0.0, 1.0]])
    inverse = np.linalg.inv(forward)
    centre = np.array([CANVAS / 2, CANVAS / 2])
    shift = rng.uniform(-5, 5, size=2)
    offset = centre - inverse @ (centre + shift)
    coeffs = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    canvas = canvas.transform((CANVAS, CANVAS), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.2)))
    small = np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), np.float32)
    small = small + rng.normal(0.0, rng.uniform(0.0, 12.0), small.shape)
    return np.clip(small, 0, 255).astype(np.uint8)


def write_character_folders(root: str | Path, *, train_per_face: int = 4, val_per_face: int = 2,
                            seed: int = 0) -> Path:
    """root/{train,val}/<class>/*.png: every character in every training face `train_per_face`
    times, and in every held-out face `val_per_face` times. Returns root."""
    from PIL import Image

    root = Path(root)
    for split, faces, copies in (("train", TRAIN_FACES, train_per_face),
                                 ("val", VAL_FACES, val_per_face)):
        for c, ch in enumerate(CHARACTERS):
            folder = root / split / class_name(ch)
            folder.mkdir(parents=True, exist_ok=True)
            for f, face in enumerate(faces):
                # One generator per (split, char, face): any subset renders the same images.
                rng = np.random.default_rng([seed, split == "val", c, f])
                for k in range(copies):
                    Image.fromarray(render(ch, face, rng), mode="L").save(
                        folder / f"{Path(face).stem}_{k}.png")
    return root
