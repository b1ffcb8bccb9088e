"""Benchmark how ``grads-select`` scales with the pool size: wall time and peak memory per stage.

For each pool size N (``--sizes``; default 10^4, 10^5, 10^6):

1. **Pool.** A deterministic custom pool ``<out>/pools/pool_n<N>_v<FORMAT_VERSION>.jsonl`` of N
   distinct short Alpaca records (``instruction`` / ``input`` / ``output``: sums, percentages, unit
   conversions, sorting, parity, past tense, e-mail subject lines), each 60-120 tokens of the tiny
   model's byte-level tokenizer (one token per byte) once the chat template wraps it. It is written
   one record at a time into a temporary file renamed when complete, and reused when it exists.
2. **Stages.** The pipeline runs with ``model=tiny domain=custom domain.path=<pool> budget=p5
   logger=none`` in three child processes, one per stage, so that each stage's peak memory is its
   own: ``grads stages=[warmup]``, then ``grads stages=[warmup,features]`` (the warm-up is a cache
   hit), then ``grads-select`` (``grads-select`` always runs ``[warmup, features, select]`` and
   ignores a ``stages=`` override; both are hits, and it writes its export as users get it). They
   share the stage cache ``<out>/cache`` (``paths.cache_dir``); Hydra's run folders are
   ``<out>/runs/n<N>/<stage>``, each with the child's ``child.log``.
3. **Warm-up size.** ``warmup.fraction`` (``--warmup-fraction``, default 1.0) and
   ``warmup.max_samples`` (``--warmup-samples``, default 2000): the warm-up trains on min(N, 2000)
   samples at every size, so its training cost is constant and what grows with N is reading,
   tokenising and hashing the pool (a 5 % fraction would train on 50,000 samples at 10^6 and hide the
   other stages' scaling). It still reads the whole pool.

Measured per child:

* ``wall s``: from starting the child to its exit (interpreter start, imports, config, the cache
  keys, which hash the pool's content, the stage, ``metrics.json``).
* ``stage s``: the stage's own time as the stage cache recorded it when it computed the entry
  (``stage.json``'s ``wall_s``, which the run's ``metrics.json`` reports as ``cost.<stage>.wall_s``
  beside ``cached``); it leaves out the child's start-up and the cache's manifest hashing and fsync.
  ``s/1k`` is it per 1,000 pool samples.
* ``peak GB``: ``ru_maxrss`` of the child from ``os.wait4``: the kernel's high-water mark of the
  child's resident memory, or of a descendant it waited for if larger (what ``/usr/bin/time -v``
  calls "Maximum resident set size"). Exact, not sampled, but per process: two processes alive at
  once are not added up. So a thread also samples the summed RSS of the child's process tree with
  psutil every 0.1 s (``tree_peak_gb`` in the JSON); the two agree when a stage runs in one process
  (``trainer.procs=1``, ``features.procs=1``, the defaults used here).
* ``anon -base GB``: the sampled peak of the tree's *anonymous* resident memory (``RssAnon`` in
  ``/proc/<pid>/status``: heap and stacks) minus the baseline's. ``peak GB`` also counts the file
  pages a process maps, and the pool store is a memory-mapped file: pages of it that a stage has
  read stay resident as page cache (shared, dropped by the kernel under memory pressure) and grow
  with the pool even though the process holds nothing of it. This column is the memory the stage
  itself holds, the one the goal of flat memory is about; both are reported.
* ``-base GB``: the peak minus the peak of a baseline child that only imports ``grads.pipeline``
  and loads the tiny model the way the stages do: "excluding the model" (Python, torch,
  transformers, grads and the model, which the warm-up and features children hold too). The warm-up
  also imports DeepSpeed, which the baseline does not, so its figure carries that import. The select
  child loads no model (both upstream stages are cached, the ``grads`` selector needs none): its
  figure is its whole peak, libraries included.

Ratios (printed and saved): per stage, seconds per sample at each N over that at the smallest N
(1.0 = linear); and per stage, (peak - baseline) at the largest N over that at the smallest N, plus
the same for the largest stage peak of each size (goal: <= 1.5 from 10^4 to 10^6).

Resuming: a child's measurement is saved as ``<out>/runs/n<N>/<stage>/measure.json`` once it
succeeds and reused by the next invocation, like the pools and the cache; only what is missing
runs. ``--rerun`` forgets measurements and the stage cache (pools kept) to measure changed code:
cache keys hash the config and the data, not the code, so new code would otherwise be served the
old entries. ``--rerun select`` forgets only that stage (and any after it), keeping the costly
warm-up and features entries. A measurement whose child computed more than its own stage (an upstream entry was
gone), or found its own stage cached, is flagged in the ``note`` column: its RSS is not the stage's.

Outputs: ``<out>/bench_scale.md`` (the table, printed too) and ``<out>/bench_scale.json``.

Usage::

    python scripts/bench_scale.py                              # 1e4 1e5 1e6 -> outputs/bench_scale
    python scripts/bench_scale.py --sizes 1e4 --out /tmp/bench_scale
    python scripts/bench_scale.py --sizes 1e4 1e5 1e6 --keep-going --rerun
    python scripts/bench_scale.py --rerun select                 # new selection / export code
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMAT_VERSION = 1  # bump when the generated records change: pool files are named by it
STAGES = ("warmup", "features", "select")
# The stages whose child loads the model: the baseline is taken off their peak. grads-select's select
# child finds warm-up and features cached and the default selector (grads) needs no model.
MODEL_STAGES = ("warmup", "features")
DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
GB = 1e9
# Children run the checkout's code offline and quietly; the caller's values win.
CHILD_ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_SILENT": "true",
    "WANDB_MODE": "disabled",
}

# --------------------------------------------------------------------------------------------------
# Pool: N distinct short instruction / response records, generated one at a time
# --------------------------------------------------------------------------------------------------
_NAMES = ("Ana", "Ben", "Chen", "Dana", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kim", "Leo", "Mia")
_VERBS = (
    ("packs", "packed"),
    ("ships", "shipped"),
    ("checks", "checked"),
    ("signs", "signed"),
    ("prints", "printed"),
    ("labels", "labelled"),
)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _sum(j: int, rng: random.Random) -> tuple[str, str, str]:
    a, b = 10 + j, rng.randint(2, 999)
    return f"What is the sum of {a} and {b}?", "", f"The sum of {a} and {b} is {a + b}."


def _percent(j: int, rng: random.Random) -> tuple[str, str, str]:
    p, q = rng.randrange(5, 100, 5), 20 + j
    return f"What is {p} percent of {q}?", "", f"{p} percent of {q} is {p * q / 100:g}."


def _convert(j: int, rng: random.Random) -> tuple[str, str, str]:
    km = j / 10 + 1
    return (
        f"Convert {km:.1f} kilometres to miles.",
        "",
        f"{km:.1f} km is about {km * 0.621371:.2f} miles.",
    )


def _sort(j: int, rng: random.Random) -> tuple[str, str, str]:
    nums = [j, *(rng.randint(0, 999) for _ in range(3))]  # the first one makes the record unique
    return (
        "Sort these numbers in ascending order.",
        ", ".join(map(str, nums)),
        ", ".join(map(str, sorted(nums))) + ".",
    )


def _parity(j: int, rng: random.Random) -> tuple[str, str, str]:
    n = 100 + j
    kind = "even" if n % 2 == 0 else "odd"
    return f"Is {n} even or odd?", "", f"{n} is {kind}: its last digit, {n % 10}, is {kind}."


def _past(j: int, rng: random.Random) -> tuple[str, str, str]:
    name, (now, past), order = rng.choice(_NAMES), rng.choice(_VERBS), 1000 + j
    return (
        "Rewrite in the past tense.",
        f"{name} {now} order {order} today.",
        f"{name} {past} order {order} today.",
    )


def _subject(j: int, rng: random.Random) -> tuple[str, str, str]:
    invoice, month, day = 1000 + j, rng.choice(_MONTHS), rng.randint(1, 28)
    return (
        f"Write an e-mail subject line about invoice {invoice}.",
        "",
        f"Invoice {invoice}: payment due {month} {day}",
    )


# Record i comes from family i % len(_FAMILIES) with j = i // len(_FAMILIES): every family puts j
# in its text one-to-one, so no two records of a pool are equal (the pipeline drops duplicates).
_FAMILIES = (_sum, _percent, _convert, _sort, _parity, _past, _subject)


def pool_record(i: int) -> dict:
    """Record ``i`` of every generated pool (the pool of N holds records 0..N-1)."""
    family = _FAMILIES[i % len(_FAMILIES)]
    instruction, inp, output = family(i // len(_FAMILIES), random.Random(i))
    return {"instruction": instruction, "input": inp, "output": output}


def pool_records(n: int) -> Iterator[dict]:
    return (pool_record(i) for i in range(n))


def pool_path(out: Path, n: int) -> Path:
    return out / "pools" / f"pool_n{n}_v{FORMAT_VERSION}.jsonl"


def ensure_pool(out: Path, n: int) -> Path:
    """The pool of ``n`` records under ``out``, generated (streaming) unless it is already there."""
    path = pool_path(out, n)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    t0 = time.perf_counter()
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in pool_records(n):
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # a killed generation leaves only the .tmp file, never a short pool
    print(f"generated {path} ({n} records, {time.perf_counter() - t0:.1f} s)", flush=True)
    return path


# --------------------------------------------------------------------------------------------------
# Measuring a child: wall time, ru_maxrss from wait4, summed RSS of its process tree (sampled)
# --------------------------------------------------------------------------------------------------
class _TreeRss:
    """Sample the summed RSS of a process and its descendants from a daemon thread; keep the max."""

    def __init__(self, pid: int, interval: float = 0.1):
        import psutil

        self._psutil, self._root = psutil, psutil.Process(pid)
        self.interval, self.peak, self.anon_peak = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> tuple[int, int]:
        """Summed RSS and summed anonymous RSS (``RssAnon``) of the tree, in bytes."""
        ps = self._psutil
        total = anon = 0
        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except ps.Error:  # gone (exited, or a zombie waiting for wait4)
            return 0, 0
        for p in procs:
            with contextlib.suppress(ps.Error, OSError):  # exited between listing and reading
                total += p.memory_info().rss
                anon += _rss_anon(p.pid)
        return total, anon

    def _run(self) -> None:
        while not self._stop.is_set():
            total, anon = self._sample()
            self.peak, self.anon_peak = max(self.peak, total), max(self.anon_peak, anon)
            self._stop.wait(self.interval)

    def __enter__(self) -> _TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _rss_anon(pid: int) -> int:
    """A process's resident anonymous memory in bytes (``RssAnon`` of ``/proc/<pid>/status``): its
    own heap and stacks, without the file pages it maps (the memory-mapped pool store is page
    cache, shared and dropped by the kernel under pressure); 0 where /proc has no such line."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(cmd: list[str], env: dict, log_path: Path) -> dict:
    """Run ``cmd`` (output to ``log_path``); its exit code, wall time and peak memory.

    ``peak_rss_gb`` is ``ru_maxrss`` of ``os.wait4`` (kernel high-water mark of the child, or of a
    descendant it reaped if larger); ``tree_peak_gb`` the sampled maximum of its tree's summed RSS.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            with _TreeRss(proc.pid) as tree:
                _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C or an error here: leave no child running
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, not by Popen
    return {
        "rc": proc.returncode,
        "wall_s": round(wall, 2),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / GB, 4),  # Linux: ru_maxrss in KiB
        "tree_peak_gb": round(tree.peak / GB, 4),
        "anon_peak_gb": round(tree.anon_peak / GB, 4),
        "log": str(log_path),
    }


# --------------------------------------------------------------------------------------------------
# Children: the pipeline's entry points run from this checkout
# --------------------------------------------------------------------------------------------------
def child_env() -> dict:
    """The caller's environment, this checkout first on ``PYTHONPATH``, offline defaults."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    for key, value in CHILD_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    return env


def _quoted(path: Path) -> str:
    """A path as a quoted Hydra override value (any character but a quote or a backslash)."""
    text = str(path)
    if "'" in text or "\\" in text:
        raise SystemExit(
            f"bench_scale: {text!r}: paths with quotes or backslashes are not supported"
        )
    return f"'{text}'"


def stage_command(stage: str, pool: Path, out: Path, run_dir: Path, args) -> list[str]:
    """The child for ``stage``: ``grads stages=[..stage]``, or ``grads-select`` for select."""
    upto = list(STAGES[: STAGES.index(stage) + 1])
    entry = ["-m", "grads.cli.select"] if stage == "select" else ["-m", "grads.cli.main"]
    overrides = [
        "model=tiny",
        "domain=custom",
        f"domain.path={_quoted(pool)}",
        "budget=p5",
        "logger=none",
        f"warmup.fraction={args.warmup_fraction}",
        f"warmup.max_samples={args.warmup_samples or 'null'}",
        f"paths.output_dir={_quoted(out)}",
        f"paths.cache_dir={_quoted(out / 'cache')}",
        f"hydra.run.dir={_quoted(run_dir)}",
    ]
    if stage != "select":  # grads-select sets its own three stages
        overrides.append(f"stages=[{','.join(upto)}]")
    return [sys.executable, *entry, *overrides]


# The baseline: what every stage child holds before its stage runs (imports and the tiny model).
BASELINE_CODE = """
import grads.pipeline, torch, transformers
from omegaconf import OmegaConf
from grads.constants import conf_dir
from grads.models import load_model
model, tokenizer = load_model(OmegaConf.to_container(OmegaConf.load(conf_dir() / "model/tiny.yaml")))
print(sum(p.numel() for p in model.parameters()), "parameters")
"""


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


# --------------------------------------------------------------------------------------------------
# One measurement per (size, stage), saved and reused
# --------------------------------------------------------------------------------------------------
def _from_metrics(stage: str, run_dir: Path) -> dict:
    """The stage's own time and the cache's hits / misses from the child's ``metrics.json``."""
    path = run_dir / "metrics.json"
    if not path.exists():
        return {"stage_s": None, "cache_misses": None, "n_pool": None, "note": "no metrics.json"}
    m = json.loads(path.read_text())
    cost = (m.get("cost") or {}).get(stage) or {}
    misses = list(m.get("cache_misses") or [])
    note = ""
    if stage not in misses:
        note = f"{stage} was cached: wall and RSS are not its own (--rerun)"
    elif misses != [stage]:
        note = f"also computed {[s for s in misses if s != stage]}: RSS not {stage}'s alone"
    return {
        "stage_s": cost.get("wall_s"),
        "cache_misses": misses,
        "n_pool": m.get("n_pool"),
        "note": note,
    }


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def measured(
    name: str, run_dir: Path, cmd: list[str], env: dict, sha: str | None, extra=None
) -> dict:
    """The saved measurement of ``cmd`` in ``run_dir`` if one exists for the same command, else run
    it (the folder emptied first) and save the measurement, with ``extra(run_dir)`` (a dict) added,
    when the child succeeded."""
    saved = run_dir / "measure.json"
    if saved.exists():
        rec = json.loads(saved.read_text())
        if rec.get("cmd") == cmd:
            if rec.get("git_sha") != sha:
                print(f"  {name}: reusing a measurement of commit {rec.get('git_sha')} (--rerun)")
            return rec | {"reused": True}
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"  {name} ...", flush=True)
    rec = {"cmd": cmd, "git_sha": sha, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    rec |= measure(cmd, env, run_dir / "child.log")
    if rec["rc"] != 0:
        rec["note"] = f"failed (exit {rec['rc']}), see {rec['log']}"
        print(f"  {name} FAILED (exit {rec['rc']}):\n{_log_tail(Path(rec['log']))}", flush=True)
        return rec
    rec |= extra(run_dir) if extra else {}
    saved.write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def run_baseline(out: Path, env: dict, sha: str | None) -> dict:
    """The baseline child: imports and the tiny model, nothing else."""
    cmd = [sys.executable, "-c", BASELINE_CODE]
    rec = measured("baseline (imports + tiny model)", out / "runs" / "baseline", cmd, env, sha)
    print(f"  baseline: peak {rec['peak_rss_gb']:.3f} GB, {rec['wall_s']:.1f} s", flush=True)
    return rec


def run_size(n: int, args, env: dict, sha: str | None) -> dict:
    """Pool of ``n``, then one child per stage; stops at the first stage that fails."""
    print(f"pool of {n}:", flush=True)
    pool = ensure_pool(args.out, n)
    row: dict = {"n": n, "pool": str(pool), "stages": {}, "ok": True}
    for stage in STAGES:
        run_dir = args.out / "runs" / f"n{n}" / stage
        cmd = stage_command(stage, pool, args.out, run_dir, args)
        rec = measured(stage, run_dir, cmd, env, sha, lambda d, s=stage: _from_metrics(s, d))
        row["stages"][stage] = rec
        if rec["rc"] != 0:
            row["ok"] = False
            break
        print(
            f"  {stage}: stage {rec['stage_s']} s, child {rec['wall_s']} s, "
            f"peak {rec['peak_rss_gb']:.3f} GB{' (reused)' if rec.get('reused') else ''} "
            f"{rec.get('note', '')}",
            flush=True,
        )
        row["n_pool"] = rec.get("n_pool") or row.get("n_pool")
    return row


# --------------------------------------------------------------------------------------------------
# Report: one row per pool size, the stages side by side, and the ratios the goals name
# --------------------------------------------------------------------------------------------------
def _ok(rec: dict | None) -> bool:
    return bool(rec) and rec["rc"] == 0 and rec.get("stage_s") is not None


def _anon_excl(rec: dict, base: dict, stage: str) -> float | None:
    """Sampled peak anonymous memory beyond the model's (as :func:`_excl`), if measured."""
    if rec.get("anon_peak_gb") is None or base.get("anon_peak_gb") is None:
        return None
    return rec["anon_peak_gb"] - (base["anon_peak_gb"] if stage in MODEL_STAGES else 0.0)


def _excl(rec: dict, base: dict, stage: str) -> float:
    """Peak RSS beyond the model (GB): minus the baseline's for a stage that loads the model; the
    whole peak for one that does not (nothing to take away; its libraries stay counted)."""
    return rec["peak_rss_gb"] - (base["peak_rss_gb"] if stage in MODEL_STAGES else 0.0)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(rows: list[dict], base: dict) -> dict:
    """Seconds per sample at each size over the smallest size's (per stage), and peak RSS above the
    baseline at the largest size over the smallest's (per stage, and of each size's largest peak);
    over the sizes whose three stages all succeeded."""
    done = [r for r in rows if all(_ok(r["stages"].get(s)) for s in STAGES)]
    if not done:
        return {}
    first, last = done[0], done[-1]

    def per_sample(row: dict, stage: str) -> float:
        return row["stages"][stage]["stage_s"] / row["n"]

    def top(row: dict) -> float:
        return max(_excl(row["stages"][s], base, s) for s in STAGES)

    time_ratio = {
        s: {str(r["n"]): _ratio(per_sample(r, s), per_sample(first, s)) for r in done}
        for s in STAGES
    }
    rss_ratio = {
        s: _ratio(_excl(last["stages"][s], base, s), _excl(first["stages"][s], base, s))
        for s in STAGES
    }
    rss_ratio["largest stage"] = _ratio(top(last), top(first))
    anon_ratio = {
        s: _ratio(_anon_excl(last["stages"][s], base, s), _anon_excl(first["stages"][s], base, s))
        for s in STAGES
    }
    return {
        "anon_excl_model_largest_vs_smallest": anon_ratio,
        "smallest": first["n"],
        "largest": last["n"],
        "time_per_sample_vs_smallest": time_ratio,
        "rss_excl_model_largest_vs_smallest": rss_ratio,
    }


def _cells(rec: dict | None, n: int, base: dict, stage: str) -> list[str]:
    if not rec or rec["rc"] != 0:
        return ["failed" if rec else "-"] + ["-"] * 4
    s, anon = rec.get("stage_s"), _anon_excl(rec, base, stage)
    return [
        f"{s:.1f}" if s is not None else "?",
        f"{1000 * s / n:.3f}" if s is not None else "?",
        f"{rec['peak_rss_gb']:.3f}",
        f"{_excl(rec, base, stage):.3f}",
        f"{anon:.3f}" if anon is not None else "?",
    ]


def markdown(rows: list[dict], base: dict, rat: dict, settings: dict) -> str:
    """The table (one row per pool size), the baseline and the ratios, as Markdown."""
    head = ["N", "pool"]
    for s in STAGES:
        head += [f"{s} s", f"{s} s/1k", f"{s} GB", f"{s} -base GB", f"{s} anon -base GB"]
    lines = ["| " + " | ".join([*head, "note"]) + " |", "|" + "---|" * (len(head) + 1)]
    for r in rows:
        cells = [f"{r['n']:,}", f"{r['n_pool']:,}" if r.get("n_pool") else "-"]
        for s in STAGES:
            cells += _cells(r["stages"].get(s), r["n"], base, s)
        notes = "; ".join(rec["note"] for rec in r["stages"].values() if rec.get("note"))
        lines.append("| " + " | ".join([*cells, notes]) + " |")
    lines += [
        "",
        f"Baseline (imports + tiny model): peak RSS {base['peak_rss_gb']:.3f} GB. "
        "s: the stage's own wall time (metrics.json cost.<stage>.wall_s); GB: the child's peak RSS "
        "(ru_maxrss); -base GB: minus the baseline (select loads no model: its whole peak); "
        "anon -base GB: the sampled peak of the tree's anonymous memory (RssAnon: without the "
        "page cache of the memory-mapped pool store), minus the baseline's.",
        f"Settings: {json.dumps(settings)}",
    ]
    if rat:
        lines += ["", f"Time per sample relative to N = {rat['smallest']:,}:"]
        for s, by_n in rat["time_per_sample_vs_smallest"].items():
            lines.append(f"- {s}: " + ", ".join(f"{int(n):,}: {v}" for n, v in by_n.items()))
        rss = rat["rss_excl_model_largest_vs_smallest"]
        lines += [
            "",
            f"Peak RSS minus baseline, N = {rat['largest']:,} over N = {rat['smallest']:,}: "
            + ", ".join(f"{k}: {v}" for k, v in rss.items()),
            "Peak anonymous memory minus baseline, same sizes: "
            + ", ".join(
                f"{k}: {v}" for k, v in rat.get("anon_excl_model_largest_vs_smallest", {}).items()
            ),
        ]
    return "\n".join(lines) + "\n"


def write_report(out: Path, rows: list[dict], base: dict, settings: dict) -> str:
    """``bench_scale.md`` and ``bench_scale.json`` in ``out``; returns the Markdown."""
    rat = ratios(rows, base)
    text = markdown(rows, base, rat, settings)
    (out / "bench_scale.md").write_text(text)
    report = {"settings": settings, "baseline": base, "rows": rows, "ratios": rat}
    (out / "bench_scale.json").write_text(json.dumps(report, indent=1) + "\n")
    return text


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def _size(text: str) -> int:
    """A pool size: 10000, 1e4 or 10_000."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a pool size is a whole number >= 1")
    return int(value)


def forget(out: Path, stages: list[str]) -> None:
    """Remove the measurements and cache entries of ``stages`` and of every later stage (all of
    them when ``stages`` is empty), so that the next run measures new code; the pools are kept."""
    first = min((STAGES.index(s) for s in stages), default=0)
    if first == 0:
        for sub in ("cache", "runs"):
            shutil.rmtree(out / sub, ignore_errors=True)
        return
    for stage in STAGES[first:]:
        shutil.rmtree(out / "cache" / stage, ignore_errors=True)
        for saved in (out / "runs").glob(f"n*/{stage}/measure.json"):
            saved.unlink()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=_size, default=list(DEFAULT_SIZES))
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_scale")
    p.add_argument(
        "--keep-going", action="store_true", help="go on to the next size after a failure"
    )
    p.add_argument(
        "--rerun",
        nargs="*",
        choices=STAGES,
        metavar="STAGE",
        help="forget measurements and the stage cache (pools kept); with stages: forget those "
        "from the first named one on (e.g. --rerun select)",
    )
    p.add_argument("--warmup-fraction", type=float, default=1.0, help="warmup.fraction")
    p.add_argument(
        "--warmup-samples", type=int, default=2000, help="warmup.max_samples (0: no cap)"
    )
    args = p.parse_args(argv)
    if not 0.0 < args.warmup_fraction <= 1.0:
        p.error(f"--warmup-fraction {args.warmup_fraction}: must be in (0, 1]")
    if args.warmup_samples < 0:
        p.error(f"--warmup-samples {args.warmup_samples}: must be >= 0 (0: no cap)")
    args.out = args.out.resolve()
    args.sizes = sorted(set(args.sizes))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.rerun is not None:
        forget(args.out, args.rerun)
    env, sha = child_env(), git_sha()
    settings = {
        "model": "tiny",
        "budget": "p5",
        "warmup_fraction": args.warmup_fraction,
        "warmup_max_samples": args.warmup_samples or None,
        "format_version": FORMAT_VERSION,
        "git_sha": sha,
        "host": platform.node(),
        "cpus": os.cpu_count(),
    }
    base = run_baseline(args.out, env, sha)
    if base["rc"] != 0:
        return 1
    rows, failed = [], False
    for n in args.sizes:
        rows.append(run_size(n, args, env, sha))
        failed = failed or not rows[-1]["ok"]
        if failed and not args.keep_going:
            break
    print(write_report(args.out, rows, base, settings))
    print(f"written: {args.out / 'bench_scale.md'}, {args.out / 'bench_scale.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
