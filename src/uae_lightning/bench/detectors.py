"""GenEval's scorers: what finds objects in an image and what tells their colour.

- `HFScorer`: a transformers Mask2Former instance-segmentation model (the official scorer's architecture and
  training data: COCO, Swin-S) and CLIP ViT-L/14 as a zero-shot colour classifier (the official templates and
  crops: the object through its mask over flat #999 grey, cropped to its box).
- `ToyScorer`: the toy world's exact reading of its own images: each grid cell's object, its shape (the toy
  templates of `ToyObjects`), its colour (the nearest palette colour of its pixels) and a confidence.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from uae_lightning.bench.geneval import COLOR_TEMPLATES, COLORS, Detection, box_from_mask

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
GREY = (153, 153, 153)  # "#999": the background of the colour classifier's crops


def object_names() -> list[str]:
    """The 80 COCO class names in the detector's label order (GenEval's object_names.txt)."""
    return Path(__file__).with_name("geneval_object_names.txt").read_text().split("\n")[:80]


class HFScorer:
    """Mask2Former detections (unfiltered: GenEval's rules apply the thresholds) and CLIP colours."""

    colour_names = COLORS

    def __init__(self, detector: str = DEFAULT_DETECTOR, clip: str = "openai/clip-vit-large-patch14",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import (AutoConfig, AutoImageProcessor, CLIPImageProcessor, CLIPModel, CLIPTokenizer,
                                  Mask2FormerForUniversalSegmentation)

        self.device = torch.device(device)
        self.names = object_names()
        try:
            labels = AutoConfig.from_pretrained(detector).num_labels
        except (OSError, ValueError) as e:
            raise ValueError(f"GenEval detector {detector!r} cannot be loaded ({e.__class__.__name__}: "
                             f"{str(e).splitlines()[0][:200]})") from e
        if labels != len(self.names):
            raise ValueError(f"GenEval detector {detector!r} has {labels} classes; GenEval needs COCO's 80 "
                             f"(an instance-segmentation checkpoint trained on COCO)")
        try:
            self.detector = Mask2FormerForUniversalSegmentation.from_pretrained(detector, dtype=dtype).to(self.device).eval()
            self.processor = AutoImageProcessor.from_pretrained(detector)
        except (OSError, ValueError) as e:
            raise ValueError(f"GenEval detector {detector!r} cannot be loaded as a Mask2Former instance-segmentation "
                             f"model ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})") from e
        try:
            self.clip = CLIPModel.from_pretrained(clip, dtype=dtype).to(self.device).eval()
            self.clip_processor = CLIPImageProcessor.from_pretrained(clip)
            self.tokenizer = CLIPTokenizer.from_pretrained(clip)
        except (OSError, ValueError) as e:
            raise ValueError(f"GenEval colour classifier {clip!r} cannot be loaded as a CLIP model "
                             f"({e.__class__.__name__}: {str(e).splitlines()[0][:200]})") from e
        self._classifiers: dict[str, torch.Tensor] = {}
        self.settings = {"detector": detector, "clip": clip}

    @torch.no_grad()
    def detect(self, images: list[Image.Image]) -> list[dict[str, list[Detection]]]:
        """Per image and class, every candidate: Mask2Former's instance post-processing without a score threshold
        (the top num_queries (query, class) pairs by class probability; the score is the class probability times
        the mean mask probability inside the binary mask; the mask is the query's mask at the image's size, > 0.5;
        the box comes from the mask)."""
        out = []
        for image in images:
            image = image.convert("RGB")
            inputs = self.processor(images=[image], return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device, self.detector.dtype)
            res = self.detector(pixel_values=pixels)
            cls = res.class_queries_logits[0].float().softmax(-1)[:, :-1]  # [Q, C]
            queries, classes = cls.shape
            scores, flat = cls.flatten().topk(min(queries, cls.numel()))
            query, label = flat // classes, flat % classes
            h, w = pixels.shape[-2:]
            logits = F.interpolate(res.masks_queries_logits[0][None].float(), size=(h, w), mode="bilinear",
                                   align_corners=False)[0]
            if "pixel_mask" in inputs:  # the padded processor input: keep the image's own area
                valid = inputs["pixel_mask"][0]
                logits = logits[:, : int(valid.any(1).sum()), : int(valid.any(0).sum())]
            logits = F.interpolate(logits[None], size=image.size[::-1], mode="bilinear", align_corners=False)[0]
            probs = logits[query].sigmoid()
            binary = probs > 0.5
            mask_scores = (probs * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
            final = (scores * mask_scores).cpu().numpy()
            binary = binary.cpu().numpy()
            found: dict[str, list[Detection]] = {}
            for k in range(len(final)):
                box = box_from_mask(binary[k])
                if box is None:
                    continue
                found.setdefault(self.names[int(label[k])], []).append(Detection(box, float(final[k]), binary[k]))
            out.append(found)
        return out

    def classifier(self, name: str) -> torch.Tensor:
        """The zero-shot colour classifier of one object class: per colour, the mean of the three templates'
        normalised text embeddings, normalised again. [D, colours]."""
        if name not in self._classifiers:
            weights = []
            for c in COLORS:
                texts = [t.format(c=c, obj=name) for t in COLOR_TEMPLATES]
                tokens = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
                emb = _features(self.clip.get_text_features(**tokens)).float()
                weights.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=-1))
            self._classifiers[name] = torch.stack(weights, 1)
        return self._classifiers[name]

    @torch.no_grad()
    def colours(self, image: Image.Image, name: str, detections: list[Detection]) -> list[str]:
        image = image.convert("RGB")
        grey = Image.new("RGB", image.size, GREY)
        crops = []
        for d in detections:
            shown = image if d.mask is None else Image.composite(image, grey, Image.fromarray(d.mask.astype(np.uint8) * 255))
            crops.append(shown.crop(tuple(d.box)))
        pixels = self.clip_processor(images=crops, return_tensors="pt")["pixel_values"].to(self.device, self.clip.dtype)
        feats = F.normalize(_features(self.clip.get_image_features(pixel_values=pixels)).float(), dim=-1)
        return [COLORS[i] for i in (feats @ self.classifier(name)).argmax(1).tolist()]


def _features(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output


class ToyScorer:
    """The toy world read exactly: per grid cell, the object's pixels (coverage > 0.5), its shape by the nearest toy
    template (softmax over every shape x size and the empty cell, as the `toy_objects` reward, sharper; the score is
    the shape's probability summed over sizes), its colour the palette colour that holds most of its coverage.
    On an image the toy world drew, every object is found with score > 0.9, its shape and colour right."""

    def __init__(self):
        from uae_lightning.data import toy
        from uae_lightning.rewards.backbones import ToyObjects

        self.objects = ToyObjects(temperature=0.02)  # sharper than the reward: a detector decides
        self.shapes, self.sizes = toy.SHAPES, toy.SIZES
        self.colour_names = tuple(toy.COLOURS)
        self.settings = {"detector": "toy", "clip": None}

    @torch.no_grad()
    def detect(self, images: list[Image.Image]) -> list[dict[str, list[Detection]]]:
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1)
                         for im in images]) / 255
        probs, masks, _, windows = self.objects.cells(x)  # [B,9,S,Z], coverage [B,H,W], [9,H,W]
        shape_p = probs.sum(-1)  # [B,9,S]
        out = []
        for b in range(len(images)):
            found: dict[str, list[Detection]] = {}
            for cell in range(windows.shape[0]):
                mask = ((masks[b] > 0.5) & (windows[cell] > 0)).numpy()
                box = box_from_mask(mask)
                if box is None:
                    continue
                for s, shape in enumerate(self.shapes):
                    found.setdefault(shape, []).append(Detection(box, float(shape_p[b, cell, s]), mask))
            out.append(found)
        return out

    @torch.no_grad()
    def colours(self, image: Image.Image, name: str, detections: list[Detection]) -> list[str]:
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1)[None] / 255
        coverage, weights = self.objects.coverage(x)
        shares = (coverage[..., None] * weights)[0]  # [H,W,K]
        return [self.colour_names[int(shares[torch.from_numpy(d.mask)].sum(0).argmax())] for d in detections]


def build_scorer(detector: str, clip: str | None = None, device: str | torch.device = "cpu"):
    """`toy` (the toy world's exact reading) or a Mask2Former id / path with a CLIP id / path."""
    if detector == "toy":
        return ToyScorer()
    return HFScorer(detector, clip or "openai/clip-vit-large-patch14", device)
