"""WISE judging over the real chat-completions protocol: a local HTTP server in the test speaks
``POST /v1/chat/completions`` and replies from a script per prompt (good, malformed, HTTP errors),
and the WISE stage runs end to end on the local Ray cluster against it."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from evals.wise.judge import ChatCompletionsJudge, judge_image, judge_prompt
from evals.wise.rules import wiscore

GOOD = "Consistency: 2\nRealism: 1\nAesthetic Quality: 1"


class JudgeServer:
    """Replies per PROMPT from ``script[prompt]``: a list consumed call by call (the last entry
    repeats); an int entry is answered as that HTTP status."""

    def __init__(self, key="test-key"):
        self.key = key
        self.script: dict[str, list] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    reply = outer._next(body)
                if self.path != "/v1/chat/completions" or self.headers.get("Authorization") != f"Bearer {outer.key}":
                    reply = 401
                if isinstance(reply, int):
                    self.send_response(reply)
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "scripted failure"}}')
                    return
                data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _next(self, body):
        user = body["messages"][-1]["content"][0]["text"]
        prompt = re.search(r"PROMPT: (.*)", user).group(1)
        seq = self.script.get(prompt, [GOOD])
        return seq.pop(0) if len(seq) > 1 else seq[0]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = JudgeServer()
    yield s
    s.close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("WISE_TEST_KEY", "test-key")
    return "WISE_TEST_KEY"


def _image():
    return Image.new("RGB", (24, 16), (10, 200, 30))


def test_request_follows_the_chat_completions_protocol(server, key):
    judge = ChatCompletionsJudge(server.url, "gpt-4o-2024-05-13", key, max_tokens=2000)
    server.script["Mooncakes request"] = [GOOD]
    res = judge_image(judge, "legacy", judge_prompt("legacy"), _image(), "Mooncakes request", "round pastries", 3, 0)
    assert res == {"status": "scored", "score": wiscore({"consistency": 2, "realism": 1, "aesthetic_quality": 1}),
                   "grades": {"consistency": 2, "realism": 1, "aesthetic_quality": 1}, "attempts": 1, "reply": GOOD}
    req = server.requests[-1]
    body = req["body"]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer test-key"
    assert body["model"] == "gpt-4o-2024-05-13" and body["temperature"] == 0.0 and body["max_tokens"] == 2000
    assert body["messages"][0]["role"] == "system"
    text, image = body["messages"][1]["content"]
    assert "PROMPT: Mooncakes request\nEXPLANATION: round pastries" in text["text"]
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    png = base64.b64decode(image["image_url"]["url"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (24, 16)


def test_retries_then_skips_and_never_scores_zero(server, key):
    judge = ChatCompletionsJudge(server.url, "judge", key)
    prompt = judge_prompt("legacy")
    server.script["retry once"] = ["I think it is nice.", GOOD]
    res = judge_image(judge, "legacy", prompt, _image(), "retry once", "", 3, 0)
    assert res["status"] == "scored" and res["attempts"] == 2
    server.script["always garbage"] = ["no grades here"]
    res = judge_image(judge, "legacy", prompt, _image(), "always garbage", "", 3, 0)
    assert res["status"] == "skipped" and res["reason"] == "unparseable reply" and res["attempts"] == 3
    assert "score" not in res
    server.script["server error"] = [500, 429, "2\n2\n2"]  # bare-lines fallback on the third try
    res = judge_image(judge, "legacy", prompt, _image(), "server error", "", 3, 0)
    assert res["status"] == "scored" and res["score"] == pytest.approx(1.0) and res["attempts"] == 3
    server.script["down"] = [503]
    res = judge_image(judge, "legacy", prompt, _image(), "down", "", 2, 0)
    assert res["status"] == "skipped" and res["reason"].startswith("judge call failed: HTTP 503")
    wrong_key = ChatCompletionsJudge(server.url, "judge", "NO_SUCH_ENV_VAR")
    res = judge_image(wrong_key, "legacy", prompt, _image(), "retry once", "", 1, 0)
    assert res["status"] == "skipped" and "HTTP 401" in res["reason"]
    closed = ChatCompletionsJudge("http://127.0.0.1:9/v1", "judge", key, timeout_s=2)
    res = judge_image(closed, "legacy", prompt, _image(), "x", "", 1, 0)
    assert res["status"] == "skipped" and res["reason"].startswith("judge call failed")


def test_verified_protocol_turns_thinking_off_and_strips_think_blocks(server, key, tmp_path):
    from evals.scorers import WISEScorer
    from evals.layout import png_bytes

    server.script["verified one"] = ["<think>Score: 0?</think>\nScore: 1"]
    prompt_file = tmp_path / "prompt.json"
    prompt_file.write_text(json.dumps({"system": "S", "user": "Official wording. PROMPT: {prompt}\n{explanation}"}))
    scorer = WISEScorer({"protocol": "verified", "judge": "api", "api_base_url": server.url, "api_model": "",
                         "api_key_env": key, "max_attempts": 3, "max_workers": 2, "prompt_file": str(prompt_file)})
    task = {"benchmark": "wise", "nfe": 1, "key": "7", "images": [png_bytes(_image())],
            "meta": {"prompt": "verified one", "explanation": "E", "category": "CULTURE"}}
    (rec,) = scorer.process([task])
    assert rec["status"] == "scored" and rec["data"]["binary"] == 1 and rec["data"]["score"] == 1.0
    body = server.requests[-1]["body"]
    assert body["model"] == "Qwen3.5-35B-A3B" and body["max_tokens"] == 500
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["messages"][0]["content"] == "S" and body["messages"][1]["content"][0]["text"].startswith("Official")


@pytest.mark.ray
def test_wise_stage_end_to_end_with_coverage(server, key, ray_local, tmp_path):
    from evals.config import EvalConfig, GenerationConfig, PoolConfig, StageConfig, WISEConfig
    from evals.mini_data import WISE_LEGACY, write_mini_benchmarks
    from evals.runner import evaluate
    from twinflow.models.tiny_qwen import build_tiny_qwen_image

    data = write_mini_benchmarks(tmp_path / "benchmarks")
    ckpt = build_tiny_qwen_image(tmp_path / "qwen-image", "tiny")
    prompts = {pid: p for rows in WISE_LEGACY.values() for pid, _, _, p, _ in rows}
    server.script.update({prompts[1]: ["Consistency: 2\nRealism: 2\nAesthetic Quality: 2"],
                          prompts[2]: ["garbage", "Consistency: 0\nRealism: 2\nAesthetic Quality: 0"],
                          prompts[401]: ["consistency 1 realism 1 aesthetic quality 1"],
                          prompts[568]: ["never parseable"],
                          prompts[701]: [500, "2\n0\n0"],
                          prompts[901]: ["Consistency: 0\nRealism: 0\nAesthetic Quality: 0"]})
    stage = StageConfig(num_actors=1, num_cpus=1.0, num_gpus=0.0, shard_size=3, batch_size=6)
    cfg = EvalConfig(checkpoint=str(ckpt), output_dir=str(tmp_path / "eval"), data_root=str(data),
                     benchmarks=["wise"], nfe=[1], generation=GenerationConfig(max_sequence_length=16),
                     wise=WISEConfig(resolution=32, api_base_url=server.url, api_model="local-judge", api_key_env=key,
                                     max_workers=3),
                     pool=PoolConfig(device="cpu", generate=stage, wise=stage))
    cfg.validate()
    res = evaluate(cfg)["wise"]
    r = res["nfe"]["1"]
    assert r["coverage"] | {"failures": []} == {"expected": 6, "generated": 6, "scored": 5, "skipped": 1, "failed": 0,
                                                 "missing": 0, "complete": False, "failures": [],
                                                 "reasons": {"score skipped: unparseable reply": 1}}
    assert r["coverage"]["failures"][0]["key"] == "568" and "unparseable" in r["coverage"]["failures"][0]["error"]
    # CULTURE = mean(1.0, 0.2), TIME = 0.5, SPACE skipped (absent, not 0), BIOLOGY = 0.7, CHEMISTRY = 0
    assert r["breakdown"] == pytest.approx({"CULTURE": 0.6, "TIME": 0.5, "BIOLOGY": 0.7, "CHEMISTRY": 0.0})
    assert r["overall"] is None  # the official overall needs all 1,000 ids
    weights = {"CULTURE": 0.4, "TIME": 0.167, "BIOLOGY": 0.1, "CHEMISTRY": 0.1}
    assert r["overall_over_scored"] == pytest.approx(sum(weights[c] * v for c, v in r["breakdown"].items())
                                                     / sum(weights.values()))
    assert "open judge, not comparable" in res["label"] and "paraphrased judge prompt" in res["label"]
    md = (tmp_path / "eval" / "wise" / "results.md").read_text()
    assert "| 1 | 0.60 | 0.50 | – | 0.70 | – | 0.00 |" in md and "1 skipped" in md
    assert "NFE 1: 1 × score skipped: unparseable reply" in md  # why it is incomplete, not only that it is
    assert (tmp_path / "eval" / "wise" / "nfe1" / "images" / "701.png").is_file()
    # A rerun re-asks the judge for the skipped image only (official: parse failures are re-run).
    server.script[prompts[568]] = ["Consistency: 1\nRealism: 1\nAesthetic Quality: 1"]
    again = evaluate(cfg)["wise"]
    assert again["pool"]["score"]["tasks"] == 1 and again["nfe"]["1"]["coverage"]["complete"]
    assert again["nfe"]["1"]["breakdown"]["SPACE"] == pytest.approx(0.5)
