"""Inference on a trained auto-encoder: caption(image), generate(text), reconstruct(image); export to and load
from Hugging Face formats.

    pipe = UAEPipeline.from_run("runs/toy/default")            # the last finished stage of a run
    pipe = UAEPipeline.from_pretrained("exports/toy")           # an export written by save_pretrained
    texts = pipe.caption(images)                                # float [B,3,H,W] in [0,1] -> captions
    images = pipe.generate(texts, seeds=[0, 1])                 # captions -> images, one seed per image
    pipe.save_pretrained("exports/toy")

Export layout (each part loads with its library's own `from_pretrained`):

    decoder/          a diffusers pipeline (models/decoder_pipeline.UAEDecoderPipeline: caption text -> image):
                      model_index.json, text_encoder/ (Qwen2_5_VLForConditionalGeneration, base weights), processor/,
                      connector/ and pooled/ (diffusers models, each with its class's code), transformer/, scheduler/,
                      vae/ (latent decoders), and the pipeline's code (pipeline.py, decoder.py, conditioning.py): it
                      loads with diffusers alone, without this package
    encoder_adapter/  the captioner's LoRA for decoder/text_encoder as a peft adapter (adapter_config.json,
                      adapter_model.safetensors): the captioner is the text encoder with this adapter
    uae_pipeline.json resolution, sampling defaults, the run's Unified-Bench settings (`bench`) and stage metrics,
                      and the model settings that are not in the parts above
    README.md         the model card: what it is, the stages and metrics that produced it, how to load it

The command line (`python -m uae_lightning.pipeline --help`) captions, generates, reconstructs and exports.
"""
from __future__ import annotations

import argparse
import logging
import json
import importlib.util
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from uae_lightning import quiet  # first: silences third-party notices
from uae_lightning.config import round_config, stage_runs
from uae_lightning.models.build import build_autoencoder
from uae_lightning.models.decoder import seed_for
from uae_lightning.models.decoder_pipeline import UAEDecoderPipeline
from uae_lightning.models.pooled import PooledProjection
from uae_lightning.models.lora import base_part, has_adapter, lora_config
from uae_lightning.models.weights import load_weights

quiet.hide_loading_bars()

EXPORT_FILE = "uae_pipeline.json"
PEFT_PREFIX = "base_model.model."  # peft's key prefix for an adapter of a whole model


@torch.no_grad()
def redraw(encoder, connector, decoder, texts: list[str], noise: torch.Tensor, num_steps: int,
           guidance_scale: float = 1.0, negative_prompt: str = "") -> torch.Tensor:
    """Caption text -> image from the given initial noise, through the text bottleneck (classifier-free guidance
    against `negative_prompt` when guidance_scale != 1). The decoder is conditioned by the encoder without its
    captioner adapter, so captioner training never moves the decoder's inputs."""
    negative = None
    with encoder.adapter_disabled():
        hidden, mask = encoder.condition(texts)
        if guidance_scale != 1.0:
            neg_hidden, neg_mask = encoder.condition([negative_prompt] * len(texts))
            negative = (connector(neg_hidden), neg_mask)
    latents = decoder.sample(connector(hidden), mask, noise, num_steps, guidance_scale, negative)
    return decoder.decode(latents)


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (argparse turns the ValueError into a one-line usage error)."""
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def bench_settings(cfg, stage: str | None = None) -> dict:
    """Everything a Unified-Bench score of a run depends on besides the weights, from the run's config: the `bench:`
    group (steps, CFG, negative prompt, caption budget, seed, backbones) and where the backbones load from, at
    `bench.resolution` (null: the resolution `stage` trained at). Saved with every bench result and export, so that
    `bench run --model` re-scores a run or an export exactly as the run did."""
    b = cfg["bench"]
    data = dict(cfg["data"])
    if stage is not None:
        data.update((cfg["stages"][stage].get("data") or {}))
    return {"resolution": b.get("resolution") or data["resolution"], "num_steps": b["num_steps"],
            "guidance_scale": b["guidance_scale"], "negative_prompt": b["negative_prompt"],
            "max_new_tokens": b["max_new_tokens"], "seed": b["seed"], "batch_size": b["batch_size"],
            "max_images": b.get("max_images"),
            "backbones": list(b["backbones"]), "backbone_sources": dict(cfg.get("backbone_sources") or {})}


PIPELINE_KEYS = ("num_steps", "max_new_tokens", "guidance_scale", "negative_prompt")


class UAEPipeline(nn.Module):
    def __init__(self, encoder, connector, decoder, resolution: int, model_cfg: dict, num_steps: int = 28,
                 max_new_tokens: int = 512, guidance_scale: float = 1.0, negative_prompt: str = "",
                 encoder_lora: dict | None = None, bench: dict | None = None, summary: dict | None = None):
        super().__init__()
        self.encoder, self.connector, self.decoder = encoder, connector, decoder
        self.resolution = resolution
        self.model_cfg = model_cfg
        self.num_steps = num_steps
        self.max_new_tokens = max_new_tokens
        self.guidance_scale, self.negative_prompt = guidance_scale, negative_prompt
        self.encoder_lora = encoder_lora
        # The Unified-Bench settings of the run this came from (seed, batch_size, backbones, backbone_sources).
        self.bench = dict(bench or {})
        # The run's summary (stage metrics, Unified-Bench scores) when it came from a run: for the model card.
        self.summary = summary
        self.eval().requires_grad_(False)

    @classmethod
    def from_bench_settings(cls, weights: str | Path, model_cfg: dict, settings: dict) -> "UAEPipeline":
        """A stage's weights set up to sample as the run's Unified-Bench does (`bench_settings`)."""
        return cls.from_weights(weights, model_cfg, settings["resolution"], bench=settings,
                                **{k: settings[k] for k in PIPELINE_KEYS})

    # ---- construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_weights(cls, weights: str | Path, model_cfg: dict, resolution: int, **kwargs) -> "UAEPipeline":
        """Build the models of `model_cfg` (the run's `model:` config) and load a stage's weights.safetensors."""
        encoder, connector, decoder = build_autoencoder(model_cfg, resolution)
        lora = load_weights(weights, encoder, connector, decoder, model_cfg)
        return cls(encoder, connector, decoder, resolution, model_cfg, encoder_lora=lora, **kwargs)

    @classmethod
    def from_run(cls, run_dir: str | Path, stage: str | None = None, **kwargs) -> "UAEPipeline":
        """A run directory of `python -m uae_lightning`: its saved config and one stage's weights (default: the
        last stage of the run that finished)."""
        run_dir = Path(run_dir)
        cfg_file = run_dir / ".hydra" / "config.yaml"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no .hydra/config.yaml)")
        cfg = OmegaConf.load(cfg_file)
        runs = {folder: (name, round_) for folder, name, round_ in stage_runs(cfg)}
        finished = [f for f in runs if (run_dir / f / "done.json").is_file()]
        if stage is None:
            if not finished:
                raise FileNotFoundError(f"{run_dir}: no stage has finished yet (no */done.json)")
            stage = finished[-1]
        elif stage not in finished:
            raise FileNotFoundError(f"{run_dir}: stage {stage!r} has not finished; finished: {finished}")
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        name, round_ = runs[stage]
        settings = bench_settings(OmegaConf.to_container(round_config(cfg, name, round_), resolve=True), name)
        chain = list(runs)[: list(runs).index(stage) + 1]
        summary = {"stages": {s: json.loads((run_dir / s / "done.json").read_text())["metrics"] for s in chain
                              if (run_dir / s / "done.json").is_file()}}
        if (run_dir / "summary.json").is_file():
            saved = json.loads((run_dir / "summary.json").read_text())
            for key in ("unified_bench", "geneval"):
                summary[key] = {k: v for k, v in saved.get(key, {}).items() if k in chain}
        if cfg.get("init_from"):
            summary["init_from"] = str(cfg.init_from)
        return cls.from_weights(run_dir / stage / "weights.safetensors", model_cfg, settings["resolution"],
                                **{"bench": settings, "summary": summary, **{k: settings[k] for k in PIPELINE_KEYS},
                                   **kwargs})

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "UAEPipeline":
        """Load an export written by `save_pretrained`; the encoder and decoder load through the same
        `from_pretrained` code path as Hugging Face hub checkpoints."""
        path = Path(path)
        meta_file = path / EXPORT_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} is not a uae_lightning export (no {EXPORT_FILE})")
        meta = json.loads(meta_file.read_text())
        cfg = meta["model"]
        dec = path / "decoder"
        cfg["encoder"]["pretrained"] = str(dec / "text_encoder")
        cfg["encoder"]["processor"] = str(dec / "processor")
        cfg["decoder"]["pretrained"] = str(dec)
        cfg["decoder"]["pooled"] = str(dec / "pooled")
        encoder, connector, decoder = build_autoencoder(cfg, meta["resolution"])
        connector.load_state_dict(type(connector).from_pretrained(dec / "connector").state_dict())
        lora = None
        adapter_dir = path / "encoder_adapter"
        if adapter_dir.is_dir():
            lora_cfg = LoraConfig.from_pretrained(str(adapter_dir))
            inject_adapter_in_model(lora_cfg, encoder.model)
            sd = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()}
            result = set_peft_model_state_dict(encoder.model, sd)
            missing = [k for k in result.missing_keys if "lora_" in k]
            if missing:
                raise RuntimeError(f"{adapter_dir}: adapter does not match the encoder (missing {missing[:5]})")
            lora = meta.get("encoder_lora")
        defaults = {k: meta[k] for k in PIPELINE_KEYS}
        return cls(encoder, connector, decoder, meta["resolution"], cfg, encoder_lora=lora,
                   **{**defaults, "bench": meta.get("bench"), "summary": meta.get("summary"), **kwargs})

    def decoder_pipeline(self):
        """The decoder half as a diffusers pipeline (decoder_pipeline.UAEDecoderPipeline) sharing these modules; its
        text encoder is the encoder without the captioner adapter, as the decoder is always conditioned."""
        pooled = PooledProjection(self.decoder.pooled.numel())
        pooled.vector.copy_(self.decoder.pooled)
        enc = self.encoder
        return UAEDecoderPipeline(
            text_encoder=enc.model, processor=enc.processor, connector=self.connector, pooled=pooled,
            transformer=self.decoder.transformer, scheduler=self.decoder.scheduler, vae=self.decoder.vae,
            generate_role=enc.generate_role, generation_prompt=enc.generation_prompt,
            max_condition_tokens=enc.max_condition_tokens, condition_padding=enc.condition_padding,
            resolution=self.resolution, num_steps=self.num_steps, guidance_scale=self.guidance_scale,
            negative_prompt=self.negative_prompt)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the export (layout in the module docstring) and its model card; returns its directory."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        enc = self.encoder.model
        adapter = has_adapter(enc)
        dec = path / "decoder"
        pipe = self.decoder_pipeline()
        pipe.save_config(dec)  # model_index.json: the pipeline class, its components and settings
        write_decoder_code(dec)
        # The parts, each with its own library's save_pretrained; the text encoder without the captioner adapter.
        enc.save_pretrained(dec / "text_encoder", state_dict=base_part(enc.state_dict()) if adapter else None)
        self.encoder.processor.save_pretrained(dec / "processor")
        self.connector.save_pretrained(dec / "connector")
        pipe.pooled.save_pretrained(dec / "pooled")
        self.decoder.transformer.save_pretrained(dec / "transformer")
        self.decoder.scheduler.save_pretrained(dec / "scheduler")
        if self.decoder.vae is not None:
            self.decoder.vae.save_pretrained(dec / "vae")
        if adapter:
            adapter_dir = path / "encoder_adapter"
            adapter_dir.mkdir(exist_ok=True)
            if self.encoder_lora is None:
                raise ValueError("the encoder has a LoRA adapter but the pipeline has no encoder_lora config for it")
            lora_config(self.encoder_lora).save_pretrained(str(adapter_dir))
            sd = get_peft_model_state_dict(enc)
            save_file({PEFT_PREFIX + k: v.contiguous() for k, v in sd.items()}, str(adapter_dir / "adapter_model.safetensors"))
        cfg = json.loads(json.dumps(self.model_cfg))
        cfg["decoder"]["vae"] = self.decoder.vae is not None
        meta = {"resolution": self.resolution, "num_steps": self.num_steps, "max_new_tokens": self.max_new_tokens,
                "guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt, "encoder_lora": self.encoder_lora, "bench": self.bench, "summary": self.summary, "model": cfg}
        (path / EXPORT_FILE).write_text(json.dumps(meta, indent=2))
        (path / "README.md").write_text(model_card(meta, adapter, self.summary))
        return path

    # ---- inference -------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.connector.net[0].weight.device

    def noise(self, seeds: list[int]) -> torch.Tensor:
        return self.decoder.seeded_noise(seeds, self.resolution).to(self.device)

    @torch.no_grad()
    def caption(self, images: torch.Tensor, max_new_tokens: int | None = None) -> list[str]:
        """Greedy captions of images (float [B,3,H,W] in [0,1], at the pipeline's resolution)."""
        return self.encoder.caption(images.to(self.device), do_sample=False,
                                    max_new_tokens=max_new_tokens or self.max_new_tokens).texts

    @torch.no_grad()
    def generate(self, texts: list[str], seeds: list[int] | None = None, num_steps: int | None = None) -> torch.Tensor:
        """Images (float [B,3,H,W] in [0,1]) from texts; image i starts from the noise of seeds[i]."""
        seeds = list(range(len(texts))) if seeds is None else seeds
        if len(seeds) != len(texts):
            raise ValueError(f"generate: {len(texts)} texts but {len(seeds)} seeds")
        return redraw(self.encoder, self.connector, self.decoder, texts, self.noise(seeds), num_steps or self.num_steps,
                      self.guidance_scale, self.negative_prompt)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, seeds: list[int] | None = None,
                    num_steps: int | None = None) -> tuple[list[str], torch.Tensor]:
        """Image -> caption -> image: the auto-encoder round trip; returns the captions and the redrawn images."""
        texts = self.caption(images)
        return texts, self.generate(texts, seeds, num_steps)


# The exported decoder's code, laid out as diffusers' remote code expects it: the pipeline class in pipeline.py with the
# files it imports relatively beside it, and each custom component's class in `<component>/<library>.py`, named in
# model_index.json as ["<library>", "<class>"]. Each source file imports only torch, transformers and diffusers.
PIPELINE_CODE = {"pipeline.py": "uae_lightning.models.decoder_pipeline", "decoder.py": "uae_lightning.models.decoder",
                 "conditioning.py": "uae_lightning.models.conditioning"}
COMPONENT_CODE = {"connector": ("uae_lightning.models.connector", "Connector"),
                  "pooled": ("uae_lightning.models.pooled", "PooledProjection")}


def _source(module: str) -> str:
    return Path(importlib.util.find_spec(module).origin).read_text()


def write_decoder_code(folder: Path) -> None:
    """Copy the decoder pipeline's source files into an export's decoder/ folder and name the custom components'
    files in its model_index.json, so that it loads with diffusers in a process without this package."""
    for name, module in PIPELINE_CODE.items():
        (folder / name).write_text(_source(module))
    index = json.loads((folder / "model_index.json").read_text())
    for component, (module, cls) in COMPONENT_CODE.items():
        library = module.rsplit(".", 1)[1]
        (folder / component).mkdir(parents=True, exist_ok=True)
        (folder / component / f"{library}.py").write_text(_source(module))
        index[component] = [library, cls]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def model_card(meta: dict, adapter: bool, summary: dict | None) -> str:
    """README.md of an export: what it is, how it was trained (the stage chain and its metrics), the inference
    settings, and how to load it with each library."""
    enc, dec = meta["model"]["encoder"], meta["model"]["decoder"]
    lines = ["---", "library_name: diffusers", "tags: [uae, unified-multimodal, image-to-text, text-to-image]", "---",
             "# UAE auto-encoder (uae_lightning export)", "",
             "A unified auto-encoder (UAE, arXiv 2509.09666): a vision-language model writes a caption of an image "
             "(the encoder) and a diffusion model redraws the image from that caption alone (the decoder); both were "
             "trained on how close the redrawn image is to the original.", "",
             f"- Encoder: Qwen2.5-VL architecture (`decoder/text_encoder`, {enc.get('pretrained') or enc['architecture']})"
             + ("; the captioner is it plus the LoRA adapter in `encoder_adapter/`" if adapter else ""),
             f"- Decoder: SD3 MMDiT (`decoder/transformer`, {dec.get('pretrained') or dec['architecture']}), "
             + ("its VAE" if dec.get("vae") else "pixel space (no VAE)") + ", conditioned through `decoder/connector`",
             "", "## Training", ""]
    if summary and summary.get("stages"):
        if summary.get("init_from"):
            lines.append(f"Started from `{summary['init_from']}`.")
        lines += ["| stage | metric | value |", "|---|---|---:|"]
        for stage, metrics in summary["stages"].items():
            lines += [f"| {stage} | {k} | {v:.4f} |" for k, v in metrics.items() if v is not None]
            score = (summary.get("unified_bench") or {}).get(stage)
            if score is not None:
                lines.append(f"| {stage} | Unified-Bench overall | {score:.2f} |")
            score = (summary.get("geneval") or {}).get(stage)
            if score is not None:
                lines.append(f"| {stage} | GenEval overall (mean over tags) | {score:.4f} |")
    else:
        lines.append("Not recorded (this export was not written from a run directory).")
    lines += ["", "## Inference settings", "",
              f"- resolution {meta['resolution']}, {meta['num_steps']} sampling steps, classifier-free guidance "
              f"{meta['guidance_scale']}" + (f" against \"{meta['negative_prompt']}\"" if meta["negative_prompt"] else ""),
              f"- captions: greedy, at most {meta['max_new_tokens']} new tokens, prompt \"{enc['prompt']}\"",
              "", "## Loading", "", "```python",
              "# the whole auto-encoder (caption, generate, reconstruct)",
              "from uae_lightning.pipeline import UAEPipeline",
              "pipe = UAEPipeline.from_pretrained(\"<this folder>\")",
              "texts, images = pipe.reconstruct(images)            # float [B,3,H,W] in [0,1]", "",
              "# diffusers: caption text -> image",
              "from diffusers import DiffusionPipeline",
              "gen = DiffusionPipeline.from_pretrained(\"<this folder>/decoder\", custom_pipeline=\"<this folder>/decoder\",",
              "                                        trust_remote_code=True)   # decoder/pipeline.py imports uae_lightning",
              "image = gen([\"a red circle top left\"], seeds=[0]).images[0]", ""]
    if adapter:
        lines += ["# transformers + peft: the captioner",
                  "from peft import PeftModel",
                  "from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration",
                  "base = Qwen2_5_VLForConditionalGeneration.from_pretrained(\"<this folder>/decoder/text_encoder\")",
                  "captioner = PeftModel.from_pretrained(base, \"<this folder>/encoder_adapter\")",
                  "processor = AutoProcessor.from_pretrained(\"<this folder>/decoder/processor\")"]
    lines += ["```", ""]
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------------------------
def load(source: str, stage: str | None = None, **kwargs) -> UAEPipeline:
    """An export directory, or a run directory (optionally one of its stages)."""
    if (Path(source) / EXPORT_FILE).is_file():
        return UAEPipeline.from_pretrained(source, **kwargs)
    return UAEPipeline.from_run(source, stage, **kwargs)


def main(argv: list[str] | None = None) -> None:
    from uae_lightning.bench.io import list_images, load_tensor, png_names, save_png

    p = argparse.ArgumentParser(prog="python -m uae_lightning.pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an export directory or a run directory")
    p.add_argument("--stage", default=None, help="with a run directory: which stage (default: the last finished)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("caption", help="print one JSON line {image, caption} per image")
    c.add_argument("images", nargs="+", help="image files or folders")
    g = sub.add_parser("generate", help="draw one image per text")
    g.add_argument("texts", nargs="+")
    g.add_argument("--out", required=True, help="output folder")
    r = sub.add_parser("reconstruct", help="caption then redraw each image")
    r.add_argument("images", nargs="+", help="image files or folders")
    r.add_argument("--out", required=True, help="output folder")
    e = sub.add_parser("export", help="write the Hugging Face export")
    e.add_argument("out", help="export directory")
    args = p.parse_args(argv)
    from uae_lightning.callbacks import preemption

    preemption.install()  # SLURM's warning signal must not kill an export half-written; it takes seconds
    pipe = load(args.model, args.stage)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    if args.command == "export":
        print(pipe.save_pretrained(args.out))
        if preemption.signalled():
            logging.getLogger("uae_lightning").warning("a preemption signal arrived during the export; it completed")
        return
    if args.command == "generate":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        images = pipe.generate(args.texts, [seed_for(t, args.seed) for t in args.texts], args.steps)
        for i, (text, img) in enumerate(zip(args.texts, images)):
            save_png(img, out / f"{i:04d}.png")
            print(json.dumps({"text": text, "image": str(out / f"{i:04d}.png")}))
        return
    files = list_images(args.images)
    if len({f.name for f in files}) < len(files):
        raise SystemExit("error: several inputs share a file name; their reconstructions would overwrite each other")
    png = png_names([f.name for f in files])
    for f in files:
        img = load_tensor(f, pipe.resolution)
        if img is None:
            print(json.dumps({"image": str(f), "skipped": "unreadable"}))
            continue
        if args.command == "caption":
            print(json.dumps({"image": str(f), "caption": pipe.caption(img[None])[0]}))
        else:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            texts, recon = pipe.reconstruct(img[None], [seed_for(f.name, args.seed)], args.steps)
            save_png(recon[0], out / png[f.name])
            print(json.dumps({"image": str(f), "caption": texts[0], "reconstruction": str(out / png[f.name])}))


if __name__ == "__main__":
    main()
