"""mkdocs hook: the CLI reference page is the argparse help of every
``jaxyolo`` command, generated at build time from ``jaxyolo.cli.build_parser``
(so it cannot drift from the code).  ``<!-- cli-reference -->`` in
``docs/cli.md`` is replaced by one section per command."""

from __future__ import annotations

import argparse
import os

MARKER = "<!-- cli-reference -->"


def cli_reference() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width: a fixed one
    from jaxyolo.cli import build_parser

    parser = build_parser()
    parser.prog = "jaxyolo"
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = ["## jaxyolo", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, p in sub.choices.items():
        out += [f"## jaxyolo {name}", "", "```text", p.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "cli.md":
        if MARKER not in markdown:
            raise ValueError(f"docs/cli.md lost its {MARKER} line")
        return markdown.replace(MARKER, cli_reference())
    return markdown
