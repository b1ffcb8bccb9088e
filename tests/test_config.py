"""Every option of every config group and every experiment composes, resolves, and binds its targets.

Nothing is run or instantiated: ``_target_`` signatures are bound with the node's arguments so a typo
in a knob fails here, not an hour into a run.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, REPO, compose, sweep_axes

GROUPS = sorted(
    d.name for d in CONF_DIR.iterdir() if d.is_dir() and d.name not in {"local", "hydra"}
)
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF_DIR / g).glob("*.yaml"))]
EXPERIMENTS = sorted(f.stem for f in (CONF_DIR / "experiment").glob("*.yaml"))
PACKAGED = {"tuning": "trainer"}
REQUIRED_GROUPS = {
    "model",
    "domain",
    "selector",
    "budget",
    "trainer",
    "tuning",
    "eval",
    "logger",
    "paths",
    "experiment",
}


def _targets(node, path=""):
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for k, v in node.items():
            yield from _targets(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{path}[{i}]")


def _bind_targets(resolved: dict) -> int:
    n = 0
    for path, node in _targets(resolved):
        module, _, name = node["_target_"].rpartition(".")
        target = getattr(importlib.import_module(module), name)
        kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
        try:
            inspect.signature(target).bind(**kwargs)
        except TypeError as exc:
            raise AssertionError(
                f"{path}: {node['_target_']} does not accept {sorted(kwargs)}: {exc}"
            ) from exc
        n += 1
    return n


def test_primary_defaults_list_has_every_group():
    primary = OmegaConf.load(CONF_DIR / "config.yaml")
    names = {
        next(iter(d)) if isinstance(d, dict) else d
        for d in (
            OmegaConf.to_container(x) if not isinstance(x, str) else x for x in primary.defaults
        )
    }
    names = {n.replace("optional ", "") for n in names}
    assert names >= REQUIRED_GROUPS
    entries = OmegaConf.to_container(primary.defaults)
    i = entries.index({"experiment": None})
    # experiment (deltas on top of every group) then machine-local overrides, as in lightning-hydra.
    assert entries[i + 1] == {"optional local": "default"}
    # _self_ first: experiment files override the primary config's own values, not the reverse.
    assert entries[0] == "_self_" and all(isinstance(e, dict) for e in entries[1:i])


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_binds(group, option):
    cfg = compose([f"{group}={option}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)  # fails on a bad interpolation
    if group != "experiment":
        node = PACKAGED.get(group, group)  # conf/tuning/*.yaml write into trainer
        assert resolved[node], f"{group}={option} composed to an empty node"
    _bind_targets(resolved)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_grid_first_point_composes(name):
    cfg = compose([f"experiment={name}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.get("params") or OmegaConf.create({}))
    if name.startswith("paper_"):
        assert params, f"experiment {name} defines no hydra.sweeper.params grid"
    first = [f"{k}={v[0]}" for k, v in sweep_axes(params).items()]
    point = compose([f"experiment={name}", *first])
    _bind_targets(OmegaConf.to_container(point, resolve=True))


@pytest.mark.parametrize("domain", ["synthetic", "medical", "legal", "financial"])
def test_cfg_job_is_instant_and_imports_no_torch(domain):
    # `grads --cfg job` must stay fast: composing a config may not import torch & co.
    code = (
        "import sys\n"
        f"sys.argv = ['grads', '--cfg', 'job', 'model=smollm2_135m', 'domain={domain}']\n"
        "from grads.cli.main import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'deepspeed', 'lm_eval', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-500:]
    assert f"name: {domain}" in out.stdout


@pytest.mark.parametrize("trainer", ["cpu", "zero2", "zero3", "zero3_offload"])
def test_tuning_and_strategy_are_independent_axes(trainer):
    """Any distribution strategy composes with either tuning mode, without extra overrides."""
    from grads.config import validate_config

    for tuning, (mode, lr) in {"lora": ("lora", 2e-4), "full": ("full", 2e-5)}.items():
        cfg = validate_config(compose([f"trainer={trainer}", f"tuning={tuning}"]))
        assert (cfg.trainer.name, cfg.trainer.mode, cfg.trainer.lr) == (trainer, mode, lr)
    # the experiments leave the tuning axis alone: `experiment=... tuning=full` is full tuning
    for name in ("paper_main", "demo"):
        assert compose([f"experiment={name}", "tuning=full"]).trainer.mode == "full"


def test_experiment_values_override_the_primary_config():
    demo = compose(["experiment=demo"])
    assert demo.data.max_seq_len == 128 and demo.data.system_prompt and demo.group == "demo"
    main = compose(["experiment=paper_main"])
    assert main.features.ifd is True and main.warmup.seed == 0
    # ... and the command line still wins over the experiment.
    assert compose(["experiment=demo", "data.max_seq_len=64"]).data.max_seq_len == 64


# --------------------------------------------------------------------------------------------------
# Fail fast: every probe of issue 11 fails in validate_config, before any stage, naming the key
# --------------------------------------------------------------------------------------------------
PROBES = [
    (["+finetune.epoch=3"], r"finetune\.epoch: unknown key \(did you mean 'epochs'\?\)"),
    (
        ["+data.max_seq_length=64"],
        r"data\.max_seq_length: unknown key \(did you mean 'max_seq_len'",
    ),
    (["+features.batchsize=4"], r"features\.batchsize: unknown key \(did you mean 'batch_size'"),
    (["+eval.limt=4"], r"eval\.limt: unknown key \(did you mean 'limit'"),
    (["+trainer.micro_batchsize=4"], r"trainer\.micro_batchsize: unknown key .*micro_batch_size"),
    (["+warmup.lrr=1"], r"warmup\.lrr: unknown key \(did you mean 'lr'"),
    (["+selector.rul=x"], r"selector\.rul: unknown key \(did you mean 'rule'"),
    (["+domain.sources.0.promt=x"], r"domain\.sources\[0\]\.promt: unknown key"),
    (["+model.dtyp=bf16"], r"model\.dtyp: unknown key \(did you mean 'dtype'"),
    (["+sed=1"], r"sed: unknown key \(did you mean 'seed'"),
    (["budget.value=1.5"], r"budget\.value \(kind='fraction', value=1\.5.*must be in \(0, 1\]"),
    (["budget=p5", "budget.value=0"], r"budget\.value \(kind='fraction', value=0,.*must be in"),
    (["budget=n100", "budget.value=0.5"], r"budget\.value \(kind='count'.*whole number"),
    (
        ["budget=auto"],
        r"budget=auto: selector 'grads' cannot choose its own size; allowed with auto: "
        r"\['full', 'grads_adaptive'\]",
    ),  # fmt: skip
    (["budget=auto", "selector=random"], r"selector 'random' cannot choose its own size"),
    (["features.batch_size=0"], r"features\.batch_size=0: expected an integer >= 1"),
    (["domain.pool_limit=-5"], r"domain\.pool_limit=-5: expected an integer >= 1 or null"),
    (["domain.pool_limit=0"], r"domain\.pool_limit=0: expected an integer >= 1 or null"),
    (["warmup.max_steps=0"], r"warmup\.max_steps=0: expected an integer >= 1 or -1"),
    (["finetune.max_steps=-3"], r"finetune\.max_steps=-3: expected an integer >= 1 or -1"),
    (["finetune.epochs=0"], r"finetune\.epochs=0: expected a number > 0"),
    (["seed=abc"], r"seed='abc': expected an integer"),
    (["data.on_bad_row=ignore"], r"data\.on_bad_row='ignore': expected one of \['error', 'skip'\]"),
    (["features.ifd=maybe"], r"features\.ifd='maybe': expected one of \[True, False, 'auto'\]"),
    (["data.dedup=3"], r"data\.dedup=3: expected true or false"),
    (["stages=[warmup,train]"], r"stages=\['warmup', 'train'\]: expected a non-empty list"),
    (["trainer.mode=qlora"], r"trainer \+ warmup: trainer\.mode='qlora': expected lora or full"),
    (["eval.metric=f1"], r"eval\.metric='f1': expected 'acc' or 'acc_norm'"),
]


@pytest.mark.parametrize(("overrides", "message"), PROBES, ids=[" ".join(o) for o, _ in PROBES])
def test_bad_config_fails_fast_naming_the_key(overrides, message):
    from grads.config import ConfigError, validate_config

    cfg = compose(["experiment=smoke", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_point_of_every_experiment_grid_validates(name):
    """The whole sweep grid as written (own model, trainer, eval), not just its first point."""
    import itertools

    from grads.config import validate_config

    cfg = compose([f"experiment={name}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.get("params") or OmegaConf.create({}))
    axes = [[f"{k}={v}" for v in vals] for k, vals in sweep_axes(params).items()]
    points = list(itertools.product(*axes))
    for point in points:
        validate_config(compose([f"experiment={name}", *point]))
    assert len(points) == {
        "paper_main": 66,
        "paper_ablation": 45,  # 3 domains x 5 rules x 3 gradient sources
        "paper_lora_vs_full": 12,
        "hpo_finetune": 64,
        "hpo_pareto": 64,
    }.get(name, 1)


def test_all_problems_are_reported_at_once():
    from grads.config import ConfigError, validate_config

    cfg = compose(["+finetune.epoch=3", "seed=abc", "features.batch_size=0", "budget.value=2"])
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg)
    text = str(exc.value)
    for key in ("finetune.epoch", "seed=", "features.batch_size=0", "budget.value"):
        assert key in text, key


def test_typo_inside_an_experiment_file_fails(tmp_path, monkeypatch):
    import shutil

    from grads.config import ConfigError, validate_config

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    smoke = conf / "experiment" / "smoke.yaml"
    smoke.write_text(smoke.read_text().replace("finetune:\n  epochs: 1", "finetune:\n  epoch: 1"))
    monkeypatch.setenv("GRADS_CONF_DIR", str(conf))
    with pytest.raises(ConfigError, match=r"finetune\.epoch: unknown key"):
        validate_config(compose(["experiment=smoke"], config_dir=conf))


def test_a_knob_added_to_a_yaml_is_known_at_once(tmp_path, monkeypatch):
    """Allowed keys come from the YAMLs: adding a knob is a one-place change."""
    import shutil

    from grads.config import validate_config

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    primary = conf / "config.yaml"
    primary.write_text(primary.read_text().replace("  dedup: true", "  dedup: true\n  new_knob: 1"))
    monkeypatch.setenv("GRADS_CONF_DIR", str(conf))
    validate_config(compose(["data.new_knob=2"], config_dir=conf))


def test_empty_grads_data_dir_fails(monkeypatch):
    from grads.config import ConfigError, validate_config

    monkeypatch.setenv("GRADS_DATA_DIR", "")
    with pytest.raises(ConfigError, match=r"GRADS_DATA_DIR is set but empty \(paths\.data_dir\)"):
        validate_config(compose(["domain=legal"]))


def test_missing_data_dir_is_one_clear_problem(tmp_path):
    from grads.config import ConfigError, validate_config

    with pytest.raises(
        ConfigError, match=r"(?s)1 config problem.*paths\.data_dir=.*nope: not a folder"
    ):
        validate_config(compose(["domain=medical", f"paths.data_dir={tmp_path / 'nope'}"]))


def test_cli_probe_fails_before_any_stage(tmp_path):
    """The real entry point: `grads experiment=smoke +finetune.epoch=3` stops before the warm-up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADS_")}
    cmd = [sys.executable, "-m", "grads.cli.main", "experiment=smoke", "+finetune.epoch=3"]
    out = subprocess.run(
        [*cmd, f"paths.output_dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode != 0
    assert "finetune.epoch: unknown key (did you mean 'epochs'?)" in out.stdout + out.stderr
    assert not (tmp_path / "cache").exists()  # no stage started


# --------------------------------------------------------------------------------------------------
# Paths: absolute before any stage runs; defaults independent of the working directory
# --------------------------------------------------------------------------------------------------
def test_default_paths_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    from grads.config import validate_config
    from grads.constants import DEFAULT_DATA_DIR, PATH_ENV, REPO_ROOT

    for var in PATH_ENV.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = validate_config(compose(["experiment=smoke"]))
    paths = cfg.paths
    assert (
        paths.data_dir == os.path.abspath(DEFAULT_DATA_DIR) == str(REPO.parent / "shared" / "data")
    )
    assert paths.output_dir == str(REPO_ROOT / "outputs")
    assert paths.cache_dir == str(REPO_ROOT / "outputs" / "cache")
    gen = cfg.domain.generator.out_dir  # an interpolation of cache_dir: absolute as well
    assert gen == str(REPO_ROOT / "outputs" / "cache" / "synthetic" / "seed0")


def test_relative_paths_are_taken_from_the_working_directory(tmp_path, monkeypatch):
    from grads.config import validate_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRADS_MODEL_DIR", "models")
    cfg = validate_config(
        compose(["experiment=smoke", "paths.output_dir=out", "paths.cache_dir=./c"])
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["paths"]["output_dir"] == str(tmp_path / "out")
    assert resolved["paths"]["cache_dir"] == str(tmp_path / "c")
    assert resolved["paths"]["model_dir"] == str(tmp_path / "models")
    assert resolved["domain"]["sources"][0]["path"] == str(
        tmp_path / "c/synthetic/seed0/train.jsonl"
    )
    for value in resolved["paths"].values():
        assert os.path.isabs(value)
    (tmp_path / "mine.jsonl").write_text('{"q": "a", "a": "b"}\n')
    src = "{name: mine, path: mine.jsonl, prompt: '{q}', response: '{a}'}"
    cfg = validate_config(compose(["~domain.generator", f"domain.sources=[{src}]"]))
    assert cfg.domain.sources[0].path == str(tmp_path / "mine.jsonl")


def test_conf_dir_is_honoured_by_the_deepspeed_templates(tmp_path, monkeypatch):
    import shutil

    from grads.training import load_ds_template

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "trainer" / "ds" / "cpu.json").write_text('{"marker": 1}')
    monkeypatch.setenv("GRADS_CONF_DIR", str(conf))
    assert load_ds_template("ds/cpu.json") == {"marker": 1}
    monkeypatch.setenv("GRADS_CONF_DIR", "")
    with pytest.raises(ValueError, match="GRADS_CONF_DIR is set but empty"):
        load_ds_template("ds/cpu.json")


def test_one_owner_for_shared_constants_and_no_library_import_of_the_cli():
    sources = {p: p.read_text() for p in (REPO / "grads").rglob("*.py")}
    assert [p.name for p, s in sources.items() if "IGNORE_INDEX = " in s] == ["constants.py"]
    # the paper phases start `python -m grads.cli.main` as a subprocess: that is not an import
    imports = re.compile(r"^\s*(from grads\.cli\b|import grads\.cli\b)", re.M)
    importers = [p for p, s in sources.items() if imports.search(s) and p.parent.name != "cli"]
    assert importers == []


def test_code_reads_defaults_from_the_yaml():
    """Defaults live in the YAML only: code without a composed config gets the same values."""
    from grads.config_access import defaults
    from grads.features.compute import features_settings
    from grads.training import TrainerSettings

    cpu = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "trainer" / "cpu.yaml"))
    lora = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "tuning" / "lora.yaml"))
    s = TrainerSettings.from_cfg(
        {"trainer": {}, "model": {"lora_target_modules": ["q"]}}, "finetune"
    )
    assert s.save_every == cpu["save_every"] and s.lora.r == cpu["lora"]["r"]
    assert s.lr == lora["lr"] and s.mode == lora["mode"] == "lora"  # the default tuning option
    feats = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))["features"]
    assert defaults("features") == feats
    assert features_settings({}) == {
        **feats,
        "ifd": False,  # auto: only the pipeline knows the selector
        "ifd_answer": "text",  # the domain's (domain.ifd_answer), else text
    }
    assert features_settings({"domain": {"ifd_answer": "matched"}})["ifd_answer"] == "matched"


def test_importorskip_of_a_required_dependency_fails(tmp_path):
    """A broken install must turn the suite red: conftest fails such skips (optional ones still skip)."""
    (tmp_path / "test_probe.py").write_text(
        "import sys\nimport pytest\n"
        "sys.modules['peft'] = None  # a broken install: importing it fails\n"
        "def test_required():\n    pytest.importorskip('peft')\n"
        "def test_optional():\n    pytest.importorskip('not_a_dependency_of_grads')\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "pytest", str(tmp_path), "-p", "tests.conftest", "-p", "no:cacheprovider", "-q", "-rA"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert "1 failed, 1 skipped" in out.stdout, out.stdout[-2000:]
    assert "required dependency 'peft' cannot be imported" in out.stdout


# --------------------------------------------------------------------------------------------------
# The custom domain: templates are optional, the held-out split is settled per run
# --------------------------------------------------------------------------------------------------
def _custom(tmp_path, *over):
    pool = tmp_path / "pool.jsonl"
    if not pool.exists():
        pool.write_text('{"instruction": "q", "input": "", "output": "a"}\n')
    return compose(["domain=custom", f"domain.path={pool}", *over])


def test_custom_pool_validates_without_templates(tmp_path):
    """Null templates mean "detect them from the pool's fields" (or chat records), not an error."""
    from grads.config import validate_config

    cfg = validate_config(_custom(tmp_path))
    assert cfg.domain.sources[0].prompt is None and cfg.domain.sources[0].response is None
    validate_config(_custom(tmp_path, "domain.mode=chat"))  # a messages pool, nothing else set


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (["domain.prompt=instruction"], r"domain\.prompt / domain\.response: set both"),
        (["domain.prompt='{}'", "domain.response=output"], r"domain\.prompt='\{\}'.*named fields"),
        (
            ["domain.mode=xml"],
            r"domain\.mode='xml': expected one of \['auto', 'template', 'chat'\]",
        ),
        (["domain.format=xlsx"], r"domain\.format='xlsx': expected one of"),
        (["domain.prompt=''", "domain.response=output"], r"domain\.prompt='': expected a template"),
        (
            ["domain.heldout.max_frac=2"],
            r"domain\.heldout: .*heldout\.max_frac=2 must be a fraction",
        ),
    ],
)
def test_bad_custom_pool_knobs_fail_before_the_pool_is_read(tmp_path, over, message):
    from grads.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match=message):
        validate_config(_custom(tmp_path, *over))


def test_custom_heldout_split_only_in_runs_that_score_it(tmp_path):
    from grads.config import validate_config

    def heldout(*over):
        return OmegaConf.to_container(validate_config(_custom(tmp_path, *over)).domain)["heldout"]

    split = {"n": 300, "max_frac": 0.05, "salt": "grads-heldout-v1"}
    assert heldout() == split  # the evaluate stage scores grads_heldout (eval=quick)
    assert heldout("stages=[warmup,features,select]") is None  # grads-select's stages
    assert heldout("eval=none") is None
    assert heldout("eval.domain_loss_tasks=[]") is None
    fixed = heldout("domain.heldout.only_when_measured=false", "eval=none")
    assert fixed == {**split, "only_when_measured": False}
    assert heldout("domain.heldout=null") is None
    # Shipped domains keep their fixed split whatever the run does.
    legal = validate_config(compose(["domain=legal", "stages=[warmup]"]))
    assert legal.domain.heldout.n == 300
