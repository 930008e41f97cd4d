"""Unified-Bench from the command line.

    # a trained model (a run directory, optionally --stage, or an export) on a folder of reference images
    python -m uae_lightning.bench run --model runs/toy/default --images refs/ --out bench/toy
    # reconstructions made elsewhere, scored with exactly the same backbones and numbers
    python -m uae_lightning.bench score --originals refs/ --reconstructions other_model/ --out bench/other

GenEval (object-level prompt following of the decoder; README "GenEval"):

    python -m uae_lightning.bench geneval generate --model runs/toy/default --out geneval/toy [--prompts toy]
    python -m uae_lightning.bench geneval score geneval/toy      # any folder in GenEval's layout

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
from uae_lightning.bench.detectors import DEFAULT_DETECTOR
from uae_lightning.distributed import shard
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
    g = sub.add_parser("geneval", help="GenEval: draw its prompts, or score a folder in its layout")
    gsub = g.add_subparsers(dest="geneval", required=True)
    gg = gsub.add_parser("generate", help="draw 4 images per prompt in the official layout (resumes; splits over "
                                          "SLURM tasks / torchrun ranks)")
    gg.add_argument("--model", required=True, help="run directory or export directory")
    gg.add_argument("--stage", default=None, help="with a run directory: the stage (default: the last finished)")
    gg.add_argument("--out", required=True, help="output folder (<NNNNN>/metadata.jsonl, <NNNNN>/samples/<NNNN>.png)")
    gg.add_argument("--prompts", default=None,
                    help="official (GenEval's 553), toy (the toy world's), or a JSONL file in GenEval's format "
                         "(default: toy for a toy model, else official)")
    gg.add_argument("--max-prompts", type=positive_int, default=None,
                    help="a fixed subset: each tag's first ceil(N / tags) prompts (default: all)")
    gg.add_argument("--samples", type=positive_int, default=4, help="images per prompt (GenEval: 4)")
    gg.add_argument("--seed", type=int, default=0, help="image (p, s) starts from seed + 1000 p + s")
    gg.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's)")
    gg.add_argument("--batch-size", type=positive_int, default=16)
    gs = gsub.add_parser("score", help="score a folder in GenEval's layout")
    gs.add_argument("folder")
    gs.add_argument("--out", default=None, help="where results.jsonl, summary.json, results.md, failures/ go "
                                                "(default: the folder)")
    gs.add_argument("--detector", default=None,
                    help=f"a Mask2Former COCO instance model, id or path (default: {DEFAULT_DETECTOR}), or toy "
                         f"(the toy world's exact reading; the default for images made from the toy prompts)")
    gs.add_argument("--clip", default="openai/clip-vit-large-patch14", help="the colour classifier (CLIP), id or path")
    for q in (gg, gs):
        q.add_argument("--device", default=default_device())
    args = p.parse_args(argv)
    if args.command == "geneval":
        return geneval_main(p, args)
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


def default_device() -> str:
    """cuda:<local rank> on a GPU machine (one device per SLURM task or torchrun process), else cpu."""
    import os

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{os.environ.get('LOCAL_RANK', os.environ.get('SLURM_LOCALID', '0'))}"


def geneval_main(p: argparse.ArgumentParser, args) -> dict:
    import json
    from pathlib import Path

    from uae_lightning.bench import geneval
    from uae_lightning.bench.detectors import build_scorer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    preemption.install()
    bar = quiet.progress_bars(True)
    try:
        if args.geneval == "generate":
            from uae_lightning.pipeline import load

            pipe = load(args.model, args.stage).to(args.device)
            source = args.prompts or ("toy" if pipe.model_cfg["encoder"].get("architecture") == "toy" else "official")
            prompts = geneval.read_prompts(source)
            drawn = geneval.generate(pipe, prompts, args.out, args.samples, args.batch_size, args.seed, args.steps,
                                     progress=bar, prompt_source=source,
                                     indices=geneval.subset(prompts, args.max_prompts))
            rank, world = shard()
            print(f"GenEval: drew {drawn} images{f' (rank {rank} of {world})' if world > 1 else ''} into {args.out}")
            return {"drawn": drawn}
        made = Path(args.folder) / geneval.GENERATION
        toy_made = made.is_file() and json.loads(made.read_text()).get("prompts") == "toy"
        detector = args.detector or ("toy" if toy_made else DEFAULT_DETECTOR)
        summary = geneval.score(args.folder, build_scorer(detector, args.clip, args.device), args.out, progress=bar)
    except preemption.Preempted as stop:
        preemption.requeue(str(stop), wait_s=600.0)
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    print(geneval.format_summary(summary) + f"\n\n{Path(args.out or args.folder) / geneval.SUMMARY}")
    return summary


if __name__ == "__main__":
    main()
