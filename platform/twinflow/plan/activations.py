"""Activation bytes of the Qwen-Image transformer, derived from one dual-stream block's structure.

Both streams (image tokens and text tokens) run the same block body, so everything is per token
and per block. Notation: D = heads × head_dim (3072 for 20B), F = 4·D (the GELU MLP), H = heads,
a = bytes of the compute dtype (2 for bf16), l = bytes of the LoRA weights (4 for fp32), r = rank.

Tensors autograd keeps for backward, per token per block (read off diffusers' block and
attention processor, and checked one by one with ``torch.autograd.graph.saved_tensors_hooks``;
tests/test_plan_calibration.py re-measures the sum):

  tensor                                   full            LoRA (base frozen)
  img_norm1 input (block input)            a·D             a·D   (not block 0: its input needs no grad)
  img_norm1 output (× (1 + scale))         a·D             a·D
  modulated input of to_q/k/v              a·D             — (frozen linear keeps no input)
  q, k projections (RMSNorm input)         2·a·D           2·a·D
  q, k fp32 copies (RMSNorm's pow)         2·4·D           2·4·D (0 when a = 4)
  q, k normalised (× norm weight)          2·a·D           — (frozen norm weight)
  joint q, k, v and SDPA output            4·a·D           4·a·D
  attention output (input of to_out)       — (a view of the SDPA output, already kept)
  to_out output (× gate)                   a·D             a·D
  img_norm2 input, its output              2·a·D           2·a·D
  modulated input of the MLP               a·D             —
  GELU input, GELU output                  2·a·F           a·F (input only)
  MLP output (× gate)                      a·D             a·D
  LoRA: fp32 copy of each wrapped          —               l·in per wrapped linear (PEFT casts the
        linear's input, lora_A output                      input to the adapter dtype) + l·r
  small: RMSNorm rsqrt, LayerNorm stats, SDPA log-sum-exp: 12·H + 16 bytes

Full bf16: 16·a·D + 8·D + 2·a·F = 56·D bytes per token per block (≈ 168 KiB at D = 3072).
LoRA bf16 + fp32 adapters on all 14 targets: 12·a·D + 8·D + a·F + 4·(5·D + F) = 76·D.
With gradient checkpointing each block keeps only its inputs (a·D per token); during backward
one block at a time is recomputed with the full set above.

Working sets (transients, not saved): a no-grad forward's largest live set inside one block is
its Python locals (seven D-wide tensors of both streams) plus the MLP's F-wide tensors; with
fp32 LoRA on the MLP's first linear PEFT adds three fp32 F-wide tensors there (the adapter
output, its scaled copy and the upcast sum). Backward frees saved tensors as it goes: on top of
the block's saved set only the residual gradient (a·D) and, with fp32 LoRA, the fp32 gradient of
the MLP's F-wide input (l·F) are live.
These two were derived the same way and their constants checked against measured peaks
(CPU allocator events, ``measure.PeakMemory``) on 2–6-layer models: see the calibration test.
Outside the blocks: img_in/txt_norm/txt_in/norm_out/proj_out keep a handful of tensors per
token (listed in ``outside_saved_per_token``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Block-relative module names of each stream's linears, grouped by the tensor they read.
_SITES = {
    "qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    "out": (("attn.to_out.0",), ("attn.to_add_out",)),
    "mlp_in": (("img_mlp.net.0.proj",), ("txt_mlp.net.0.proj",)),
    "mlp_out": (("img_mlp.net.2",), ("txt_mlp.net.2",)),
}
SMALL_PER_TOKEN_CONST = 16


@dataclass(frozen=True)
class BlockShape:
    dim: int
    """D = heads × head_dim."""
    heads: int
    layers: int
    text_dim: int
    """joint_attention_dim (3584: Qwen2.5-VL's hidden size)."""
    in_channels: int
    out_channels: int
    mlp_mult: int = 4

    @property
    def ffn(self) -> int:
        return self.mlp_mult * self.dim

    @staticmethod
    def from_architecture(arch: dict[str, Any]) -> "BlockShape":
        return BlockShape(dim=int(arch["num_attention_heads"]) * int(arch["attention_head_dim"]),
                          heads=int(arch["num_attention_heads"]), layers=int(arch["num_layers"]),
                          text_dim=int(arch["joint_attention_dim"]), in_channels=int(arch["in_channels"]),
                          out_channels=int(arch.get("out_channels") or arch["in_channels"]))


@dataclass(frozen=True)
class ActivationModel:
    """Bytes of activations for one model shape, training mode and dtype."""

    shape: BlockShape
    mode: str = "lora"
    act_bytes: int = 2
    lora_bytes: int = 4
    lora_rank: int = 64
    wrapped: frozenset[str] = frozenset()
    """Block-relative names of the linears that carry a LoRA adapter (``lora_sites``)."""
    gradient_checkpointing: bool = True

    # ---- per token, per block -------------------------------------------------------------

    def _site_wrapped(self, site: str, stream: int) -> list[str]:
        return [n for n in _SITES[site][stream] if n in self.wrapped]

    def block_saved_per_token(self, stream: int = 0, first_block: bool = False) -> float:
        """Bytes autograd keeps per token of ``stream`` (0 image, 1 text) in one block (no GC)."""
        a, D, F, lb = self.act_bytes, self.shape.dim, self.shape.ffn, self.lora_bytes
        full = self.mode == "full"
        fp32_qk = 0 if a == 4 else 2 * 4 * D
        total = 0.0
        if full or not first_block:
            total += a * D                        # norm1 input = block input
        total += a * D                            # norm1 output (× (1 + scale))
        total += 2 * a * D + fp32_qk              # q, k projections and their fp32 copies
        total += 4 * a * D                        # joint q, k, v, SDPA output
        total += a * D                            # to_out output (× gate)
        total += 2 * a * D                        # norm2 input and output
        total += a * F                            # GELU input
        total += a * D                            # MLP output (× gate)
        total += 12 * self.shape.heads + SMALL_PER_TOKEN_CONST
        if full:
            # inputs of the trained linears (to_out's is a view of the SDPA output: no extra), q/k normalised
            total += a * D + 2 * a * D + a * D + a * F
            return total
        widths = {"qkv": D, "out": D, "mlp_in": D, "mlp_out": F}
        for site, width in widths.items():
            names = self._site_wrapped(site, stream)
            if not names:
                continue
            if lb != a:
                total += len(names) * lb * width  # PEFT's cast copy per wrapped linear
            elif site != "out":                   # to_out's input is a view of the SDPA output
                total += a * width                # the (shared) input itself, kept once
            total += len(names) * lb * self.lora_rank
        return total

    def block_saved(self, img_tokens: int, txt_tokens: int, first_block: bool = False) -> float:
        return (img_tokens * self.block_saved_per_token(0, first_block)
                + txt_tokens * self.block_saved_per_token(1, first_block))

    # ---- outside the blocks ----------------------------------------------------------------

    def outside_saved_per_token(self) -> tuple[float, float]:
        """(per image token, per text token): img_in/txt_norm/txt_in/norm_out/proj_out."""
        a, D = self.act_bytes, self.shape.dim
        rope = 4 * (D // self.shape.heads)  # the image RoPE table (complex64, head_dim/2), once per forward
        if self.mode == "full":
            return 3 * a * D + a * self.shape.in_channels + rope, 2 * a * self.shape.text_dim
        return 2 * a * D + rope, 0.0

    # ---- a whole forward ---------------------------------------------------------------------

    def saved_outside(self, img_tokens: int, txt_tokens: int, rows: int) -> float:
        img, txt = self.outside_saved_per_token()
        return rows * (img_tokens * img + txt_tokens * txt)

    def saved(self, img_tokens: int, txt_tokens: int, rows: int) -> float:
        """Bytes kept from a grad forward of ``rows`` samples until its backward."""
        outside = self.saved_outside(img_tokens, txt_tokens, 1)
        if self.gradient_checkpointing:
            blocks = self.shape.layers * (img_tokens + txt_tokens) * self.act_bytes * self.shape.dim
        else:
            blocks = (self.block_saved(img_tokens, txt_tokens, first_block=True)
                      + (self.shape.layers - 1) * self.block_saved(img_tokens, txt_tokens))
        return rows * (outside + blocks)

    def nograd_working_set(self, img_tokens: int, txt_tokens: int, rows: int) -> float:
        """Largest live set of one forward under no_grad (also the recompute-free part of a
        checkpointed grad forward), in bytes."""
        a, D, F, lb = self.act_bytes, self.shape.dim, self.shape.ffn, self.lora_bytes
        per_token = 7 * a * D + 2 * a * F
        if self.mode == "lora" and lb != a and self._site_wrapped("mlp_in", 0):
            per_token = 7 * a * D + a * F + 3 * lb * F
        return rows * (img_tokens + txt_tokens) * per_token

    def grad_forward_transient(self, img_tokens: int, txt_tokens: int, rows: int) -> float:
        """Largest short-lived set on top of the saved tensors during the grad forward: under
        checkpointing the block runs like a no-grad forward; otherwise only what is not saved
        (GELU's F-wide output copy; PEFT's fp32 F-wide adapter output and sum on the MLP input)."""
        if self.gradient_checkpointing:
            return self.nograd_working_set(img_tokens, txt_tokens, rows)
        a, F, lb = self.act_bytes, self.shape.ffn, self.lora_bytes
        per_token = a * F
        if self.mode == "lora" and lb != a and self._site_wrapped("mlp_in", 0):
            per_token = 2 * lb * F
        return rows * (img_tokens + txt_tokens) * per_token

    def backward_working_set(self, img_tokens: int, txt_tokens: int, rows: int) -> float:
        """Gradient tensors live while one block is back-propagated (+ its recompute under GC)."""
        a, D, F, lb = self.act_bytes, self.shape.dim, self.shape.ffn, self.lora_bytes
        # Backward frees each saved tensor as soon as its op is done, so on top of the block's
        # saved set only the running residual gradient stays (a·D). PEFT adds the fp32 gradient
        # of the wrapped linear's input (F-wide for the MLP's second linear) before it is cast back.
        per_token = a * D
        if self.mode == "lora" and lb != a:
            wide = F if self._site_wrapped("mlp_out", 0) else D if self.wrapped else 0
            per_token += lb * wide
        grads = rows * (img_tokens + txt_tokens) * per_token
        recompute = rows * self.block_saved(img_tokens, txt_tokens) if self.gradient_checkpointing else 0.0
        return grads + recompute

    def table(self) -> list[tuple[str, float]]:
        """(what, bytes per token) rows for reports, in units of one image token."""
        img, _ = self.outside_saved_per_token()
        return [("saved per block (no GC)", self.block_saved_per_token(0)),
                ("saved per block (GC: block input)", float(self.act_bytes * self.shape.dim)),
                ("outside blocks", img),
                ("no-grad working set", self.nograd_working_set(1, 0, 1)),
                ("backward working set", self.backward_working_set(1, 0, 1))]


def lora_sites(architecture: dict[str, Any], targets: list[str] | tuple[str, ...]) -> frozenset[str]:
    """Block-relative names of block 0's linears that ``targets`` wrap (PEFT suffix rule)."""
    names = [n for group in _SITES.values() for stream in group for n in stream]

    def matches(name: str, target: str) -> bool:
        full = f"transformer_blocks.0.{name}"
        return full == target or full.endswith("." + target)

    return frozenset(n for n in names if any(matches(n, t) for t in targets))
