"""The seed's sample images, shipped so ``imgclf train`` works with no arguments.

``flowers/``: 200 photos, 5 labels x 40 (CC BY 2.0; see flowers/LICENSE.txt for
each photographer). ``predict/``: the seed's 4 images for trying ``predict``.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def sample_data_dir(name: str = "flowers") -> Path:
    """Folder of a bundled sample set: ``"flowers"`` or ``"predict"``."""
    return _HERE / name
