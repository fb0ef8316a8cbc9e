"""Printing for the CLI: one JSON document on stdout with --json, a table otherwise."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()


def emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def table(rows: Iterable[dict[str, Any]], columns: list[tuple[str, Callable[[dict[str, Any]], Any]]]) -> None:
    t = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for name, _ in columns:
        # ids must stay whole and copyable: fold long cells instead of cutting them with an ellipsis
        t.add_column(name, overflow="fold")
    n = 0
    for row in rows:
        t.add_row(*[_cell(get(row)) for _, get in columns])
        n += 1
    if n:
        console.print(t)
    else:
        console.print("[dim](none)[/dim]")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, dict):
        return escape(",".join(f"{k}={x}" for k, x in v.items()))
    if isinstance(v, list):
        return escape(",".join(str(x) for x in v))
    return escape(str(v))


def kv(doc: dict[str, Any]) -> None:
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            console.print(f"[bold]{k}[/bold]:")
            for k2, v2 in v.items():
                console.print(f"  {escape(str(k2))}: {_cell(v2)}", highlight=False)
        else:
            console.print(f"[bold]{k}[/bold]: {_cell(v)}", highlight=False)
