"""The benchmarks' scoring rules on hand-built cases taken from the official rules (BENCHMARKS.md)."""

from __future__ import annotations

import pytest
import torch

from evals.dpg import rules as dpg
from evals.geneval import rules as ge
from evals.geneval.models import class_index_map, instances_from_logits, masks_to_boxes
from evals.prompts import git_blob_sha1
from evals.wise import rules as wise

D = ge.Detection


# ----------------------------------------------------------------------------------------------
# GenEval
# ----------------------------------------------------------------------------------------------

def _counting(n):
    return {"tag": "counting", "include": [{"class": "cat", "count": n}], "exclude": [{"class": "cat", "count": n + 1}]}


def test_counting_uses_the_09_threshold_and_exclude_enforces_exactly_n():
    boxes = [(0, 0, 10, 10), (20, 0, 30, 10), (40, 0, 50, 10)]
    two_confident = {"cat": [D(boxes[0], 0.99), D(boxes[1], 0.95), D(boxes[2], 0.89)]}
    assert ge.evaluate_image(_counting(2), two_confident) == (True, "")
    # The third cat at 0.91 clears 0.9: three are found, and exclude {cat, 3} fails the image.
    three = {"cat": [D(boxes[0], 0.99), D(boxes[1], 0.95), D(boxes[2], 0.91)]}
    ok, reason = ge.evaluate_image(_counting(2), three)
    assert not ok and reason == "expected cat<3, found 3"
    # Asking for 3 with only two above 0.9 fails on the include side.
    ok, reason = ge.evaluate_image(_counting(3), two_confident)
    assert not ok and reason.startswith("expected cat>=3, found 2")
    # Outside the counting tag the threshold is 0.3, so the 0.89 cat counts.
    kept = ge.keep_detections(two_confident, "two_object")
    assert len(kept["cat"]) == 3


def test_threshold_is_strict_and_objects_are_capped_at_16_best_first():
    dets = {"cup": [D((i, 0, i + 5, 5), 0.3 + 0.01 * i) for i in range(20)], "fork": [D((0, 0, 1, 1), 0.3)]}
    kept = ge.keep_detections(dets, "single_object")
    assert "fork" not in kept  # exactly 0.3 is not > 0.3
    assert len(kept["cup"]) == 16
    assert [d.score for d in kept["cup"]] == sorted((d.score for d in dets["cup"] if d.score > 0.3), reverse=True)[:16]
    # The cap also bounds what exclude sees: 19 candidates above threshold, but only 16 are counted.
    meta = {"tag": "single_object", "include": [{"class": "cup", "count": 1}], "exclude": [{"class": "cup", "count": 17}]}
    assert ge.evaluate_image(meta, dets)[0]


def test_nms_is_off_at_iou_1_and_greedy_below():
    dets = {"dog": [D((0, 0, 10, 10), 0.9), D((1, 1, 10, 10), 0.8), D((50, 50, 60, 60), 0.7)]}
    assert len(ge.keep_detections(dets, "single_object")["dog"]) == 3
    with_nms = ge.keep_detections(dets, "single_object", ge.GenEvalRules(nms_threshold=0.5))
    assert [d.score for d in with_nms["dog"]] == [0.9, 0.7]
    # Pixel-inclusive IoU: two identical 1-px boxes overlap fully.
    assert ge.box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 1.0


@pytest.mark.parametrize("a, b, expected", [
    ((0, 0, 10, 10), (20, 0, 30, 10), {"left of"}),
    ((20, 0, 30, 10), (0, 0, 10, 10), {"right of"}),
    ((0, 0, 10, 10), (0, 20, 10, 30), {"above"}),
    ((0, 20, 10, 30), (0, 0, 10, 10), {"below"}),
    ((0, 0, 10, 10), (30, 30, 40, 40), {"left of", "above"}),
    # offset 1 px, dead zone 0.1*(10+10) = 2 px: both shrunk components are 0 -> no relation
    ((0, 0, 10, 10), (1, 0, 11, 10), set()),
    # offset 3 px: shrunk to 1, divided by the ORIGINAL norm 3 -> 0.33, not beyond 0.5
    ((0, 0, 10, 10), (3, 0, 13, 10), set()),
    # offset 5 px: (5 - 2) / 5 = 0.6 -> left of
    ((0, 0, 10, 10), (5, 0, 15, 10), {"left of"}),
    # identical boxes: zero offset, no relation and no division by zero
    ((0, 0, 10, 10), (0, 0, 10, 10), set()),
])
def test_relative_position_with_margin(a, b, expected):
    assert ge.relative_position(D(a, 1.0), D(b, 1.0)) == expected


def _position(rel):
    # "a photo of a cat <rel> a dog": include[0] is the reference (dog), include[1] the cat
    return {"tag": "position", "include": [{"class": "dog", "count": 1},
                                           {"class": "cat", "count": 1, "position": [rel, 0]}]}


def test_position_rule_against_the_referenced_group():
    dog, left, right = D((20, 0, 30, 10), 0.9), D((0, 0, 10, 10), 0.8), D((40, 0, 50, 10), 0.5)
    assert ge.evaluate_image(_position("left of"), {"dog": [dog], "cat": [left]}) == (True, "")
    ok, reason = ge.evaluate_image(_position("right of"), {"dog": [dog], "cat": [left]})
    assert not ok and reason == "expected cat right of target, found left of target"
    # Only the top-n (here n=1) cat is judged: the lower-scored cat on the right does not matter.
    assert ge.evaluate_image(_position("left of"), {"dog": [dog], "cat": [left, right]})[0]
    # Reference group failed -> "no target"
    ok, reason = ge.evaluate_image(_position("left of"), {"cat": [left]})
    assert not ok and reason.splitlines() == ["expected dog>=1, found 0", "no target for cat to be left of"]
    # Cat too close to the dog (inside the dead zone) -> no relation at all
    ok, reason = ge.evaluate_image(_position("left of"), {"dog": [dog], "cat": [D((19, 0, 29, 10), 0.9)]})
    assert not ok and reason == "expected cat left of target, found  target"


def test_colour_is_judged_on_the_top_n_only_and_gates_the_position_check():
    calls = []

    def colors(name, dets):
        calls.append((name, [d.score for d in dets]))
        return ["red" if d.box[0] == 0 else "blue" for d in dets]

    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    red_top = {"car": [D((0, 0, 10, 10), 0.9), D((50, 0, 60, 10), 0.8)]}
    assert ge.evaluate_image(meta, red_top, colors) == (True, "")
    assert calls == [("car", [0.9])]  # the second car was never classified
    blue_top = {"car": [D((50, 0, 60, 10), 0.9), D((0, 0, 10, 10), 0.8)]}
    ok, reason = ge.evaluate_image(meta, blue_top, colors)
    assert not ok and reason == "expected red car>=1, found 0 red; and 1 blue"
    # A failed colour check skips the position check of the same entry (only the colour reason).
    meta2 = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                           {"class": "car", "count": 1, "color": "red", "position": ["right of", 0]}]}
    dets = {"dog": [D((20, 0, 30, 10), 0.9)], "car": [D((50, 0, 60, 10), 0.9)]}
    ok, reason = ge.evaluate_image(meta2, dets, colors)
    assert not ok and reason.startswith("expected red car>=1") and "target" not in reason


def test_exclude_counts_kept_detections():
    meta = {"tag": "two_object", "include": [{"class": "cat", "count": 1}], "exclude": [{"class": "dog", "count": 1}]}
    assert ge.evaluate_image(meta, {"cat": [D((0, 0, 5, 5), 0.9)], "dog": [D((9, 9, 12, 12), 0.29)]})[0]
    ok, reason = ge.evaluate_image(meta, {"cat": [D((0, 0, 5, 5), 0.9)], "dog": [D((9, 9, 12, 12), 0.31)]})
    assert not ok and reason == "expected dog<1, found 1"


def test_overall_is_the_mean_of_tag_scores_not_of_images():
    images = [{"tag": "single_object", "correct": True, "prompt_index": i} for i in range(3)]
    images.append({"tag": "counting", "correct": False, "prompt_index": 9})
    res = ge.aggregate(images)
    assert res["per_tag"] == {"single_object": 1.0, "counting": 0.0}
    assert res["overall"] == pytest.approx(0.5)  # the image mean would be 0.75
    assert res["correct_images"] == pytest.approx(0.75)
    assert res["missing_tags"] == ["two_object", "colors", "position", "color_attr"]


def test_mmdet_style_instance_post_processing():
    # 2 queries, 3 classes (+ no-object). Query 0 is confidently class 1 with a mask over the left
    # half of the *resized* image; the padded columns (valid width 4 of 6) are cropped off.
    class_logits = torch.tensor([[0.0, 10.0, 0.0, 0.0], [0.0, 0.0, 0.0, 10.0]])
    mask_logits = torch.full((2, 4, 6), -5.0)
    mask_logits[0, :, :2] = 3.0
    # At the network's own size the mask passes through unchanged: score = p(class) x mean sigmoid in the mask.
    labels, scores, masks, boxes = instances_from_logits(class_logits, mask_logits, input_hw=(4, 6), valid_hw=(4, 4),
                                                         orig_hw=(4, 4), max_per_image=4)
    top = int(scores.argmax())
    p_cls = torch.softmax(class_logits[0], -1)[1]
    assert labels[top] == 1
    assert float(scores[top]) == pytest.approx(float(p_cls * torch.sigmoid(torch.tensor(3.0))), rel=1e-5)
    assert boxes[top].tolist() == [0.0, 0.0, 2.0, 4.0]
    # Resized to an 8x8 original: padded columns are cropped first, so the mask is the left quarter.
    labels, scores, masks, boxes = instances_from_logits(class_logits, mask_logits, input_hw=(4, 6), valid_hw=(4, 4),
                                                         orig_hw=(8, 8), max_per_image=4)
    top = int(scores.argmax())
    assert masks.shape == (4, 8, 8) and masks[top, :, :4].all() and not masks[top, :, 5:].any()
    assert boxes[top].tolist()[1::2] == [0.0, 8.0] and 4.0 <= boxes[top][2] <= 5.0
    assert masks_to_boxes(torch.zeros(1, 3, 3, dtype=torch.bool)).tolist() == [[0, 0, 0, 0]]


def test_class_mapping_uses_hf_aliases_and_refuses_other_label_sets():
    names = ["person", "computer mouse", "tv remote"]
    assert class_index_map({0: "person", 1: "mouse", 2: "remote"}, names) == {0: "person", 1: "computer mouse",
                                                                              2: "tv remote"}
    with pytest.raises(ValueError, match="lack GenEval classes"):
        class_index_map({0: "person", 1: "wall"}, names)
    assert class_index_map({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, names, "by_index")[1] == "computer mouse"


# ----------------------------------------------------------------------------------------------
# DPG-Bench
# ----------------------------------------------------------------------------------------------

def _row(item, qid, dep, tup, q=None):
    return {"item_id": item, "proposition_id": str(qid), "dependency": dep, "tuple": tup,
            "question_natural_language": q or f"{item} q{qid}?"}


# The first CSV row is partiprompts97's proposition 1, as in the real file (ELLA #61).
ROWS = [
    _row("first", 1, "0", "entity - whole (glasses)"),
    _row("first", 2, "1", "attribute - color (glasses, black)"),
    _row("first", 3, "0", "entity - whole (phone)"),
    _row("chain", 1, "0", "entity - whole (cat)"),
    _row("chain", 2, "1", "attribute - color (cat, red)"),
    _row("chain", 3, "2", "relation - spatial (cat, mat, on)"),
    _row("chain", 4, "0", "global - (photo)"),
]


def test_official_mode_skips_the_first_row_and_drops_prompts_that_depend_on_it():
    official = dpg.build_questions(ROWS, "official")
    fixed = dpg.build_questions(ROWS, "fixed")
    assert list(official["first"].questions) == [2, 3] and list(fixed["first"].questions) == [1, 2, 3]
    yes = {q: "yes" for q in (1, 2, 3)}
    res_off = dpg.aggregate(official, {"first": [yes] * 4}, "official")
    assert res_off["dropped"] and "first" in res_off["dropped"] and res_off["overall"] is None
    res_fix = dpg.aggregate(fixed, {"first": [yes] * 4}, "fixed")
    assert res_fix["overall"] == pytest.approx(100.0) and not res_fix["dropped"]


def test_dependency_zeroing_propagates_down_chains_in_csv_order():
    pq = dpg.build_questions(ROWS, "fixed")["chain"]
    score, raw = dpg.tile_score(pq, {1: "no", 2: "yes", 3: "yes", 4: "yes"})
    assert raw == {1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert score == pytest.approx(1 / 4)  # 2 zeroed by 1, 3 zeroed by 2 (already zeroed), 4 stands
    # The update is in place in CSV order: a child listed before its parent sees the parent's raw value.
    reordered = [ROWS[5], ROWS[4], ROWS[3], ROWS[6]]  # q3 (dep 2), q2 (dep 1), q1, q4
    pq2 = dpg.build_questions([ROWS[0]] + reordered, "official")["chain"]
    score2, _ = dpg.tile_score(pq2, {1: "no", 2: "yes", 3: "yes", 4: "yes"})
    assert score2 == pytest.approx(2 / 4)  # q3 kept (q2 was still 1 when q3 was visited), q2 zeroed


def test_only_the_exact_string_yes_scores():
    assert dpg.raw_scores({1: "yes", 2: "Yes", 3: "yes.", 4: " yes", 5: "no"}) == {1: 1.0, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.0}


def test_tiles_average_and_categories_follow_the_mode():
    prompts = dpg.build_questions(ROWS, "fixed")
    tiles = [{1: "yes", 2: "yes", 3: "yes", 4: "yes"}, {1: "no", 2: "yes", 3: "yes", 4: "no"},
             {1: "yes", 2: "no", 3: "yes", 4: "yes"}, {1: "yes", 2: "yes", 3: "no", 4: "yes"}]
    # tile scores (dependency-adjusted): 1, 0 (1 no -> 2,3 zero; 4 no), 0.5 (2 no -> 3 zero), 0.75
    res = dpg.score_prompt(prompts["chain"], tiles, "official")
    assert res["tile_scores"] == pytest.approx([1.0, 0.0, 0.5, 0.75])
    assert res["score"] == pytest.approx(2.25 / 4)
    # official: raw answers of the LAST tile only, no dependency rule
    assert res["category_raw"] == {1: 1.0, 2: 1.0, 3: 0.0, 4: 1.0}
    fixed = dpg.score_prompt(prompts["chain"], tiles, "fixed")
    assert fixed["category_raw"] == pytest.approx({1: 0.75, 2: 0.75, 3: 0.75, 4: 0.75})
    agg = dpg.aggregate(dpg.build_questions(ROWS, "official"), {"chain": tiles}, "official")
    assert agg["overall"] == pytest.approx(100 * 2.25 / 4)
    assert agg["l2"]["relation - spatial"] == 0.0 and agg["l2"]["attribute - color"] == 100.0
    assert agg["l1"] == {"global": 100.0, "entity": 100.0, "attribute": 100.0, "relation": 0.0}


def test_csv_schema_and_hash_checks():
    with pytest.raises(ValueError, match="lacks columns"):
        dpg.read_rows("item_id,text\nx,y\n")
    rows = dpg.read_rows("item_id,proposition_id,dependency,tuple,question_natural_language\n"
                         'a,1,0,"entity - whole (x)",is there x?\na,2,"1,0","attribute - color (x, red)",is x red?\n')
    assert dpg.build_questions(rows, "fixed")["a"].questions[2].parents == [1, 0]
    assert git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object`


# ----------------------------------------------------------------------------------------------
# WISE
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, expected", [
    ("Consistency: 2\nRealism: 1\nAesthetic Quality: 0", {"consistency": 2, "realism": 1, "aesthetic_quality": 0}),
    ("consistency 1, realism 2, AESTHETIC QUALITY 1", {"consistency": 1, "realism": 2, "aesthetic_quality": 1}),
    ("**Consistency:** 1\n**Realism:** 1\n**Aesthetic Quality:** 2",
     {"consistency": 1, "realism": 1, "aesthetic_quality": 2}),
    ("<think>Consistency: 0 maybe</think>Consistency: 2\nRealism: 2\nAesthetic Quality: 2",
     {"consistency": 2, "realism": 2, "aesthetic_quality": 2}),
    ("2\n1\n1", {"consistency": 2, "realism": 1, "aesthetic_quality": 1}),  # bare-lines fallback
    ("Consistency: 2\nRealism: 1", None),                                     # a key missing
    ("Consistency: 3\nRealism: 1\nAesthetic Quality: 1", None),               # not a 0-2 grade
    ("1\n2", None),
    ("The image is lovely.", None),
])
def test_legacy_parser(reply, expected):
    assert wise.parse_legacy(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    ("Score: 1", 1), ("score:0", 0), ("Reasoning...\nScore: 0", 0), ("<think>Score: 0</think>\nScore: 1", 1),
    ("1", 1), ("0\n", 0), ("Score: 2", None), ("The score is 1 because", None), ("1\n0", None), ("", None),
])
def test_verified_parser(reply, expected):
    assert wise.parse_verified(reply) == expected


def test_wiscore_weights():
    assert wise.wiscore({"consistency": 2, "realism": 2, "aesthetic_quality": 2}) == pytest.approx(1.0)
    assert wise.wiscore({"consistency": 2, "realism": 0, "aesthetic_quality": 0}) == pytest.approx(0.7)
    assert wise.wiscore({"consistency": 0, "realism": 1, "aesthetic_quality": 2}) == pytest.approx(0.2)


def test_protocols_have_their_own_ranges_and_weights():
    assert wise.category_of(530, "legacy") == "TIME" and wise.category_of(530, "verified") == "SPACE"
    assert wise.category_of(700, "legacy") == "SPACE" and wise.category_of(700, "verified") == "BIOLOGY"
    for proto in wise.PROTOCOLS:
        assert sum(wise.WEIGHTS[proto].values()) == pytest.approx(1.0)
        covered = sorted(i for lo, hi in wise.RANGES[proto].values() for i in range(lo, hi + 1))
        assert covered == list(range(1, 1001))
    # Full legacy run: category means, then the 0.4/0.167/0.133/0.1/0.1/0.1 weighting.
    scores = {i: (1.0 if wise.category_of(i, "legacy") == "CULTURE" else 0.5) for i in range(1, 1001)}
    res = wise.aggregate(scores, "legacy")
    assert res["complete"] and res["overall"] == pytest.approx(0.4 * 1.0 + 0.6 * 0.5)
    res_v = wise.aggregate({i: float(i > 400) for i in range(1, 1001)}, "verified")
    assert res_v["overall"] == pytest.approx(0.60)


def test_skipped_ids_are_absent_not_zero_and_block_the_official_overall():
    scores = {i: 1.0 for i in range(1, 1001) if i != 5}  # id 5 was skipped after its retries
    res = wise.aggregate(scores, "legacy")
    assert res["overall"] is None and res["missing_ids"] == [5]
    assert res["categories"]["CULTURE"] == 1.0  # not 399/400: skipped is not zero
    assert res["overall_over_scored"] == pytest.approx(1.0)
