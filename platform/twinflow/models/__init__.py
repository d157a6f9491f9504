"""Network adapters exposing F(x_t, t, r, cond) with signed time.

  toy.py          ToyMLP (2-D mixture), DigitsNet (8×8 digits)
  tiny_qwen.py    random-weight Qwen-Image pipeline folders for tests and CPU presets
  qwen_image.py   TwinFlowQwenImageTransformer2DModel (E2 target-time embedder), loaders,
                  QwenImageVelocity (the method's F)
  qwen_encode.py  prompts → condition, pixels ↔ normalised latents, the uncond prompt
  lora.py         LoRA targets/settings, adapter switching, LoRA-EMA and frozen teachers, merge
  config.py       ModelConfig (the ``model:`` config section)
  pipeline.py     TwinFlowQwenImagePipeline (a diffusers pipeline running the any-step sampler)

Import the submodules directly; this package imports nothing heavy.
"""
