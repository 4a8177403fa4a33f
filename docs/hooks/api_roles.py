"""MkDocs hook: Sphinx cross-reference roles in docstrings, shown as plain code.

imgclf's docstrings say ``:class:`ImageClassifier``` and ``:meth:`fit```; mkdocstrings
renders the name as code and leaves the role in front of it (":meth:fit"). This drops
the role, keeping the code.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:py:)?(?:attr|class|data|exc|func|meth|mod|obj):(?=<code>)")


def on_page_content(html, page, config, files):
    return _ROLE.sub("", html)
