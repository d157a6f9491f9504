"""Scorer actors: one class per benchmark, models loaded once in ``__init__``, ``process(tasks)``
returns one record per task (per prompt) and never raises for a bad item.

Task:   {"benchmark", "nfe", "key", "meta": {...}, "images": [bytes, ...]}
Record: {"benchmark", "nfe", "key", "status": "scored" | "skipped" | "failed", "error"?, "data": {...}}
  GenEval data: {"tag", "images": [{"index", "correct", "reason", "detected": {class: n}}]}
  DPG data:     {"tile_size", "tiles": [{qid: answer}, ...]}  (all CSV questions; modes are applied later)
  WISE data:    {"category", "score", "grades" | "binary", "attempts", "reply"} or the skip reason
  digits data:  {"label", "key", "images": [{"index", "pred", "conf", "correct", "digit": [64 values]}]}
The numbers are computed centrally from these records (``evals.aggregate``), never averaged per shard.
"""

from __future__ import annotations

import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from evals import layout


def _set_threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(max(1, int(n)))


def _record(task: dict, status: str, data: dict | None = None, error: str | None = None, t0: float | None = None) -> dict:
    rec = {"benchmark": task["benchmark"], "nfe": task["nfe"], "key": task["key"], "status": status,
           "data": data or {}}
    if error:
        rec["error"] = error
    if t0 is not None:
        rec["seconds"] = round(time.time() - t0, 3)
    return rec


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_exception(exc, limit=-2))[-600:]}"


class Scorer:
    """What every scorer shares: ``process`` scores each task with the benchmark's ``_score(task) -> data``
    hook, ``workers`` tasks at a time (threads; 1: in order), and records an exception as that task's
    "failed" record. ``_score`` may put ``status: "skipped"`` (with a ``reason``) in its data."""

    workers = 1

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid()}

    def _score(self, task: dict) -> dict:
        raise NotImplementedError

    def _one(self, task: dict) -> dict:
        t0 = time.time()
        try:
            data = self._score(task)
            status = data.pop("status", "scored")
            return _record(task, status, data, error=data.get("reason") if status == "skipped" else None, t0=t0)
        except Exception as exc:  # noqa: BLE001 - a bad image fails its prompt, not the shard
            return _record(task, "failed", error=_error(exc), t0=t0)

    def process(self, tasks: list[dict]) -> list[dict]:
        if self.workers <= 1:
            return [self._one(t) for t in tasks]
        with ThreadPoolExecutor(self.workers) as ex:
            return list(ex.map(self._one, tasks))


class GenEvalScorer(Scorer):
    def __init__(self, cfg: dict[str, Any], object_names: Sequence[str], device: str = "cpu", num_threads: int = 0):
        from evals.geneval.models import ClipColorClassifier, Mask2FormerDetector
        from evals.geneval.rules import GenEvalRules

        _set_threads(num_threads)
        self.rules = GenEvalRules(threshold=cfg["threshold"], counting_threshold=cfg["counting_threshold"],
                                  max_objects=cfg["max_objects"], nms_threshold=cfg["nms_threshold"],
                                  position_threshold=cfg["position_threshold"])
        self.detector = Mask2FormerDetector(cfg["detector"], object_names, device, cfg["class_mapping"],
                                            cfg["detector_short_edge"], cfg["detector_long_edge"])
        self.colors = ClipColorClassifier(cfg["clip"], device)
        self.batch = int(cfg.get("detector_batch_size", 4))

    def _score(self, task: dict) -> dict:
        from evals.geneval.rules import confidence_threshold, evaluate_image

        meta = task["meta"]
        thr = confidence_threshold(meta["tag"], self.rules)
        images = [layout.decode(b) for b in task["images"]]
        results = []
        for i in range(0, len(images), self.batch):
            chunk = images[i:i + self.batch]
            for j, (im, dets) in enumerate(zip(chunk, self.detector.detect(chunk))):
                ok, reason = evaluate_image(meta, dets, lambda name, ds, _im=im: self.colors(_im, name, ds), self.rules)
                kept = {k: n for k, v in dets.items() if (n := sum(d.score > thr for d in v))}
                results.append({"index": i + j, "correct": bool(ok), "reason": reason, "detected": kept})
        return {"tag": meta["tag"], "images": results}


class DPGScorer(Scorer):
    def __init__(self, backend: str, model_id: str, device: str = "cpu", batch_size: int = 32, num_threads: int = 0):
        from evals.dpg.vqa import load_vqa

        _set_threads(num_threads)
        self.vqa = load_vqa(backend, model_id, device)
        self.batch = batch_size

    def _score(self, task: dict) -> dict:
        questions = task["meta"].get("questions") or []
        if not questions:
            raise ValueError(f"no questions for item {task['key']} in the DPG CSV")
        tiles = layout.split_grid(layout.decode(task["images"][0]))
        pairs = [(t, int(qid), text) for t in range(len(tiles)) for qid, text in questions]
        answers: list[dict[str, str]] = [{} for _ in tiles]
        for i in range(0, len(pairs), self.batch):
            chunk = pairs[i:i + self.batch]
            replies = self.vqa.answer([tiles[t] for t, _, _ in chunk], [q for _, _, q in chunk])
            for (t, qid, _), a in zip(chunk, replies):
                answers[t][str(qid)] = a
        return {"tile_size": tiles[0].width, "tiles": answers}


class DigitsScorer(Scorer):
    """The digits benchmark (evals/digits/rules.py): a classifier and feature space fitted on real digits."""

    def __init__(self, rules: dict[str, Any], num_threads: int = 0):
        from evals.digits.rules import DigitsRules, judge_for

        _set_threads(num_threads)
        self.rules = DigitsRules(**rules)
        judge_for(self.rules)  # fit once, now

    def _score(self, task: dict) -> dict:
        from evals.digits.rules import score_images

        label = int(task["meta"]["label"])
        images = [layout.decode(b) for b in task["images"]]
        return {"label": label, "key": task["key"], "images": score_images(images, label, self.rules)}


class WISEScorer(Scorer):
    """API judge calls run ``max_workers`` at a time inside the actor; a local VLM runs one at a time."""

    def __init__(self, cfg: dict[str, Any], device: str = "cpu", num_threads: int = 0):
        from evals.wise.judge import (DEFAULT_MAX_TOKENS, OFFICIAL_JUDGES, REPLY_TEMPLATES, ChatCompletionsJudge,
                                      LocalVLMJudge, judge_prompt)

        _set_threads(num_threads)
        self.protocol = cfg["protocol"]
        self.prompt = judge_prompt(self.protocol, cfg.get("prompt_file", ""))
        self.max_attempts = int(cfg["max_attempts"])
        max_tokens = int(cfg.get("max_tokens") or DEFAULT_MAX_TOKENS[self.protocol])
        if cfg["judge"] == "api":
            base = cfg.get("api_base_url") or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
            extra = dict(cfg.get("api_extra_body") or {})
            if self.protocol == "verified":  # the official vLLM call turns Qwen3.5's thinking off
                extra.setdefault("chat_template_kwargs", {"enable_thinking": False})
            self.judge = ChatCompletionsJudge(base, cfg.get("api_model") or OFFICIAL_JUDGES[self.protocol],
                                              cfg.get("api_key_env", "OPENAI_API_KEY"), max_tokens,
                                              float(cfg.get("timeout_s", 120)), extra, api_key=cfg.get("api_key"))
            self.workers = int(cfg.get("max_workers", 8))
            self.backoff = 1.0
        else:
            template = REPLY_TEMPLATES[self.protocol] if cfg.get("local_reply") == "constrained" else None
            self.judge = LocalVLMJudge(cfg["local_model"], device, max_new_tokens=min(max_tokens, 64),
                                       reply_template=template)
            self.workers = 1
            self.backoff = 0.0

    def ready(self) -> dict[str, Any]:
        return {**super().ready(), "judge": self.judge.model}

    def _score(self, task: dict) -> dict:
        from evals.wise.judge import judge_image

        meta = task["meta"]
        res = judge_image(self.judge, self.protocol, self.prompt, layout.decode(task["images"][0]),
                          meta["prompt"], meta.get("explanation", ""), self.max_attempts, self.backoff)
        res["category"] = meta["category"]
        return res  # its "status" (scored / skipped) becomes the record's
