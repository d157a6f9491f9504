"""Model-side pieces on tiny random-weight models saved and reloaded with save_pretrained/from_pretrained:
the generator protocol (seeds, layout), the GenEval detector/CLIP port, the VQA backends, the
local VLM judge, and the scorer classes' per-item failure handling. No Ray here."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evals import layout
from evals.geneval.rules import COLORS, Detection
from evals.prompts import Item, geneval_object_names, load_geneval, resolve_data_root

OFFICIAL_ROOT = Path("/work/shared/benchmarks")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from evals.mini_data import write_mini_benchmarks

    return resolve_data_root(str(write_mini_benchmarks(tmp_path_factory.mktemp("benchmarks"))))


def test_loaders_on_the_official_files():
    import os

    from evals.prompts import load_dpg, load_wise

    root = Path(os.environ.get("TWINFLOW_BENCHMARKS_DIR") or OFFICIAL_ROOT)
    if not (root / "geneval").is_dir():
        pytest.skip(f"the official prompt files are not at {root}; set TWINFLOW_BENCHMARKS_DIR to check them")
    items = load_geneval(root)
    assert len(items) == 553 and items[0].key == "00000" and items[0].prompt == "a photo of a bench"
    tags = [it.meta["tag"] for it in items]
    assert {t: tags.count(t) for t in set(tags)} == {"single_object": 80, "two_object": 99, "counting": 80,
                                                     "colors": 94, "position": 100, "color_attr": 100}
    names = geneval_object_names(root)
    from evals.mini_data import COCO80_GENEVAL

    assert tuple(names) == COCO80_GENEVAL
    assert len(load_dpg(root)) == 1065
    legacy, verified = load_wise(root, "legacy"), load_wise(root, "verified")
    assert [it.key for it in legacy] == [str(i) for i in range(1, 1001)] == [it.key for it in verified]
    assert legacy[567].meta["category"] == "SPACE" and verified[567].meta["category"] == "SPACE"
    assert legacy[530].meta["category"] == "TIME" and verified[530].meta["category"] == "SPACE"
    assert len(load_wise(root, "legacy", rewrite=True)) == 1000


def test_wise_json_of_the_other_protocol_is_refused(tmp_path):
    import json

    from evals.mini_data import write_mini_benchmarks
    from evals.prompts import DataError, load_wise

    root = write_mini_benchmarks(tmp_path)
    # Verified-style ids: 'time' prompts at 521-560 fall in SPACE under the verified ranges.
    rows = [{"Prompt": "p", "Explanation": "e", "Category": "time", "Subcategory": "x", "prompt_id": i}
            for i in range(521, 561)]
    (root / "wise" / "data_verified" / "merge.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match="other protocol"):
        load_wise(root, "verified")


@pytest.fixture(scope="module")
def models(tmp_path_factory, data_root):
    from evals.tiny_models import build_all
    from twinflow.models.tiny_qwen import build_tiny_qwen_image

    root = tmp_path_factory.mktemp("tiny-evals")
    out = build_all(root, geneval_object_names(data_root), bias_class="bench", with_qwen_vl=True)
    out["qwen-image"] = build_tiny_qwen_image(root / "qwen-image", "tiny")
    return out


def _noise(seed, size=(48, 64)):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


def test_generator_seeds_are_per_image_and_layouts_match_the_official_scripts(models, tmp_path):
    from evals.generate import GenerationOptions, image_seed, load_generator

    gen = load_generator(models["qwen-image"], "auto", "cpu", GenerationOptions(max_sequence_length=16))
    assert gen.name == "diffusers:QwenImagePipeline"
    s = [image_seed(0, "geneval", "00000", k) for k in range(3)]
    assert len(set(s)) == 3 and s[0] == image_seed(0, "geneval", "00000", 0) != image_seed(1, "geneval", "00000", 0)
    batch = gen(["a photo of a bench", "a photo of a cow"], [s[0], s[1]], 1, (32, 32))
    alone = gen(["a photo of a cow"], [s[1]], 1, (32, 32))
    assert batch[0].size == (32, 32)
    # The image of (prompt, seed) does not depend on what else is in the batch (max abs diff in 8-bit levels).
    assert np.abs(np.asarray(batch[1], float) - np.asarray(alone[0], float)).max() <= 2
    assert np.asarray(batch[0]).tobytes() != np.asarray(batch[1]).tobytes()

    item = Item("00007", "a photo of a cow", {"tag": "single_object", "include": [{"class": "cow", "count": 1}]})
    files = layout.render("geneval", item, batch)
    assert sorted(files) == ["00007/metadata.jsonl", "00007/samples/00000.png", "00007/samples/00001.png"]
    layout.write(tmp_path, files)
    assert layout.is_complete("geneval", tmp_path, item, 2) and not layout.is_complete("geneval", tmp_path, item, 3)
    grid = layout.tile_grid([_noise(i, (32, 32)) for i in range(4)])
    assert grid.size == (64, 64)
    tiles = layout.split_grid(grid)
    assert np.array_equal(np.asarray(tiles[1]), np.asarray(_noise(1, (32, 32))))  # top-right is image 1
    with pytest.raises(ValueError, match="square"):
        layout.split_grid(Image.new("RGB", (64, 32)))


def test_twinflow_generator_is_requested_explicitly_or_by_class_name(models, tmp_path):
    from evals.generate import GenerationOptions, resolve_kind

    # No CFG by default (TwinFlow's 1-NFE setting), said explicitly to diffusers' QwenImagePipeline,
    # whose own default is true_cfg_scale=4.0; true CFG only with a negative prompt.
    assert GenerationOptions().call_kwargs("diffusers") == {"true_cfg_scale": 1.0}
    assert GenerationOptions().call_kwargs("twinflow") == {}
    assert GenerationOptions(true_cfg_scale=4.0, max_sequence_length=64).call_kwargs("twinflow") == {
        "true_cfg_scale": 4.0, "negative_prompt": " ", "max_sequence_length": 64}

    assert resolve_kind(models["qwen-image"], "auto") == "diffusers"
    fake = tmp_path / "tf"
    fake.mkdir()
    (fake / "model_index.json").write_text('{"_class_name": "TwinFlowQwenImagePipeline"}')
    assert resolve_kind(fake, "auto") == "twinflow"
    with pytest.raises(ValueError, match="unknown generator"):
        resolve_kind(fake, "sdxl")


def test_geneval_detector_and_colour_port(models, data_root):
    from evals.geneval.models import ClipColorClassifier, Mask2FormerDetector, color_crop

    names = geneval_object_names(data_root)
    det = Mask2FormerDetector(str(models["mask2former"]), names, "cpu", short_edge=64, long_edge=107)
    images = [_noise(0, (48, 64)), _noise(1, (64, 40))]
    out = det.detect(images)
    assert len(out) == 2
    for im, per_class in zip(images, out):
        benches = per_class["bench"]  # the tiny detector's class bias makes every query a bench
        assert len(benches) == 10 and all(0.3 < d.score < 1 for d in benches)
        assert [d.score for d in benches] == sorted((d.score for d in benches), reverse=True)
        assert benches[0].mask.shape == (im.height, im.width)
        x1, y1, x2, y2 = benches[0].box
        assert 0 <= x1 < x2 <= im.width and 0 <= y1 < y2 <= im.height
        assert all(d.score < 0.3 for k, v in per_class.items() if k != "bench" for d in v)

    clip = ClipColorClassifier(str(models["clip"]), "cpu")
    w = clip.classifier("car")
    assert w.shape[1] == len(COLORS) and np.allclose(w.norm(dim=0).numpy(), 1, atol=1e-5)
    dets = out[0]["bench"][:3]
    colors = clip(images[0], "bench", dets)
    assert len(colors) == 3 and set(colors) <= set(COLORS)
    assert clip(images[0], "bench", dets) == colors  # deterministic
    # Crop: outside the mask is flat #999999, and the crop has the box's size.
    mask = np.zeros((48, 64), bool)
    mask[10:20, 10:30] = True
    crop = color_crop(Image.new("RGB", (64, 48), "red"), Detection((5, 5, 35, 25), 0.9, mask))
    px = np.asarray(crop)
    assert crop.size == (30, 20) and tuple(px[0, 0]) == (0x99, 0x99, 0x99) and tuple(px[10, 10]) == (255, 0, 0)


def test_scorer_fails_one_item_on_a_corrupt_image_and_scores_the_rest(models, data_root):
    from evals.config import GenEvalConfig
    from evals.scorers import GenEvalScorer
    from twinflow.config import to_dict

    cfg = to_dict(GenEvalConfig(detector=str(models["mask2former"]), clip=str(models["clip"]), detector_short_edge=64,
                                detector_long_edge=107))
    scorer = GenEvalScorer(cfg, geneval_object_names(data_root), "cpu", 1)
    items = load_geneval(data_root, limit=2)
    good = [layout.png_bytes(_noise(i, (64, 64))) for i in range(2)]
    tasks = [{"benchmark": "geneval", "nfe": 1, "key": items[0].key, "meta": items[0].meta, "images": good},
             {"benchmark": "geneval", "nfe": 1, "key": items[1].key, "meta": items[1].meta, "images": [b"not a png"]}]
    rec_ok, rec_bad = scorer.process(tasks)
    assert rec_ok["status"] == "scored" and rec_ok["data"]["tag"] == "single_object"
    assert [im["correct"] for im in rec_ok["data"]["images"]] == [True, True]  # prompt 0 is "a photo of a bench"
    assert rec_bad["status"] == "failed" and "UnidentifiedImageError" in rec_bad["error"]


def test_vqa_backends_and_local_judge(models):
    from evals.dpg.vqa import load_vqa
    from evals.wise.judge import LocalVLMJudge, judge_image, judge_prompt

    images = [_noise(i, (40, 40)) for i in range(3)]
    questions = ["is there a cat?", "is the dog blue?", "are there two cows?"]
    blip = load_vqa("blip", str(models["blip"]))
    answers = blip.answer(images, questions)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert blip.answer(images, questions) == answers
    qwen = load_vqa("qwen_vl", str(models["qwen-vl"]))
    yn = qwen.answer(images, questions)
    assert len(yn) == 3 and set(yn) <= {"yes", "no"}
    judge = LocalVLMJudge(str(models["qwen-vl"]), max_new_tokens=8)
    reply = judge.ask(images[0], "system", "Grade it.")
    assert isinstance(reply, str)
    # A random model does not follow the format: the image is skipped after its attempts, not scored 0.
    res = judge_image(judge, "legacy", judge_prompt("legacy"), images[0], "Mooncakes", "round pastries", 2, 0)
    assert res["status"] == "skipped" and res["reason"] == "unparseable reply" and res["attempts"] == 2


def test_png_decode_applies_exif_orientation():
    im = Image.new("RGB", (40, 20), "white")
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    assert layout.decode(buf.getvalue()).size == (20, 40)
