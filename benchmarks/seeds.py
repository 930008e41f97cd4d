"""The embedded default run on several random streams: every claim it makes (uae_lightning.toy_claims, the margins the
default-run tests assert), per seed, with its value, margin and whether it holds. Seeds stand in for CPU models: a
different CPU rounds differently and so follows another random stream, and a claim must hold on all of them.

    python benchmarks/seeds.py --seeds 0 1 2 3 4 [--parallel 2] [--out /tmp/uae-seeds] [hydra overrides...]

Each seed is `python -m uae_lightning seed=K` (plus the overrides) in its own run directory under --out; a re-run
reuses the stages that finished. Runs go `--parallel` at a time, the cores shared out between them (on 2 cores one
at a time is as fast: two 2-thread runs side by side each slow down about 4x, README "Where the demo's time goes").
Prints a markdown table: one row per claim, one column per seed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_seeds(seeds: list[int], out: Path, parallel: int, overrides: list[str]) -> dict[int, dict]:
    """Run the default pipeline once per seed; returns {seed: {"summary": ..., "seconds": ...}}."""
    threads = max(1, (os.cpu_count() or 1) // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    todo, running, done = list(seeds), {}, {}
    while todo or running:
        while todo and len(running) < parallel:
            seed = todo.pop(0)
            log = (out / f"seed{seed}.log").open("w")
            cmd = [sys.executable, "-m", "uae_lightning", f"seed={seed}", f"paths.runs_dir={out}",
                   "trainer.enable_progress_bar=false", *overrides]
            running[seed] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), log)
            print(f"seed {seed}: started ({threads} threads; log {out / f'seed{seed}.log'})", flush=True)
        time.sleep(2)
        for seed, (proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[seed]
            if proc.returncode != 0:
                raise SystemExit(f"seed {seed} failed (exit {proc.returncode}); see {out / f'seed{seed}.log'}")
            [summary] = [p for p in (out / "toy").glob("*/summary.json") if _seed_of(p) == seed]
            done[seed] = {"summary": json.loads(summary.read_text()), "seconds": time.time() - t0}
            print(f"seed {seed}: done in {done[seed]['seconds'] / 60:.1f} min ({summary})", flush=True)
    return done


def _seed_of(summary: Path) -> int | None:
    config = summary.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        return None
    from omegaconf import OmegaConf

    return int(OmegaConf.load(config).seed)


def table(results: dict[int, dict]) -> str:
    from uae_lightning.toy_claims import CLAIMS

    seeds = sorted(results)
    lines = ["| claim | measured as | margin | " + " | ".join(f"seed {s}" for s in seeds) + " | holds on |",
             "|---|---|---:|" + "---:|" * len(seeds) + "---:|"]
    for claim in CLAIMS:
        checks = [claim.check(results[s]["summary"]) for s in seeds]
        cells = [f"{v:.4f} {'pass' if ok else 'FAIL'}" for v, ok in checks]
        lines.append(f"| {claim.name} | {claim.what} | > {claim.margin:g} | " + " | ".join(cells)
                     + f" | {sum(ok for _, ok in checks)} of {len(seeds)} |")
    lines.append("| run time | minutes | | " + " | ".join(f"{results[s]['seconds'] / 60:.1f}" for s in seeds) + " | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (the cores are shared out between them)")
    p.add_argument("--out", default="/tmp/uae-seeds", help="runs directory (paths.runs_dir of every run)")
    args, overrides = p.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_seeds(args.seeds, out, max(1, args.parallel), overrides)
    print(f"\nThe default run's claims on {len(results)} random streams" + (f" ({' '.join(overrides)})" if overrides else "")
          + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
