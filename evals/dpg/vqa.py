"""Pluggable VQA backends for DPG-Bench: (tile, question) -> answer string.

The official judge, mPLUG-large via modelscope, has no transformers port (BENCHMARKS.md §2.5), so
every backend here is a stand-in and reports say so:
  ``blip``     BlipForQuestionAnswering (default Salesforce/blip-vqa-capfilt-large): same family of
               COCO-VQA generative answerers; the decoded answer is compared to "yes" exactly.
  ``qwen_vl``  a Qwen2/2.5-VL model answering yes/no by comparing the next-token logits of the two
               words; stronger than mPLUG, so its numbers are not comparable with published ones.
The scoring rule ("yes" exactly -> 1) stays in ``evals.dpg.rules``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

BACKENDS = ("blip", "qwen_vl")
DEFAULT_MODELS = {"blip": "Salesforce/blip-vqa-capfilt-large", "qwen_vl": "Qwen/Qwen2.5-VL-7B-Instruct"}


class BlipVQA:
    name = "blip"

    def __init__(self, model_id: str, device: str = "cpu", max_new_tokens: int = 10):
        from transformers import AutoProcessor, BlipForQuestionAnswering

        self.device = device
        self.model = BlipForQuestionAnswering.from_pretrained(model_id).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(model_id)
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def answer(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        inputs = self.processor(images=[im.convert("RGB") for im in images], text=list(questions),
                                return_tensors="pt", padding=True).to(self.device)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [s.strip() for s in self.processor.batch_decode(out, skip_special_tokens=True)]


class QwenVLYesNo:
    name = "qwen_vl"

    def __init__(self, model_id: str, device: str = "cpu", dtype: str = "auto"):
        from evals.vlm import QwenVL

        self.vlm = QwenVL(model_id, device=device, dtype=dtype)

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        return self.vlm.yes_no(images, questions)


def load_vqa(backend: str, model_id: str, device: str = "cpu"):
    if backend == "blip":
        return BlipVQA(model_id or DEFAULT_MODELS["blip"], device)
    if backend == "qwen_vl":
        return QwenVLYesNo(model_id or DEFAULT_MODELS["qwen_vl"], device)
    raise ValueError(f"unknown DPG VQA backend {backend!r}; choose one of {BACKENDS}")
