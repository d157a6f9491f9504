"""A small Qwen2-VL / Qwen2.5-VL chat helper shared by the DPG yes/no backend and the WISE local judge.

Inputs are composed from the image processor and the tokenizer directly (the Qwen chat format with
one image, ``<|image_pad|>`` expanded to grid_t*grid_h*grid_w / merge_size^2 tokens, as the model's
processor does) rather than through ``AutoProcessor``, whose Qwen-VL class also needs a video
processor and therefore torchvision; this keeps the path identical on every machine.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from twinflow.dtypes import torch_dtype  # "auto": bf16 on CUDA, else fp32

DEFAULT_SYSTEM = "You are a helpful assistant."


class QwenVL:
    def __init__(self, model_id: str, device: str = "cpu", dtype: str = "auto"):
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        self.device = device
        self.model = AutoModelForImageTextToText.from_pretrained(
            model_id, dtype=torch_dtype(dtype, device)).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_id)
        self.tokenizer.padding_side = "left"  # batched generation appends on the right
        self.image_processor = AutoImageProcessor.from_pretrained(model_id)
        self.merge = int(getattr(self.image_processor, "merge_size", 2))

    def _inputs(self, images: Sequence[Image.Image], texts: Sequence[str], system: str | None):
        vis = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        prompts = []
        for grid, text in zip(vis["image_grid_thw"], texts):
            n = int(grid.prod()) // (self.merge ** 2)
            sys_part = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
            prompts.append(f"{sys_part}<|im_start|>user\n<|vision_start|>{'<|image_pad|>' * n}<|vision_end|>"
                           f"{text}<|im_end|>\n<|im_start|>assistant\n")
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True)
        enc.update(vis)
        return {k: v.to(self.device) for k, v in enc.items()}

    @torch.no_grad()
    def chat(self, images: Sequence[Image.Image], texts: Sequence[str], system: str | None = DEFAULT_SYSTEM,
             max_new_tokens: int = 64) -> list[str]:
        """Greedy replies, one per (image, text)."""
        inputs = self._inputs(images, texts, system)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return [s.strip() for s in self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                               skip_special_tokens=True)]

    @torch.no_grad()
    def fill(self, image: Image.Image, text: str, template: Sequence[tuple[str, Sequence[str]]],
             system: str | None = DEFAULT_SYSTEM) -> str:
        """A reply in a fixed format: for each (literal, choices) of ``template`` the literal is written
        for the model and it picks the choice whose first token it finds most likely next (greedy,
        one forward pass per choice slot). E.g. [("Score: ", ["0", "1"])] -> "Score: 1"."""
        inputs = self._inputs([image], [text], system)
        reply = ""
        for literal, choices in template:
            reply += literal
            forced = self.tokenizer(reply, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
            ids = torch.cat([inputs["input_ids"], forced], dim=1)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(forced)], dim=1)
            step = {**inputs, "input_ids": ids, "attention_mask": mask}
            logits = self.model(**step).logits[0, -1].float()
            first = [self.tokenizer.encode(c, add_special_tokens=False)[0] for c in choices]
            reply += choices[int(torch.argmax(logits[first]))]
        return reply

    @torch.no_grad()
    def yes_no(self, images: Sequence[Image.Image], questions: Sequence[str],
               suffix: str = " Please answer yes or no.") -> list[str]:
        """'yes' or 'no' per question: the larger next-token logit of the two words (BENCHMARKS.md §2.5c)."""
        yes = self.tokenizer.encode("yes", add_special_tokens=False)[0]
        no = self.tokenizer.encode("no", add_special_tokens=False)[0]
        inputs = self._inputs(images, [q + suffix for q in questions], DEFAULT_SYSTEM)
        logits = self.model(**inputs).logits[:, -1].float()
        return ["yes" if a > b else "no" for a, b in zip(logits[:, yes].tolist(), logits[:, no].tolist())]
