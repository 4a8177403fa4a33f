"""One exception hierarchy for imgclf.

Every error a user can cause is an :class:`ImgclfError`, and every subclass is
defined here. Its ``exit_code`` (for the CLI) and ``http_status`` (for the web
API) are decided here and nowhere else, so callers catch the level they care
about and the front ends map errors the same way every time. (The web server's
answers about the HTTP exchange itself, such as a body over the size limit or a
missing API key, are not errors of imgclf's and stay in :mod:`imgclf.serve.handlers`.)
"""

from __future__ import annotations


class ImgclfError(Exception):
    """Base class: a problem the user can fix, with a one-line message."""

    exit_code = 2
    http_status = 400


class DataError(ImgclfError):
    """The images given for training or evaluation cannot be used as given."""


class ImageDecodeError(DataError):
    """One image cannot be read: not an image, truncated, empty or too large."""

    http_status = 415


class ImageTooLargeError(ImageDecodeError):
    """An image has more pixels than allowed (decompression-bomb guard)."""

    http_status = 413


class ModelFileError(ImgclfError):
    """A model file is missing, incomplete, corrupt or not an imgclf model."""


class NotExplainableError(ImgclfError):
    """The model gives no class activation maps: its network is not average-pooled, or the
    ONNX file was exported before imgclf had explanations (``imgclf.inference.explain``)."""

    http_status = 422


class ArchitectureError(ImgclfError):
    """An architecture name is unknown or cannot be built."""


class WeightsUnavailableError(ArchitectureError):
    """Pretrained weights for an architecture are not available here."""


class MissingDependencyError(ImgclfError):
    """An optional dependency (an install extra) is not installed."""


class OptionError(ImgclfError):
    """An option has a value that cannot be used.

    ``parameter``: the Python parameter at fault, when one is (the message names it so).
    ``template``: the message with each parameter it names written ``{name}``, so a front
    end can spell parameters its own way (:meth:`spelled`; the command line writes flags).
    """

    http_status = 422

    def __init__(self, message: str = "", parameter: str | None = None, *, template: str | None = None):
        super().__init__(message)
        self.parameter = parameter
        self.template = template

    def spelled(self, names: dict[str, str]) -> str:
        """The message with each parameter it names spelled as ``names`` says (others as they are)."""
        if self.template is None:
            return str(self)
        return self.template.format_map(_Spelling(names))


class _Spelling(dict):
    def __missing__(self, key: str) -> str:
        return key


class TrainingInterrupted(ImgclfError):
    """Training was stopped (Ctrl-C / SIGTERM) after saving a checkpoint."""

    exit_code = 130


class DistributedRunError(ImgclfError):
    """A rank of a ``--nproc-per-node`` run failed; the others were stopped.

    Its exit code is the failed rank's own when that rank reported its error
    (``rank_exit_code``: 2 for bad input, as in one process), else 1.
    """

    exit_code = 1

    def __init__(self, message: str, rank_exit_code: int | None = None):
        super().__init__(message)
        if rank_exit_code is not None and rank_exit_code > 0:
            self.exit_code = rank_exit_code
