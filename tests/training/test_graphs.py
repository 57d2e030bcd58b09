"""GraphedStep on the CPU: its steps equal the plain training loop (eager, and compiled with ``aot_eager``
standing in for inductor), it asks ``torch.compile`` for ``mode="reduce-overhead"``, bad setups fail clearly,
and every method's step is capture-safe (no host read of a GPU value) for reduce-overhead's CUDA graphs.
On the GPU: tests/training/test_gpu.py."""

from __future__ import annotations

import copy
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import orthotune
from orthotune import GraphedStep
from orthotune.ops import skew
from orthotune.methods.registry import METHODS

from ..conftest import eager_step
from ..method_cases import CASES, Case

transformers = pytest.importorskip("transformers")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(config: orthotune.AdapterConfig | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg)
    return orthotune.get_model(model, config) if config is not None else model


def batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (2, 12), generator=g)
        out.append(dict(input_ids=ids, labels=ids, use_cache=False))
    return out


def _adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def test_eager_path_is_the_plain_loop() -> None:
    model = llama(orthotune.LoCOConfig(target_modules=TARGETS, rank=2, chain_length=2, init_identity=False))
    ref = copy.deepcopy(model)
    opt, ref_opt = _adamw(model), _adamw(ref)
    step = GraphedStep(model, opt, max_grad_norm=0.5, enabled=False)
    assert step.compiled is model
    for batch in batches(4):
        loss = step(batch)
        assert torch.equal(loss, eager_step(ref, ref_opt, batch, max_grad_norm=0.5))
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n


CONFIGS = {
    "lora": lambda: orthotune.LoRAConfig(target_modules=TARGETS, r=4, lora_alpha=8, init_identity=False),
    "loco": lambda: orthotune.LoCOConfig(target_modules=TARGETS, rank=2, chain_length=2, init_identity=False),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_steps_equal_the_eager_loop(name: str) -> None:
    """Forward and backward through ``torch.compile`` (``aot_eager``: the graphs inductor would get), clipping and
    AdamW: the losses and, after five steps, the parameters of the plain eager loop, to float32 rounding."""
    model = llama(CONFIGS[name]())
    ref = copy.deepcopy(model)
    opt, ref_opt = _adamw(model), _adamw(ref)
    torch._dynamo.reset()
    step = GraphedStep(model, opt, max_grad_norm=0.5, enabled=True, backend="aot_eager", compile_kwargs=dict(fullgraph=True))
    assert isinstance(step.compiled, torch._dynamo.eval_frame.OptimizedModule) and step.compiled._orig_mod is model
    for batch in batches(5):
        loss = step(batch)
        torch.testing.assert_close(loss, eager_step(ref, ref_opt, batch, max_grad_norm=0.5), rtol=1e-5, atol=1e-6)
    moved = 0
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
        moved += p.requires_grad and bool(p.grad is not None and p.grad.abs().sum() > 0)
    assert moved == sum(p.requires_grad for p in model.parameters()), "every trainable parameter has this step's gradient"


def test_no_stale_inference_core_after_a_fused_optimizer_step() -> None:
    """A fused AdamW step bumps no parameter version, so the plan's kept inference cores would look current;
    the step drops them, and a no-grad forward afterwards sees the updated adapters."""
    model = llama(CONFIGS["loco"]())
    x = batches(1)[0]
    with torch.no_grad():
        before = model(**x).logits  # keeps the inference cores, stamped with the parameters' versions
    torch._dynamo.reset()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    GraphedStep(model, opt, enabled=True, backend="aot_eager")(x)
    with torch.no_grad():
        after = model(**x).logits
        orthotune.layer.plan.clear(model)
        torch.testing.assert_close(after, model(**x).logits)
    assert not torch.allclose(after, before)


def test_it_asks_torch_compile_for_reduce_overhead(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    GraphedStep(model, opt, enabled=True)
    GraphedStep(model, opt, enabled=True, backend="aot_eager", compile_kwargs=dict(mode="max-autotune", dynamic=False))
    GraphedStep(model, opt, enabled=False)
    assert calls == [dict(backend="inductor", mode="reduce-overhead"),
                     dict(backend="aot_eager", mode="max-autotune", dynamic=False)]
    if not torch.cuda.is_available():
        assert not GraphedStep(model, opt).enabled and len(calls) == 2, "enabled=None: eager steps without CUDA"


def test_custom_loss_fn_and_its_errors() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    step = GraphedStep(model, opt, loss_fn=lambda m, b: m(b["x"]).pow(2).mean(), enabled=False)
    first = step(dict(x=x))
    assert step(dict(x=x)) < first  # it trains
    bad = GraphedStep(model, opt, loss_fn=lambda m, b: m(b["x"]), enabled=False)
    with pytest.raises(ValueError, match="one-element tensor"):
        bad(dict(x=x))
    with pytest.raises(ValueError, match="no 'loss'.*labels"):
        GraphedStep(llama(), opt, enabled=False)(dict(input_ids=batches(1)[0]["input_ids"], use_cache=False))


def test_bad_setups_are_refused() -> None:
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="max_grad_norm=-1"):
        GraphedStep(model, opt, max_grad_norm=-1, enabled=False)

    class DistributedDataParallel(torch.nn.Module):  # the name is what GraphedStep checks
        pass

    with pytest.raises(ValueError, match="DistributedDataParallel.*enabled=False"):
        GraphedStep(DistributedDataParallel(), opt, enabled=True)
    with pytest.raises(TypeError, match="warmup_steps"):  # removed with the hand-made capture
        GraphedStep(model, opt, warmup_steps=3)


class _HostReads(TorchDispatchMode):
    """Records ops that read a tensor's value on the host or size an output by its data: under CUDA
    graph capture each is an error. transformers' own packed-sequence check is exempt: it skips itself
    while a stream is capturing."""

    OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "lift_fresh"}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func._schema.name.split("::")[-1] in self.OPS:
            stack = traceback.extract_stack()
            if not any("masking_utils" in f.filename for f in stack):
                self.reads.append(f"{func._schema.name} at " + " <- ".join(f"{f.name}:{f.lineno}" for f in stack[-6:-1]))
        return func(*args, **(kwargs or {}))


#: Training-only randomness (block dropout) must be drawn on the device too.
DROPOUT_CASES = [
    Case("boft", dict(boft_block_size=2, boft_n_butterfly_factor=2, boft_dropout=0.5), lambda i, o: 0),
    Case("oft", dict(oft_block_size=4, module_dropout=0.5), lambda i, o: 0),
]


@pytest.mark.parametrize("case", CASES + DROPOUT_CASES, ids=lambda c: c.id)
def test_every_method_step_is_capture_safe(case, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Forward and backward of every configuration read nothing on the host once capture-mode paths are on
    (``skew._capturing``: expm's fixed squarings), so ``mode="reduce-overhead"`` (``GraphedStep``) records it."""
    config_cls = METHODS[case.method][0]
    model = llama(config_cls(target_modules=TARGETS, **case.kwargs))
    monkeypatch.setattr(skew, "_capturing", lambda t: True)
    batch = batches(1)[0]
    for _ in range(2):  # the second forward also exercises the cached-core paths
        reads = _HostReads()
        with reads:
            model(**batch).loss.backward()
        assert not reads.reads, reads.reads
