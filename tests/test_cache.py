"""grads.cache: one computation per key across processes, resumable attempts, stale owners named,
damaged entries recomputed, and the `grads-cache ls|verify|gc` commands; end to end on the tiny
model: two concurrent jobs, a rewritten pool file, a joblib sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grads.cache import DONE, IDENTITY, MANIFEST, StageCache, check_entry, event_counts, scan
from grads.cli.cache import main
from grads.errors import UserError
from tests.conftest import REPO

# A stage that appends one log row per step (resuming after the rows already written), counts its
# computations in a marker file, and can kill itself mid-way (KILL_AT) like `kill -9` would.
WORKER = r"""
import json, logging, os, signal, sys, time
from pathlib import Path
from grads.cache import StageCache

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
root, marker, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
kill_at = int(os.environ.get("KILL_AT", "0"))

def fn(work):
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    log = work / "train_log.jsonl"
    start = len(log.read_text().splitlines()) if log.exists() else 0
    for i in range(start, n):
        with open(log, "a") as f:
            f.write(json.dumps({"step": i + 1}) + "\n")
        if i + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(float(os.environ.get("STEP_S", "0.05")))
    (work / "result.txt").write_text("42")
    return {"rows": n, "resumed_from": start}

cache = StageCache(root, wait_message_s=0.3)
path = cache.get_or_run("warmup", "k1", fn, identity={"summary": {"model.name": "tiny"}})
print(json.dumps({"path": str(path), "hits": cache.hits, "misses": cache.misses}))
"""


def _worker(tmp_path: Path, n: int = 20, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(tmp_path / "cache"), str(tmp_path / "marker"), str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )


def _finish(p: subprocess.Popen) -> tuple[dict, str]:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1]), err


def _rows(path: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (path / "train_log.jsonl").read_text().splitlines()]


def test_two_processes_compute_once_and_share_the_result(tmp_path):
    first = _worker(tmp_path, STEP_S="0.1")
    time.sleep(0.8)  # let it take the lock
    second = _worker(tmp_path)
    (a, _), (b, err) = _finish(first), _finish(second)
    assert (tmp_path / "marker").read_text().count("\n") == 1  # one computation
    assert a["path"] == b["path"] and a["misses"] == ["warmup"] and b["hits"] == ["warmup"]
    assert "waiting" in err and "its result will be reused" in err
    entry = Path(a["path"])
    assert _rows(entry) == list(range(1, 21))  # an intact log: every row once
    assert check_entry(entry, content=True) == []
    assert event_counts(tmp_path / "cache")["warmup"] == {"miss": 1, "done": 1, "hit": 1}
    assert not list((tmp_path / "cache" / "warmup").glob("*.partial"))


def test_a_killed_holder_is_named_and_its_attempt_resumed(tmp_path):
    killed = _worker(tmp_path, KILL_AT="7")
    killed.communicate(timeout=60)
    assert killed.returncode == -9
    attempts = list((tmp_path / "cache" / "warmup").glob("k1.*.partial"))
    assert len(attempts) == 1 and not (tmp_path / "cache" / "warmup" / "k1").exists()
    res, err = _finish(_worker(tmp_path))
    assert "breaking the stale lock of pid" in err and "resuming the interrupted attempt" in err
    entry = Path(res["path"])
    assert _rows(entry) == list(range(1, 21))  # rows 1-7 from the killed run, 8-20 after
    info = json.loads((entry / "stage.json").read_text())
    assert info["resumed_from"] == 7
    assert event_counts(tmp_path / "cache")["warmup"]["stale_owner"] == 1
    # the entry's time is both attempts': the killed one until its last row (after 6 steps of 50 ms)
    assert info["attempts"] == 2 and info["attempt_wall_s"] >= 13 * 0.05
    assert 5 * 0.05 <= info["wall_s"] - info["attempt_wall_s"] < 30
    assert not list((tmp_path / "cache" / "warmup" / ".locks").glob("*attempts*"))


def test_an_attempt_from_before_attempt_times_is_counted_as_unknown(tmp_path):
    cache = StageCache(tmp_path)
    legacy = tmp_path / "features" / "k.otherhost-1-abcdef.partial"
    (legacy / "features.chunks").mkdir(parents=True)
    (legacy / "features.chunks" / "000000000000.parquet").write_bytes(b"x")
    out = cache.get_or_run("features", "k", lambda work: {"n": 1})
    info = json.loads((out / "stage.json").read_text())
    assert info["attempts"] == 2 and info["attempts_uncounted"] == 1
    assert info["wall_s"] == info["attempt_wall_s"]
    one = cache.get_or_run("select", "k", lambda work: {"n": 1})  # one attempt: no extra keys
    assert set(json.loads((one / "stage.json").read_text())) == {"stage", "key", "wall_s", "n"}


def test_a_failed_stage_leaves_no_work_folder(tmp_path, caplog):
    cache = StageCache(tmp_path)

    def boom(work: Path):
        (work / "half.txt").write_text("x")
        raise RuntimeError("bad input")

    with pytest.raises(RuntimeError, match="bad input"):
        cache.get_or_run("select", "k", boom)
    assert not list((tmp_path / "select").glob("*.partial"))  # nothing left to resume or clean
    assert not (tmp_path / "select" / ".locks" / "k.owner.json").exists()  # released cleanly
    assert event_counts(tmp_path, by_key=True)[("select", "k")] == {"miss": 1, "failed": 1}
    seen = []
    out = cache.get_or_run("select", "k", lambda w: seen.append(sorted(os.listdir(w))))
    assert seen == [[]] and (out / DONE).exists()  # the next attempt starts from scratch
    assert "stale" not in caplog.text and "resuming" not in caplog.text


@pytest.mark.parametrize("stop", ["interrupted", "ctrl-c", "checkpointed failure"])
def test_an_interrupted_or_checkpointed_stage_keeps_its_work_folder_to_resume(tmp_path, stop):
    from grads.stages import StageInterrupted

    cache = StageCache(tmp_path)
    raised = {
        "interrupted": StageInterrupted("stopped after 2 steps"),
        "ctrl-c": KeyboardInterrupt(),
        "checkpointed failure": RuntimeError("the node went away"),
    }[stop]

    def stops(work: Path):
        (work / "checkpoints").mkdir()
        if stop == "checkpointed failure":  # a published training checkpoint (Checkpoints.save)
            (work / "checkpoints" / "latest").write_text("step_2\n")
        (work / "train_log.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
        raise raised

    with pytest.raises(type(raised)):
        cache.get_or_run("finetune", "k", stops)
    assert len(list((tmp_path / "finetune").glob("k.*.partial"))) == 1
    seen = []
    out = cache.get_or_run("finetune", "k", lambda w: seen.append(_rows(w)))
    assert seen == [[1, 2]] and (out / DONE).exists()  # the same command resumed the attempt
    assert not list((tmp_path / "finetune").glob("*.partial"))


def test_entry_layout_and_damaged_entries_are_recomputed(tmp_path, caplog):
    cache = StageCache(tmp_path)
    calls = []

    def fn(work: Path):
        calls.append(1)
        (work / "selection.jsonl").write_text('{"id": 1}\n')
        (work / "sub").mkdir()
        (work / "sub" / "w.bin").write_bytes(b"\0" * 100)
        return {"selected": 1}

    ident = {"summary": {"selector.name": "grads"}, "upstream": {"features": "f1"}}
    out = cache.get_or_run("select", "k", fn, identity=ident)
    assert {p.name for p in out.iterdir()} == {
        "selection.jsonl",
        "sub",
        "stage.json",
        IDENTITY,
        MANIFEST,
        DONE,
    }
    manifest = json.loads((out / MANIFEST).read_text())["files"]
    assert set(manifest) == {"selection.jsonl", "sub/w.bin", "stage.json", IDENTITY}
    assert json.loads((out / IDENTITY).read_text())["upstream"] == {"features": "f1"}
    assert cache.get_or_run("select", "k", fn) == out and calls == [1]
    (out / "selection.jsonl").unlink()  # e.g. a half-copied cache
    assert cache.get_or_run("select", "k", fn) == out and calls == [1, 1]
    assert "damaged" in caplog.text and (out / "selection.jsonl").exists()
    assert [r["status"] for r in scan(tmp_path)] == ["done", "corrupt"]


def test_cli_ls_verify_gc(tmp_path, capsys):
    root = tmp_path / "cache"
    cache = StageCache(root)

    def make(stage: str, key: str, upstream: dict) -> Path:
        ident = {"summary": {"model.name": "tiny", "seed": 0}, "upstream": upstream}

        def fn(work: Path) -> None:
            (work / "x.txt").write_text(key)

        return cache.get_or_run(stage, key, fn, ident)

    make("warmup", "w1", {})
    make("features", "f1", {"warmup": "w1"})
    sel = make("select", "s1", {"features": "f1"})
    make("select", "s2", {"features": "f1"})  # no job references it
    (root / "select" / "s3.host-1-abc.partial").mkdir()  # an abandoned attempt
    (root / "warmup" / "old").mkdir()  # a version-1 entry: DONE, no identity
    (root / "warmup" / "old" / DONE).write_text("")
    (root / "synthetic" / "seed0").mkdir(parents=True)  # generated data: never an entry

    assert main(["--root", str(root), "ls"]) == 0
    out = capsys.readouterr().out
    assert "s1" in out and "model=tiny" in out and "partial" in out and "legacy" in out
    assert "seed0" not in out

    assert main(["--root", str(root), "verify"]) == 1  # the legacy entry has no manifest
    (sel / "x.txt").write_text("s9")  # same size, other content
    main(["--root", str(root), "verify", "--stage", "select", "s1"])
    assert "content changed: x.txt" in capsys.readouterr().out
    (sel / "x.txt").write_text("s1")

    runs = tmp_path / "runs" / "job0"
    runs.mkdir(parents=True)
    (runs / "metrics.json").write_text(json.dumps({"keys": {"select": "s1"}}))
    assert main(["--root", str(root), "gc", "--runs", str(tmp_path / "runs")]) == 0
    assert "dry run" in capsys.readouterr().out and (root / "select" / "s2").exists()
    main(["--root", str(root), "gc", "--runs", str(tmp_path / "runs"), "--yes"])
    left = {(r["stage"], r["key"]) for r in scan(root)}
    assert left == {("warmup", "w1"), ("features", "f1"), ("select", "s1")}  # s1 and its inputs
    assert (root / "synthetic" / "seed0").exists()
    assert main(["--root", str(root), "verify"]) == 0


@pytest.mark.parametrize("cmd", [["ls"], ["verify"], ["gc"]])
def test_cli_fails_on_a_missing_root(tmp_path, capsys, cmd):
    missing = tmp_path / "nonexistent"
    with pytest.raises(SystemExit) as exit_:
        main(["--root", str(missing), *cmd])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert f"grads-cache: error: no cache folder at {missing} (--root)" in err
    assert "Traceback" not in err and not missing.exists()
    with pytest.raises(UserError, match="no cache folder"):  # -v: the exception itself
        main(["--root", str(missing), *cmd, "-v"])


def test_cli_rejects_a_missing_runs_folder_and_an_unknown_key(tmp_path, capsys):
    root = tmp_path / "cache"
    StageCache(root).get_or_run("select", "s1", lambda w: (w / "x.txt").write_text("1") and None)
    for argv, problem in (
        (["gc", "--runs", str(tmp_path / "typo"), "--yes"], "--runs: no such folder"),
        (["verify", "s9"], "no cache entry with key s9"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["--root", str(root), *argv])
        assert exit_.value.code == 1 and problem in capsys.readouterr().err
    assert [r["key"] for r in scan(root)] == ["s1"]  # the typo deleted nothing


# --------------------------------------------------------------------------------------------------
# End to end on the tiny model
# --------------------------------------------------------------------------------------------------
SMOKE = [
    "experiment=smoke",
    "logger=none",
    "eval=none",
    "domain.pool_limit=40",
    "data.max_seq_len=64",
    "stages=[warmup,features,select]",
]


def _grads(
    tmp_path: Path, *overrides: str, cache: Path, name: str, multirun: bool = False
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "grads.cli.main",
        *(["-m"] if multirun else []),
        *SMOKE,
        *overrides,
    ]
    cmd += [f"paths.output_dir={tmp_path / name}", f"hydra.run.dir={tmp_path / name / 'run'}"]
    cmd += [f"hydra.sweep.dir={tmp_path / name / 'sweep'}"]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "GRADS_CACHE_DIR": str(cache), "HYDRA_FULL_ERROR": "1"},
    )


def _done(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-4000:]
    return out


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("metrics.json"))]


@pytest.mark.slow
def test_concurrent_runs_on_one_cache_compute_once(tmp_path):
    """The issue's reproduction: two identical runs on one cache folder, the second 8 s later."""
    cache = tmp_path / "cache"
    ov = ["warmup.max_steps=15", "trainer.save_every=2", "trainer.micro_batch_size=4"]
    first = _grads(tmp_path, *ov, cache=cache, name="a")
    time.sleep(8)
    second = _grads(tmp_path, *ov, cache=cache, name="b")
    _done(first), _done(second)
    (a,), (b,) = _metrics(tmp_path / "a" / "run"), _metrics(tmp_path / "b" / "run")
    assert a["keys"] == b["keys"] and a["n_selected"] == b["n_selected"]
    misses = a["cache_misses"] + b["cache_misses"]
    assert sorted(misses) == ["features", "select", "warmup"]  # each stage computed once
    entry = Path(a["artefacts"]["warmup"])
    log = (entry / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log] == list(range(1, 16))  # intact: every step once
    sel_a = Path(a["artefacts"]["select"]) / "selection.jsonl"
    assert sel_a.exists() and sel_a == Path(b["artefacts"]["select"]) / "selection.jsonl"
    assert all(r["status"] == "done" for r in scan(cache))
    assert main(["--root", str(cache), "verify"]) == 0


@pytest.mark.slow
def test_rewritten_pool_file_recomputes_every_stage(tmp_path):
    pool = tmp_path / "pool.jsonl"

    def write(n: int, tag: str) -> None:
        rows = [{"prompt": f"{tag} question {i}?", "response": f"answer {i}"} for i in range(n)]
        pool.write_text("".join(json.dumps(r) + "\n" for r in rows))

    src = (
        f"domain.sources=[{{name: mine, path: {pool}, prompt: '{{prompt}}', "
        "response: '{response}'}]"
    )
    ov = [src, "domain.generator=null", "domain.pool_limit=null", "warmup.max_steps=2"]
    write(30, "old")
    _done(_grads(tmp_path, *ov, cache=tmp_path / "cache", name="r1"))
    write(50, "new")
    _done(_grads(tmp_path, *ov, cache=tmp_path / "cache", name="r2"))
    (m1,), (m2,) = _metrics(tmp_path / "r1" / "run"), _metrics(tmp_path / "r2" / "run")
    assert m1["n_pool"] == 30 and m2["n_pool"] == 50
    assert m2["cache_misses"] == ["warmup", "features", "select"]


@pytest.mark.slow
def test_joblib_sweep_runs_the_shared_warmup_once(tmp_path):
    """`hydra/launcher=joblib hydra.launcher.n_jobs=2` over two selectors: one warm-up."""
    cache = tmp_path / "cache"
    p = _grads(
        tmp_path,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "selector=grads,random",
        "warmup.max_steps=6",
        cache=cache,
        name="sweep",
        multirun=True,
    )
    _done(p)
    jobs = _metrics(tmp_path / "sweep" / "sweep")
    assert len(jobs) == 2 and len({j["keys"]["warmup"] for j in jobs}) == 1
    misses = [s for j in jobs for s in j["cache_misses"]]
    assert misses.count("warmup") == 1 and misses.count("features") == 1
    assert event_counts(cache)["warmup"]["miss"] == 1
