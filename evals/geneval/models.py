"""GenEval's two models through transformers: Mask2Former instances and CLIP colour classification.

This is the "HF port" of BENCHMARKS.md §1.5. The detector is the same family and task as the
official mmdetection 2.x Mask2Former Swin-S (COCO instance, 100 queries) with different weights, so
reports label it a stand-in. What is kept from the official pipeline:
  * resize to shorter side 800 / longer side <= 1333 and pad to a multiple of 32 (mmdet's test
    pipeline), not the processor's default size;
  * mmdet's instance post-processing (not transformers' ``post_process_instance_segmentation``,
    which works on a fixed 384x384 grid): top-100 (query, class) pairs by class probability, masks
    upsampled to the padded input, cropped to the resized image and resized to the original,
    score = class probability x mean mask probability inside the mask, boxes derived from masks;
  * class ids mapped onto GenEval's 80 names (HF spells three of them differently);
  * colour: crop = image pasted over flat #999999 through the instance mask, cut to the box;
    CLIP classifier = per colour the three templates, each L2-normalised, averaged, normalised;
    prediction = argmax of the normalised image embedding against it.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from evals.geneval.rules import COLOR_TEMPLATES, COLORS, Detection

# GenEval name -> the name transformers' COCO-instance configs use for the same class index.
HF_ALIASES = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}
CROP_BACKGROUND = "#999999"


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name).strip().lower())


def class_index_map(id2label: Mapping[int, str], object_names: Sequence[str], mode: str = "by_name") -> dict[int, str]:
    """Detector label id -> GenEval class name.

    ``by_name`` matches names (with HF's three aliases) and fails loudly if any of GenEval's 80 names
    is missing, which catches a detector trained on another label set. ``by_index`` is the official
    behaviour (position i is object_names[i]) for detectors whose labels are unnamed.
    """
    id2label = {int(k): v for k, v in id2label.items()}
    if mode == "by_index":
        if len(id2label) < len(object_names):
            raise ValueError(f"detector has {len(id2label)} classes; GenEval needs {len(object_names)} in COCO-80 order")
        return {i: object_names[i] for i in range(len(object_names))}
    if mode != "by_name":
        raise ValueError(f"class_mapping must be 'by_name' or 'by_index', got {mode!r}")
    by_label = {_norm(v): k for k, v in id2label.items()}
    out: dict[int, str] = {}
    missing = []
    for name in object_names:
        key = by_label.get(_norm(name), by_label.get(_norm(HF_ALIASES.get(name, name))))
        if key is None:
            missing.append(name)
        else:
            out[key] = name
    if missing:
        raise ValueError(f"detector labels lack GenEval classes {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                         "use a COCO-instance detector or geneval.class_mapping=by_index")
    return out


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """[N, H, W] bool -> [N, 4] (x1, y1, x2 + 1, y2 + 1), zeros for empty masks (mmdet's mask2bbox)."""
    n = masks.shape[0]
    boxes = torch.zeros((n, 4), dtype=torch.float32)
    if n == 0:
        return boxes
    xs = masks.any(dim=1)
    ys = masks.any(dim=2)
    for i in range(n):
        x = torch.nonzero(xs[i]).flatten()
        y = torch.nonzero(ys[i]).flatten()
        if len(x) and len(y):
            boxes[i] = torch.tensor([x[0], y[0], x[-1] + 1, y[-1] + 1], dtype=torch.float32)
    return boxes


def instances_from_logits(class_logits: torch.Tensor, mask_logits: torch.Tensor, input_hw: tuple[int, int],
                          valid_hw: tuple[int, int], orig_hw: tuple[int, int], max_per_image: int = 100):
    """mmdet-style instance post-processing for one image.

    class_logits [Q, C+1] (last = no object), mask_logits [Q, h, w] at low resolution;
    ``input_hw`` is the padded network input, ``valid_hw`` the resized image inside it and
    ``orig_hw`` the original image. Returns (labels [K], scores [K], masks [K, H, W] bool, boxes [K, 4]).
    """
    num_q, num_c1 = class_logits.shape
    num_classes = num_c1 - 1
    probs = class_logits.float().softmax(-1)[:, :-1]
    k = min(max_per_image, probs.numel())
    scores, flat = probs.flatten().topk(k, sorted=False)
    labels = flat % num_classes
    query = torch.div(flat, num_classes, rounding_mode="floor")
    masks = mask_logits[query].float()[None]
    masks = F.interpolate(masks, size=input_hw, mode="bilinear", align_corners=False)
    masks = masks[:, :, : valid_hw[0], : valid_hw[1]]
    masks = F.interpolate(masks, size=orig_hw, mode="bilinear", align_corners=False)[0]
    binary = masks > 0
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    det_scores = scores * mask_scores
    order = det_scores.argsort(descending=True)
    binary = binary[order].cpu()
    return labels[order].cpu(), det_scores[order].cpu(), binary, masks_to_boxes(binary)


class Mask2FormerDetector:
    """COCO instance detector -> ``{geneval_class: [Detection, ...]}`` per image, best first."""

    def __init__(self, model_id: str, object_names: Sequence[str], device: str = "cpu", class_mapping: str = "by_name",
                 short_edge: int = 800, long_edge: int = 1333, size_divisor: int = 32, max_per_image: int = 100):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        self.device = device
        self.max_per_image = max_per_image
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(model_id).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(
            model_id, size={"shortest_edge": short_edge, "longest_edge": long_edge}, size_divisor=size_divisor)
        self.label_map = class_index_map(self.model.config.id2label, object_names, class_mapping)

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image]) -> list[dict[str, list[Detection]]]:
        inputs = self.processor(images=list(images), return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device)
        pixel_mask = inputs.get("pixel_mask")
        out = self.model(pixel_values=pixel_values,
                         pixel_mask=None if pixel_mask is None else pixel_mask.to(self.device))
        input_hw = tuple(pixel_values.shape[-2:])
        results = []
        for i, im in enumerate(images):
            if pixel_mask is not None:
                valid = (int(pixel_mask[i].any(1).sum()), int(pixel_mask[i].any(0).sum()))
            else:
                valid = input_hw
            labels, scores, masks, boxes = instances_from_logits(
                out.class_queries_logits[i], out.masks_queries_logits[i], input_hw, valid, (im.height, im.width),
                self.max_per_image)
            per_class: dict[str, list[Detection]] = {}
            for lab, sc, m, b in zip(labels.tolist(), scores.tolist(), masks, boxes.tolist()):
                name = self.label_map.get(lab)
                if name is not None:
                    per_class.setdefault(name, []).append(Detection(tuple(b), float(sc), m.numpy()))
            results.append(per_class)
        return results


def color_crop(image: Image.Image, det: Detection, background: str = CROP_BACKGROUND) -> Image.Image:
    """The instance pasted over a flat background through its mask, then cut to its box."""
    image = image.convert("RGB")
    if det.mask is not None:
        bg = Image.new("RGB", image.size, background)
        image = Image.composite(image, bg, Image.fromarray(np.asarray(det.mask, dtype=bool)))
    return image.crop(tuple(int(round(v)) for v in det.box[:4]))


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding;
    # older releases return the tensor itself.
    return out.pooler_output if hasattr(out, "pooler_output") else out


class ClipColorClassifier:
    """Zero-shot colour of each crop, with one cached 10-way classifier per class name."""

    def __init__(self, model_id: str, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.device = device
        self.model = CLIPModel.from_pretrained(model_id).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_id)
        self.image_processor = AutoImageProcessor.from_pretrained(model_id)
        self._classifiers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def classifier(self, class_name: str) -> torch.Tensor:
        if class_name not in self._classifiers:
            texts = [t.format(c=c, obj=class_name) for c in COLORS for t in COLOR_TEMPLATES]
            tok = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
            emb = _features(self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok.get("attention_mask")))
            emb = F.normalize(emb.float(), dim=-1).view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(1)
            self._classifiers[class_name] = F.normalize(emb, dim=-1).T  # [D, 10]
        return self._classifiers[class_name]

    @torch.no_grad()
    def __call__(self, image: Image.Image, class_name: str, dets: Sequence[Detection]) -> list[str]:
        if not dets:
            return []
        crops = [color_crop(image, d) for d in dets]
        pix = self.image_processor(images=crops, return_tensors="pt")["pixel_values"].to(self.device)
        emb = F.normalize(_features(self.model.get_image_features(pixel_values=pix)).float(), dim=-1)
        pred = (emb @ self.classifier(class_name)).argmax(-1)
        return [COLORS[i] for i in pred.tolist()]
