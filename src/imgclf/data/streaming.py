"""Training photos read from disk each epoch, for folders too big to hold decoded.

Fine-tuning normally decodes every training photo once and keeps it in memory
at the network's resize size (a few hundred KB each: 100,000 photos are about
19 GB). When that would exceed a memory budget, :func:`training_pictures`
returns a :class:`StreamedPictures` instead: the same sequence of uint8 CHW
tensors, but each one is decoded from disk when it is read, in the fine-tuning
DataLoader's worker processes, so memory stays flat however many photos there
are. Only torch (imported when a photo is read), Pillow and numpy are needed.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imgclf.data.images import ImageData
from imgclf.data.imaging import Preprocessing, open_image, resize_shorter_side
from imgclf.options import validate

if TYPE_CHECKING:
    import torch

#: Share of the machine's memory the decoded training set may take by default.
DEFAULT_MEMORY_SHARE = 0.25
#: Photos whose headers are read to estimate the decoded size of the set.
_SIZE_SAMPLE = 64


def total_memory_bytes() -> int:
    """Physical memory of this machine."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget_bytes(max_memory_gb: float | None, processes_on_machine: int = 1) -> int:
    """The decoded-set budget of one process: ``max_memory_gb`` (for the whole machine) or a
    quarter of its memory, shared by the training processes running on it."""
    validate("train", {"max_memory_gb": max_memory_gb})
    if max_memory_gb is None:
        total = total_memory_bytes() * DEFAULT_MEMORY_SHARE
    else:
        total = max_memory_gb * 2**30
    return int(total / max(1, processes_on_machine))


def decoded_bytes(images: Sequence[ImageData], prep: Preprocessing) -> int:
    """About how much the photos take decoded at ``prep.resize_to`` (shorter side), estimated
    from the headers of a sample (headers only: nothing is decoded)."""
    from PIL import Image

    if not images:
        return 0
    step = max(1, len(images) // _SIZE_SAMPLE)
    ratios = []
    for im in images[::step][:_SIZE_SAMPLE]:
        try:
            with Image.open(im.source if isinstance(im.source, Path) else io.BytesIO(im.source)) as img:
                w, h = img.size
            ratios.append(max(w, h) / max(1, min(w, h)))
        except Exception:  # an unreadable photo is skipped later; it does not change the estimate much
            continue
    ratio = float(np.mean(ratios)) if ratios else 4 / 3
    return int(len(images) * 3 * prep.resize_to * prep.resize_to * ratio)


def decode_picture(image: ImageData, prep: Preprocessing) -> torch.Tensor:
    """One photo decoded and resized so its shorter side is ``prep.resize_to``, uint8 CHW."""
    import torch

    img = resize_shorter_side(open_image(image.read_bytes(), image.name, draft_size=prep.resize_to), prep)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


class StreamedPictures(Sequence):
    """The training photos as a sequence of decoded tensors, each decoded when read.

    Stands in for the in-memory list of decoded photos wherever one is used (the
    fine-tuning dataset, evaluation); ``loader_workers`` is how many DataLoader
    workers should decode them, so decoding overlaps the training steps.
    """

    def __init__(self, images: Sequence[ImageData], prep: Preprocessing, processes_on_machine: int = 1):
        self.images, self.prep = list(images), prep
        cores = (os.cpu_count() or 1) // max(1, processes_on_machine)  # shared by this machine's ranks
        self.loader_workers = max(1, min(4, cores)) if multiprocessing.get_start_method() == "fork" else 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [decode_picture(im, self.prep) for im in self.images[i]]
        return decode_picture(self.images[i], self.prep)


def training_pictures(
    images: Sequence[ImageData],
    prep: Preprocessing,
    decode_all,
    max_memory_gb: float | None = None,
    processes_on_machine: int = 1,
) -> Sequence:
    """``decode_all(images)`` (the decoded list) when it fits the memory budget, else the
    photos streamed from disk (:class:`StreamedPictures`)."""
    if decoded_bytes(images, prep) <= memory_budget_bytes(max_memory_gb, processes_on_machine):
        return decode_all(images)
    return StreamedPictures(images, prep, processes_on_machine)
