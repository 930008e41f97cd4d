"""Paper-scale dress rehearsal: README's paper-scale block, run as it stands under the local SLURM on tiny random
checkpoints in the real on-disk formats (uae_lightning.rehearsal), with only paths, sizes and steps overridden (and the
CPU stand-ins for the GPUs: trainer.accelerator=cpu, gloo, 2 devices). Four stages on 2 FSDP2 ranks in the presets'
bf16 precision, then `bench run` and the export, then a reload of the export with transformers', peft's and
diffusers' own classes.

Also here: the official UAE inference strings, rendered by the real chat template, against the release's.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose_cfg, noise_lines
from uae_lightning.pipeline import UAEPipeline

README = Path(__file__).resolve().parent.parent / "README.md"
OFFICIAL_PROMPT = ("You are an expert vision-language model.  \nYour task is: Given an input image, generate a "
                   "**textual description** of the image. If there is text in the image, transcribe it inside double "
                   "quotes \"\".  \nNow, carefully analyze the input image and output the full description. ")
OFFICIAL_NEGATIVE = "Generate a random, low quality, ugly, blur, bad and anime, cartoon image."


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    from uae_lightning.rehearsal import write_fixture

    root = tmp_path_factory.mktemp("fixture")
    return root, write_fixture(root)


def readme_block() -> str:
    text = README.read_text()
    block = re.search(r"<!-- rehearsal:.*?-->\s*```bash\n(.*?)```\s*<!-- /rehearsal -->", text, re.S)
    assert block, "README.md has no rehearsal block"
    return block.group(1)


def stage_overrides(paths: dict) -> dict[str, list[str]]:
    """Paths to the fixture, and sizes and steps small enough for CPUs; nothing else differs from the presets."""
    common = [f"model.encoder.pretrained={paths['Qwen/Qwen2.5-VL-3B-Instruct']}",
              f"model.decoder.pretrained={paths['stabilityai/stable-diffusion-3.5-large']}",
              f"backbone_sources.clip={paths['openai/clip-vit-large-patch14']}",
              f"backbone_sources.dinov2={paths['facebook/dinov2-large']}",
              f"backbone_sources.dinov3={paths['facebook/dinov3-vitl16-pretrain-lvd1689m']}",
              f"backbone_sources.longclip={paths['BeichenZhang/LongCLIP-L']}",
              f"bench.geneval.detector={paths['facebook/mask2former-swin-small-coco-instance']}",
              "bench.geneval.max_prompts=6", "bench.geneval.samples=2",
              "data.resolution=64", "bench.resolution=64", "data.val_fraction=0.2", "data.batch_size=2",
              "data.eval_batch_size=4", "data.num_workers=0", "bench.batch_size=4", "bench.num_steps=2",
              "bench.max_new_tokens=8", "trainer.enable_progress_bar=false"]
    per_stage = {
        "pretrain": ["stages.pretrain.module.eval_steps=2"],
        "cold_start": ["stages.cold_start.module.num_steps=2", "stages.cold_start.data.batch_size=2"],
        "g4u": ["stages.g4u.module.decode_steps=2", "stages.g4u.module.group_size=2", "stages.g4u.data.batch_size=2",
                "stages.g4u.data.resolution=64"],
        "u4g": ["stages.u4g.module.num_steps=2", "stages.u4g.module.group_size=2", "stages.u4g.data.batch_size=2",
                "stages.u4g.data.resolution=64"],
    }
    out = {}
    for stage, extra in per_stage.items():
        steps = [f"stages.{stage}.trainer.max_steps=2", f"stages.{stage}.module.eval_steps=2"]
        if stage != "pretrain":
            steps.append(f"stages.{stage}.module.max_new_tokens=8")
        out[stage] = [*common, *steps, *extra]
    return out


def rehearsal_script(paths: dict, ranks: int) -> str:
    """The README block with the fixture's paths and sizes: the data path replaced, GPUs replaced by 2 CPU processes
    under SLURM (FSDP2 over gloo) or by one local process (a one-GPU debug run: strategy=auto, no launcher), the
    size/step overrides appended to each stage command."""
    script = readme_block()
    script = script.replace("/data/long_captions/train.jsonl", str(paths["manifest"]))
    gpus = "hydra/launcher=submitit_slurm trainer.accelerator=gpu trainer.devices=8 strategy=fsdp2"
    assert gpus in script, "the README block's GPU settings changed: update the rehearsal"
    script = script.replace(gpus, "hydra/launcher=submitit_slurm trainer.accelerator=cpu trainer.devices=2 strategy=fsdp2 "
                            "strategy.process_group_backend=gloo" if ranks == 2 else
                            "trainer.accelerator=cpu trainer.devices=1 strategy=auto")
    script = script.replace("bench_images/1024", "bench_images/64")
    overrides = stage_overrides(paths)
    lines = []
    for line in script.splitlines():
        m = re.match(r"python -m uae_lightning \+experiment=(\w+) ", line)
        if m:
            line = line.split("#")[0].rstrip() + " " + " ".join(overrides[m.group(1)])
        lines.append(line)
    return "set -euo pipefail\n" + "\n".join(lines) + "\n"


def test_the_fixture_is_in_the_real_formats(fixture_dir):
    """Each checkpoint loads through its library's own entry point with the real ids and settings."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import AutoImageProcessor, AutoProcessor, GenerationConfig

    root, paths = fixture_dir
    qwen = paths["Qwen/Qwen2.5-VL-3B-Instruct"]
    proc = AutoProcessor.from_pretrained(qwen)
    tok = proc.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>")] \
        == [151643, 151644, 151645, 151655]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    g = GenerationConfig.from_pretrained(qwen)
    assert (g.repetition_penalty, g.temperature, g.top_k, g.top_p, g.eos_token_id) == (1.05, 0.1, 1, 0.001, [151645, 151643])
    assert json.loads((qwen / "config.json").read_text())["dtype"] == "bfloat16"
    pipe = StableDiffusion3Pipeline.from_pretrained(paths["stabilityai/stable-diffusion-3.5-large"],
                                                    text_encoder_3=None, tokenizer_3=None)
    assert pipe.scheduler.config.shift == 3.0 and pipe.vae.config.latent_channels == 16
    assert pipe.transformer.config.pooled_projection_dim == (pipe.text_encoder.config.projection_dim
                                                             + pipe.text_encoder_2.config.projection_dim)
    dino = AutoImageProcessor.from_pretrained(paths["facebook/dinov2-large"])
    assert dino.size["shortest_edge"] == 256 and dino.crop_size["height"] == 224
    longclip = paths["BeichenZhang/LongCLIP-L"]
    assert not (longclip / "config.json").exists()
    sd = torch.load(longclip / "longclip-L.pt", weights_only=True)
    assert sd["positional_embedding"].shape[0] == 248 and "visual.conv1.weight" in sd


def test_official_inference_strings_are_rendered_as_the_release_renders_them(fixture_dir):
    """The paper presets' captioning turn and conditioning message, through Qwen's real chat template: the release's
    prompt (two spaces before each newline, a trailing space), text before the image, the assistant turn opened; the
    conditioning message ends with the opened assistant turn too (add_generation_prompt=True)."""
    from omegaconf import OmegaConf

    from uae_lightning.models.build import build_encoder

    _, paths = fixture_dir
    cfg = compose_cfg(["+experiment=u4g", "init_from=x", "data.manifest=y"])
    assert cfg.model.encoder.prompt == OFFICIAL_PROMPT
    assert cfg.bench.negative_prompt == OFFICIAL_NEGATIVE and cfg.stages.u4g.module.eval_guidance_scale == 5.0
    assert (cfg.bench.resolution, cfg.bench.num_steps, cfg.bench.guidance_scale) == (1024, 40, 5.0)
    enc_cfg = {**OmegaConf.to_container(cfg.model.encoder, resolve=True),
               "pretrained": str(paths["Qwen/Qwen2.5-VL-3B-Instruct"])}
    enc = build_encoder(enc_cfg, 64, "mask")
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert enc.caption_prompt() == (system + "<|im_start|>user\n" + OFFICIAL_PROMPT
                                    + "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n")
    assert enc.generate_message("a red circle") == (system + "<|im_start|>generate\na red circle<|im_end|>\n"
                                                   "<|im_start|>assistant\n")
    # The preset's image budget (max 65536 pixels) wins over the checkpoint's 12845056: a 1024^2 image is scaled by
    # 1/4 and floored to a multiple of 28 = 252 px, 18 patches of 14, 9 merged tokens a side (12845056: 37 a side).
    inputs = enc.caption_inputs(torch.rand(1, 3, 1024, 1024))
    assert int((inputs["input_ids"] == 151655).sum()) == 9 * 9


def run_block(paths: dict, ranks: int, cwd: Path) -> None:
    """Run the README block on `ranks` processes; its output must be free of third-party noise."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(["bash", "-c", rehearsal_script(paths, ranks)], cwd=cwd, capture_output=True, text=True,
                         timeout=1500, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    # What a researcher reads: no third-party warning, deprecation notice or progress bar (conftest.NOISE). Lightning's
    # warning that an epoch (here 5 batches) is shorter than the logging interval is one a user acts on (a larger
    # dataset or a lower trainer.log_every_n_steps): allowed.
    out = res.stdout + res.stderr
    noise = [line for line in noise_lines(out) if "is smaller than the logging interval" not in line]
    assert not noise, noise[:6]


@pytest.mark.slow
def test_readme_paper_block_runs_end_to_end_on_one_process(fixture_dir, tmp_path):
    """A one-GPU debug run (trainer.devices=1, strategy=auto, no launcher) of the same block, in the presets' bf16:
    the encoder's tied lm_head / embed_tokens (as Qwen2.5-VL-3B ships them) are one tensor in every file."""
    _, paths = fixture_dir
    run_block(paths, 1, tmp_path)
    check_rehearsal(tmp_path)


@pytest.mark.slow
@pytest.mark.usefixtures("slurm_cluster")
def test_readme_paper_block_runs_end_to_end_under_slurm_on_two_ranks(fixture_dir, tmp_path):
    _, paths = fixture_dir
    run_block(paths, 2, tmp_path)
    runs = tmp_path / "runs"
    for stage in ("pretrain", "cold_start", "g4u", "u4g"):
        [run] = [p.parent.parent for p in runs.glob(f"{stage}/*/{stage}/done.json")]
        ckpt = run / stage / "checkpoints" / "last.ckpt"
        assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # sharded over 2 FSDP2 ranks
        logs = "".join(p.read_text() for p in (run.parent / ".submitit").rglob("*_log.*"))
        assert "MEMBER: 2/2" in logs  # one SLURM job, two tasks = two ranks
        # only rank 0 read the checkpoints; rank 1 built empty models and received its shards
        assert "rank 1: building the models without weights" in logs
        # the SLURM logs of both ranks are as clean as the block's own output
        noise = [line for line in noise_lines(logs) if "is smaller than the logging interval" not in line]
        assert not noise, (stage, noise[:6])
    check_rehearsal(tmp_path)


def check_rehearsal(tmp_path: Path) -> None:
    """What both rehearsals must show: four stages whose outputs hold what each trained (a LoRA stage's under 5 % of
    the complete weights) and load as a chain into exactly the complete weights; the bench reproduced; the export
    reloaded with the libraries' own classes into the same captions and images."""
    from safetensors import safe_open

    from uae_lightning.models.weights import save_weights

    runs = tmp_path / "runs"
    for stage in ("pretrain", "cold_start", "g4u", "u4g"):
        [run] = [p.parent.parent for p in runs.glob(f"{stage}/*/{stage}/done.json")]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["unified_bench"][stage] is not None
        # GenEval after the stages that change the decoder (the paper presets' bench.geneval.stages): a subset of
        # the official prompts, one per tag, drawn at the bench's settings and scored by Mask2Former + CLIP.
        if stage == "g4u":
            assert "geneval" not in summary or stage not in summary["geneval"]
            continue
        assert 0 <= summary["geneval"][stage] <= 1
        scored = json.loads((run / stage / "geneval" / "summary.json").read_text())
        assert scored["subset"] and scored["images"] == 12 and set(scored["tags"]) == {
            "single_object", "two_object", "counting", "colors", "position", "color_attr"}
        assert scored["generation"]["resolution"] == 64 and scored["generation"]["num_steps"] == 2
        line = json.loads((run / stage / "geneval" / "results.jsonl").read_text().splitlines()[0])
        assert list(line) == ["filename", "tag", "prompt", "correct", "reason", "metadata", "details"]
    # The chain (four files, each on top of the one before) loads into the weights a complete file holds.
    ours = UAEPipeline.from_run(run)
    complete = tmp_path / "complete.safetensors"
    save_weights(complete, {"encoder": ours.encoder.state_dict(), "connector": ours.connector.state_dict(),
                            "decoder": ours.decoder.state_dict()}, {}, ours.encoder_lora)
    with safe_open(str(complete), "pt") as f:  # the tied head is written once
        assert "encoder.model.model.language_model.embed_tokens.weight" in f.keys()
        assert "encoder.model.lm_head.weight" not in f.keys()
    whole = UAEPipeline.from_weights(complete, ours.model_cfg, ours.resolution)
    a, b = ours.state_dict(), whole.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lm = whole.encoder.model
    assert lm.lm_head.weight.data_ptr() == lm.model.language_model.embed_tokens.weight.data_ptr()  # re-tied
    sizes = {s: next(runs.glob(f"{s}/*/{s}/weights.safetensors")).stat().st_size for s in ("cold_start", "g4u", "u4g")}
    assert all(size < 0.05 * complete.stat().st_size for size in sizes.values()), (sizes, complete.stat().st_size)
    # `bench run --model <run>` used the run's own bench settings (backbones and their sources, resolution, steps,
    # CFG, seed) and reproduced its score.
    rerun = json.loads((tmp_path / "bench" / "u4g" / "summary.json").read_text())
    inrun = json.loads((run / "u4g" / "unified_bench" / "summary.json").read_text())
    assert set(rerun["backbones"]) == {"clip", "dinov2", "dinov3", "longclip"} and rerun["images"] == inrun["images"]
    assert rerun["overall"] == pytest.approx(inrun["overall"], rel=1e-6)
    assert (rerun["resolution"], rerun["num_steps"]) == (64, 2)

    # The export reloads with the libraries' own classes into the same captions and images for the same seeds.
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from peft import PeftModel
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from diffusers import DiffusionPipeline

    from uae_lightning.models.connector import Connector
    from uae_lightning.models.decoder import Decoder
    from uae_lightning.models.encoder import Encoder
    from uae_lightning.models.pooled import PooledProjection
    from uae_lightning.pipeline import redraw

    export = tmp_path / "exports" / "uae"
    meta = json.loads((export / "uae_pipeline.json").read_text())
    assert meta["bench"]["backbones"] == ["clip", "dinov2", "dinov3", "longclip"] and meta["resolution"] == 64
    d = export / "decoder"
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(d / "text_encoder", dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, export / "encoder_adapter").get_base_model()
    e = meta["model"]["encoder"]
    encoder = Encoder(model, AutoProcessor.from_pretrained(d / "processor"), prompt=e["prompt"],
                      generate_role=e["generate_role"], prompt_position=e["prompt_position"],
                      generation_prompt=e["generation_prompt"], max_condition_tokens=e["max_condition_tokens"])
    connector = Connector.from_pretrained(d / "connector")
    decoder = Decoder(SD3Transformer2DModel.from_pretrained(d / "transformer", torch_dtype=torch.bfloat16),
                      FlowMatchEulerDiscreteScheduler.from_pretrained(d / "scheduler"),
                      AutoencoderKL.from_pretrained(d / "vae", torch_dtype=torch.bfloat16),
                      PooledProjection.from_pretrained(d / "pooled").vector)
    assert decoder.scheduler.config.shift == 3.0
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for seed in (0, 1):  # sampled captions (the random tiny model's greedy ones are only whitespace)
        torch.manual_seed(seed)
        a = encoder.caption(images, do_sample=True, temperature=0.7, max_new_tokens=8).texts
        torch.manual_seed(seed)
        b = ours.encoder.caption(images, do_sample=True, temperature=0.7, max_new_tokens=8).texts
        assert a == b and any(a)
    texts = ["a large red circle", OFFICIAL_NEGATIVE[:20]]
    reloaded = redraw(encoder, connector, decoder, texts, ours.noise([3, 4]), meta["num_steps"],
                      meta["guidance_scale"], meta["negative_prompt"])
    assert torch.equal(reloaded, ours.generate(texts, [3, 4]))
    # diffusers' own entry point on the decoder folder: the same images (CFG 5 against the official negative prompt)
    gen = DiffusionPipeline.from_pretrained(d, custom_pipeline=str(d), trust_remote_code=True,
                                            dtype={"default": torch.bfloat16, "connector": torch.float32})
    assert torch.equal(gen(texts, seeds=[3, 4], output_type="pt").images, reloaded)


@pytest.mark.slow
def test_unified_grpo_preset_chains_cold_start_and_two_rounds_on_one_process(fixture_dir, tmp_path):
    """+experiment=unified_grpo rounds=2 from a stage-1 result, on one process in the presets' bf16: cold start,
    then G4U -> U4G twice, each stage in its own directory with its preset's settings, round 2 from round 1."""
    _, paths = fixture_dir
    overrides = stage_overrides(paths)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = ["trainer.accelerator=cpu", "trainer.devices=1", "strategy=auto", f"paths.runs_dir={tmp_path}",
              f"data.manifest={paths['manifest']}"]

    def run(*args: str) -> None:
        res = subprocess.run([sys.executable, "-m", "uae_lightning", *args, *common], capture_output=True, text=True,
                             timeout=1500, env=env)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]

    run("+experiment=pretrain", *overrides["pretrain"])
    [weights] = tmp_path.glob("pretrain/*/pretrain/weights.safetensors")
    grpo = list(dict.fromkeys(overrides["cold_start"] + overrides["g4u"] + overrides["u4g"]))
    run("+experiment=unified_grpo", "rounds=2", f"init_from={weights}", *grpo)
    [summary] = tmp_path.glob("unified_grpo/*/summary.json")
    s = json.loads(summary.read_text())
    assert list(s["stages"]) == ["cold_start", "g4u", "u4g", "g4u_round2", "u4g_round2"]
    assert list(s["geneval"]) == ["cold_start", "u4g", "u4g_round2"]  # after the stages that change the decoder
    run_dir = summary.parent
    done = json.loads((run_dir / "g4u_round2" / "done.json").read_text())
    g4u = compose_cfg(["+experiment=g4u", "init_from=x", "data.manifest=y"]).stages.g4u.module
    assert done["settings"]["stage"]["module"]["lr"] == g4u.lr and done["settings"]["precision"] == "bf16-mixed"
    chain = UAEPipeline.from_run(run_dir)  # the last stage: round 2's U4G, loaded through its chain of outputs
    assert list(chain.summary["stages"]) == list(s["stages"])
