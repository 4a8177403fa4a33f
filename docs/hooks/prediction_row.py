"""MkDocs hook: the prediction-row page's tables, generated from ``imgclf.rows``.

``docs/prediction-row.md`` holds a marker line; this hook replaces it with the fields
and the table columns as the library defines them, so the page cannot drift from the code.
"""

from __future__ import annotations

MARKER = "<!-- prediction-row -->"
PAGE = "prediction-row.md"


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} lost its marker line {MARKER!r}: the generated tables have nowhere to go")
    from imgclf import rows

    fields = "| field (JSON key) | kind | what it holds |\n|---|---|---|\n" + "\n".join(
        f"| `{f.name}` | {f.kind} | {f.help} |" for f in rows.FIELDS
    )
    columns = "| column | type |\n|---|---|\n" + "\n".join(f"| `{name}` | {kind} |" for name, kind in rows.TABLE_COLUMNS)
    version = f"Row version: **{rows.ROW_VERSION}**."
    return markdown.replace(MARKER, f"{version}\n\n{fields}\n\nIn tables (Parquet, CSV, JSON Lines, Ray):\n\n{columns}")
