"""TwinFlow on Ray: self-adversarial one/few-step flows for large text-to-image models.

Sub-packages, one per axis of change:
  method/  the TwinFlow objective and any-step sampler (pure torch, nothing distributed)
  models/  network adapters (toy backbones, diffusers Qwen-Image)
  config/  typed config trees (YAML + --set overrides)
  study/   the small-scale study run through Ray Train
"""

__version__ = "0.1.0"
