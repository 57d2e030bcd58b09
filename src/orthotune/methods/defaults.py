"""Each method's default learning rate, and where the number comes from.

A starting rate for AdamW at batch 32 with a 10% warm-up (what the recipes and
``benchmarks/standard_loop.py`` use); ``orthotune finetune --lr auto`` centres its candidates on it.
Measured means: the rate the learning-rate grid chose on dev. Two sources, in this order:

* ``standard loop``: ``benchmarks/results/standard_loop/grid3/`` (issue 22): all-MiniLM-L6-v2 on BANKING77 in
  the plain transformers loop (random head, AdamW, linear schedule, no gradient clipping), each row at its
  default x 1/3, 1, 3, three seeds per point.
* ``quality``: the sweep centre of ``benchmarks/quality.py`` (the recipes' table: base x 1/3, 1, 3 on each
  task's validation split), itself moved 3x where the first session's sweeps chose the top of the grid.

These are the centres of the uniformly swept evaluation table (``benchmarks/results/quality_uniform/``:
every row at its default x 1/3, 1, 3, grown 3x past a winning edge, on the four recipes). No number here lands
within 1 point of the swept best on every task (issue 22, item 3): the text and vision recipes choose 3-27x
the default for most methods, while on the LM the rotations collapse at 3x and LOFT / PSOFT choose 1/3 of it
(LOFT gradient 1/9; that README has the per-method gaps; LoRA's 3x fits all four recipes but not the standard
loop). On a new task ``--lr auto`` is the fallback.
"""

from __future__ import annotations

from typing import Any

#: method -> (default learning rate, where it comes from)
DEFAULT_LR: dict[str, tuple[float, str]] = {
    "lora": (2e-3, "standard loop: dev choice of 6.7e-4 / 2e-3 / 6e-3 for r=8, alpha 16 (at 6e-3 all three seeds stayed at "
                   "chance); the lm_arithmetic and vit_digits recipes use 2e-3; quality's centre is 6e-3 (with gradient "
                   "clipping, which the standard loop has not)"),
    "pissa": (5e-4, "quality: sweep centre (not measured in the standard loop)"),
    "loco": (3e-3, "the rate that collapses nowhere: on the lm_arithmetic recipe (SmolLM2-135M, q/v, k=2 r=3) 3e-3 is "
                   "the swept best (59.5 exact match, seed 0) and 9e-3 collapses the model (24 in float32; 5.7 and 20.7 "
                   "over 3 seeds on bf16 and NF4 bases, benchmarks/results/quantized/quality_lm/); elsewhere 9e-3 was "
                   "better: standard loop 0.913 vs 0.910 at 3e-3 (3 seeds), text 0.928 vs 0.917, ViT 0.897 vs 0.863, DiT "
                   "loss 0.0277 vs 0.0289 (seed 0 sweeps, benchmarks/results/session1/); no fixed rate lands within 1 "
                   "point of every task's best, --lr auto (3e-3 x 1/3, 1, 3) reaches both. Measured where d_in*r*k is about 3,500; the best "
                   "rate falls like 1/sqrt(d_in*r*k) (benchmarks/results/loco_width/, a controlled task), so for much wider "
                   "layers or larger ranks start at 3e-3*sqrt(3456/(d_in*r*k)) (docs/loco.md, 'Width and rank')"),
    "loca": (3e-3, "quality: sweep centre (not measured in the standard loop)"),
    "fourierft": (3e-2, "quality: sweep centre with scaling=150 (not measured in the standard loop)"),
    "oft": (2e-3, "standard loop: dev choice of 6.7e-4 / 2e-3 / 6e-3 for block size 32; quality's centre is 2e-3"),
    "boft": (2e-3, "quality: sweep centre (OFT's family; not measured in the standard loop)"),
    "hra": (2e-3, "quality: sweep centre (not measured in the standard loop)"),
    "psoft": (2e-3, "quality: sweep centre (not measured in the standard loop)"),
    "goft": (2e-3, "no measurement: OFT's value, the same family of exact rotations"),
}

#: LOFT: the rate depends on the support (a task-aware one lies in high-curvature directions)
LOFT_LR: dict[str, tuple[float, str]] = {
    "gradient": (2e-3, "standard loop: dev choice of 6.7e-4 / 2e-3 / 6e-3 for r=112 Cayley with a 100-step head warm-up "
                       "(6e-3 lost 1.6 points); quality's centre for loft-grad is 2e-3"),
    "gradient_coordinate": (2e-3, "no measurement: the gradient support's value (the same first-order selection)"),
    "random": (6e-3, "standard loop: dev choice of 6.7e-4 / 2e-3 / 6e-3 for r=112 Cayley with a head warm-up: 3x the "
                     "gradient support's, which concentrates the rotation where the loss is steepest"),
    "coordinate": (6e-3, "no measurement: the random support's value (a support chosen without the gradient)"),
    "principal": (2e-3, "quality: PSOFT's sweep centre (the principal support); in the standard loop LOFT principal ran "
                        "only at 2e-3"),
    "full": (2e-3, "OFT's value: the full support with a Cayley transform is OFT"),
}


def default_lr(config: Any) -> float:
    """The default learning rate of ``config``'s method (for LOFT: of its support); see :data:`DEFAULT_LR`."""
    if config.method == "loft":
        return LOFT_LR[config.support][0]
    if config.method not in DEFAULT_LR:
        raise ValueError(f"method {config.method!r} has no default learning rate; set train.lr")
    return DEFAULT_LR[config.method][0]


def default_lr_source(config: Any) -> str:
    """Where :func:`default_lr`'s number for ``config`` comes from."""
    return (LOFT_LR[config.support] if config.method == "loft" else DEFAULT_LR[config.method])[1]
