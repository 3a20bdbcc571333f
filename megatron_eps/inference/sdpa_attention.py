"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for the local spec.

Why megatron-eps ships this (benchmark harness only, not part of the EPS scheduler):

* Megatron-Core's local ``DotProductAttention`` materialises the full ``[b, heads, s, s]`` score
  matrix: at a 32K-token prompt with 16 heads that is 17 G elements (34 GB in bf16, plus an
  fp32 softmax copy), so DSV2-Lite prefill at 32K cannot run on one 80 GB GPU without TE.
* ``DotProductAttention`` does not accept MLA's ``k_channels``/``v_channels`` constructor
  arguments (0.16.1 and 0.19.2), so Multi-Latent Attention cannot be built from the local spec
  at all; with this module it can (CPU included).

``SDPAttention`` has DotProductAttention's constructor and forward signatures (plus MLA's
``k_channels``/``v_channels``), takes ``[sq, b, heads, d]`` query/key/value and returns
``[sq, b, heads * dv]``. PyTorch picks the kernel (flash / memory-efficient / cuDNN on GPU,
the math kernel on CPU). It is used identically by the stock and the EPS model, so it does not
affect the stock-vs-EPS comparison. Inference only: no dropout, no context parallelism.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """Drop-in core attention (``submodules.core_attention``) backed by torch SDPA."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(config=config)
        if getattr(config, "context_parallel_size", 1) != 1:
            raise ValueError(
                "SDPAttention: context_parallel_size must be 1 "
                f"(got {config.context_parallel_size})"
            )
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.k_channels = k_channels if k_channels is not None else config.kv_channels
        self.v_channels = v_channels if v_channels is not None else config.kv_channels
        if config.num_attention_heads % tp_size or config.num_query_groups % tp_size:
            raise ValueError(
                f"SDPAttention: num_attention_heads={config.num_attention_heads} and "
                f"num_query_groups={config.num_query_groups} must be divisible by "
                f"tensor_model_parallel_size={tp_size}"
            )
        self.heads_per_partition = config.num_attention_heads // tp_size
        self.groups_per_partition = config.num_query_groups // tp_size
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.k_channels)
        )
        # apply_query_key_layer_scaling needs nothing here: Megatron divides the scale by the
        # layer number and multiplies it back inside its fp32 softmax (net factor 1).
        if getattr(config, "window_size", None) is not None:
            raise ValueError("SDPAttention: window_size (sliding-window attention) is not supported")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(
                f"SDPAttention: softmax_type={config.softmax_type!r} is not supported; "
                "allowed value: 'vanilla'"
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
        **kwargs,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("SDPAttention: packed sequences are not supported")
        if attention_bias is not None:
            raise ValueError("SDPAttention: attention_bias is not supported")
        sq, b, nq, dq = query.shape
        sk = key.shape[0]
        dv = value.shape[-1]
        # [s, b, h, d] -> [b, h, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if k.shape[1] != nq:
            rep = nq // k.shape[1]
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        # Equal head dims let the flash kernel run (MLA: q/k 192, v 128 -> pad v to 192).
        pad_v = q.is_cuda and dv != dq and dv < dq
        if pad_v:
            v = F.pad(v, (0, dq - dv))

        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        attn_mask = None
        is_causal = False
        if attention_mask is not None:
            # Megatron masks: True = masked out; SDPA boolean masks: True = attend.
            mask = attention_mask
            if mask.dtype == torch.bool:
                attn_mask = ~mask
            else:
                attn_mask = mask
        elif mask_type == AttnMaskType.causal:
            if sq == sk:
                is_causal = True
            elif sq > 1:
                # Prefill continuing a KV cache: bottom-right aligned causal mask.
                attn_mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(
                    diagonal=sk - sq
                )
            # sq == 1 (decode): the new token attends to everything cached.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.softmax_scale
        )
        if pad_v:
            out = out[..., :dv]
        # [b, h, sq, dv] -> [sq, b, h * dv]
        return out.permute(2, 0, 1, 3).reshape(sq, b, nq * dv)
