"""WISE judges: an OpenAI-compatible chat-completions endpoint or a local transformers VLM.

The official judge prompts are not reproduced here (WISE ships no license); the built-in messages
state the same protocol in our own words: the legacy three 0-2 grades with the strict rubric and
the three-line reply format, and the verified binary "Score: 0|1" rule. Reports label results made
with them "paraphrased prompt". For comparability, put the official wording in a JSON file
``{"system": "...", "user": "..."}`` with ``{prompt}`` and ``{explanation}`` placeholders and set
``wise.prompt_file``.

``judge_image`` asks up to ``max_attempts`` times; a reply that cannot be parsed or a failed call
is retried, and after the last attempt the image is *skipped* (status "skipped", with the reason),
never scored 0.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from evals.wise.rules import parse_legacy, parse_verified, wiscore

OFFICIAL_JUDGES = {"legacy": "gpt-4o-2024-05-13", "verified": "Qwen3.5-35B-A3B"}
DEFAULT_MAX_TOKENS = {"legacy": 2000, "verified": 500}

_SYSTEM = {
    "legacy": "You are a meticulous auditor of AI-generated images. You grade strictly and follow the output "
              "format exactly.",
    "verified": "You are a strict judge of whether an AI-generated image shows the knowledge a prompt asks for.",
}
_USER = {
    "legacy": (
        "Grade the image below against the text PROMPT, using the EXPLANATION to know what the prompt is "
        "really asking for. Give each of three aspects an integer grade 0, 1 or 2.\n"
        "Consistency: does the image show what the prompt intends, as the explanation describes it? "
        "0 = the intended content is missing or wrong; 1 = partly right, with notable errors or omissions; "
        "2 = completely and unambiguously right.\n"
        "Realism: is the image physically and visually plausible? 0 = clearly unrealistic or badly broken; "
        "1 = noticeable flaws; 2 = fully convincing.\n"
        "Aesthetic Quality: composition, colour, lighting and detail. 0 = poor; 1 = acceptable; 2 = excellent.\n"
        "Be strict: a 2 should be exceedingly rare and only for flawless results.\n"
        "Reply with exactly these three lines and nothing else:\n"
        "Consistency: <0-2>\nRealism: <0-2>\nAesthetic Quality: <0-2>\n\n"
        "PROMPT: {prompt}\nEXPLANATION: {explanation}"),
    "verified": (
        "Decide whether the image below satisfies both the PROMPT and the EXPLANATION of what it refers to.\n"
        "Return 1 only if the intended answer is clearly shown, the key objects and relations are right, and no "
        "generation failure prevents judging. Style or beauty alone never causes a 0.\n"
        "Return 0 if the intended answer is missing, the image only echoes surface words of the prompt, key "
        "relations are wrong, the image is ambiguous, or it has major artifacts. If in serious doubt, return 0.\n"
        "Reply with exactly one line: \"Score: 0\" or \"Score: 1\".\n\n"
        "PROMPT: {prompt}\nEXPLANATION: {explanation}"),
}


@dataclass
class JudgePrompt:
    system: str
    user: str
    source: str  # "built-in paraphrase" or the prompt file path

    def render(self, prompt: str, explanation: str) -> str:
        return self.user.replace("{prompt}", prompt).replace("{explanation}", explanation)


def judge_prompt(protocol: str, prompt_file: str = "") -> JudgePrompt:
    if not prompt_file:
        return JudgePrompt(_SYSTEM[protocol], _USER[protocol], "built-in paraphrase")
    data = json.loads(Path(prompt_file).read_text())
    if not isinstance(data, dict) or "user" not in data:
        raise ValueError(f"{prompt_file}: expected a JSON object with 'user' (and optional 'system') text")
    return JudgePrompt(data.get("system", ""), data["user"], str(prompt_file))


def png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Judge(Protocol):
    model: str

    def ask(self, image: Image.Image, system: str, user: str) -> str: ...


class JudgeCallError(RuntimeError):
    """A judge call failed (HTTP error, timeout, malformed response)."""


class ChatCompletionsJudge:
    """POST {base_url}/chat/completions with the image as a PNG data URL; returns the reply text."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_tokens: int = 2000,
                 timeout_s: float = 120.0, extra_body: dict[str, Any] | None = None, api_key: str | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        # An explicit key (passed from the driver) wins over this process's environment.
        self.api_key = api_key or (os.environ.get(api_key_env, "") if api_key_env else "")
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.extra_body = dict(extra_body or {})

    def ask(self, image: Image.Image, system: str, user: str) -> str:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": [
            {"type": "text", "text": user},
            {"type": "image_url", "image_url": {"url": png_data_url(image)}}]})
        body = {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": self.max_tokens,
                **self.extra_body}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 - configured endpoint
                payload = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:200]
            raise JudgeCallError(f"HTTP {exc.code} from {self.url}: {detail}") from exc
        except (OSError, ValueError) as exc:
            raise JudgeCallError(f"{type(exc).__name__} calling {self.url}: {exc}") from exc
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise JudgeCallError(f"malformed chat-completions response: {str(payload)[:200]}") from exc
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content or ""


# The reply formats of the two protocols as (literal, allowed grades) slots: what a constrained local
# judge writes (LocalVLMJudge(reply_template=...)); parse_legacy / parse_verified read exactly these.
REPLY_TEMPLATES = {
    "legacy": [("Consistency: ", ["0", "1", "2"]), ("\nRealism: ", ["0", "1", "2"]),
               ("\nAesthetic Quality: ", ["0", "1", "2"])],
    "verified": [("Score: ", ["0", "1"])],
}


class LocalVLMJudge:
    """A local Qwen2.5-VL-style model through transformers (``evals.vlm``): greedy free generation, or,
    with ``reply_template``, a reply in the protocol's format whose grades the model picks."""

    def __init__(self, model_id: str, device: str = "cpu", max_new_tokens: int = 64, dtype: str = "auto",
                 reply_template: list | None = None):
        from evals.vlm import QwenVL

        self.vlm = QwenVL(model_id, device=device, dtype=dtype)
        self.model = model_id
        self.max_new_tokens = max_new_tokens
        self.reply_template = reply_template

    def ask(self, image: Image.Image, system: str, user: str) -> str:
        if self.reply_template:
            return self.vlm.fill(image, user, self.reply_template, system=system)
        return self.vlm.chat([image], [user], system=system, max_new_tokens=self.max_new_tokens)[0]


def judge_image(judge: Judge, protocol: str, prompt: JudgePrompt, image: Image.Image, text: str, explanation: str,
                max_attempts: int = 3, backoff_s: float = 1.0) -> dict[str, Any]:
    """Ask until the reply parses; returns the per-image record data.

    {"status": "scored", "score": float, "grades"|"binary": ..., "attempts": n, "reply": last reply}
    or {"status": "skipped", "reason": "unparseable reply" | "judge call failed: ...", ...}.
    """
    user = prompt.render(text, explanation)
    reply, last_error = "", ""
    for attempt in range(1, max_attempts + 1):
        try:
            reply = judge.ask(image, prompt.system, user)
        except JudgeCallError as exc:
            last_error = f"judge call failed: {exc}"
            if attempt < max_attempts and backoff_s > 0:
                time.sleep(backoff_s * attempt)
            continue
        if protocol == "legacy":
            grades = parse_legacy(reply)
            if grades is not None:
                return {"status": "scored", "score": wiscore(grades), "grades": grades, "attempts": attempt,
                        "reply": reply[:500]}
        else:
            binary = parse_verified(reply)
            if binary is not None:
                return {"status": "scored", "score": float(binary), "binary": binary, "attempts": attempt,
                        "reply": reply[:500]}
        last_error = "unparseable reply"
    return {"status": "skipped", "reason": last_error, "attempts": max_attempts, "reply": reply[:500]}
