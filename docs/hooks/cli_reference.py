"""MkDocs hook: the CLI reference page, generated from ``imgclf.cli.build_parser()``.

``docs/cli.md`` holds a marker line; this hook replaces it with one section per
subcommand (its usage, then a table of option, default and help), read generically
from the argparse actions, so the page follows the parser whatever builds it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

MARKER = "<!-- cli-reference -->"
PAGE = "cli.md"


def on_config(config):
    """Document the source tree next to mkdocs.yml, not whichever copy happens to be installed."""
    src = Path(config.config_file_path).resolve().parent / "src"
    if (src / "imgclf").is_dir() and "imgclf" not in sys.modules and str(src) not in sys.path:
        sys.path.insert(0, str(src))
    return config


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} lost its marker line {MARKER!r}: the generated reference has nowhere to go")
    from imgclf.cli import build_parser

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps usage to the terminal's width: the same page everywhere
    try:
        return markdown.replace(MARKER, render(build_parser()))
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns


def render(parser: argparse.ArgumentParser) -> str:
    """Markdown for ``parser``: its own options, then a section per subcommand (nested ones too)."""
    _no_colour(parser)
    out = [_usage(parser)]
    if parser.epilog:
        out.append(f"```\n{parser.epilog.strip()}\n```")
    table = _options_table(parser)
    if table:
        out.append(table)
    commands = _subcommands(parser)
    if commands:
        out.append("| command | what it does |\n|---|---|")
        out[-1] += "".join(f"\n| [`{name}`](#{_anchor(sub.prog)}) | {_cell(helptext)} |"
                           for name, sub, helptext in commands)  # fmt: skip
        out.extend(_section(sub, helptext) for _, sub, helptext in commands)
    return "\n\n".join(out) + "\n"


def _section(parser: argparse.ArgumentParser, helptext: str) -> str:
    _no_colour(parser)
    parts = [f"## {parser.prog}", _usage(parser)]
    description = parser.description or helptext[:1].upper() + helptext[1:]
    if description:
        parts.append(_text(description))
    table = _options_table(parser)
    if table:
        parts.append(table)
    for _, sub, sub_help in _subcommands(parser):
        parts.append(_section(sub, sub_help).replace("## ", "### ", 1))
    return "\n\n".join(parts)


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    """(name, parser, one-line help) per subcommand, in the order they were added, aliases once."""
    found, seen = [], set()
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        for name, sub in action.choices.items():
            if id(sub) not in seen:
                seen.add(id(sub))
                found.append((name, sub, helps.get(name, "")))
    return found


def _usage(parser: argparse.ArgumentParser) -> str:
    usage = parser.format_usage().strip()
    return f"```\n{usage}\n```"


def _options_table(parser: argparse.ArgumentParser) -> str:
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        rows.append(f"| {_cell(_name(action))} | {_cell(_default(action))} | {_cell(_help(action, parser))} |")
    if not rows:
        return ""
    return "| option | default | help |\n|---|---|---|\n" + "\n".join(rows)


def _name(action: argparse.Action) -> str:
    """`--engine {auto,torch}` / `-q, --quiet` / `FOLDER` (positionals by their metavar)."""
    metavar = action.metavar
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    if action.choices is not None and metavar is None and not isinstance(action.choices, dict):
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    if not action.option_strings:
        return f"`{metavar or action.dest.upper()}`"
    flags = ", ".join(action.option_strings)
    if action.nargs == 0:
        return f"`{flags}`"
    return f"`{flags} {metavar or action.dest.upper()}`"


def _default(action: argparse.Action) -> str:
    default = action.default
    if default is None or default is argparse.SUPPRESS or (action.nargs == 0 and default is False):
        return ""
    if isinstance(action, argparse._VersionAction):
        return ""
    return f"`{default}`"


def _help(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    text = action.help or ""
    if "%" in text:
        params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
        params["prog"] = parser.prog
        for key in ("choices",):
            if params.get(key) is not None:
                params[key] = ", ".join(map(str, params[key]))
        try:
            text = text % params
        except (KeyError, TypeError, ValueError):
            pass  # a help string that is not a format string: shown as written
    if _default(action):  # the default has its own column: drop a closing "(default: X)" that repeats it
        text = re.sub(rf"\s*\(default: {re.escape(str(action.default))}\)$", "", text.strip())
    return _text(text)


def _text(text: str) -> str:
    """Prose from the parser: joined into one paragraph, markdown's special characters kept literal."""
    text = " ".join(text.split())
    for char in "\\*_<>[]`":
        text = text.replace(char, "\\" + char)
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _anchor(prog: str) -> str:
    return "-".join(prog.lower().split())


def _no_colour(parser: argparse.ArgumentParser) -> None:
    if hasattr(parser, "color"):  # Python 3.14 colours usage when it thinks a terminal is reading
        parser.color = False
