"""The one table renderer of every command: plain text for the terminal (report headline,
status, best, plan, inspect), Markdown for report.md and LaTeX (`nptm report --latex`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def text_table(
    headers: Sequence[Any],
    rows: Sequence[Sequence[Any]],
    *,
    right: Sequence[int] = (),
    total: bool = False,
) -> str:
    """Columns padded to their widest cell and separated by two spaces, a rule under the header.

    `right`: indices of right-aligned columns (numbers). `total`: the last row is a total,
    set off by a second rule.
    """
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        padded = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [line(r) for r in cells]
    lines.insert(1, rule)
    if total and len(lines) > 2:
        lines.insert(len(lines) - 1, rule)
    return "\n".join(lines)


def md_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    def esc(x: Any) -> str:
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# Characters of the report's tables that LaTeX's default fonts lack, as math.
_LATEX_SYMBOLS = {"±": r"$\pm$", "↓": r"$\downarrow$", "−": "$-$", "×": r"$\times$"}


def latex_table(
    headers: Sequence[Any], rows: Sequence[Sequence[Any]], *, caption: str | None = None
) -> str:
    """A booktabs ``table`` of the same cells as `md_table`, rendered by pandas' Styler (cells
    and headers escaped for LaTeX); needs ``\\usepackage{booktabs}``."""
    import pandas as pd

    frame = pd.DataFrame([[str(c) for c in r] for r in rows], columns=[str(h) for h in headers])
    styler = frame.style.hide(axis="index").format(escape="latex")
    styler = styler.format_index(escape="latex", axis=1)
    text = styler.to_latex(
        hrules=True,
        caption=None if caption is None else _latex_escape(caption),
        position_float="centering",
        environment="table",
    )
    for char, latex in _LATEX_SYMBOLS.items():
        text = text.replace(char, latex)
    return text


def _latex_escape(text: str) -> str:
    """A caption escaped for LaTeX (Styler escapes the cells, not the caption)."""
    specials = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}"}  # fmt: skip
    return "".join(specials.get(c, c) for c in text)
