import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import compose_cfg
from uae_lightning.cli import run_name
from uae_lightning.config import validate
from uae_lightning.errors import ConfigError

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_validates_and_instantiates(experiment):
    overrides = [f"+experiment={experiment}"]
    if not experiment.startswith("toy"):
        overrides.append("data.manifest=/data/train.jsonl")
    cfg = compose_cfg(overrides)
    validate(cfg)
    for name in cfg.run:  # the module classes import and accept their config (models are built later)
        stage = instantiate(cfg.stages[name].module, model=OmegaConf.to_container(cfg.model), resolution=cfg.data.resolution)
        assert stage.encoder is None  # nothing large is built before configure_model
    assert OmegaConf.to_container(cfg, resolve=True)


def test_default_is_the_toy_pipeline():
    cfg = compose_cfg()
    assert cfg.data.source == "toy" and cfg.model.encoder.pretrained is None and cfg.model.decoder.pretrained is None
    assert list(cfg.run)[0] == "pretrain"


@pytest.mark.parametrize(
    "override, key",
    [
        ("run=[pretrain,nope]", "run[]"),
        ("data.resolution=30", "data.resolution"),
        ("model.condition_padding=trim", "model.condition_padding"),
        ("model.encoder.conditioning=image", "model.encoder.conditioning"),
        ("model.decoder.architecture=sd4", "model.decoder.architecture"),
        ("stages.pretrain.module.lr=-1", "stages.pretrain.module.lr"),
        ("stages.pretrain.module.weighting_scheme=cosine", "stages.pretrain.module.weighting_scheme"),
        ("stages.pretrain.module.caption_dropout=1.5", "stages.pretrain.module.caption_dropout"),
        ("stages.pretrain.trainer.max_steps=0", "stages.pretrain.trainer.max_steps"),
        ("+reward.backbones.toy_pixelz=1.0", "reward.backbones"),
        ("reward.backbones.toy_pixels=0", "reward.backbones.toy_pixels"),
        ("+data.caption_levels.verbose=1.0", "data.caption_levels"),
        ("stages.pretrain.module.lr=inf", "stages.pretrain.module.lr"),
        ("trainer.checkpoint_every_n_steps=0", "trainer.checkpoint_every_n_steps"),
        ("stages.g4u.module.max_nonfinite_in_a_row=0", "stages.g4u.module.max_nonfinite_in_a_row"),
        ("trainer.devices=0", "trainer.devices"),
        ("trainer.precision=banana", "trainer.precision"),
        ("data.num_workers=-1", "data.num_workers"),
        ("bench.num_steps=0", "bench.num_steps"),
        ("bench.backbones=[toy_pixelz]", "bench.backbones"),
        ("+trainer.max_steps=2", "stages.<stage>.trainer.max_steps"),
        ("stages.u4g.module.convention=exact", "stages.u4g.module.convention"),
        ("stages.pretrain.module.sigma_sampling=shifted", "stages.pretrain.module.sigma_sampling"),
        ("stages.g4u.module.guidance_scale=0.5", "stages.g4u.module.guidance_scale"),
        ("merged_weights=sometimes", "merged_weights"),
    ],
)
def test_impossible_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        validate(compose_cfg([override]))


def heavy_imports(importtime_log: str) -> set[str]:
    """The heavy packages a `python -X importtime` run imported (torch, Lightning, transformers, diffusers)."""
    return set(re.findall(r"\|\s*(torch|lightning|transformers|diffusers)$", importtime_log, re.M))


def test_heavy_imports_reads_importtime_output():
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch"], capture_output=True, text=True,
                         timeout=120)
    assert heavy_imports(out.stderr) == {"torch"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["+experiment=nope"], "Could not find 'experiment/nope'"),
        (["data.bach_size=3"], "Key 'bach_size' is not in struct"),
        (["model.condition_padding=trim"], "model.condition_padding='trim' is not valid"),
        (["+experiment=pretrain"], "data.manifest is not set"),
    ],
)
def test_cli_rejects_bad_configs_before_building_models(args, message, tmp_path):
    """...and before importing torch or the model libraries, so a misspelt key is reported in about a second."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "uae_lightning", *args, f"paths.runs_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert message in out.stderr + out.stdout
    assert not heavy_imports(out.stderr)
    assert "GPU available" not in out.stderr + out.stdout  # no Trainer, so no model, was ever built
    assert not list(tmp_path.rglob("*.safetensors"))
    if "is not valid" in message or "is not set" in message:  # our own checks: one line, no traceback (UAE_DEBUG=1 would show it)
        assert "Traceback" not in out.stderr and out.returncode == 2


def test_paper_preset_prints_with_cfg_job():
    out = subprocess.run([sys.executable, "-m", "uae_lightning", "--cfg", "job", "+experiment=pretrain"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in out.stdout and "stable-diffusion-3.5-large" in out.stdout


def test_run_names_are_deterministic_and_bounded():
    assert run_name("") == "default"
    assert run_name("+experiment=toy_pretrain,seed=1") == "experiment-toy_pretrain+seed-1"
    long = ",".join(f"stages.pretrain.module.k{i}=v{i}" for i in range(20))
    assert run_name(long) == run_name(long) and len(run_name(long)) <= 96
    assert run_name(long) != run_name(long + "x")


def test_a_path_into_a_run_is_an_unquoted_hydra_value(compose_config):
    """The README's `init_from=runs/<name>/<stage>/weights.safetensors`, with the name a run really gets (old names
    held `=` and `,`, which Hydra's override parser rejects unquoted)."""
    name = run_name("+experiment=cold_start,data.manifest=/data/v1.2/train.jsonl,init_from=runs/a/b.safetensors,"
                    "trainer.devices=8,stages.g4u.module.lr=1e-4")
    path = f"runs/cold_start/{name}/cold_start/weights.safetensors"
    assert compose_config([f"init_from={path}"]).init_from == path


def _with_hydra(overrides):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="uae_lightning.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_submits_without_m_and_follows_the_trainer():
    from hydra.types import RunMode

    assert _with_hydra([]).hydra.mode is None  # plain runs: -m decides, as usual
    cfg = _with_hydra(["hydra/launcher=submitit_slurm", "trainer.accelerator=gpu", "trainer.devices=4", "trainer.num_nodes=2"])
    assert cfg.hydra.mode == RunMode.MULTIRUN
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.max_num_timeout == 0 and launcher.additional_parameters.signal == "USR1@300"
    # the lead time is one key, and reaches both the sbatch --signal and submitit's own delay
    lead = _with_hydra(["hydra/launcher=submitit_slurm", "preemption.lead_s=900"]).hydra.launcher
    assert lead.additional_parameters.signal == "USR1@900" and lead.signal_delay_s == 900
    cpu = _with_hydra(["hydra/launcher=submitit_slurm", "trainer.devices=2"]).hydra.launcher
    assert (cpu.tasks_per_node, cpu.gpus_per_node) == (2, 0)  # accelerator auto requests no GPU
    bad = _with_hydra(["hydra/launcher=submitit_slurm", "trainer.devices=auto"])
    with pytest.raises(Exception, match="trainer.devices='auto'.*must be explicit"):
        bad.hydra.launcher.tasks_per_node


def test_job_whose_allocation_disagrees_with_the_trainer_stops(monkeypatch):
    from uae_lightning.slurm import check_allocation

    cfg = compose_cfg(["trainer.devices=2"])
    monkeypatch.setenv("SLURM_JOB_NAME", "uae")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    check_allocation(cfg)  # 1 node x 2 tasks: as the trainer expects
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(ConfigError, match="SLURM started 4 task"):
        check_allocation(cfg)


def test_every_toy_stage_checkpoints_before_it_ends():
    """A stage shorter than its checkpoint interval has no resume point but its end: each toy stage checkpoints at
    least twice (the paper presets' intervals are per stage too, so the toy's do not leak into them)."""
    cfg = compose_cfg()
    for name in cfg.run:
        every = cfg.stages[name].trainer.get("checkpoint_every_n_steps", cfg.trainer.checkpoint_every_n_steps)
        assert cfg.stages[name].trainer.max_steps >= 2 * every, name
    paper = compose_cfg(["+experiment=u4g", "init_from=x", "data.manifest=y"])
    assert paper.stages.u4g.trainer.checkpoint_every_n_steps == 50


def test_paper_presets_score_with_the_paper_reward():
    for experiment in ("pretrain", "cold_start", "g4u", "u4g"):
        cfg = compose_cfg([f"+experiment={experiment}", "data.manifest=x", "init_from=y"])
        assert dict(cfg.reward.backbones) == {"clip": 1.0}, experiment


@pytest.mark.parametrize("override, named", [
    ("backbone_sources.clip={missing}", r"bench.backbones: backbone 'clip' cannot be loaded from .*missing.*backbone_sources.clip"),
    ("model.encoder.pretrained={missing}", r"model.encoder.pretrained=.*missing.* cannot be loaded"),
    ("model.decoder.pretrained={missing}", r"model.decoder.pretrained=.*missing.* cannot be loaded"),
])
def test_a_wrong_model_or_backbone_source_stops_the_run_before_any_stage(tmp_path, override, named):
    """Checked before the first stage trains (not after it, when the in-run Unified-Bench first loads a backbone)."""
    from uae_lightning.runner import run_pipeline

    cfg = compose_cfg(["run=[pretrain]", "bench.backbones=[toy_pixels,clip]", override.format(missing=tmp_path / "missing")])
    with pytest.raises(ConfigError, match=named):
        run_pipeline(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "pretrain").exists()


def test_help_is_the_packages_own():
    """`python -m uae_lightning --help`: what the default does, the presets, the stages, the main keys and the
    commands for SLURM, sweeps, the bench and the pipeline — not Hydra's generic text."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "uae_lightning", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not heavy_imports(out.stderr)  # the help answers at once
    text = out.stdout
    assert "powered by Hydra" not in text
    for needle in ("embedded toy pipeline", "+experiment=u4g", "hydra/launcher=submitit_slurm", "init_from",
                   "python -m uae_lightning.sweeps", "python -m uae_lightning.bench run",
                   "python -m uae_lightning.pipeline", "experiment: cold_start, g4u, pretrain"):
        assert needle in text, needle


def test_u4g_measures_on_sixteen_times_the_held_out_scenes_and_leaves_a_manifest_split_alone():
    """conf/stage/u4g.yaml: the toy U4G's held-out set is 16x data.val_size, whatever data.val_size is set to (the
    first sixteenth is the other stages' set); with a manifest (no val_size) nothing is added."""
    from uae_lightning.runner import _merged

    for overrides, expected in (([], 2048), (["data.val_size=8"], 128)):
        cfg = compose_cfg(overrides)
        assert _merged(cfg.data, cfg.stages.u4g.data).val_size == expected
        assert _merged(cfg.data, cfg.stages.g4u.data).val_size == expected // 16
    paper = compose_cfg(["+experiment=u4g", "data.manifest=m.jsonl", "init_from=w.safetensors"])
    assert _merged(paper.data, paper.stages.u4g.data).get("val_size") is None
    # The toy's in-stage curve reads the first 2 held-out batches; the paper preset evaluates its whole split.
    assert compose_cfg([]).stages.u4g.trainer.limit_val_batches == 2
    assert paper.stages.u4g.trainer.limit_val_batches == 1.0
    validate(paper)
