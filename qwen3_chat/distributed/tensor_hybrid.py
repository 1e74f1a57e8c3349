"""How tensor parallel splits the hybrid Qwen3 family (Qwen3-Next, Qwen3.5).

Gated attention splits as Qwen3's does (q_proj holds each head's query and gate side by
side, so whole heads are contiguous rows). Gated DeltaNet splits by key-head groups: each
rank takes num_k_heads/size key heads and the num_v_heads/num_k_heads value heads each one
serves (they are consecutive: gated_delta repeats each key head over its value heads).
"""

from __future__ import annotations

from qwen3_chat.models.hybrid_config import HybridConfig

# How a tensor is split: (axis, sizes of the consecutive parts along it); each rank takes
# its 1/size share of every part.
Plan = tuple[int, tuple[int, ...]]
# Split as well as the dense fields: the Gated DeltaNet heads and the shared expert's width.
HYBRID_SPLIT_FIELDS = (
    "linear_num_key_heads",
    "linear_num_value_heads",
    "shared_expert_intermediate_size",
)
# Gated DeltaNet tensors split by output rows (axis 0), each one a single block of heads:
# Qwen3-Next's fused in_proj_qkvz / in_proj_ba are already grouped per key head
# ([nk, (q, k, v, z)] and [nk, (b, a)]); Qwen3.5's z, b, a and A_log, dt_bias are per
# value head.
LINEAR_ROWS = ("in_proj_qkvz", "in_proj_ba", "in_proj_z", "in_proj_b", "in_proj_a",
               "A_log", "dt_bias")  # fmt: skip
# The q | k | v channels, one after the other: each part is split by heads on its own.
LINEAR_QKV = ("in_proj_qkv", "conv1d")


def hybrid_dims(config: HybridConfig) -> tuple[dict[str, int], dict[str, int]]:
    """(the head counts and widths that must divide by the rank count, the input width of
    each projection split by columns), only of the blocks some layer has."""
    moe = [config.is_moe_layer(i) for i in range(config.num_hidden_layers)]
    dims = {"attention heads": config.num_attention_heads,
            "KV heads": config.num_key_value_heads,
            "linear key heads": config.linear_num_key_heads,
            "linear value heads": config.linear_num_value_heads}  # fmt: skip
    inputs = {"o_proj": config.num_attention_heads * config.head_dim,  # type: ignore[operator]
              "out_proj": config.linear_num_value_heads * config.linear_value_head_dim}  # fmt: skip
    if not all(moe):
        dims["MLP width"] = inputs["down_proj"] = config.intermediate_size
    if any(moe):
        dims["expert width"] = inputs["experts' down_proj"] = config.moe_intermediate_size
        dims["shared expert width"] = config.shared_expert_intermediate_size
        inputs["shared expert's down_proj"] = config.shared_expert_intermediate_size
    return dims, inputs


def linear_attn_plan(module: str, param: str, shape: tuple[int, ...],
                     config: HybridConfig) -> Plan | None:  # fmt: skip
    """How a Gated DeltaNet tensor (`module`.`param`) is split; None for one every rank
    holds whole (the gated norm's weight is per value-head channel, shared by all heads)."""
    name = param if module.endswith("linear_attn") else module.rpartition(".")[2]
    if name in LINEAR_QKV:  # packed or not, conv [C, K, 1] or Linear [C, H]: rows
        key_dim = config.linear_num_key_heads * config.linear_key_head_dim
        value_dim = config.linear_num_value_heads * config.linear_value_head_dim
        return 0, (key_dim, key_dim, value_dim)
    if name in LINEAR_ROWS:
        return 0, (shape[0],)
    if name == "out_proj":
        return -1, (shape[-1],)
    return None
