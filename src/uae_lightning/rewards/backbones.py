"""Frozen image backbones whose feature cosine similarity scores a reconstruction against its original.

Each backbone maps images (float [B,3,H,W] in [0,1]) to L2-normalised features. The toy world's backbones are
weight-free, so the embedded default needs no download; they register exactly like the Hugging Face ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from uae_lightning.choices import PAPER_BACKBONES, TOY_BACKBONES


class Backbone(nn.Module):
    """Base class: subclasses implement `embed`; `forward` returns normalised float32 features.

    Differentiable (the cold start backpropagates through it); parameters are frozen by `Similarity`."""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(images).float().flatten(1), dim=-1)


class ToyPixels(Backbone):
    """Low-resolution pixels, centred per image: the cosine is the Pearson correlation of two 8x8 thumbnails."""

    def __init__(self, size: int = 8):
        super().__init__()
        self.size = size

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(images.float(), self.size).flatten(1)
        return x - x.mean(1, keepdim=True)


class ToyRegionColours(Backbone):
    """Per-region colour statistics on a 3x3 grid (mean and spread of each channel), centred over regions."""

    def __init__(self, grid: int = 3):
        super().__init__()
        self.grid = grid

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        mean = F.adaptive_avg_pool2d(x, self.grid)
        spread = (F.adaptive_avg_pool2d(x * x, self.grid) - mean * mean).clamp_min(0).sqrt()
        feats = torch.cat([mean, spread], 1).flatten(2)  # [B, 6, grid*grid]
        return feats - feats.mean(2, keepdim=True)


# Models with a joint image-text embedding: features are `get_image_features` (the projected pooled output).
CONTRASTIVE_TYPES = ("clip", "siglip", "siglip2", "chinese_clip", "altclip")
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes in image processor configs -> torch interpolation modes


class ImagePreprocess(nn.Module):
    """A Hugging Face image processor's resize / centre crop / rescale / normalise, done in torch so that gradients
    reach the images (the cold start backpropagates through the reward). Reads `size` (shortest_edge, or height and
    width), `crop_size`, `do_center_crop`, `resample`, `image_mean`, `image_std` from the processor, so each backbone
    sees its images as its own processor prepares them (DINOv2: resize to 256, crop 224; DINOv3: resize to 224 x 224;
    CLIP: resize to 224, crop 224). Input: float [B,3,H,W] in [0,1] (the rescale to [0,1] is already done)."""

    def __init__(self, processor):
        super().__init__()
        size = dict(getattr(processor, "size", None) or {})
        size = {k: v for k, v in size.items() if v is not None}
        if "height" in size and "width" in size:
            self.resize = ("exact", (int(size["height"]), int(size["width"])))
        elif "shortest_edge" in size:
            self.resize = ("shortest_edge", int(size["shortest_edge"]))
        else:
            raise ValueError(f"image processor {type(processor).__name__}: unsupported size {size}")
        crop = dict(getattr(processor, "crop_size", None) or {}) if getattr(processor, "do_center_crop", False) else {}
        self.crop = (int(crop["height"]), int(crop["width"])) if crop.get("height") else None
        self.mode = RESAMPLE.get(int(getattr(processor, "resample", 3) or 3), "bicubic")
        self.register_buffer("mean", torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        kind, value = self.resize
        if kind == "exact":
            return value
        short, long = (h, w) if h <= w else (w, h)
        other = int(value * long / short)  # the processors' get_resize_output_image_size (floor)
        return (value, other) if h <= w else (other, value)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        size = self.output_size(*x.shape[-2:])
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode=self.mode, align_corners=False, antialias=True)
        if self.crop is not None:
            (h, w), (ch, cw) = x.shape[-2:], self.crop
            top, left = (h - ch) // 2, (w - cw) // 2  # torchvision's centre crop
            x = x[..., top : top + ch, left : left + cw]
        return (x.clamp(0, 1) - self.mean) / self.std


class HFBackbone(Backbone):
    """Any Hugging Face image model, by hub id or local path: CLIP/SigLIP-style models use their projected image
    features (`get_image_features`); other vision models (DINOv2, DINOv3, ViT, ...) their CLS token (`pooler_output`
    when the model has one, else the first token of `last_hidden_state`). A LongCLIP checkpoint (a raw
    `longclip-*.pt` in OpenAI-CLIP layout, no config.json) is converted to a transformers CLIPModel on load."""

    def __init__(self, name_or_path: str, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.name = name_or_path
        longclip = longclip_file(name_or_path)
        if longclip is not None:
            self.model, processor = load_longclip(longclip)
            self.model = self.model.to(dtype).eval()
            self.contrastive = True
        else:
            from transformers import AutoConfig, AutoImageProcessor, AutoModel

            config = AutoConfig.from_pretrained(name_or_path)
            self.contrastive = config.model_type in CONTRASTIVE_TYPES
            self.model = AutoModel.from_pretrained(name_or_path, dtype=dtype).eval()
            processor = AutoImageProcessor.from_pretrained(name_or_path)
        self.preprocess = ImagePreprocess(processor)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images).to(self.model.dtype)
        if self.contrastive:
            out = self.model.get_image_features(pixel_values=x)
            return out if torch.is_tensor(out) else out.pooler_output
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


LONGCLIP_FILES = ("longclip-L.pt", "longclip-B.pt")


def longclip_file(name_or_path: str) -> Path | None:
    """The raw LongCLIP checkpoint `name_or_path` stands for, if it is one: a `.pt` file, a folder holding one and no
    config.json, or a hub repository with a `longclip-*.pt` (BeichenZhang/LongCLIP-L)."""
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".pt":
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return None
        found = [path / f for f in LONGCLIP_FILES if (path / f).is_file()]
        return found[0] if found else None
    if "longclip" in name_or_path.lower():
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name_or_path, "longclip-L.pt" if "-B" not in name_or_path else "longclip-B.pt"))
    return None


def load_longclip(path: str | Path):
    """LongCLIP's raw state dict (OpenAI-CLIP key layout, 248 text positions) as a transformers CLIPModel and the
    CLIP image processor of its own transform (resize the short side to the input size, bicubic; centre crop; CLIP's
    mean and std). Sizes are read from the tensors, as OpenAI's `build_model` does (heads = width / 64)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    sd = torch.load(path, map_location="cpu", weights_only=True)
    if "visual.conv1.weight" not in sd:
        raise ValueError(f"{path}: not an OpenAI-layout CLIP state dict (no visual.conv1.weight)")

    def layers(prefix: str) -> int:
        return len({k.split(".")[len(prefix.split("."))] for k in sd if k.startswith(prefix + ".")})

    width, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    text_width, positions = sd["ln_final.weight"].shape[0], sd["positional_embedding"].shape[0]
    vocab = sd["token_embedding.weight"].shape[0]
    config = CLIPConfig(
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers("visual.transformer.resblocks"),
                           num_attention_heads=width // 64, image_size=patch * grid, patch_size=patch,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5),
        text_config=dict(hidden_size=text_width, intermediate_size=4 * text_width, num_attention_heads=text_width // 64,
                         num_hidden_layers=layers("transformer.resblocks"), max_position_embeddings=positions,
                         vocab_size=vocab, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1),
        projection_dim=sd["visual.proj"].shape[1])
    text_positions = sd["positional_embedding"]
    if "positional_embedding_res" in sd:  # LongCLIP: the first 20 positions from CLIP's, the rest interpolated
        keep = torch.zeros(positions, 1)
        keep[:20] = 1
        text_positions = text_positions * keep + sd["positional_embedding_res"] * (1 - keep)
    hf = {"vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
          "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
          "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
          "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"], "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
          "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
          "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
          "visual_projection.weight": sd["visual.proj"].t(),
          "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
          "text_model.embeddings.position_embedding.weight": text_positions,
          "text_model.final_layer_norm.weight": sd["ln_final.weight"], "text_model.final_layer_norm.bias": sd["ln_final.bias"],
          "text_projection.weight": sd["text_projection"].t(), "logit_scale": sd["logit_scale"]}
    for src, dst in (("visual.transformer", "vision_model.encoder"), ("transformer", "text_model.encoder")):
        for i in range(layers(f"{src}.resblocks")):
            a, b = f"{src}.resblocks.{i}.", f"{dst}.layers.{i}."
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):  # nn.MultiheadAttention packs q, k, v in order
                hf[b + f"self_attn.{name}.weight"] = sd[a + "attn.in_proj_weight"].chunk(3)[j]
                hf[b + f"self_attn.{name}.bias"] = sd[a + "attn.in_proj_bias"].chunk(3)[j]
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                                 ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                hf[b + ours + ".weight"], hf[b + ours + ".bias"] = sd[a + theirs + ".weight"], sd[a + theirs + ".bias"]
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict({k: v.float().contiguous() for k, v in hf.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{path}: cannot convert to CLIPModel (missing {missing[:5]}, unexpected {unexpected[:5]})")
    size = patch * grid
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,
                                   do_center_crop=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711])
    return model, processor


class ToyPalette(Backbone):
    """How much of each toy object colour an image contains, wherever it is: soft-assigns every pixel to the
    toy palette (objects and background) and keeps the object colours' shares. Rewards the right colours and
    sizes even when positions are wrong, so captions that only name colours already score."""

    def __init__(self, temperature: float = 0.02):
        super().__init__()
        from uae_lightning.data.toy import BACKGROUND, COLOURS

        palette = torch.tensor([BACKGROUND, *COLOURS.values()], dtype=torch.float32) / 255.0
        self.register_buffer("palette", palette, persistent=False)
        self.temperature = temperature

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().flatten(2).transpose(1, 2)  # [B, HW, 3]
        d = ((x[:, :, None, :] - self.palette) ** 2).sum(-1)  # [B, HW, K]
        shares = torch.softmax(-d / self.temperature, -1).mean(1)  # [B, K]
        return shares[:, 1:].sqrt() + 1e-6  # object colours only; sqrt so a small object still counts


class ToyObjects(Backbone):
    """What is drawn in each cell of the toy world's 3x3 grid: which shape at which size (template matching) and in
    which colour, so that a wrong shape, size or colour costs about as much as a missing object.

    Each pixel is read as the background blended with one palette colour: its coverage (how much of the pixel an
    object covers, whatever its colour) and that colour (soft: the colours whose blend line passes nearest the pixel,
    at `colour_temperature`). Per cell, the coverage map is compared with the coverage of every shape x size drawn
    alone in that cell (rendered by the toy world itself at the input's resolution) and with an empty cell; a
    softmax over their squared differences (normalised by the smallest object's area, at `temperature`) gives the
    cell's probabilities. A cell's colour is its covered pixels' colour shares. Its features are the joint
    (shape x size x colour) probabilities and, at weight `partial` each, the shape, the size and the colour alone,
    so that a half-right object still earns a little. Differentiable; no weights."""

    def __init__(self, temperature: float = 0.05, colour_temperature: float = 0.002, partial: float = 0.3):
        super().__init__()
        from uae_lightning.data.toy import BACKGROUND, COLOURS

        self.register_buffer("background", torch.tensor(BACKGROUND, dtype=torch.float32) / 255.0, persistent=False)
        self.register_buffer("palette", torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255.0,
                             persistent=False)
        self.temperature, self.colour_temperature, self.partial = temperature, colour_temperature, partial
        self._templates: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def coverage(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B,3,H,W] -> (coverage [B,H,W] in [0,1], colour weights [B,H,W,K] over the toy palette). A pixel x is
        read as background + t (colour - background): t per colour is the projection onto that blend line,
        clipped to [0,1]; the colours are weighted by how near x lies to their line."""
        d = images.float().permute(0, 2, 3, 1) - self.background  # [B,H,W,3]
        v = self.palette - self.background  # [K,3]
        t = ((d @ v.T) / (v * v).sum(-1)).clamp(0, 1)  # [B,H,W,K]
        residual = ((d[..., None, :] - t[..., None] * v) ** 2).sum(-1)  # [B,H,W,K]
        weights = torch.softmax(-residual / self.colour_temperature, -1)
        return (weights * t).sum(-1), weights

    def templates(self, resolution: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(coverage [9, S*Z, H, W] of every shape x size alone in each cell, cell windows [9, H, W] (by pixel
        centre), the smallest object's area in pixels)."""
        if resolution not in self._templates:
            # Built outside inference mode (and without grad), whatever the first caller runs under: a template cached
            # by a held-out test (inference mode) must still serve a training step's autograd graph later.
            with torch.inference_mode(False), torch.no_grad():
                self._templates[resolution] = self._build_templates(resolution)
        masks, windows, area = self._templates[resolution]
        return masks.to(device), windows.to(device), area

    def _build_templates(self, resolution: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        from uae_lightning.data import toy

        def drawn(obj) -> torch.Tensor:
            image = toy.image_array(toy.Scene((obj,)), resolution)
            return self.coverage(torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float().div(255).to(
                self.palette.device))[0][0].cpu()

        masks = torch.stack([torch.stack([drawn(toy.ToyObject(shape, "white", size, cell))
                                          for shape in toy.SHAPES for size in toy.SIZES])
                             for cell in range(len(toy.POSITIONS))])
        centre = torch.arange(resolution, dtype=torch.float32).add(0.5).mul(3 / resolution).floor().clamp(max=2)
        row, col = centre.view(-1, 1).expand(resolution, resolution), centre.view(1, -1).expand(resolution, resolution)
        windows = torch.stack([(row == r) & (col == c) for r in range(3) for c in range(3)]).float()
        return masks, windows, float(masks.sum((-1, -2)).min())

    def cells(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per cell, the probabilities of each shape x size [B,9,S,Z], summing to the probability that the cell
        holds an object; the coverage map [B,H,W]; the colour weights [B,H,W,K]; the cell windows [9,H,W])."""
        from uae_lightning.data.toy import SHAPES, SIZES

        b, _, h, w = images.shape
        if h != w:
            raise ValueError(f"toy_objects expects square toy images, got {h}x{w}")
        masks, windows, area = self.templates(h, images.device)
        m, colours = self.coverage(images)
        diff = ((m[:, None, None] - masks[None]) ** 2 * windows[None, :, None]).sum((-1, -2))  # [B,9,T]
        empty = (m[:, None] ** 2 * windows[None]).sum((-1, -2))  # [B,9]
        p = torch.softmax(-torch.cat([diff, empty[..., None]], -1) / (area * self.temperature), -1)
        return p[..., :-1].reshape(b, 9, len(SHAPES), len(SIZES)), m, colours, windows

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        objects, m, colours, windows = self.cells(images)  # [B,9,S,Z]
        weight = (m[..., None] * colours).flatten(1, 2)  # [B,HW,K]: covered pixels' colours
        per_cell = torch.einsum("ch,bhk->bck", windows.flatten(1), weight)  # [B,9,K]
        colour = per_cell / per_cell.sum(-1, keepdim=True).clamp_min(1e-6)  # shares in the cell
        present = objects.sum((-1, -2))[..., None]  # [B,9,1]
        joint = objects[..., None] * colour[:, :, None, None, :]  # [B,9,S,Z,K]
        side = self.partial
        return torch.cat([joint.flatten(2), side * objects.sum(-1), side * objects.sum(-2),
                          side * present * colour], -1).flatten(1)

BACKBONES: dict[str, Callable[[], Backbone]] = dict(zip(TOY_BACKBONES, (ToyPixels, ToyRegionColours, ToyPalette, ToyObjects), strict=True))


def backbone_source(name: str, sources: dict[str, str] | None = None) -> str | None:
    """Where backbone `name` loads from: None for a toy backbone, `sources[name]` (default: the paper's hub id) for a
    paper short name, else the name itself (a Hugging Face id or local path)."""
    if name in BACKBONES:
        return None
    if name.startswith("toy_"):
        raise ValueError(f"unknown toy backbone {name!r}; expected one of {sorted(BACKBONES)}")
    return {**PAPER_BACKBONES, **(sources or {})}.get(name, name)


def build_backbone(name: str, sources: dict[str, str] | None = None) -> Backbone:
    """A toy backbone by name, a paper backbone by short name (clip, dinov2, dinov3, longclip; loaded from
    `sources[name]`, default the hub ids above), or any Hugging Face image model by id or local path."""
    source = backbone_source(name, sources)
    if source is None:
        return BACKBONES[name]()
    try:
        return HFBackbone(source)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot load backbone {name!r} from {source!r} ({e.__class__.__name__}: {str(e).splitlines()[0][:200]}); "
            f"expected a toy backbone {sorted(BACKBONES)}, a paper backbone {sorted(PAPER_BACKBONES)} (its source set "
            f"in backbone_sources), or a Hugging Face id / local path"
        ) from e


def check_backbone(name: str, sources: dict[str, str] | None = None) -> None:
    """Cheap check that `name` will load (its config and image processor, or LongCLIP's state dict memory-mapped),
    without loading weights: run before training so a wrong id or path fails at once. Raises ValueError."""
    source = backbone_source(name, sources)
    if source is None:
        return
    try:
        longclip = longclip_file(source)
        if longclip is not None:
            sd = torch.load(longclip, map_location="cpu", weights_only=True, mmap=True)
            if "visual.conv1.weight" not in sd:
                raise ValueError(f"{longclip} is not an OpenAI-layout CLIP state dict (no visual.conv1.weight)")
            return
        from transformers import AutoConfig, AutoImageProcessor

        AutoConfig.from_pretrained(source)
        ImagePreprocess(AutoImageProcessor.from_pretrained(source))
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"backbone {name!r} cannot be loaded from {source!r} ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from e


class Similarity(nn.Module):
    """Weighted sum of per-backbone cosine similarities; never trained, never saved in checkpoints. Backbones are
    kept in a list in the order given (their names may be paths, which a ModuleDict key cannot hold)."""

    def __init__(self, backbones: dict[str, float], sources: dict[str, str] | None = None):
        super().__init__()
        if not backbones:
            raise ValueError("reward.backbones is empty; name at least one backbone with a weight")
        for name, w in backbones.items():
            if not w > 0:
                raise ValueError(f"reward.backbones.{name}={w}: weights must be > 0")
        total = sum(backbones.values())
        self.names = list(backbones)
        self.weights = {k: v / total for k, v in backbones.items()}
        self.backbones = nn.ModuleList([build_backbone(k, sources) for k in self.names])
        self.requires_grad_(False)

    def per_backbone(self, images: torch.Tensor, references: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: (b(images) * b(references)).sum(-1) for k, b in zip(self.names, self.backbones)}

    def forward(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        scores = self.per_backbone(images, references)
        return sum(self.weights[k] * s for k, s in scores.items())
