"""Keep RESULTS.md pointing at the generated tables: links and their verdicts, never pasted copies.

RESULTS.md marks one block per table folder, ``<!-- tables:<key>:begin -->`` …
``<!-- tables:<key>:end -->`` (``key``: a domain, or ``all`` for the merge across domains). After
every collection the block is rewritten from the folder: a link to the generated Markdown with its
section headings, the plots, and, when given, the verdict lines of the tables (Table 2's winner, the
default decision), so the document never carries a stale copy of a number the tables hold.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from grads.io import write_text

# lines of a generated table that state a verdict: RESULTS.md quotes them next to the links
VERDICT_PREFIXES = ("Winner of the", "Decision over")


def verdict_lines(md_file: Path) -> list[str]:
    """The verdict lines of a generated Markdown file (:data:`VERDICT_PREFIXES`), in order."""
    return [line for line in md_file.read_text().splitlines() if line.startswith(VERDICT_PREFIXES)]


def _link(path: Path, base: Path, text: str | None = None) -> str:
    rel = Path(os.path.relpath(path, base)).as_posix()
    return f"[{text or path.name}]({rel})"


def table_sections(md_file: Path) -> list[str]:
    """What a generated Markdown file holds, in order: its ``##`` headings without their domain
    and budget prefixes and parentheticals, once each; the per-domain mean ± std tables (headed by
    the domain's name alone) as one entry, ``Table 1 (<domains>)``."""
    heads = [line[3:] for line in md_file.read_text().splitlines() if line.startswith("## ")]
    names = [h for h in heads if re.fullmatch(r"[\w-]+", h)]
    prefix = re.compile(rf"^(?:{'|'.join(map(re.escape, names))})(?: \S+)?: ") if names else None
    out = [f"Table 1 ({', '.join(names)})"] if names else []
    for head in heads:
        if head in names:
            continue
        short = (prefix.sub("", head) if prefix else head).split(" (", 1)[0]
        if short not in out:
            out.append(short)
    return out


def links_block(
    results_dir: Path,
    title: str,
    base: Path,
    summary: Sequence[str] = (),
    views: str = "Subsets",
) -> str:
    """The Markdown of one block: the generated tables of ``results_dir`` (``<title>.md`` and what
    it holds, :func:`table_sections`), the other Markdown views (labelled ``views``), the plots,
    then ``summary``; links are relative to ``base`` (the folder of RESULTS.md)."""
    main = results_dir / f"{title}.md"
    lines = [
        f"- Tables: {_link(main, base)} (CSV, LaTeX and per-item results beside it): "
        + "; ".join(table_sections(main))
        + "."
    ]
    others = sorted(p for p in results_dir.glob("*.md") if p != main)
    if others:
        lines.append(f"- {views}: " + ", ".join(_link(p, base, p.stem) for p in others) + ".")
    pngs = sorted(results_dir.glob("*.png"))
    if pngs:
        lines.append("- Plots: " + ", ".join(_link(p, base, p.stem) for p in pngs) + ".")
    return "\n".join(lines + ([""] if summary else []) + list(summary)) + "\n"


def update_results_md(
    results_md: Path,
    key: str,
    results_dir: Path,
    summary: Sequence[str] = (),
    title: str | None = None,
    views: str = "Subsets",
) -> bool:
    """Rewrite the block between ``<!-- tables:<key>:begin -->`` and ``<!-- tables:<key>:end -->``
    of ``results_md`` with :func:`links_block` of ``results_dir`` (tables ``<title>.md``, by default
    ``<key>.md``), its other Markdown files labelled ``views``, and ``summary``.

    Returns whether the block was found (a RESULTS.md without the markers is left alone).
    """
    begin, end = f"<!-- tables:{key}:begin -->", f"<!-- tables:{key}:end -->"
    text = results_md.read_text()
    if begin not in text or end not in text:
        return False
    block = links_block(results_dir, title or key, results_md.parent, summary, views)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    write_text(results_md, f"{head}{begin}\n{block}{end}{tail}")
    return True
