"""LoCA: the method against scipy, the location-learning schedule (plain loop and HF Trainer), and an
end-to-end problem whose best locations are known."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.fft
import torch
from torch import nn

import orthotune
from orthotune import LoCAConfig, LocationLearner
from orthotune.methods.loca.loca import LoCA
from orthotune.ops import spectral

from ..conftest import MODELS
from ..processes import spawn_two


def _loca_modules(model) -> list[LoCA]:
    return [layer.adapters["default"] for _, layer in model.adapter_layers()]


def test_delta_weight_is_scaled_idctn_of_the_sparse_spectrum() -> None:
    cls, targets, _ = MODELS["mlp"]
    model = orthotune.get_model(cls().double(), LoCAConfig(target_modules=targets, n_frequency=40, scale=3.0, init_identity=False))
    model.double()
    for m in _loca_modules(model):
        C = np.zeros((m.d_out, m.d_in))
        np.add.at(C, (m.locations[0].numpy(), m.locations[1].numpy()), m.spectrum.detach().numpy())
        ref = 3.0 * scipy.fft.idctn(C, norm="ortho")
        assert np.abs(m.delta_weight(torch.float64).detach().numpy() - ref).max() < 1e-13
        assert m.diagnostics()["delta_norm"] == pytest.approx(np.linalg.norm(ref), rel=1e-12)
        assert m.diagnostics()["distinct_locations"] == 40  # distinct cells at init


def test_fixed_cells_are_planned_in_one_call_with_tables_shared_by_width() -> None:
    """At fixed cells the plan makes every layer's core in one call: the cosine tables of each width (one tensor per
    width, shared) and the coefficients times their norms; the forward makes the rows from them, equal to the DCT
    rows at the cells. A location phase's relaxed cells are made per layer (their finite-difference backward)."""
    cls, targets, make_x = MODELS["mlp"]
    model = orthotune.get_model(cls().double(), LoCAConfig(target_modules=targets, n_frequency=12, scale=2.0, init_identity=False,
                                                           location_learning_steps=10, coefficient_steps=1))
    model.double()
    assert model.plan.start(model.base_model) == 1
    tables: dict[int, torch.Tensor] = {}
    for _, layer in model.adapter_layers():
        m = layer.adapters["default"]
        cos_out, cos_in, c = layer.planned["default"]
        for d, t in ((m.d_out, cos_out), (m.d_in, cos_in)):
            assert t is tables.setdefault(d, t) and t.shape == (4 * d,) and t.dtype == torch.float64
        P, Q, c_eff = m.rows(layer.planned["default"])
        rows, cols = m.locations
        assert torch.equal(P, spectral.cos_rows(m.d_out, rows, torch.float64))
        assert torch.equal(Q, spectral.cos_rows(m.d_in, cols, torch.float64))
        norms = spectral.dct_scales(m.d_out, rows) * spectral.dct_scales(m.d_in, cols)
        torch.testing.assert_close(c_eff, 2.0 * m.spectrum * norms, rtol=1e-15, atol=0)
        ref = m.factors(m.spectrum)  # the per-layer factors merging uses: the same update
        assert torch.allclose(spectral.sparse_delta(P, Q, c_eff), spectral.sparse_delta(*ref), atol=1e-14)
    model.plan.end()
    model.eval()  # serving: the frozen cores are the tables and coefficients, not n x (d_in + d_out) rows per layer
    frozen: dict[int, torch.Tensor] = {}
    for _, layer in model.adapter_layers():
        m, core = layer.adapters["default"], layer.frozen["default"][0]
        assert [t.dim() for t in core] == [1, 1, 1]
        assert core[0] is frozen.setdefault(m.d_out, core[0]) and core[1] is frozen.setdefault(m.d_in, core[1])
    model.train()
    learner = LocationLearner(model)
    learner.step()  # a location phase: per layer, rows with their finite-difference backward
    assert all(m.core_key() is None for m in _loca_modules(model))
    assert model.plan.start(model.base_model) == 0
    model.plan.end()


def test_eager_update_is_added_into_the_base_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager training adds the rank-n update into the frozen map's fresh output (one pass over it), with the same
    output and gradients as ``W0 x + dW x``."""
    from orthotune.layer.adapter_layer import AdapterLayer

    torch.manual_seed(0)
    model = orthotune.get_model(nn.Sequential(nn.Linear(16, 12, bias=False)).double(),
                                LoCAConfig(target_modules=["0"], n_frequency=20, init_identity=False))
    model.double()
    seen: list[torch.Tensor] = []
    inner = AdapterLayer._base_no_bias
    monkeypatch.setattr(AdapterLayer, "_base_no_bias", lambda self, x: seen.append(inner(self, x)) or seen[-1])
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    y = model(x)
    assert y.data_ptr() == seen[0].data_ptr()  # the base output itself, added into
    m = _loca_modules(model)[0]
    W0 = model.base_model[0].base_layer.weight
    ref = x @ (W0 + m.delta_weight(torch.float64)).T
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    (g_x, g_c), (r_x, r_c) = (torch.autograd.grad(out.pow(2).sum(), (x, m.spectrum)) for out in (y, ref))
    torch.testing.assert_close(g_x, r_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_c, r_c, rtol=1e-12, atol=1e-12)


def test_config_and_layer_checks_name_the_fix() -> None:
    with pytest.raises(ValueError, match="n_frequency"):
        LoCAConfig(n_frequency=0)
    with pytest.raises(ValueError, match="compute"):
        LoCAConfig(compute="fft")
    with pytest.raises(ValueError, match="location_learning_fraction"):
        LoCAConfig(location_learning_fraction=1.5)
    with pytest.raises(ValueError, match="location_grad_clip"):
        LoCAConfig(location_grad_clip=0.0)
    cls, targets, _ = MODELS["mlp"]
    with pytest.raises(ValueError, match="use n_frequency <= 288"):
        orthotune.get_model(cls(), LoCAConfig(target_modules=["lin2"], n_frequency=289))


def test_schedule_has_the_papers_defaults() -> None:
    cls, targets, _ = MODELS["mlp"]
    learner = LocationLearner(orthotune.get_model(cls(), LoCAConfig(target_modules=targets, n_frequency=8)), total_steps=1000)
    assert learner.learning_steps == 100  # B_s = 10% of the steps
    phases = [learner.phase_at(t) for t in range(120)]
    assert phases[:10] == ["coefficients"] * 10 and phases[10:30] == ["locations"] * 20  # B_a = 10, B_l = 20
    assert phases[30:40] == ["coefficients"] * 10 and phases[90:100] == ["coefficients"] * 10
    assert phases[100:] == ["frozen"] * 20
    assert learner.optimizer.defaults["lr"] == 1e-4


def test_learner_errors_name_the_fix() -> None:
    cls, targets, _ = MODELS["mlp"]
    with pytest.raises(ValueError, match="no trainable LoCA adapter"):
        LocationLearner(orthotune.get_model(cls(), orthotune.LoRAConfig(target_modules=targets)), total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        LocationLearner(orthotune.get_model(cls(), LoCAConfig(target_modules=targets, n_frequency=8)))
    model = orthotune.get_model(cls(), LoCAConfig(target_modules=targets, n_frequency=8))
    model.add_adapter("other", LoCAConfig(target_modules=targets, n_frequency=8, location_steps=5))
    model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="disagree on \\['location_steps'\\]"):
        LocationLearner(model, total_steps=10)


def _schedule_config(targets: list[str], **kw) -> LoCAConfig:
    kw = {"n_frequency": 24, "coefficient_steps": 2, "location_steps": 3, "location_lr": 0.05, **kw}
    return LoCAConfig(target_modules=targets, init_identity=False, **kw)


def _snapshot(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    mods = _loca_modules(model)
    return [m.spectrum.detach().clone() for m in mods], [m.locations.clone() for m in mods]


def _check_alternation(snapshots: list, phases: list[str]) -> None:
    """Between snapshots t and t+1 (optimiser step t): what the phase of step t allows to change did, nothing else."""
    moved_locations = 0
    for t, phase in enumerate(phases):
        (c0, l0), (c1, l1) = snapshots[t], snapshots[t + 1]
        coef_changed = any(not torch.equal(a, b) for a, b in zip(c0, c1))
        loc_changed = any(not torch.equal(a, b) for a, b in zip(l0, l1))
        assert coef_changed == (phase != "locations"), (t, phase)
        assert not loc_changed or phase == "locations", (t, phase)
        moved_locations += loc_changed
    assert moved_locations >= 2


def test_plain_loop_alternates_then_freezes_locations(tmp_path) -> None:
    cls, targets, make_x = MODELS["mlp"]
    base = cls()
    fresh = copy.deepcopy(base)
    model = orthotune.get_model(base, _schedule_config(targets, location_learning_steps=15))
    x, y = make_x(), torch.randn(6, 4)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    learner = LocationLearner(model)
    snapshots, phases = [_snapshot(model)], []
    for _ in range(20):
        phases.append(learner.phase)
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        learner.step()
        snapshots.append(_snapshot(model))
    assert phases == [learner.phase_at(t) for t in range(20)] and phases[15:] == ["frozen"] * 5
    _check_alternation(snapshots, phases)
    assert 0 < learner.moved_fraction() <= 1
    assert all(m.spectrum.requires_grad and m.relaxed_locations is None for m in _loca_modules(model))
    model.save_adapter(tmp_path / "a")
    loaded = orthotune.load_adapter(fresh, tmp_path / "a")
    assert all(torch.equal(a.locations, b.locations) for a, b in zip(_loca_modules(model), _loca_modules(loaded)))
    assert torch.equal(loaded(x), model(x))
    learner = LocationLearner(model, total_steps=1000)
    learner.finish()  # an early finish is final: the schedule does not restart its location phases
    for _ in range(12):
        learner.step()
    assert learner.phase == "frozen" and all(m.spectrum.requires_grad for m in _loca_modules(model))


def test_location_phase_forward_matches_the_integer_cells() -> None:
    cls, targets, make_x = MODELS["conv2d"]  # the conv path merges per forward: the relaxed cells reach it too
    model = orthotune.get_model(cls(), _schedule_config(targets, location_learning_steps=10, coefficient_steps=1))
    x = make_x()
    before = model(x)
    learner = LocationLearner(model)
    learner.step()  # now in a location phase: forward reads the relaxed positions
    assert learner.phase == "locations" and all(m.relaxed_locations is not None for m in _loca_modules(model))
    out = model(x)
    # The same cells: equal up to float32 rounding (the fixed cells fold the DCT norms into the coefficients).
    torch.testing.assert_close(out, before, rtol=1e-6, atol=1e-6)
    out.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.positions)
    assert all(m.spectrum.grad is None for m in _loca_modules(model))


def _known_answer_problem(learn: bool, seed: int) -> tuple[float, float]:
    """Teacher update = iDCT2 of a spectrum decaying away from the low frequencies; orthogonal inputs make the
    loss Parseval-exact. The best n cells are known (the n largest); returns (error, best possible error)."""
    torch.manual_seed(seed)
    d, n = 32, 16
    r = torch.arange(d, dtype=torch.float32)
    C = 1.0 / (1 + (r[:, None] + r[None, :]) / 2) ** 2
    D = spectral.dct_basis(d)
    target = D.T @ C @ D
    base = nn.Sequential(nn.Linear(d, d, bias=False))
    Y_base = base[0].weight.detach().T
    cfg = LoCAConfig(target_modules=["0"], n_frequency=n, learn_locations=learn, location_lr=0.03, location_learning_steps=200)
    model = orthotune.get_model(base, cfg)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    learner = LocationLearner(model) if learn else None
    X = torch.linalg.qr(torch.randn(4 * d, d))[0] * (4 * d) ** 0.5
    Y = X @ (Y_base + target.T)
    for _ in range(400):
        (model(X) - Y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if learner:
            learner.step()
    with torch.no_grad():
        err = float((_loca_modules(model)[0].delta_weight() - target).norm() / target.norm())
    top = C.flatten().pow(2).sort(descending=True).values[:n].sum()
    return err, float((1 - top / C.pow(2).sum()).sqrt())


@pytest.mark.parametrize("seed", [0, 1])
def test_learned_locations_beat_fixed_random_locations(seed: int) -> None:
    learned, best = _known_answer_problem(True, seed)
    fixed, _ = _known_answer_problem(False, seed)
    assert fixed > 0.95  # 16 random cells of 1024 miss the energy
    assert learned < 0.7 and learned < fixed - 0.3  # learned cells climb to the low frequencies
    assert best < learned  # and the known optimum bounds them


def test_trainer_callback_runs_the_schedule(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from orthotune.methods.loca.schedule import LoCACallback

    class Regression(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin0 = nn.Linear(16, 24)
            self.lin1 = nn.Linear(24, 8)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.lin1(torch.tanh(self.lin0(x)))
            return {"loss": (out - labels).pow(2).mean(), "logits": out}

    model = orthotune.get_model(Regression(), _schedule_config(["lin0", "lin1"], location_learning_fraction=0.5))
    data = [{"x": torch.randn(16), "labels": torch.randn(8)} for _ in range(32)]
    snapshots, phases = [_snapshot(model)], []
    loca = LoCACallback()

    class Record(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            phases.append(loca.learner.phase_at(state.global_step - 1))
            snapshots.append(_snapshot(model))

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=8, learning_rate=0.05, lr_scheduler_type="constant",
        report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
    )
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[loca, Record()]).train()
    assert loca.learner.learning_steps == 10 and phases[10:] == ["frozen"] * 10
    _check_alternation(snapshots, phases)
    assert all(m.spectrum.requires_grad and m.relaxed_locations is None for m in _loca_modules(model))


def test_without_learner_locations_never_move() -> None:
    cls, targets, make_x = MODELS["mlp"]
    model = orthotune.get_model(cls(), LoCAConfig(target_modules=targets, n_frequency=16, init_identity=False))
    start = copy.deepcopy([m.locations for m in _loca_modules(model)])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        model(make_x()).pow(2).mean().backward()
        opt.step()
    assert all(torch.equal(a, m.locations) for a, m in zip(start, _loca_modules(model)))


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same model and cells on every rank
    cls, targets, make_x = MODELS["mlp"]
    model = orthotune.get_model(cls(), _schedule_config(targets, location_learning_steps=8, coefficient_steps=1))
    torch.manual_seed(100 + rank)  # different data on every rank
    x, y = make_x(), torch.randn(6, 4)
    learner = LocationLearner(model)
    for _ in range(8):
        (model(x) - y).pow(2).mean().backward()
        for p in model.parameters():
            p.grad = None  # coefficients are not the point here
        learner.step()
    torch.save([m.locations for m in _loca_modules(model)] + [torch.tensor(learner.moved_fraction())], f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_location_gradients_are_averaged_across_ranks(tmp_path) -> None:
    spawn_two(_distributed_worker, (2, str(tmp_path / "init"), str(tmp_path)))
    a, b = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert a[-1] > 0.1  # locations moved, and identically on both ranks despite different data
    assert all(torch.equal(u, v) for u, v in zip(a, b))
