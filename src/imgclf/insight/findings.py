"""What an audit found (:class:`AuditResult`) and how it is shown: the console
summary and the offline HTML gallery.

:mod:`imgclf.insight.audit` finds; this module holds the result and its two
views, built from the page pieces in :mod:`imgclf.insight.pages`.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from imgclf.insight.pages import Thumbnails, card, page, page_folder, section, write_page
from imgclf.rows import tsv_cell

MAX_LISTED = 20  # label suspects and outliers listed at most (the JSON has them all)


@dataclass
class AuditResult:
    """Everything ``audit`` found; ``to_dict`` is the JSON of ``imgclf audit --json``."""

    folder: str
    against: str | None
    labels: dict[str, int]
    unreadable: list[dict]
    image_problems: list[dict]
    duplicates: list[dict]
    leaks: list[dict]
    label_issues: list[dict]
    outliers: list[dict]
    method: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    #: a manifest's rows that list a file already listed: ``file``, ``row``, ``first_row``, ``labels``, ``splits``
    duplicate_rows: list[dict] = field(default_factory=list)

    @property
    def imbalance(self) -> float:
        """Most images of a label divided by fewest (1.0 is balanced)."""
        counts = [c for c in self.labels.values()]
        return max(counts) / max(1, min(counts)) if counts else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "against": self.against,
            "labels": self.labels,
            "imbalance": round(self.imbalance, 3),
            "unreadable": self.unreadable,
            "image_problems": self.image_problems,
            "duplicates": self.duplicates,
            "duplicate_rows": self.duplicate_rows,
            "leaks": self.leaks,
            "label_issues": self.label_issues,
            "outliers": self.outliers,
            "method": self.method,
            "timing": self.timing,
        }

    def summary(self) -> str:
        """The console report: one line per kind of finding, the worst ones named."""
        return "\n".join(summary_lines(self))

    def __str__(self) -> str:
        return self.summary()

    def write_html(self, out: str | Path) -> Path:
        """``out/index.html`` with thumbnails in ``out/thumbs/``: a gallery of every finding."""
        return write_audit_page(self, Path(out))


def write_audit_page(result: AuditResult, out: Path) -> Path:
    """The audit gallery: each finding grouped with thumbnails, the worst first."""
    with page_folder(out, "gallery", inside=tuple(r for r in (result.folder, result.against) if r and os.path.isdir(r))):
        return _write_audit_page(result, out)


def _write_audit_page(result: AuditResult, out: Path) -> Path:
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
    parts.append(section("Duplicates", len(result.duplicates), body, "No duplicates found."))

    if result.duplicate_rows:
        body = "".join(f"<tr><td>{escape(d['row'])}</td><td>{escape(d['first_row'])}</td><td>{escape(d['file'])}</td>"
                       f"<td>{escape(' / '.join(d['labels']))}</td><td>{escape(' / '.join(d['splits']))}</td></tr>"
                       for d in result.duplicate_rows)  # fmt: skip
        parts.append(section("Rows listing a file twice", len(result.duplicate_rows),
                             "<table><tr><th>row</th><th>repeats</th><th>file</th><th>labels</th><th>parts</th></tr>"
                             f"{body}</table>", "None."))  # fmt: skip

    target = (
        "the test folder" if result.against else _leak_target(result, "the held-out split `imgclf train` would make")
    )
    body = "".join(f'<div class="group alert"><span class="badge red">{escape(leak["kind"])} copy</span>'
                   f'{escape(leak["between"])}, similarity {leak["similarity"]:.4f}<div class="cards">'
                   + show(leak["file"], "training") + show(leak["against_file"], "test")
                   + "</div></div>" for leak in result.leaks)  # fmt: skip
    body = f'<div class="groups">{body}</div>' if body else ""
    parts.append(section("Leaks", len(result.leaks), body, f"No copies of training images in {target}."))

    shown = result.label_issues[:MAX_LISTED]
    body = '<div class="cards">' + "".join(
        show(issue["file"], f'filed as <b>{escape(issue["given"])}</b>, looks like '
             f'<b>{escape(issue["suggested"])}</b> ({issue["confidence"]:.2f})') for issue in shown) + "</div>"  # fmt: skip
    more = len(result.label_issues) - len(shown)
    body += f"<p class='muted'>{more} more in the JSON.</p>" if more > 0 else ""
    parts.append(section("Suspected label errors", len(result.label_issues), body if shown else "",
                          "No image looks filed under the wrong label."))  # fmt: skip

    shown = result.outliers[:MAX_LISTED]
    body = '<div class="cards">' + "".join(
        show(o["file"], f'{escape(o["label"])}, distance {o["score"]:.3f}') for o in shown) + "</div>"  # fmt: skip
    parts.append(section("Outliers (far from every label)", len(result.outliers), body if shown else "",
                          "No image stands far from all the others."))  # fmt: skip

    body = '<div class="cards">' + "".join(
        show(p["file"], f'<b>{escape(p["problem"])}</b>: {escape(p["detail"])}')
        for p in result.image_problems) + "</div>"  # fmt: skip
    parts.append(section("Tiny, extreme or blank images", len(result.image_problems),
                          body if result.image_problems else "", "None."))  # fmt: skip

    body = "".join(f"<tr><td>{escape(u['file'])}</td><td>{escape(u['reason'])}</td></tr>" for u in result.unreadable)
    parts.append(section("Unreadable files", len(result.unreadable),
                          f"<table><tr><th>file</th><th>reason</th></tr>{body}</table>" if body else "", "None."))  # fmt: skip

    near = result.method.get("near_duplicates", {})
    parts.append(f"<h2>How</h2><p class='muted'>Near-duplicates: pixel correlation after crop alignment at least "
                 f"{near.get('threshold', 0):.4f} (calibrated on this folder); label suspects: "
                 f"{escape(str(result.method.get('label_issues', '')))}; features: "
                 f"{result.method['features']['extracted']} computed, {result.method['features']['cached']} "
                 f"from the cache; {result.timing.get('total_seconds', 0):.1f} s.</p>")  # fmt: skip
    return write_page(out / "index.html", page("imgclf data audit", "".join(parts)))


def _leak_target(result: AuditResult, otherwise: str) -> str:
    """Where leaks were looked for without a test folder: the input's own parts, or ``otherwise``."""
    split = result.method.get("split") or {}
    return "the " + "/".join(split["parts"]) + " parts" if "parts" in split else otherwise


def _names(files: list[str], limit: int = 3) -> str:
    shown = ", ".join(files[:limit])
    return shown + (f" (+{len(files) - limit})" if len(files) > limit else "")


def summary_lines(result: AuditResult) -> list[str]:
    """The console summary of an audit, one line per entry whatever the files are called."""
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
    if result.duplicate_rows:
        clash = [d for d in result.duplicate_rows if len(d["labels"]) > 1 or len(d["splits"]) > 1]
        lines.append(f"  rows listing a file twice: {len(result.duplicate_rows)}"
                     + (f", {len(clash)} WITH ANOTHER LABEL OR PART" if clash else ""))  # fmt: skip
        for d in (clash or result.duplicate_rows)[:5]:
            said = " / ".join(d["labels"]) + (f" in {' / '.join(d['splits'])}" if d["splits"] else "")
            lines.append(f"    {d['row']} repeats {d['first_row']}: {d['file']} ({said})")
    where = "the test folder" if result.against else _leak_target(result, "the train/test split")
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
    return [tsv_cell(line) for line in lines]  # a name's tab, newline or non-UTF-8 byte escaped, as predict does
