"""Unified-Bench from the command line.

    # a trained model (a run directory, optionally --stage, or an export) on a folder of reference images
    python -m uae_lightning.bench run --model runs/toy/default --images refs/ --out bench/toy
    # reconstructions made elsewhere, scored with exactly the same backbones and numbers
    python -m uae_lightning.bench score --originals refs/ --reconstructions other_model/ --out bench/other

--backbones takes the paper's short names (clip dinov2 dinov3 longclip, the default), toy backbones, or any
Hugging Face image model id or local path. Re-running the same command resumes.
"""
from __future__ import annotations

import argparse
import logging

import torch

from uae_lightning import quiet  # first: silences third-party notices
from uae_lightning.callbacks import preemption
from uae_lightning.bench.core import DEFAULT_BACKBONES, format_summary, run_bench, score_folders
from uae_lightning.pipeline import positive_int


quiet.hide_loading_bars()

def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m uae_lightning.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="caption, redraw and score a folder of reference images with a trained model")
    r.add_argument("--model", required=True, help="run directory or export directory")
    r.add_argument("--stage", default=None, help="with a run directory: the stage (default: the last finished)")
    r.add_argument("--images", required=True, help="folder of reference images")
    r.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's)")
    r.add_argument("--seed", type=int, default=None, help="default: the run's bench.seed (an export keeps it), else 0")
    r.add_argument("--max-images", type=positive_int, default=None,
                   help="the first N images by name (default: the run's bench.max_images, else all)")
    s = sub.add_parser("score", help="score reconstructions made elsewhere against their originals")
    s.add_argument("--originals", required=True)
    s.add_argument("--reconstructions", required=True, help="same relative names as the originals (any suffix)")
    s.add_argument("--resolution", type=positive_int, default=512, help="both sides are centre-cropped and resized to this")
    for q in (r, s):
        q.add_argument("--out", required=True, help="output folder (results.jsonl, summary.json, results.md, grid.png)")
        q.add_argument("--backbones", nargs="+", default=None,
                       help=f"default: the run's bench.backbones (an export keeps them), else {' '.join(DEFAULT_BACKBONES)}")
        q.add_argument("--batch-size", type=positive_int, default=None, help="default: the run's, else 16")
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    preemption.install()  # SIGUSR1 (SLURM's warning) stops the bench after a batch; re-running resumes
    bar = quiet.progress_bars(True)  # a progress bar in a terminal; in a log file, a line a minute (run_bench)
    try:
        if args.command == "run":
            from uae_lightning.pipeline import load

            pipe = load(args.model, args.stage).to(args.device)
            summary = run_bench(pipe, args.images, args.out, args.backbones, args.batch_size, args.seed, args.steps,
                                progress=bar, max_images=args.max_images)
        else:
            summary = score_folders(args.originals, args.reconstructions, args.out, args.backbones, args.resolution,
                                    args.batch_size or 16, args.device, progress=bar)
    except preemption.Preempted as stop:
        preemption.requeue(str(stop), wait_s=600.0)
    except (ValueError, FileNotFoundError) as err:  # a user's input: one line (exit 2), no traceback
        p.error(str(err))
    print(format_summary(summary) + f"\n\n{args.out}/summary.json")
    return summary


if __name__ == "__main__":
    main()
