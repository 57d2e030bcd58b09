"""LOFT's framework: R = I + P (T - I) P^T for every support x transform, against float64 references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthotune
from orthotune import GOFTConfig, LOFTConfig
from orthotune.methods.loft import transforms
from orthotune.methods.boft import BOFT
from orthotune.methods.goft import GOFT
from orthotune.methods.loco import LoCO, LoCOConfig
from orthotune.methods.loft.rotation import LOFT
from orthotune.methods.loft.supports import CoordinateSupport, DenseSupport, FullSupport

from ..ops.test_loft_ops import givens_dense

from ..method_cases import run

f64 = torch.float64
TRANSFORMS = [
    dict(transform="cayley"),
    dict(transform="cayley", block_size=2),
    dict(transform="exp", generator_rank=2, chain_length=2),
    dict(transform="givens"),
    dict(transform="householder", reflections=4),
    dict(transform="householder", reflections=2),  # narrower than r: the support folds into U = P A
    dict(transform="butterfly", block_size=2, butterfly_factors=3),
]
SUPPORTS = [dict(support="principal", r=8), dict(support="random", r=8), dict(support="coordinate", r=8), dict(support="full")]


def make(d_in: int = 16, d_out: int = 12, **kwargs) -> LOFT:
    cfg = LOFTConfig(init_identity=False, **kwargs)
    W = torch.randn(d_out, d_in)
    LOFT.check_layer(cfg, d_in, d_out, "layer")
    return LOFT(cfg, d_in, d_out, W).double()


def basis(module: LOFT) -> torch.Tensor:
    s = module.support
    if isinstance(s, FullSupport):
        return torch.eye(s.dim, dtype=f64)
    if isinstance(s, CoordinateSupport):
        return torch.eye(module.d_in, dtype=f64)[:, s.index]
    return s.P


@pytest.mark.parametrize("support", SUPPORTS, ids=lambda s: s["support"])
@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: "-".join(str(v) for v in t.values()))
def test_rotation_is_support_times_transform(support: dict, transform: dict) -> None:
    module = make(**support, **transform)
    P = basis(module)
    T = module.transform.matrix().detach()
    eye_r, eye_d = torch.eye(T.shape[0], dtype=f64), torch.eye(module.d_in, dtype=f64)
    assert (P.T @ P - eye_r).abs().max() < 1e-6
    assert (T.T @ T - eye_r).abs().max() < 1e-12
    R = eye_d + P @ (T - eye_r) @ P.T
    assert torch.allclose(module.rotation(), R, atol=1e-12)
    assert (R - eye_d).abs().max() > 1e-3  # it rotates
    x = torch.randn(3, 5, module.d_in, dtype=f64)
    W = torch.randn(module.d_out, module.d_in, dtype=f64)
    assert torch.allclose(run(module, x, lambda z: z @ W.T), x @ (W @ R).T, atol=1e-12)
    assert torch.allclose(module.merged_weight(W), W @ R, atol=1e-12)
    # R^{-1} = R^T relies on P^T P = I, which float32-built supports hold to ~1e-7
    assert torch.allclose(module.unmerged_weight(W @ R), W, atol=1e-5)
    dense_err = float(torch.linalg.matrix_norm(R.T @ R - eye_d) / module.d_in**0.5)
    assert module.diagnostics()["orthogonality_error"] == pytest.approx(dense_err, abs=1e-7)


def test_neumann_transform_unmerges_with_its_inverse() -> None:
    for support in SUPPORTS[1:]:
        module = make(**support, transform="cayley", block_size=4, neumann_terms=3)
        R = module.rotation().detach()
        eye = torch.eye(16, dtype=f64)
        assert (R.T @ R - eye).abs().max() > 1e-6  # not orthogonal: the transpose would not undo it
        W = torch.randn(12, 16, dtype=f64)
        assert torch.allclose(module.unmerged_weight(W @ R), W, atol=1e-10)
        dense_err = float(torch.linalg.matrix_norm(R.T @ R - eye) / 4)
        assert module.diagnostics()["orthogonality_error"] == pytest.approx(dense_err, rel=1e-6)


def test_support_paths_agree() -> None:
    """The same T on the same coordinates: gather/scatter (coordinate) and one form (dense P) agree."""
    coord = make(support="coordinate", r=6, transform="givens")
    dense = copy.deepcopy(coord)
    dense.support, dense.path = DenseSupport(basis(coord).clone()), "one_form"  # the path follows the support
    x = torch.randn(4, 16, dtype=f64)
    assert torch.allclose(run(coord, x, lambda z: z), run(dense, x, lambda z: z), atol=1e-12)


def test_loco_is_loft_with_the_full_support_and_the_exponential() -> None:
    cls_cfg = dict(init_identity=False)
    W = torch.randn(12, 20)
    loco = LoCO(LoCOConfig(rank=3, chain_length=2, **cls_cfg), 20, 12, W)
    loft = LOFT(LOFTConfig(support="full", transform="exp", generator_rank=3, chain_length=2, **cls_cfg), 20, 12, W)
    with torch.no_grad():
        loft.transform.U.copy_(loco.U)
        loft.transform.V.copy_(loco.V)
    x = torch.randn(5, 20)
    assert torch.allclose(run(loft, x, lambda z: z @ W.T), run(loco, x, lambda z: z @ W.T), atol=1e-6)
    assert torch.allclose(loft.merged_weight(W), loco.merged_weight(W), atol=1e-6)


def test_goft_layer_equals_dense_givens_product() -> None:
    W = torch.randn(7, 13, dtype=f64)
    module = GOFT(GOFTConfig(init_identity=False), 13, 7, W.float()).double()
    T = givens_dense(module.transform.theta.detach(), 13)
    x = torch.randn(4, 13, dtype=f64)
    assert torch.allclose(run(module, x, lambda z: z @ W.T), x @ (W @ T).T, atol=1e-12)
    assert torch.allclose(module.merged_weight(W), W @ T, atol=1e-12)


@pytest.mark.parametrize(
    "cfg",
    [
        LOFTConfig(support="random", r=4, transform="householder"),
        LOFTConfig(support="coordinate", r=8, transform="givens"),
        LOFTConfig(support="full", transform="exp"),
        LOFTConfig(support="full", transform="cayley", block_size=4),
        LOFTConfig(support="full", transform="butterfly", block_size=2, butterfly_factors=2),
        LOFTConfig(support="full", transform="givens"),
        orthotune.HRAConfig(r=2),
    ],
    ids=["random-householder", "coordinate-givens", "exp", "oft", "boft", "goft", "hra"],
)
def test_training_path_never_forms_d_by_d(cfg) -> None:
    d = 100_000  # a d x d float32 matrix would need 40 GB
    module = orthotune.METHODS[cfg.method][1](cfg.replace(init_identity=False), d, 4, torch.zeros(4, d))
    W = torch.randn(4, d) / d**0.5
    y = run(module, torch.randn(3, d), lambda z: z @ W.T)
    y.sum().backward()
    assert all(p.grad is not None for p in module.parameters())
    assert module.merged_weight(W).shape == W.shape and module.unmerged_weight(W).shape == W.shape


def test_transforms_leave_module_apply_alone() -> None:
    """``nn.Module.apply(fn)`` recurses into every child: a transform must not shadow it."""
    model = orthotune.get_model(nn.Sequential(nn.Linear(8, 8)), orthotune.OFTConfig(target_modules=["0"], oft_block_size=2))
    seen = []
    model.apply(seen.append)
    assert any(type(m).__name__ == "BlockCayley" for m in seen)


def test_unselected_gradient_support_refuses_to_run() -> None:
    model = orthotune.get_model(nn.Sequential(nn.Linear(8, 8)), LOFTConfig(target_modules=["0"], support="gradient", r=2))
    with pytest.raises(ValueError, match="select_supports"):
        model(torch.randn(2, 8))
    with pytest.raises(ValueError, match="select_supports"):
        model.merge()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(support="full", r=4), "leave r unset"),
        (dict(transform="givens", neumann_terms=5), "neumann_terms applies"),
        (dict(transform="householder", reflections=3), "odd"),
        (dict(support="nowhere"), "support='nowhere' is not supported"),
        (dict(transform="qr"), "transform='qr' is not supported"),
        (dict(r=0), "r must be a positive integer"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LOFTConfig(**kwargs)


@pytest.mark.parametrize(
    "cfg,match",
    [
        (LOFTConfig(r=12), "min\\(d_in, d_out\\)=8"),
        (LOFTConfig(support="random", r=20), "exceeds d_in=16"),
        (LOFTConfig(support="random", r=6, block_size=4), "block size 4 does not divide the rotated dimension 6"),
        (LOFTConfig(support="random", r=12, transform="butterfly", block_size=2, butterfly_factors=3), "divisible by 2\\*2\\^2=8"),
        (LOFTConfig(support="random", r=4, transform="exp", generator_rank=3), "2\\*generator_rank <= 4"),
        (orthotune.OFTConfig(oft_block_size=5), "block size 5 does not divide"),
        (orthotune.OFTConfig(r=3, oft_block_size=0), "r=3 blocks do not divide"),
        (orthotune.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=4), "divisible by 4\\*2\\^3=32"),
        (orthotune.PSOFTConfig(r=10), "PSOFT r=10 exceeds"),
        (orthotune.HRAConfig(r=20, apply_GS=True, init_identity=False), "at most 16 reflections"),
    ],
)
def test_layer_checks_name_the_fix(cfg, match: str) -> None:
    base = nn.Sequential(nn.Linear(16, 8))
    with pytest.raises(ValueError, match=match):
        orthotune.get_model(base, cfg.replace(target_modules=["0"]))
    assert isinstance(base[0], nn.Linear)  # nothing was wrapped


def test_preset_config_validation() -> None:
    with pytest.raises(ValueError, match="exactly one of r"):
        orthotune.OFTConfig(r=4, oft_block_size=4)
    with pytest.raises(ValueError, match="exactly one of boft_block_size"):
        orthotune.BOFTConfig(boft_block_size=0, boft_block_num=0)
    with pytest.raises(ValueError, match="apply_GS=True cannot start at the identity"):
        orthotune.HRAConfig(apply_GS=True)
    with pytest.raises(ValueError, match="odd"):
        orthotune.HRAConfig(r=3)
    with pytest.raises(ValueError, match="psoft_svd='qr' is not supported"):
        orthotune.PSOFTConfig(psoft_svd="qr")


@pytest.mark.parametrize(
    "cfg",
    [orthotune.OFTConfig(oft_block_size=2, module_dropout=0.5), orthotune.BOFTConfig(boft_block_size=2, boft_dropout=0.5)],
    ids=["oft", "boft"],
)
def test_multiplicative_dropout_only_in_training(cfg) -> None:
    torch.manual_seed(0)
    module = orthotune.METHODS[cfg.method][1](cfg.replace(init_identity=False), 16, 16, torch.zeros(16, 16))
    if hasattr(module, "boft_s"):
        nn.init.ones_(module.boft_s)  # keep BOFT's output scale out of the comparison
    x = torch.randn(3, 16)
    eval_out = run(module.eval(), x, lambda z: z)
    train_out = run(module.train(), x, lambda z: z)
    rotated = ~torch.isclose(train_out, x).reshape(3, 8, 2).all(-1).all(0)
    assert int(rotated.sum()) == 4  # half the blocks were the identity
    assert not torch.isclose(eval_out, x).reshape(3, 8, 2).all(-1).all(0).any()


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_boft_composed_blocks_equal_the_factor_path(monkeypatch: pytest.MonkeyPatch, dropout: float) -> None:
    cfg = orthotune.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=3, boft_dropout=dropout, init_identity=False)
    composed = BOFT(cfg, 32, 32, torch.zeros(32, 32)).double()  # span 4*2^2 = 16: two composed 16-blocks
    monkeypatch.setattr(transforms, "COMPOSE_MAX_SPAN", 8)  # span 16 above it: the factor path
    factors = BOFT(cfg, 32, 32, torch.zeros(32, 32)).double()
    factors.load_state_dict(composed.state_dict())
    assert len(composed.transform.core()) == 2 and len(factors.transform.core()) == 1
    assert torch.equal(composed.transform.blocks(), factors.transform.blocks())
    assert torch.allclose(composed.rotation(), factors.rotation(), atol=1e-12)
    x = torch.randn(5, 32, dtype=f64)
    outputs = {}
    for training in (False, True):
        for module in (composed, factors):
            torch.manual_seed(1)  # the same blocks dropped on both paths
            out = run(module.train(training), x, lambda z: z)
            (grad,) = torch.autograd.grad(out.square().sum(), module.transform.weight)
            outputs[training, module is composed] = out, grad
        for a, b in zip(outputs[training, True], outputs[training, False]):
            assert torch.allclose(a, b, atol=1e-12)
    assert torch.allclose(outputs[False, True][0], outputs[True, True][0]) == (dropout == 0)


def test_hra_orthogonality_loss() -> None:
    model = orthotune.get_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), orthotune.HRAConfig(target_modules=["0", "1"], r=4))
    loss = orthotune.hra_orthogonality_loss(model)
    us = [layer.adapters["default"].transform.u for _, layer in model.adapter_layers()]
    expected = sum(((u / u.norm(dim=0)).T @ (u / u.norm(dim=0)) - torch.eye(4)).pow(2).sum() for u in us)
    assert torch.allclose(loss, expected)
    assert loss > 1.0  # the identity start pairs equal reflections: far from orthogonal planes
    loss.backward()
    assert all(u.grad is not None and u.grad.abs().sum() > 0 for u in us)
    with pytest.raises(ValueError, match="no HRA layers"):
        orthotune.hra_orthogonality_loss(orthotune.get_model(nn.Sequential(nn.Linear(8, 8)), LOFTConfig(target_modules=["0"], r=2)))
