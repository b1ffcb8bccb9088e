"""The ``grads-config`` console script: list the shipped configs and copy one to edit it.

Modelled on torchtune's ``tune ls`` / ``tune cp``. The configs ship inside the package (``grads/conf``,
also ``pkg://grads.conf``; a checkout reads ``conf/``), so a user edits a copy, never the package::

    grads-config ls                                        # every group, its options, * = default
    grads-config ls experiment                             # one group
    grads-config cp experiment/paper_main my_conf/experiment/my_main.yaml
    grads --config-dir my_conf experiment=my_main          # a new option beside the shipped ones
    grads-config cp all my_tree/                           # every config, to change anything
    GRADS_CONF_DIR=my_tree grads experiment=paper_main     # ... and run from that tree only
    grads-config path                                      # where the shipped configs are

``--config-dir`` (Hydra's own flag) adds a folder to the config search path *after* the shipped
configs: its files are new options of their groups (a file named like a shipped option is not
seen). ``GRADS_CONF_DIR`` replaces the whole tree (the CLI, the validation and the DeepSpeed
templates all read it). Nothing heavy is imported here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from grads.constants import conf_dir

PRIMARY = "config.yaml"  # the one file of the tree that is not an option of a group


def options(root: Path) -> dict[str, list[str]]:
    """``{group: [option, ...]}`` of the config tree at ``root`` (nested folders are part of the
    option name, as Hydra spells it: ``experiment`` -> ``paper/base``)."""
    groups: dict[str, list[str]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        names = sorted(str(f.relative_to(sub).with_suffix("")) for f in sub.rglob("*.yaml"))
        if names:
            groups[sub.name] = names
    return groups


def default_choices(root: Path) -> dict[str, str]:
    """The option each group gets in the primary config's defaults list (``optional``, ``override``
    prefixes dropped; ``null`` where none)."""
    from omegaconf import OmegaConf

    primary = OmegaConf.to_container(OmegaConf.load(root / PRIMARY), resolve=False)
    out: dict[str, str] = {}
    for entry in primary.get("defaults") or []:  # type: ignore[union-attr]
        if isinstance(entry, dict):
            key, value = next(iter(entry.items()))
            name = key.replace("optional ", "").replace("override ", "").strip()
            out[name] = str(value)
    return out


def cmd_ls(group: str | None) -> int:
    root = conf_dir()
    groups, chosen = options(root), default_choices(root)
    if group is not None and group not in groups:
        print(f"no config group {group!r}; groups: {sorted(groups)}", file=sys.stderr)
        return 2
    print(f"configs in {root} (* = the default)")
    if group is None:
        print(f"  {PRIMARY:<12} the primary config: the defaults list and every top-level knob")
    for name, opts in groups.items():
        if group is not None and name != group:
            continue
        shown = [f"{o}*" if chosen.get(name) == o else o for o in opts]
        print(f"  {name:<12} {' '.join(shown)}")
    ds = sorted((root / "trainer" / "ds").glob("*.json"))
    if group in (None, "trainer") and ds:
        print(f"  {'trainer/ds':<12} {' '.join(p.name for p in ds)}  (DeepSpeed templates)")
    return 0


ALL = "all"


def source_file(name: str) -> Path:
    """The shipped file ``name`` names (``experiment/paper_main``, ``.yaml`` optional, or a
    DeepSpeed template ``trainer/ds/zero2.json``), or the whole tree for ``all``.

    Raises:
        FileNotFoundError: no such config, with what there is.
    """
    root = conf_dir()
    if name == ALL:
        return root
    rel = name.strip().strip("/")
    for cand in (root / rel, root / f"{rel}.yaml"):
        if "/" in rel and cand.is_file():
            return cand
    hint = ", ".join(f"{g}/{o[0]}" for g, o in list(options(root).items())[:3])
    raise FileNotFoundError(
        f"no shipped config {name!r} in {root}: give group/option (e.g. {hint}) or 'all'; "
        "`grads-config ls` lists them"
    )


def destination(src: Path, dest: str) -> Path:
    """Where ``src`` lands: inside an existing folder (or one written with a trailing ``/``) at its
    place in the tree (``<dest>/<group>/<option>.yaml``, the layout ``--config-dir`` reads); a
    file path as given (``.yaml`` added when it has no suffix). The whole tree goes to ``dest``."""
    folder = dest.endswith(("/", os.sep))
    path = Path(dest).expanduser()
    if src == conf_dir():
        return path
    if folder or path.is_dir():
        return path / src.relative_to(conf_dir())
    return path if path.suffix else path.with_suffix(src.suffix)


def usage_hint(src: Path, out: Path) -> str:
    """How to run with the copy."""
    root = conf_dir()
    if src == root:
        return f"run with it (every config from there): GRADS_CONF_DIR={out} grads ..."
    if src.suffix == ".json":  # a DeepSpeed template is named by path, not composed by Hydra
        return f"run with it: grads trainer.ds_config={out}"
    group = src.relative_to(root).parts[0]
    if out.parent.name != group:
        return (
            f"Hydra finds it as an option of '{group}' in <dir>/{group}/: move it there and run "
            f"grads --config-dir <dir> {group}={out.stem}"
        )
    option = str(out.relative_to(out.parent).with_suffix(""))
    if (root / group / f"{option}.yaml").is_file():
        # --config-dir comes after the shipped configs on Hydra's search path.
        return (
            f"the shipped {group}/{option} is found first: rename the copy (e.g. "
            f"{option}_mine.yaml, then grads --config-dir {out.parent.parent} "
            f"{group}={option}_mine), or copy every config (grads-config cp all <dir>) and run "
            "with GRADS_CONF_DIR=<dir>"
        )
    return f"run with it: grads --config-dir {out.parent.parent} {group}={option}"


def cmd_cp(name: str, dest: str, force: bool) -> int:
    try:
        src = source_file(name)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = destination(src, dest)
    if out.exists() and not force and (src.is_file() or any(out.iterdir())):
        print(f"error: {out} exists (--force to overwrite)", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        ignore = shutil.ignore_patterns("__pycache__", "__init__.py")
        shutil.copytree(src, out, ignore=ignore, dirs_exist_ok=True)
    else:
        shutil.copyfile(src, out)
    print(f"copied {src} -> {out}")
    print(usage_hint(src, out.resolve()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``grads-config ls|cp|path``: the shipped configs, and copies of them to edit."""
    p = argparse.ArgumentParser(prog="grads-config", description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("ls", help="config groups and their options (* = the default)")
    ls.add_argument("group", nargs="?", help="only this group, e.g. experiment")
    cp = sub.add_parser("cp", help="copy a shipped config (or all of them) to edit it")
    cp.add_argument("name", help="group/option (experiment/paper_main), or 'all' (the whole tree)")
    cp.add_argument("dest", help="a file, or a folder (the copy keeps its <group>/ sub-folder)")
    cp.add_argument("--force", action="store_true", help="overwrite an existing copy")
    sub.add_parser("path", help="print the folder of the shipped configs")
    args = p.parse_args(argv)
    if args.cmd == "ls":
        return cmd_ls(args.group)
    if args.cmd == "cp":
        return cmd_cp(args.name, args.dest, args.force)
    print(conf_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
