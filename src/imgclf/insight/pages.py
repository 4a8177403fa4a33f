"""The offline HTML pages (audit gallery, training report) and the audit's console summary.

Pages load nothing from outside: styles are inline, pictures are files next to
``index.html`` (``thumbs/``, the report's PNG charts), so a page works opened
as a file, copied to another machine, or attached to a ticket.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from imgclf.atomic import atomic_path
from imgclf.names import is_text, printable

if TYPE_CHECKING:
    from imgclf.insight.audit import AuditResult

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


def _section(title: str, count: int, body: str, empty: str) -> str:
    return f'<h2>{escape(title)} <span class="count">({count})</span></h2>' + (body or f'<p class="muted">{empty}</p>')


def write_audit_page(result: AuditResult, out: Path) -> Path:
    """The audit gallery: each finding grouped with thumbnails, the worst first."""
    from imgclf.insight.audit import MAX_LISTED

    out.mkdir(parents=True, exist_ok=True)
    thumbs = Thumbnails(out)
    roots = [r for r in (result.folder, result.against) if r]

    def show(file: str, caption: str = "") -> str:
        """A card naming the file inside its folder (the page says which folders)."""
        for root in roots:
            if file.startswith(os.path.join(root, "")):
                return card(thumbs, file, caption, short=os.path.relpath(file, root))
        return card(thumbs, file, caption)

    parts = [f"<h1>Data audit</h1><p class='muted'>{escape(result.folder)}"
             + (f" against {escape(result.against)}" if result.against else "") + "</p>"]  # fmt: skip

    rows = "".join(f"<tr><td>{escape(label)}</td><td class='num'>{count}</td></tr>" for label, count in
                   result.labels.items())  # fmt: skip
    parts.append(f"<h2>Labels <span class='count'>(imbalance {result.imbalance:.2f}: most / fewest)</span></h2>"
                 f"<table><tr><th>label</th><th>images</th></tr>{rows}</table>")  # fmt: skip

    body = "".join(f'<div class="group"><span class="badge {"red" if d["cross_label"] else "grey"}">'
                   f'{"spans labels: " + escape(" / ".join(d["labels"])) if d["cross_label"] else escape(d["labels"][0])}'
                   f'</span>{d["kind"]} duplicates, similarity {d["similarity"]:.4f}<div class="cards">'
                   + "".join(show(f) for f in d["files"]) + "</div></div>"
                   for d in result.duplicates)  # fmt: skip
    body = f'<div class="groups">{body}</div>' if body else ""
    parts.append(_section("Duplicates", len(result.duplicates), body, "No duplicates found."))

    target = "the test folder" if result.against else "the held-out split `imgclf train` would make"
    body = "".join(f'<div class="group alert"><span class="badge red">{escape(leak["kind"])} copy</span>'
                   f'{escape(leak["between"])}, similarity {leak["similarity"]:.4f}<div class="cards">'
                   + show(leak["file"], "training") + show(leak["against_file"], "test")
                   + "</div></div>" for leak in result.leaks)  # fmt: skip
    body = f'<div class="groups">{body}</div>' if body else ""
    parts.append(_section("Leaks", len(result.leaks), body, f"No copies of training images in {target}."))

    shown = result.label_issues[:MAX_LISTED]
    body = '<div class="cards">' + "".join(
        show(issue["file"], f'filed as <b>{escape(issue["given"])}</b>, looks like '
             f'<b>{escape(issue["suggested"])}</b> ({issue["confidence"]:.2f})') for issue in shown) + "</div>"  # fmt: skip
    more = len(result.label_issues) - len(shown)
    body += f"<p class='muted'>{more} more in the JSON.</p>" if more > 0 else ""
    parts.append(_section("Suspected label errors", len(result.label_issues), body if shown else "",
                          "No image looks filed under the wrong label."))  # fmt: skip

    shown = result.outliers[:MAX_LISTED]
    body = '<div class="cards">' + "".join(
        show(o["file"], f'{escape(o["label"])}, distance {o["score"]:.3f}') for o in shown) + "</div>"  # fmt: skip
    parts.append(_section("Outliers (far from every label)", len(result.outliers), body if shown else "",
                          "No image stands far from all the others."))  # fmt: skip

    body = '<div class="cards">' + "".join(
        show(p["file"], f'<b>{escape(p["problem"])}</b>: {escape(p["detail"])}')
        for p in result.image_problems) + "</div>"  # fmt: skip
    parts.append(_section("Tiny, extreme or blank images", len(result.image_problems),
                          body if result.image_problems else "", "None."))  # fmt: skip

    body = "".join(f"<tr><td>{escape(u['file'])}</td><td>{escape(u['reason'])}</td></tr>" for u in result.unreadable)
    parts.append(_section("Unreadable files", len(result.unreadable),
                          f"<table><tr><th>file</th><th>reason</th></tr>{body}</table>" if body else "", "None."))  # fmt: skip

    near = result.method.get("near_duplicates", {})
    parts.append(f"<h2>How</h2><p class='muted'>Near-duplicates: pixel correlation after crop alignment at least "
                 f"{near.get('threshold', 0):.4f} (calibrated on this folder); label suspects: "
                 f"{escape(str(result.method.get('label_issues', '')))}; features: "
                 f"{result.method['features']['extracted']} computed, {result.method['features']['cached']} "
                 f"from the cache; {result.timing.get('total_seconds', 0):.1f} s.</p>")  # fmt: skip
    return write_page(out / "index.html", page("imgclf data audit", "".join(parts)))


def _names(files: list[str], limit: int = 3) -> str:
    shown = ", ".join(files[:limit])
    return shown + (f" (+{len(files) - limit})" if len(files) > limit else "")


def summary_lines(result: AuditResult) -> list[str]:
    """The console summary of an audit."""
    n = sum(result.labels.values())
    lines = [f"Audited {n} readable images of {len(result.labels)} labels in {result.folder}"
             + (f", against {result.against}" if result.against else "")]  # fmt: skip
    lines.append("  labels: " + ", ".join(f"{k} {v}" for k, v in result.labels.items())
                 + f" (imbalance {result.imbalance:.2f})")  # fmt: skip
    lines.append(f"  unreadable: {len(result.unreadable)}")
    for u in result.unreadable[:5]:
        lines.append(f"    {u['file']}: {u['reason']}")
    kinds = Counter(p["problem"] for p in result.image_problems)
    lines.append("  tiny, extreme or blank: " + (", ".join(f"{v} {k}" for k, v in kinds.items()) or "0"))
    for p in result.image_problems[:5]:
        lines.append(f"    {p['file']}: {p['problem']} ({p['detail']})")
    cross = [d for d in result.duplicates if d["cross_label"]]
    exact = sum(d["kind"] == "exact" for d in result.duplicates)
    lines.append(f"  duplicates: {len(result.duplicates)} groups ({exact} exact, {len(result.duplicates) - exact} near)"
                 + (f", {len(cross)} ACROSS LABELS" if cross else ""))  # fmt: skip
    for d in result.duplicates[:8]:
        flag = "ACROSS LABELS " if d["cross_label"] else ""
        lines.append(f"    {flag}{d['kind']} {d['similarity']:.4f}: {_names(d['files'])}")
    where = "the test folder" if result.against else "the train/test split"
    lines.append(f"  leaks into {where}: {len(result.leaks)}")
    for leak in result.leaks[:5]:
        lines.append(f"    {leak['kind']} {leak['similarity']:.4f}: {leak['file']} = {leak['against_file']}")
    lines.append(f"  suspected label errors: {len(result.label_issues)}")
    for issue in result.label_issues[:5]:
        lines.append(f"    {issue['file']}: filed as {issue['given']}, looks like {issue['suggested']} "
                     f"({issue['confidence']:.2f})")  # fmt: skip
    lines.append(f"  outliers: {len(result.outliers)}")
    for o in result.outliers[:3]:
        lines.append(f"    {o['file']} ({o['score']:.3f})")
    f = result.method["features"]
    lines.append(f"Features: {f['extracted']} computed, {f['cached']} from the workspace cache; "
                 f"{result.timing.get('total_seconds', 0):.1f} s")  # fmt: skip
    return lines
