"""What the offline HTML pages (audit gallery, training report) are built from.

Pages load nothing from outside: styles are inline, pictures are files next to
``index.html`` (``thumbs/``, the report's PNG charts), so a page works opened
as a file, copied to another machine, or attached to a ticket.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from html import escape
from pathlib import Path

from imgclf.atomic import atomic_path, check_output_folder
from imgclf.errors import OptionError
from imgclf.names import is_text, printable

THUMB_SIDE = 160

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#f6f6f8}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.muted{color:#666}.count{color:#666;font-weight:normal}
table{border-collapse:collapse;background:#fff}td,th{padding:4px 10px;border:1px solid #e2e2e6;text-align:left}
th{background:#f0f0f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.groups{display:flex;flex-wrap:wrap;gap:12px}
.group{background:#fff;border:1px solid #e2e2e6;border-radius:8px;padding:10px}
.group.alert{border:2px solid #d70015;background:#fff5f5}
.card{width:168px;background:#fff;border:1px solid #e2e2e6;border-radius:6px;padding:4px;font-size:12px;
overflow-wrap:anywhere}
.card img{width:160px;height:160px;object-fit:contain;background:#eee;display:block}
.card .none{width:160px;height:160px;background:#eee;display:flex;align-items:center;justify-content:center;
color:#999;text-align:center}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;font-weight:600;margin-right:6px}
.badge.red{background:#d70015;color:#fff}.badge.grey{background:#e2e2e6;color:#333}
.chart{max-width:100%;background:#fff;border:1px solid #e2e2e6;border-radius:6px}
.charts{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
"""


def page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f"<body><main>{body}</main></body></html>\n")  # fmt: skip


def check_page_folder(out: Path, what: str, *, inside: tuple = (), option: str | None = None) -> None:
    """Refuse, before any work, a folder a page (``what``: "report", "gallery") cannot go to: a
    file, a place that cannot be written, a folder inside one of the image folders ``inside`` (the
    next train would read the page's pictures as photos), or one holding files that are not an
    earlier imgclf page's (writing there would overwrite them)."""
    label = f"{option} {out}" if option else str(out)
    check_output_folder(out, what, option=option)
    target = out.resolve()
    for root in sorted({Path(r).resolve() for r in inside}):
        if target == root or root in target.parents:
            raise OptionError(f"{label}: is inside the image folder {root}; the next train would learn its "
                              f"pictures as photos. Write the {what} outside it")  # fmt: skip
    if out.is_dir() and any(out.iterdir()) and not _is_imgclf_page(out / "index.html"):
        raise OptionError(f"{label}: holds files that are not an imgclf page (writing the {what} there would "
                          "overwrite them); give a new or empty folder")  # fmt: skip


def _is_imgclf_page(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return b"<title>imgclf " in f.read(400)
    except OSError:
        return False


@contextmanager
def page_folder(out: Path, what: str, inside: tuple = ()) -> Iterator[Path]:
    """``out``, made if missing. A page that fails takes what it added with it, so a refused
    report or audit leaves nothing behind: the folders it made, or in a folder that was there,
    the files that were not (what the folder held is kept). A page that succeeds in an earlier
    page's folder (:func:`check_page_folder` lets no other through) removes what that page left
    and this one did not write again: a chart or thumbnails beside a page that no longer shows them."""
    import time

    check_page_folder(out, what, inside=inside)
    made = next((p for p in reversed((out, *out.parents)) if not p.exists()), None)
    held = {p.name for p in out.iterdir()} if made is None and out.is_dir() else set()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        yield out
    except BaseException:
        _remove([made] if made is not None else [p for p in out.iterdir() if p.name not in held])
        raise
    for name in held:
        _remove_stale(out / name, started)


def _remove_stale(path: Path, moment: float) -> None:
    """Remove what under ``path`` was last written before ``moment``, and folders left empty
    (a folder's own time does not change when a file in it is rewritten in place)."""
    try:
        if path.is_dir() and not path.is_symlink():
            for child in path.iterdir():
                _remove_stale(child, moment)
            if not any(path.iterdir()):
                path.rmdir()
        elif path.lstat().st_mtime < moment:
            path.unlink()
    except OSError:
        pass  # gone already, or not ours to remove: the page is written either way


def _remove(paths) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def write_page(path: Path, html: str) -> Path:
    r"""Write the page atomically; a file name's bytes that are not UTF-8 show as ``\xNN``."""
    with atomic_path(path, "page") as tmp:
        Path(tmp).write_text(html if is_text(html) else printable(html), encoding="utf-8")
    return path


class Thumbnails:
    """Writes each image once as a small JPEG under ``out/thumbs`` and names it for the page."""

    def __init__(self, out: Path):
        self.out = out
        self.folder = out / "thumbs"
        self.done: dict[str, str | None] = {}

    def __call__(self, file: str, source: str | None = None) -> str | None:
        """Relative URL of ``file``'s thumbnail, or None when it cannot be read."""
        if file in self.done:
            return self.done[file]
        from imgclf.data.imaging import open_image
        from imgclf.errors import ImageDecodeError

        name = hashlib.sha256(file.encode("utf-8", "surrogatepass")).hexdigest()[:20] + ".jpg"
        try:
            picture = open_image(source or file, file, draft_size=THUMB_SIDE)
        except ImageDecodeError:
            self.done[file] = None
            return None
        picture.thumbnail((THUMB_SIDE, THUMB_SIDE))
        self.folder.mkdir(parents=True, exist_ok=True)
        picture.save(self.folder / name, "JPEG", quality=85)
        self.done[file] = f"thumbs/{name}"
        return self.done[file]


def card(thumbs: Thumbnails, file: str, caption: str = "", missing: str = "cannot be read", short: str = "") -> str:
    """One picture with its file (shown as ``short`` if given; the whole path is the tooltip) and a caption."""
    url = thumbs(file)
    picture = (f'<img src="{escape(url)}" alt="{escape(file)}">' if url
               else f'<div class="none">{escape(missing)}</div>')  # fmt: skip
    extra = f"<div>{caption}</div>" if caption else ""
    return (f'<div class="card" title="{escape(file)}">{picture}<div class="muted">{escape(short or file)}</div>'
            f"{extra}</div>")  # fmt: skip


def section(title: str, count: int, body: str, empty: str) -> str:
    """A heading with its count, then ``body``, or ``empty`` when there is nothing to show."""
    return f'<h2>{escape(title)} <span class="count">({count})</span></h2>' + (body or f'<p class="muted">{empty}</p>')
