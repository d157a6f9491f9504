"""Model families behind one contract, each exposing F(x_t, t, r, cond) with signed time.

  backbone.py       the contract a family implements (classes, velocity, encode side, LoRA targets, sizes)
  families.py       the registry: model.family or a folder's model_index.json -> its backbone
  target_time.py    E2 for any diffusers transformer (temb = E1(t) + (t − r)·E2(r))
  loading.py        build / load / stream into ZeRO-3, any family;  saving.py: the TwinFlow pipeline folder
  qwen_backbone.py  Qwen-Image: qwen_image.py (transformer + E2), qwen_velocity.py, qwen_encode.py,
                    pipeline.py (TwinFlowPipelineMixin + TwinFlowQwenImagePipeline), tiny_qwen.py
  sana.py           SANA, the whole family in one module
  lora.py           LoRA targets/settings, adapter switching, LoRA-EMA and frozen teachers, merge
  config.py         ModelConfig (the ``model:`` config section)
  toy.py            ToyMLP (2-D mixture), DigitsNet (8×8 digits)

Import the submodules directly; this package imports nothing heavy.
"""
