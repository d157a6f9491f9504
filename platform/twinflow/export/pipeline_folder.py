"""The trained transformer as a plain module, for a TwinFlow pipeline folder of its family around it.

    transformer = build_transformer(weights, base_path, dtype)
    twinflow.models.saving.save_pipeline(transformer, base_path, folder, presets, default_steps, dtype)

LoRA runs: the base transformer is loaded from the run's base model, the "default" adapter is added
with the run's settings (rank, alpha, targets), the trained LoRA + E2 are loaded into it (strict)
and folded into the base weights (``twinflow.models.lora.merge_lora``): a plain transformer.
Full runs: a meta-device skeleton from the base model's transformer config takes the trained
tensors as they are (``assign=True``): no second copy of 20B weights is ever materialised.

The pipeline folder is the base model's folder (VAE, text encoder, tokenizer, scheduler) with the
trained transformer, saved by diffusers; ``model_index.json`` carries the sampler presets and the
default NFE, so ``TwinFlowQwenImagePipeline.from_pretrained(folder)(prompt)`` (or the family's) samples as
trained. The family is the base model's (models/families.py).
"""

from __future__ import annotations

import torch

from twinflow.export.sources import ExportError, TrainedWeights, materialise


def build_transformer(weights: TrainedWeights, base_path: str, dtype: torch.dtype):
    """The trained TwinFlow transformer of the base model's family on CPU in ``dtype`` (eval mode, no grad)."""
    if weights.lora is not None:
        model = _merged_lora(weights, base_path, dtype)
    elif weights.transformer_dir is not None:
        from twinflow.models.loading import load_twinflow_transformer

        model = load_twinflow_transformer(weights.transformer_dir, subfolder=None, torch_dtype=dtype)
    else:
        model = _assembled(weights, base_path, dtype)
    return model.requires_grad_(False).eval()


def _merged_lora(weights: TrainedWeights, base_path: str, dtype: torch.dtype):
    from twinflow.models.lora import load_lora_state_dict, merge_lora
    from twinflow.models.loading import load_twinflow_transformer

    settings = weights.source.config.model.lora
    model = load_twinflow_transformer(base_path, subfolder=weights.source.config.model.subfolder or None,
                                      torch_dtype=dtype, lora=settings)
    try:
        load_lora_state_dict(model, weights.lora)
    except (KeyError, RuntimeError) as exc:
        raise ExportError(f"the trained LoRA does not fit the base model {base_path} with the run's LoRA settings "
                          f"(rank {settings.rank}, {len(settings.targets) or 'default'} targets): "
                          f"{str(exc).splitlines()[0][:300]}; "
                          f"is --base-model the model the run trained on?") from None
    return merge_lora(model, dtype=dtype)


def _assembled(weights: TrainedWeights, base_path: str, dtype: torch.dtype):
    from accelerate import init_empty_weights

    from twinflow.models.families import backbone_for
    from twinflow.models.loading import build_twinflow_transformer

    subfolder = weights.source.config.model.subfolder or None
    cls = backbone_for(str(base_path)).transformer_class()
    model = build_twinflow_transformer(cls.load_config(base_path, subfolder=subfolder),
                                       init_context=init_empty_weights(), cls=cls)
    expected = set(model.state_dict())
    given = set(weights.transformer)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ExportError(f"the checkpoint's weights do not match the base model {base_path}'s transformer: missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}; is --base-model the model the run trained on?")
    # One tensor at a time: a lazy ZeRO value is stitched from the rank shards and cast right away.
    state = {}
    for name in list(weights.transformer):
        state[name] = materialise(weights.transformer[name], dtype)
    model.load_state_dict(state, strict=True, assign=True)
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise ExportError(f"the checkpoint does not set {meta[:3]} of the transformer")
    return model

