"""How much of NF4's rounding error on the LM recipe's q/v weights can a LoCO rotation remove, against a rank-8 correction?

For every fifth layer of SmolLM2-135M-Instruct (the recipe's base), ``Q`` = NF4(W) with double quantisation (bitsandbytes),
``E = W - Q``. A LoCO k2 r3 rotation (the recipe's budget: ``R = exp(S_1) exp(S_2)``, ``S_i = U_i V_i^T - V_i U_i^T``,
``U_i, V_i`` of width x 3: orthotune's ``LoCO`` module in float64), fitted by Adam to minimise ``||W - Q R||``, against the best rank-8 additive
correction (the SVD of ``E``, LoRA r8's budget: LoftQ's one-shot start), the best block-diagonal rotation of OFT b32
(orthogonal Procrustes per 32 x 32 block, OFT's whole budget) and the best full rotation (Procrustes, every degree of
freedom a rotation has). Prints the share of ``||E||`` each leaves.

    python benchmarks/results/quantized/quality_lm_loco_rate/rounding_fit.py     # CPU, a few minutes
"""

from __future__ import annotations

import statistics

import bitsandbytes.functional as bf
import torch

from orthotune import LoCOConfig
from orthotune.methods.loco import LoCO
from orthotune.recipes.assets import smollm2_path


def nf4(W: torch.Tensor) -> torch.Tensor:
    q, state = bf.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    return bf.dequantize_4bit(q, state, quant_type="nf4")


def loco_fit(W: torch.Tensor, Q: torch.Tensor, k: int = 2, r: int = 3, steps: int = 1000) -> float:
    """``min ||W - Q R||`` over orthotune's LoCO rotations (chain ``k``, rank ``r``, float64), as a share of ``||W - Q||``."""
    torch.manual_seed(0)
    loco = LoCO(LoCOConfig(rank=r, chain_length=k), W.shape[1], W.shape[0], W)
    opt = torch.optim.Adam(loco.parameters(), lr=3e-3)
    best = float("inf")
    for _ in range(steps):
        loss = (W - loco.merged_weight(Q)).norm()
        best = min(best, float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return best / float((W - Q).norm())


def procrustes(W: torch.Tensor, Q: torch.Tensor, block: int) -> torch.Tensor:
    """The block-diagonal rotation ``R`` (blocks of ``block`` columns) minimising ``||W - Q R||``, block by block."""
    R = torch.zeros(W.shape[1], W.shape[1], dtype=W.dtype)
    for j in range(0, W.shape[1], block):
        U, _, Vh = torch.linalg.svd(Q[:, j : j + block].T @ W[:, j : j + block])
        R[j : j + block, j : j + block] = U @ Vh
    return R


def main() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.bfloat16)
    rows: dict[str, list[tuple[float, ...]]] = {"q_proj": [], "v_proj": []}
    for i in range(0, len(model.model.layers), 5):
        for name in rows:
            W16 = getattr(model.model.layers[i].self_attn, name).weight.data
            Q, W = nf4(W16).double(), W16.double()
            E = W - Q
            s = torch.linalg.svdvals(E)
            rows[name].append((float(E.norm() / W.norm()), loco_fit(W, Q), float(s[8:].norm() / s.norm()),
                               *(float((W - Q @ procrustes(W, Q, b)).norm() / E.norm()) for b in (32, W.shape[1]))))
            print(f"layer {i} {name}: " + ", ".join(f"{v:.4f}" for v in rows[name][-1]), flush=True)
    print("\n| weight | ||E|| / ||W|| | left by LoCO k2 r3 | left by a rank-8 correction | left by OFT b32's best rotation"
          " | left by the best full rotation |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{statistics.mean(x[j] for x in r):.4f}" for j in range(5)) + " |")


if __name__ == "__main__":
    main()
