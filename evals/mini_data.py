"""A miniature benchmarks folder in the official layouts, for hermetic tests and offline demos.

It mirrors the *schemas* of the real files (BENCHMARKS.md §1.1, §2.1, §3.1) with a handful of
prompts written here, plus the 80 COCO class names in GenEval's spelling (a public fact list).
The real prompt sets are read from the folder ``data_root`` points at; this exists so the test
suite does not depend on that folder being present.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

COCO80_GENEVAL = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign parking_meter "
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee "
    "skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle "
    "wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake "
    "chair couch potted_plant bed dining_table toilet tv laptop computer_mouse tv_remote computer_keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush"
).split()
COCO80_GENEVAL = tuple(n.replace("_", " ") for n in COCO80_GENEVAL)

GENEVAL = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"},
    {"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "dog", "count": 1}],
     "prompt": "a photo of a bench and a dog"},
    {"tag": "counting", "include": [{"class": "bench", "count": 2}], "exclude": [{"class": "bench", "count": 3}],
     "prompt": "a photo of two benches"},
    {"tag": "colors", "include": [{"class": "bench", "count": 1, "color": "red"}], "prompt": "a photo of a red bench"},
    {"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "bench", "count": 1,
                                                                  "position": ["left of", 0]}],
     "prompt": "a photo of a bench left of a cat"},
]

DPG_PROMPTS = {
    "partiprompts97": "An empty room with a pair of glasses floating in mid-air above a small table.",
    "0": "A red cat sleeping on a blue mat next to a wooden chair.",
    "1": "Two white birds perched on a green fence under a cloudy sky.",
}
# (item_id, proposition_id, dependency, tuple, question); the first row belongs to partiprompts97,
# whose proposition 1 the official loader skips (ELLA #61).
DPG_ROWS = [
    ("partiprompts97", 1, "0", "entity - whole (glasses)", "Are there glasses?"),
    ("partiprompts97", 2, "1", "entity - state (glasses, floating)", "Are the glasses floating?"),
    ("partiprompts97", 3, "0", "entity - whole (table)", "Is there a table?"),
    ("0", 1, "0", "entity - whole (cat)", "Is there a cat?"),
    ("0", 2, "1", "attribute - color (cat, red)", "Is the cat red?"),
    ("0", 3, "0", "entity - whole (mat)", "Is there a mat?"),
    ("0", 4, "1,3", "relation - spatial (cat, mat, on)", "Is the cat on the mat?"),
    ("0", 5, "0", "global - (photo)", "Is this a photo?"),
    ("1", 1, "0", "entity - whole (birds)", "Are there birds?"),
    ("1", 2, "1", "other - count (birds, ==2)", "Are there two birds?"),
    ("1", 3, "1", "attribute - color (birds, white)", "Are the birds white?"),
]

WISE_LEGACY = {
    "cultural_common_sense": [(1, "Cultural knowledge", "Festival", "Traditional food of a harvest festival",
                               "Round pastries filled with sweet paste"),
                              (2, "Cultural knowledge", "Sports", "The ball game played at Wimbledon",
                               "Tennis on a grass court")],
    "spatio-temporal_reasoning": [(401, "time", "Horizontal time", "A city street at noon in summer",
                                   "Short shadows and bright light"),
                                  (568, "Space", "geographical location", "The tallest mountain on Earth",
                                   "Mount Everest")],
    "natural_science": [(701, "Biology", "State", "A sunflower at night", "Closed, drooping flower head"),
                        (901, "Chemistry", "Combustion", "Burning magnesium", "A blinding white flame")],
}


def dpg_csv_text() -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["item_id", "text", "keywords", "proposition_id", "dependency", "category_broad",
                "category_detailed", "tuple", "question_natural_language"])
    for item, qid, dep, tup, q in DPG_ROWS:
        cat = tup.split("(")[0].strip()
        w.writerow([item, DPG_PROMPTS[item], "", qid, dep, cat.split("-")[0].strip(), cat, tup, q])
    return buf.getvalue()


def write_mini_benchmarks(root: str | Path) -> Path:
    """Write geneval/, dpg_bench/ (+ dpg_bench.csv), wise/ under ``root``; returns root."""
    root = Path(root)
    gp = root / "geneval" / "prompts"
    gp.mkdir(parents=True, exist_ok=True)
    (gp / "evaluation_metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in GENEVAL))
    (gp / "object_names.txt").write_text("\n".join(COCO80_GENEVAL) + "\n")
    dp = root / "dpg_bench" / "prompts"
    dp.mkdir(parents=True, exist_ok=True)
    for key, text in DPG_PROMPTS.items():
        (dp / f"{key}.txt").write_text(text)
    (root / "dpg_bench" / "dpg_bench.csv").write_text(dpg_csv_text())
    wl = root / "wise" / "WISE_legacy" / "data"
    wl.mkdir(parents=True, exist_ok=True)
    merged = []
    for name, rows in WISE_LEGACY.items():
        objs = [{"Prompt": p, "Explanation": e, "Category": c, "Subcategory": s, "prompt_id": i}
                for i, c, s, p, e in rows]
        (wl / f"{name}.json").write_text(json.dumps(objs))
        merged += objs
    wv = root / "wise" / "data_verified"
    wv.mkdir(parents=True, exist_ok=True)
    (wv / "merge.json").write_text(json.dumps([o for o in merged if o["prompt_id"] <= 400]))
    return root
