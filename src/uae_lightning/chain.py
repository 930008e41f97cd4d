"""Submit a run to SLURM once and log out: each stage (and round) becomes its own job, started when the one before it
has succeeded (`--dependency=afterok`), and the command returns as soon as they are queued.

    python -m uae_lightning.chain +experiment=unified_grpo rounds=2 init_from=... hydra.launcher.partition=gpu \\
        trainer.accelerator=gpu trainer.devices=8 strategy=fsdp2

Takes the overrides of the run itself and the launcher's resources (`hydra.launcher.*`, conf/hydra/launcher/
submitit_slurm.yaml: nodes, tasks and GPUs per node from trainer.num_nodes / trainer.devices, partition, account,
time, setup lines). Job k runs the run's own command with `stop_after=<stage k>` in the run's own directory: the
stages before it are already done there and are reused, so a job only trains its stage (then its held-out test,
Unified-Bench and GenEval). Each job requeues itself on SLURM's warning signal and resumes, as every run does. A
failed stage cancels the jobs after it (`--kill-on-invalid-dep=yes`); submitting the same command again queues the
stages not yet finished, from the first one.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from uae_lightning.config import stage_runs, validate
from uae_lightning.errors import ConfigError, fail


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    import uae_lightning.cli  # noqa: F401  (registers the resolvers the configs use)

    with initialize_config_module(config_module="uae_lightning.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


def run_overrides(overrides: list[str]) -> list[str]:
    """The overrides of the run itself: without the launcher choice and hydra.* settings, which do not change what
    it trains nor its directory."""
    return [o for o in overrides if not o.lstrip("+~").startswith(("hydra/", "hydra."))]


def sbatch_options(launcher, folder: str, name: str, log_dir: Path, lead_s: int) -> list[str]:
    """sbatch options from the SLURM launcher config: resources, time, where the log goes, the warning signal."""
    opts = [f"--job-name={name}-{folder}", f"--output={log_dir / (folder + '-%j.out')}", "--open-mode=append",
            "--requeue", f"--signal=USR1@{lead_s}", "--kill-on-invalid-dep=yes", "--parsable",
            f"--nodes={launcher.nodes}", f"--ntasks-per-node={launcher.tasks_per_node}",
            f"--time={int(launcher.timeout_min)}"]
    if launcher.gpus_per_node:
        opts.append(f"--gpus-per-node={launcher.gpus_per_node}")
    for key, flag in (("partition", "partition"), ("account", "account"), ("qos", "qos"), ("constraint", "constraint"),
                      ("exclude", "exclude"), ("cpus_per_task", "cpus-per-task"), ("mem_gb", "mem"),
                      ("gres", "gres"), ("comment", "comment")):
        value = launcher.get(key)
        if value:
            opts.append(f"--{flag}={value}G" if key == "mem_gb" else f"--{flag}={value}")
    return opts


def submit(overrides: list[str], dry_run: bool = False) -> tuple[Path, list[tuple[str, str]]]:
    """Queue every unfinished stage of the run as a chain of dependent jobs; returns the run directory and
    [(stage folder, job id)]."""
    launcher_choice = [o for o in overrides if o.startswith("hydra/launcher=")]
    cfg = compose(overrides if launcher_choice else [*overrides, "hydra/launcher=submitit_slurm"])
    validate(cfg)
    if cfg.get("stop_after"):
        raise ConfigError("stop_after is set by the chain for each job; leave it out of the command")
    run_dir = Path(cfg.hydra.run.dir).absolute()
    todo = [folder for folder, _, _ in stage_runs(cfg) if not (run_dir / folder / "done.json").is_file()]
    if not todo:
        print(f"every stage of {run_dir} has finished; nothing to submit")
        return run_dir, []
    launcher = cfg.hydra.launcher
    log_dir = run_dir / "slurm"
    log_dir.mkdir(parents=True, exist_ok=True)
    setup = "".join(f"{line}\n" for line in (launcher.get("setup") or []))
    command = [sys.executable, "-m", "uae_lightning", *run_overrides(overrides)]
    jobs: list[tuple[str, str]] = []
    for folder in todo:
        script = (f"#!/bin/bash\nset -euo pipefail\n{setup}"
                  f"srun {shlex.join(command)} stop_after={folder}\n")
        opts = sbatch_options(launcher, folder, cfg.name, log_dir, int(cfg.preemption.lead_s))
        if jobs:
            opts.append(f"--dependency=afterok:{jobs[-1][1]}")
        if dry_run:
            jobs.append((folder, f"<job {len(jobs) + 1}>"))
            print("sbatch " + " ".join(opts) + "\n" + script)
            continue
        out = subprocess.run(["sbatch", *opts], input=script, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed for stage {folder} ({out.stderr.strip()}); jobs queued so far: "
                               f"{jobs or 'none'}")
        jobs.append((folder, out.stdout.strip().split(";")[0]))
    return run_dir, jobs


def main(argv: list[str] | None = None) -> list[tuple[str, str]]:
    p = argparse.ArgumentParser(prog="python -m uae_lightning.chain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("overrides", nargs="*", help="the run's overrides, as for python -m uae_lightning")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch options and scripts, submit nothing")
    args = p.parse_args(argv)
    try:
        run_dir, jobs = submit(args.overrides, args.dry_run)
    except ConfigError as err:
        fail(err)
    if jobs and not args.dry_run:
        print("queued, each after the one before it succeeds:")
        for folder, job in jobs:
            print(f"  {folder:<16} job {job}   log {run_dir / 'slurm' / f'{folder}-{job}.out'}")
        ids = ",".join(job for _, job in jobs)
        print(f"follow: squeue -j {ids}    tail -f {run_dir}/slurm/*.out\n"
              f"results: {run_dir}/summary.json (after the last job); tensorboard --logdir {run_dir}\n"
              f"if a stage fails, the jobs after it are cancelled: fix it and run this command again (it queues the "
              f"unfinished stages)")
    return jobs


if __name__ == "__main__":
    main()
