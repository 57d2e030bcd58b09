"""Support strategies and the gradient-informed selection step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthotune
from orthotune import LOFTConfig
from orthotune.methods.loft.selection import captured_fraction, gradient_basis, gradient_coordinates, skew_statistic
from orthotune.training.support_selection import InputMoments, select_supports
from orthotune.methods.loft.supports import principal_basis, random_basis

f64 = torch.float64


def projector(P: torch.Tensor) -> torch.Tensor:
    return P @ P.T


def dense_skew(W0: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    K = W0.T @ G
    return (K - K.T) / 2


def test_skew_statistic_is_the_generator_gradient() -> None:
    """d/dA L(W0 exp(A - A^T)) at A = 0 is 2 Skew(W0^T G): the statistic is the first-order signal."""
    W0 = torch.randn(5, 7, dtype=f64)
    x = torch.randn(9, 7, dtype=f64)

    def loss(W):
        return torch.tanh(x @ W.T).pow(3).sum()

    W = W0.clone().requires_grad_()
    loss(W).backward()
    X, Y = skew_statistic(W0, W.grad)
    assert torch.allclose(X @ Y.T, dense_skew(W0, W.grad))
    A = torch.zeros(7, 7, dtype=f64, requires_grad=True)
    loss(W0 @ torch.linalg.matrix_exp(A - A.T)).backward()
    assert torch.allclose(A.grad, 2 * dense_skew(W0, W.grad), atol=1e-10)


@pytest.mark.parametrize("d_out,d_in", [(4, 30), (30, 12)], ids=["factored", "dense"])
def test_gradient_basis_spans_the_dominant_planes(d_out: int, d_in: int) -> None:
    W0, G = torch.randn(d_out, d_in, dtype=f64), torch.randn(d_out, d_in, dtype=f64)
    K = dense_skew(W0, G)
    U, s, _ = torch.linalg.svd(K)
    for r in (2, 4):
        P = gradient_basis(W0, G, r)
        assert torch.allclose(P.T @ P, torch.eye(r, dtype=f64), atol=1e-10)
        assert torch.allclose(projector(P), projector(U[:, :r]), atol=1e-8)
        # it captures the most first-order signal: more than any random support
        best = captured_fraction(W0, G, P)
        assert best == pytest.approx(float(s[:r].norm() / s.norm()), rel=1e-8)
        assert all(captured_fraction(W0, G, random_basis(d_in, r, P)) < best for _ in range(5))


def test_gradient_basis_completes_a_rank_deficient_statistic() -> None:
    W0, G = torch.randn(1, 10, dtype=f64), torch.randn(1, 10, dtype=f64)  # Skew(W0^T G) has rank 2
    P = gradient_basis(W0, G, 5)
    assert torch.allclose(P.T @ P, torch.eye(5, dtype=f64), atol=1e-10)
    assert captured_fraction(W0, G, P) == pytest.approx(1.0)


def test_gradient_coordinates_take_the_heaviest_rows() -> None:
    W0, G = torch.randn(6, 20, dtype=f64), torch.randn(6, 20, dtype=f64)
    idx = gradient_coordinates(W0, G, 5)
    expected = torch.sort(torch.topk(dense_skew(W0, G).norm(dim=1), 5).indices).values
    assert torch.equal(idx, expected)


def test_principal_basis_is_top_right_singular_vectors() -> None:
    W = torch.randn(8, 12)
    P = principal_basis(W, 3)
    Vh = torch.linalg.svd(W.double()).Vh
    assert torch.allclose(projector(P.double()), projector(Vh[:3].T), atol=1e-5)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 10)
        self.drop = nn.Dropout(0.3)
        self.b = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.b(self.drop(torch.tanh(self.a(x))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(16, 12, generator=g), "labels": torch.randint(0, 3, (16,), generator=g)} for _ in range(n)]


def manual_gradient(base: nn.Module, data: list[dict], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    base = base.eval()
    W = base.get_submodule(name).weight
    W.requires_grad_(True)
    for batch in data:
        base(**batch)["loss"].backward()
    G = W.grad / len(data)
    W.grad = None
    W.requires_grad_(False)
    return W.detach(), G


@pytest.mark.parametrize("support", ["gradient", "gradient_coordinate"])
def test_select_supports_fills_supports_and_leaves_the_model_alone(support: str, capsys) -> None:
    torch.manual_seed(0)
    base = Tiny()
    reference = {name: manual_gradient(copy.deepcopy(base), batches(3), name) for name in ("a", "b")}
    model = orthotune.get_model(base, LOFTConfig(target_modules=["a", "b"], support=support, r=2))
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    report = select_supports(model, iter(batches(5)), num_batches=3, progress=True)
    assert "LOFT support selection" in capsys.readouterr().err  # tqdm progress
    assert set(report) == {"a", "b"} and all(r["batches"] == 3 for r in report.values())
    for name, layer in model.adapter_layers():
        sup = layer.adapters["default"].support
        assert sup.ready
        W0, G = reference[name]
        if support == "gradient":
            assert torch.allclose(projector(sup.P), projector(gradient_basis(W0, G, 2)), atol=1e-5)
        else:
            assert torch.equal(sup.index, gradient_coordinates(W0, G, 2))
        assert report[name]["captured_fraction"] > 0
        assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    out = model(torch.randn(4, 12))["logits"]  # now it runs, and trains
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_selected_support_round_trips_through_save_and_load(tmp_path) -> None:
    torch.manual_seed(0)
    base = Tiny()
    state = base.state_dict()
    model = orthotune.get_model(base, LOFTConfig(target_modules=["a"], support="gradient", r=2, init_identity=False))
    select_supports(model, batches(2), num_batches=2, progress=False)
    model.save_adapter(tmp_path / "ad")
    fresh = Tiny()
    fresh.load_state_dict(state)
    loaded = orthotune.load_adapter(fresh, tmp_path / "ad")
    x = torch.randn(3, 12)
    model.eval(), loaded.eval()
    assert torch.equal(loaded(x)["logits"], model(x)["logits"])
    assert dict(loaded.adapter_layers())["a"].adapters["default"].support.ready


def test_select_supports_with_a_loss_fn_and_tuple_batches() -> None:
    torch.manual_seed(0)
    model = orthotune.get_model(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)),
                                LOFTConfig(target_modules=["0"], support="gradient", r=4))
    data = [(torch.randn(5, 8), torch.randn(5, 2)) for _ in range(2)]
    with pytest.raises(ValueError, match="loss_fn"):
        select_supports(model, data, progress=False)
    report = select_supports(model, data, loss_fn=lambda m, b: (m(b[0]) - b[1]).pow(2).mean(), progress=False)
    assert report["0"]["batches"] == 2  # the data ran out before num_batches


def test_select_supports_refuses_bad_calls() -> None:
    plain = orthotune.get_model(nn.Sequential(nn.Linear(8, 8)), LOFTConfig(target_modules=["0"], support="random", r=2))
    with pytest.raises(ValueError, match="no task-aware support"):
        select_supports(plain, batches(1), progress=False)
    model = orthotune.get_model(Tiny(), LOFTConfig(target_modules=["a"], support="gradient", r=2))
    with pytest.raises(ValueError, match="num_batches"):
        select_supports(model, batches(1), num_batches=0)
    with pytest.raises(ValueError, match="no batch"):
        select_supports(model, [], progress=False)
    with pytest.raises(ValueError, match="no adapter named"):
        select_supports(model, batches(1), adapter_name="other")
    assert all(not p.requires_grad for p in model.base_model.a.base_layer.parameters())  # restored after errors


def test_head_warmup_trains_only_the_head_then_selects_on_the_next_batches() -> None:
    torch.manual_seed(0)
    base = Tiny()
    model = orthotune.get_model(base, LOFTConfig(target_modules=["a"], support="gradient", r=2, modules_to_save=["b"]))
    head = dict(model.saved_modules())["b"]
    trained = [p for p in head.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    frozen_a = dict(model.adapter_layers())["a"].base_layer.weight.detach().clone()
    data = batches(5)
    select_supports(model, iter(data), num_batches=2, head_warmup_steps=3, head_lr=0.1, progress=False)
    assert all(not torch.equal(b, p) for b, p in zip(before, trained))  # the head moved and is kept
    assert all(p.requires_grad and p.grad is None for p in trained)
    layer = dict(model.adapter_layers())["a"]
    assert torch.equal(layer.base_layer.weight, frozen_a)
    # the statistic comes from the two batches after the warm-up, through the warmed-up head
    ref = copy.deepcopy(base)
    ref.a = nn.Linear(12, 10)
    ref.a.load_state_dict(layer.base_layer.state_dict())
    ref.b = copy.deepcopy([m for m in head.modules() if isinstance(m, nn.Linear) and any(p.requires_grad for p in m.parameters())][0])
    W0, G = manual_gradient(ref, data[3:5], "a")
    assert torch.allclose(projector(layer.adapters["default"].support.P), projector(gradient_basis(W0, G, 2)), atol=1e-5)


def test_second_moment_statistic_matches_its_definition() -> None:
    torch.manual_seed(0)
    base = Tiny()
    data = batches(3)
    Ms = torch.zeros(12, 12, dtype=f64)
    for batch in data:
        W0, G = manual_gradient(copy.deepcopy(base), [batch], "a")
        K = dense_skew(W0.double(), G.double())
        Ms += K.T @ K
    model = orthotune.get_model(base, LOFTConfig(target_modules=["a"], support="gradient", r=4))
    select_supports(model, data, num_batches=3, statistic="second_moment", progress=False)
    top = torch.linalg.eigh(Ms).eigenvectors[:, -4:]
    P = dict(model.adapter_layers())["a"].adapters["default"].support.P.double()
    assert torch.allclose(projector(P), projector(top), atol=1e-4)


@pytest.mark.parametrize("ridge", [0.1, 3.0])
def test_whitened_statistic_matches_its_definition(ridge: float) -> None:
    """statistic="whitened": the span of M U, U the top singular vectors of M K M, M = (C + ridge tr(C)/d I)^-1/2,
    with C the second moment of the layer's inputs over the same batches."""
    torch.manual_seed(0)
    base = Tiny()
    data = batches(3)
    W0, G = manual_gradient(copy.deepcopy(base), data, "a")
    X = torch.cat([b["x"] for b in data]).double()
    C = X.T @ X / X.shape[0]
    evals, evecs = torch.linalg.eigh(C + ridge * torch.trace(C) / 12 * torch.eye(12, dtype=f64))
    M = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    Kw = M @ dense_skew(W0.double(), G.double()) @ M
    U = torch.linalg.svd(Kw).U[:, :4]
    ref = torch.linalg.qr(M @ U).Q
    model = orthotune.get_model(base, LOFTConfig(target_modules=["a"], support="gradient", r=4))
    select_supports(model, data, num_batches=3, statistic="whitened", whitening_ridge=ridge, progress=False)
    P = dict(model.adapter_layers())["a"].adapters["default"].support.P.double()
    assert torch.allclose(P.T @ P, torch.eye(4, dtype=f64), atol=1e-5)
    assert torch.allclose(projector(P), projector(ref), atol=1e-4)
    assert not dict(model.adapter_layers())["a"]._forward_hooks  # its input hooks are gone


def test_input_moments_record_the_second_moment_only_while_active() -> None:
    layer = nn.Linear(5, 3)
    X = [torch.randn(4, 2, 5, dtype=torch.float64) for _ in range(3)]
    recorder = InputMoments([("l", layer.double())], torch.float64)
    with pytest.raises(ValueError, match="no input of layer 'l'"):
        recorder.mean("l")
    with recorder:
        layer(X[0])
        layer(X[1])
    layer(X[2])  # after exit: not recorded, and no hook is left
    rows = torch.cat(X[:2]).reshape(-1, 5)
    assert torch.allclose(recorder.mean("l"), rows.T @ rows / 16) and not layer._forward_hooks


def test_whitened_statistic_refuses_coordinate_supports() -> None:
    model = orthotune.get_model(Tiny(), LOFTConfig(target_modules=["a"], support="gradient_coordinate", r=4))
    with pytest.raises(ValueError, match="gradient_coordinate"):
        select_supports(model, batches(2), statistic="whitened", progress=False)


def test_selection_options_refuse_bad_values() -> None:
    model = orthotune.get_model(Tiny(), LOFTConfig(target_modules=["a"], support="gradient", r=2))
    with pytest.raises(ValueError, match="modules_to_save"):
        select_supports(model, batches(4), head_warmup_steps=2, progress=False)
    with pytest.raises(ValueError, match="statistic"):
        select_supports(model, batches(4), statistic="median", progress=False)
    with pytest.raises(ValueError, match="head_warmup_steps"):
        select_supports(model, batches(4), head_warmup_steps=-1, progress=False)
    for ridge in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="whitening_ridge"):
            select_supports(model, batches(4), statistic="whitened", whitening_ridge=ridge, progress=False)
    headed = orthotune.get_model(Tiny(), LOFTConfig(target_modules=["a"], support="gradient", r=2, modules_to_save=["b"]))
    with pytest.raises(ValueError, match="ran out during the 5-step head warm-up"):
        select_supports(headed, batches(3), head_warmup_steps=5, progress=False)
