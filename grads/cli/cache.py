"""The ``grads-cache`` console script: ``ls`` lists the stage cache's entries with their config
summary and size, ``verify`` re-hashes them against their manifests, ``gc`` removes partial, corrupt
and legacy entries and, given run folders or configs, every entry none of them references.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path

from grads.cache import BASE_EVAL, LOCKS, check_entry, event_counts, scan
from grads.errors import UserError, reported
from grads.io import read_json
from grads.locks import try_lock

log = logging.getLogger(__name__)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*r)
    Console().print(t)


def cmd_ls(root: Path, stage: str | None) -> int:
    rows = [r for r in scan(root) if stage is None or r["stage"] == stage]
    per_key = event_counts(root, by_key=True)
    table = []
    total = 0
    for r in rows:
        size = _size(r["path"])
        total += size
        summary = " ".join(
            f"{k.removesuffix('.name').split('.')[-1]}={v}"
            for k, v in r["summary"].items()
            if v is not None
        )
        hits = per_key.get((r["stage"], r["key"]), {}).get("hit", 0)
        table.append([r["stage"], r["key"], r["status"], summary, _human(size), str(hits)])
    _print_table(
        f"grads cache {root} ({len(rows)} entries, {_human(total)})",
        ["stage", "key", "status", "config", "size", "hits"],
        table,
    )
    counts = event_counts(root)
    if counts:
        _print_table(
            "events (all jobs)",
            ["stage", "hit", "miss", "done", "failed", "stale owner"],
            [
                [s, *(str(c.get(k, 0)) for k in ("hit", "miss", "done", "failed", "stale_owner"))]
                for s, c in sorted(counts.items())
            ],
        )
    return 0


def cmd_verify(root: Path, stage: str | None, keys: list[str]) -> int:
    unknown = sorted(set(keys) - {r["key"] for r in scan(root)})
    if unknown:
        raise UserError(f"no cache entry with key {', '.join(unknown)} in {root}")
    bad = 0
    table = []
    for r in scan(root):
        if (stage and r["stage"] != stage) or (keys and r["key"] not in keys):
            continue
        if r["stage"] == BASE_EVAL or r["status"] in ("partial", "running"):
            continue
        problems = check_entry(r["path"], content=True) if r["status"] != "corrupt" else ["corrupt"]
        bad += bool(problems)
        table.append([r["stage"], r["key"], "ok" if not problems else "; ".join(problems[:4])])
    _print_table(f"verify {root}", ["stage", "key", "result"], table)
    print(f"{len(table) - bad} ok, {bad} with problems")
    return 1 if bad else 0


def referenced_keys(
    runs: list[Path], configs: list[str], skip: Path | None = None
) -> set[tuple[str, str]]:
    """``(stage, key)`` pairs referenced by run folders (``metrics.json`` keys, else the keys of
    their ``config_resolved.yaml``) and by configs given as Hydra override strings."""
    refs: set[tuple[str, str]] = set()
    skip = skip.resolve() if skip is not None else None
    for run_root in runs:
        for m in Path(run_root).rglob("metrics.json"):
            if skip is not None and skip in m.resolve().parents:
                continue  # an evaluate entry's own metrics, not a job's
            try:
                data = read_json(m)
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and isinstance(data.get("keys"), dict):
                refs |= set(data["keys"].items())
        for c in Path(run_root).rglob("config_resolved.yaml"):
            if (c.parent / "metrics.json").exists():
                continue
            from omegaconf import OmegaConf

            refs |= _config_refs(OmegaConf.to_container(OmegaConf.load(c), resolve=True), str(c))
    from hydra.errors import HydraException

    from grads.config import compose_resolved

    for overrides in configs:
        try:
            resolved = compose_resolved(overrides.split(), validate=False)
        except HydraException as exc:  # an unknown option or a malformed override
            raise UserError(f"--config {overrides!r}: {exc}") from exc
        refs |= _config_refs(resolved, overrides)
    return refs


def _config_refs(resolved: dict, where: str) -> set[tuple[str, str]]:
    from grads.pipeline import job_identities

    try:
        ids = job_identities(resolved, list(resolved.get("stages") or ()))
    except Exception as exc:  # noqa: BLE001 - a stale config must not stop gc; it says which
        log.warning(
            "cannot compute the keys of %s (%s: %s): skipped", where, type(exc).__name__, exc
        )
        return set()
    return {(s, i.key) for s, i in ids.items()}


def _close_upstream(rows: list[dict], refs: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Add every entry a referenced entry was computed from (its identity's upstream keys), and the
    base-model evaluations a referenced evaluation used."""
    by_key = {(r["stage"], r["key"]): r for r in rows if r["status"] == "done"}
    todo, seen = list(refs), set(refs)
    while todo:
        row = by_key.get(todo.pop())
        if row is None:
            continue
        nxt = set(row["upstream"].items())
        metrics = row["path"] / "metrics.json" if row["stage"] == "evaluate" else None
        if metrics is not None and metrics.exists():
            for part in (read_json(metrics).get("base_cache") or {}).values():
                nxt.add((BASE_EVAL, part.get("key")))
        for ref in nxt - seen:
            seen.add(ref)
            todo.append(ref)
    return seen


def cmd_gc(root: Path, runs: list[Path], configs: list[str], yes: bool) -> int:
    rows = scan(root)
    remove = [r for r in rows if r["status"] in ("partial", "corrupt", "legacy", "incomplete")]
    if runs or configs:
        keep = _close_upstream(rows, referenced_keys(runs, configs, skip=root))
        remove += [r for r in rows if r["status"] == "done" and (r["stage"], r["key"]) not in keep]
    else:
        print("no --runs/--config given: only partial, corrupt and legacy entries are candidates")
    total = sum(_size(r["path"]) for r in remove)
    _print_table(
        f"gc {root}: {len(remove)} entries, {_human(total)}" + ("" if yes else " (dry run)"),
        ["stage", "key", "status", "size"],
        [[r["stage"], r["key"], r["status"], _human(_size(r["path"]))] for r in remove],
    )
    if not yes:
        print("dry run: add --yes to delete")
        return 0
    for r in remove:
        lock = root / r["stage"] / LOCKS / f"{r['key']}.lock"
        with try_lock(lock) if r["stage"] != BASE_EVAL else contextlib.nullcontext(True) as free:
            if not free:
                print(f"skipped {r['path']}: a job holds its lock")
                continue
            if r["path"].is_dir():
                shutil.rmtree(r["path"])
            else:
                r["path"].unlink(missing_ok=True)
    print(f"removed {len(remove)} entries ({_human(total)})")
    return 0


_DEFAULT_ROOT = "$GRADS_CACHE_DIR, else $GRADS_OUTPUT_DIR/cache, else ./outputs/cache"


def default_root() -> Path:
    """``$GRADS_CACHE_DIR``, else ``$GRADS_OUTPUT_DIR/cache``, else ``./outputs/cache`` (as the
    ``paths`` config resolves them)."""
    if os.environ.get("GRADS_CACHE_DIR"):
        return Path(os.environ["GRADS_CACHE_DIR"])
    return Path(os.environ.get("GRADS_OUTPUT_DIR", "outputs")) / "cache"


def main(argv: list[str] | None = None) -> int:
    """``grads-cache ls|verify|gc``: list, check and clean the stage cache."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with reported("grads-cache", args.verbose):
        root = args.root or default_root()
        if not root.is_dir():
            how = "--root" if args.root else "the default: " + _DEFAULT_ROOT
            raise UserError(f"no cache folder at {root} ({how}): nothing to {args.cmd}")
        if args.cmd == "ls":
            return cmd_ls(root, args.stage)
        if args.cmd == "verify":
            return cmd_verify(root, args.stage, args.keys)
        missing = [str(r) for r in args.runs if not Path(r).exists()]
        if missing:  # a typo must not make every entry look unreferenced
            raise UserError(f"--runs: no such folder {', '.join(missing)}")
        return cmd_gc(root, args.runs, args.config, args.yes)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grads-cache", description=main.__doc__)
    p.add_argument(
        "--root", type=Path, default=None, help=f"cache folder (default: {_DEFAULT_ROOT})"
    )
    verbose = "show the traceback of a user error (a missing folder, a bad --config)"
    p.add_argument("-v", "--verbose", action="store_true", help=verbose)
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("ls", help="entries with their config summary and size; event counts")
    ls.add_argument("--stage")
    ver = sub.add_parser("verify", help="re-hash every entry's files against its manifest")
    ver.add_argument("--stage")
    ver.add_argument("keys", nargs="*")
    gc = sub.add_parser("gc", help="remove partial/corrupt/legacy entries and unreferenced ones")
    for cmd in (ls, ver, gc):  # -v after the command too; unset there, the top-level value stays
        cmd.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    gc.add_argument(
        "--runs",
        type=Path,
        action="append",
        default=[],
        help="run/sweep folder whose jobs reference entries (metrics.json / config_resolved.yaml)",
    )
    gc.add_argument(
        "--config",
        action="append",
        default=[],
        help='Hydra overrides of a config whose entries are kept, e.g. "experiment=demo"',
    )
    gc.add_argument("--yes", action="store_true", help="delete (default: dry run)")
    return p


if __name__ == "__main__":
    sys.exit(main())
