"""The paper in miniature: a small *pretrained* Qwen-Image base for the digits, built here on real
data, that the TwinFlow path distils exactly as it distils Qwen/Qwen-Image.

    recipe.py   BaseRecipe (what changes the built model; its hash names the cache folder), presets
    vae.py      training the tiny AutoencoderKLQwenImage on the digits; reconstruction accuracy
    base.py     the staged, resumable build (data -> VAE -> pipeline -> latent cache -> pretraining ->
                a plain diffusers folder -> report) and the twinflow.named providers of digits-base
Jobs: jobs/build_base.py (the build), jobs/mini_paper.py (the table), jobs/bench_pretrain.py.
"""
