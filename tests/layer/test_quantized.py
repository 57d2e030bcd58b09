"""Every method on a frozen bitsandbytes base (4-bit NF4/FP4 and 8-bit), on CPU: a tiny Llama saved
in float32 and reloaded by transformers with a BitsAndBytesConfig, as users load one."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

import orthotune
from orthotune.layer import quantized
from orthotune.methods.loft.rotation import SupportRotation
from orthotune.methods.registry import METHODS

from ..method_cases import CASES, Case

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
    "nf4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama (2 layers, 64 wide, all 7 projections) saved in float32."""
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def load(path: str, quant: str | None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The saved model, quantised as ``quant`` (a key of QUANT) or not (None), its other weights in ``dtype``
    (default: as saved, float32)."""
    kwargs = {} if quant is None else {"quantization_config": transformers.BitsAndBytesConfig(**QUANT[quant])}
    if dtype is not None:
        kwargs["dtype"] = dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        return transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **kwargs)


def config(case: Case, **extra) -> orthotune.AdapterConfig:
    return METHODS[case.method][0](target_modules="all-linear", **case.kwargs, **extra)


def logits(model: torch.nn.Module) -> torch.Tensor:
    """The logits without grad, in train mode (these models have no dropout): an eval-mode forward of a
    bnb 4-bit layer on an AVX512-BF16 CPU repacks its weight for bnb's inference kernel, whose numerics
    differ from the standard layout's by ~0.5% (test_cpu_inference_layout covers that path)."""
    training = model.training
    try:
        with torch.no_grad():
            return model.train()(TOKENS).logits.float()
    finally:
        model.train(training)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def packed(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The quantised storage of every bnb layer, to show training never writes it."""
    return {n.replace(".base_layer", ""): m.weight.data.clone() for n, m in model.named_modules() if quantized.is_quantized(m)}


def train(model: torch.nn.Module, steps: int = 3) -> list[float]:
    """``steps`` AdamW steps (lr 1e-2) on the language-modelling loss of TOKENS; the losses seen."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(TOKENS, labels=TOKENS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


CASE_IDS = [c.id for c in CASES]


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_method_trains_saves_and_loads(case: Case, quant: str, llama_dir: str, tmp_path) -> None:
    base = load(llama_dir, quant)
    targets = [n for n, m in base.named_modules() if quantized.is_quantized(m)]
    assert len(targets) == 14  # 7 projections x 2 layers, all bitsandbytes layers
    before, storage = logits(base), packed(base)
    model = orthotune.get_model(base, config(case))
    assert rel(logits(model), before) < 2e-3  # identity at init (adapters act in the compute dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    losses = train(model)
    assert losses[-1] < losses[0]
    after = packed(base)
    assert after.keys() == storage.keys() and all(torch.equal(storage[n], t) for n, t in after.items())  # the base is never written
    trained = logits(model)
    model.save_adapter(tmp_path / "a")
    reloaded = orthotune.load_adapter(load(llama_dir, quant), tmp_path / "a")
    assert rel(logits(reloaded), trained) < 1e-6


@pytest.mark.parametrize("method", ["loca", "fourierft"])
def test_spectral_updates_run_in_the_base_matmuls_dtype(method: str, llama_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After prepare_model_for_kbit_training the activations are float32 while a bf16-compute NF4 matmul runs
    in bf16: the rank-n spectral update (a third of that matmul's FLOPs at n=1000) runs in bf16 too and is added
    back in float32 (float16 on an int8 base, whose kernels take float16); on a float32 base it stays float32. Its
    basis rows (LoCA: the cosine tables its plan makes them from) are made in that dtype (no float32 copy to cast).
    Its parameters and gradients stay float32."""
    from orthotune.ops import spectral

    seen: list[torch.dtype] = []
    inner = spectral.sparse_apply
    monkeypatch.setattr(spectral, "sparse_apply", lambda x, *a, **k: (seen.append(x.dtype), inner(x, *a, **k))[1])
    made = spectral.cos_table if method == "loca" else spectral.dft_rows
    made_in: list[torch.dtype] = []
    if method == "loca":
        monkeypatch.setattr(spectral, "cos_table", lambda n, dtype, device: (made_in.append(dtype), made(n, dtype, device))[1])
    else:
        monkeypatch.setattr(spectral, "dft_rows", lambda n, index, dtype: (made_in.append(dtype), made(n, index, dtype))[1])
    cfg = METHODS[method][0](target_modules="all-linear", n_frequency=16, init_identity=False)
    for quant, want in (("nf4", torch.bfloat16), ("int8", torch.float16), (None, torch.float32)):
        model = orthotune.get_model(orthotune.prepare_model_for_kbit_training(load(llama_dir, quant)), cfg)
        seen.clear()  # get_model's finite-init probe runs each method on a plain float32 base
        made_in.clear()
        out = model(TOKENS, labels=TOKENS)
        out.loss.backward()
        assert out.logits.dtype == torch.float32 and seen and set(seen) == {want}, (quant, set(seen))
        assert made_in and set(made_in) == {want}, (quant, set(made_in))
        spectra = [p for p in model.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0 for p in spectra)


@pytest.mark.parametrize("method", ["loca", "fourierft", "loco", "oft", "hra", "boft", "psoft"])
def test_updates_share_the_base_matmuls_cast_input(method: str, llama_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On an NF4 base (bf16 compute, float32 activations) a spectral update and a low-rank rotation (LoCO, HRA, PSOFT) run in
    bf16 from one cast of the layer's input, which bitsandbytes' matmul takes too (14 layers: 14 activation-sized
    casts to bf16, not 28); the output is cast back as bitsandbytes' own forward would, and equals the base's own plus
    the update (W0 x + dW x), or the base on the rotated input (W0 R x), to bf16 rounding. OFT's and BOFT's block
    rotations stay float32 (bitsandbytes makes the one cast)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            src = args[0] if args else None
            if func is torch.ops.aten._to_copy.default and src.dtype == torch.float32 and out.dtype == torch.bfloat16:
                self.count += tuple(src.shape[:-1]) == tuple(TOKENS.shape)  # activations: (2 x 12) tokens x width
            return out

    extra = {"loco": dict(rank=4, chain_length=2), "oft": dict(r=0, oft_block_size=16), "hra": dict(r=4), "psoft": dict(r=8),
             "boft": dict(boft_block_size=8, boft_n_butterfly_factor=2)}.get(method, dict(n_frequency=16))
    cfg = METHODS[method][0](target_modules="all-linear", init_identity=False, **extra)
    model = orthotune.get_model(orthotune.prepare_model_for_kbit_training(load(llama_dir, "nf4")), cfg)
    layer = next(m for _, m in model.adapter_layers())
    adapter = layer.adapters["default"]
    x = torch.randn(2, 12, layer.d_in)
    with torch.no_grad():
        if method == "boft":  # the base on the butterfly-rotated input, then BOFT's output scale: s * W0 R x
            R = SupportRotation.merged_weight(adapter, torch.eye(layer.d_in))
            want = quantized.matmul(layer.base_layer, x @ R.T) * adapter.boft_s.squeeze(-1)
        elif adapter.multiplicative:  # the base on the rotated input, W0 R x
            want = quantized.matmul(layer.base_layer, x @ adapter.merged_weight(torch.eye(layer.d_in)).T)
        else:
            want = quantized.matmul(layer.base_layer, x) + x @ adapter.delta_weight().T
        inner, seen = quantized.matmul, []
        monkeypatch.setattr(quantized, "matmul", lambda module, z: (seen.append(z.dtype), inner(module, z))[1])
        casts = Casts()
        with casts:
            model.train()(TOKENS)
        # the matmul gets the cast input (OFT, BOFT: float32, which it casts itself)
        assert casts.count == 14 and seen == [torch.float32 if method in ("oft", "boft") else torch.bfloat16] * 14, (casts.count, seen)
        got = layer(x)
    assert got.dtype == torch.float32 and rel(got, want) < 2e-2
    out = model(TOKENS, labels=TOKENS)
    out.loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_training_never_dequantises_a_whole_layer(llama_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rotations and additive updates act on activations: forward and backward call no dequantisation
    of ours (bitsandbytes' backward dequantises one layer at a time inside its kernel, as for QLoRA)."""
    first = {c.method: c for c in reversed(CASES)}  # one case per method
    for case in [first[m] for m in ("loco", "oft", "hra", "loca", "lora", "loft")]:
        model = orthotune.get_model(load(llama_dir, "nf4"), config(case))
        calls = []
        monkeypatch.setattr(quantized, "dequantize", lambda m: calls.append(m))
        model(TOKENS, labels=TOKENS).loss.backward()
        monkeypatch.undo()
        assert not calls, case.id


@pytest.mark.parametrize("quant,bound", [("nf4-fp32", 1e-5), ("fp4", 1e-5), ("int8", 5e-2)])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_merge_to_float_matches_unmerged(case: Case, quant: str, bound: float, llama_dir: str) -> None:
    """``merge_and_unload(dequantize=float32)``: each adapted layer becomes a plain Linear holding
    dequant(W0) merged exactly. 4-bit with float32 compute agrees to float rounding; LLM.int8() also
    quantises the activations in its matmul (about 1% here), which the float model does not."""
    model = orthotune.get_model(load(llama_dir, quant), config(case, init_identity=False))
    unmerged = logits(model)
    merged = model.merge_and_unload(dequantize=torch.float32)
    assert not any(quantized.is_quantized(m) for m in merged.modules())
    assert rel(logits(merged), unmerged) < bound


@pytest.mark.parametrize("quant,bound", [("nf4", 0.12), ("int8", 0.01)])
def test_merge_requantises_and_reports_the_error(quant: str, bound: float, llama_dir: str) -> None:
    """The default merge re-quantises each layer in its own format and reports |Q(W)-W|/|W| per layer:
    NF4 rounds a weight by about 10%, int8 (per-row absmax) by well under 1%."""
    base = load(llama_dir, quant)
    model = orthotune.get_model(base, orthotune.LoRAConfig(target_modules="all-linear", r=4, init_identity=False))
    unmerged = logits(model)
    with pytest.warns(UserWarning, match="re-quantising"):
        merged = model.merge_and_unload()
    errors = model.requantization_errors
    assert len(errors) == 14 and all(0 < e < bound for e in errors.values())
    layer = merged.model.layers[0].self_attn.q_proj
    assert type(layer) is type(base.model.layers[1].mlp.up_proj) and quantized.is_quantized(layer)
    if quant == "nf4":
        assert layer.weight.quant_type == "nf4" and layer.weight.quant_state.nested  # format kept
    assert rel(logits(merged), unmerged) < 3 * bound


def test_pissa_dequantises_one_layer_for_its_svd(llama_dir: str) -> None:
    """PiSSA's start is the SVD of the dequantised weight; the quantised base is kept, not replaced by a
    re-quantised residual (peft refuses PiSSA on bnb layers), so the start is exactly the base model."""
    base = load(llama_dir, "nf4-fp32")
    q = base.model.layers[0].self_attn.q_proj
    W = quantized.dequantize(q).float()
    model = orthotune.get_model(base, orthotune.PiSSAConfig(target_modules="all-linear", r=4, lora_alpha=4))
    pissa = model.base_model.model.layers[0].self_attn.q_proj.adapters["default"]
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(pissa.lora_B0 @ pissa.lora_A0, (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-5, rtol=1e-4)


def test_quantised_matmul_and_dequantise_match_bitsandbytes(llama_dir: str) -> None:
    for quant in ("nf4", "fp4", "int8"):
        layer = load(llama_dir, quant).model.layers[0].mlp.down_proj  # bias-free, as Llama's
        x = torch.randn(3, layer.in_features)
        ref = layer.train()(x)  # train mode: bnb's standard layout on any CPU (see logits)
        assert torch.equal(quantized.matmul(layer, x), ref)
        dense = x @ quantized.dequantize(layer).float().T
        assert rel(dense, ref) < (1e-2 if quant == "int8" else 5e-3), quant  # int8 also quantises x; bf16 compute


def pack_for_cpu_inference(model: torch.nn.Module) -> None:
    """Every 4-bit layer in bnb's AVX512-BF16 inference layout, as its eval-mode forward leaves it on such a CPU,
    made by bnb's own converter (pure torch, so on any CPU)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    for m in model.modules():
        if quantized.is_4bit(m):
            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)


def test_cpu_inference_layout(llama_dir: str) -> None:
    """A 4-bit base that served inference on an AVX512-BF16 CPU before it was adapted holds bnb's repacked
    inference layout (made here by bnb's own converter, on any CPU): dequantise and the adapter's matmul
    unpack it (the repack rounded absmax to bf16) and adapters train on it."""
    base = load(llama_dir, "nf4")
    layer = base.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    W, ref = quantized.dequantize(layer).float(), quantized.matmul(layer, x)
    pack_for_cpu_inference(base)
    assert layer.weight.quant_state.packing_format_for_cpu
    assert 0 < rel(quantized.dequantize(layer).float(), W) < 1e-2
    assert not layer.weight.quant_state.packing_format_for_cpu
    assert rel(quantized.matmul(layer, x), ref) < 1e-2
    model = orthotune.get_model(base, orthotune.LoCOConfig(target_modules="all-linear", rank=2, init_identity=False))
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in model.modules() if quantized.is_4bit(m))
    loss = model(input_ids=TOKENS, labels=TOKENS).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_an_evaluation_does_not_stop_gradients_through_frozen_4bit_layers(llama_dir: str) -> None:
    """Adapters on q/v only: an eval-mode forward (as a recipe's evaluation before training) must not leave
    the untargeted 4-bit layers (o_proj, the MLP) in bnb's AVX512-BF16 inference layout, whose kernel has no
    backward: that silently cut every gradient below them (packed here by bnb's own converter, on any CPU)."""
    base = load(llama_dir, "nf4")
    pack_for_cpu_inference(base)
    model = orthotune.get_model(base, orthotune.LoRAConfig(target_modules=["q_proj", "v_proj"], r=4))
    frozen = [m for m in model.modules() if quantized.is_4bit(m)]
    assert len(frozen) == 14 and not any(m.weight.quant_state.packing_format_for_cpu or m.support_avx512bf16_for_cpu for m in frozen)
    with torch.no_grad():
        model.eval()(TOKENS)
    model.train()(input_ids=TOKENS, labels=TOKENS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.endswith("lora_B")}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("method,kwargs", [("lora", dict(r=4)), ("loco", dict(rank=2)), ("oft", dict(oft_block_size=4)), ("pissa", dict(r=4))])
def test_adapters_cross_load_between_4bit_and_float_bases(method: str, kwargs: dict, llama_dir: str, tmp_path) -> None:
    """An adapter trained on the 4-bit base loads onto the float base and back: the same parameters,
    and outputs that differ only as much as the two bases do."""
    cfg = METHODS[method][0](target_modules="all-linear", init_identity=False, **kwargs)
    for src, dst in (("nf4-fp32", None), (None, "nf4-fp32")):
        model = orthotune.get_model(load(llama_dir, src), cfg)
        model.save_adapter(tmp_path / f"{src}")
        moved = orthotune.load_adapter(load(llama_dir, dst), tmp_path / f"{src}")
        ours = {k: v for k, v in model.state_dict().items() if ".adapters." in k}
        theirs = {k: v for k, v in moved.state_dict().items() if ".adapters." in k}
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        with moved.disable_adapter():
            base_gap = rel(logits(moved), logits(load(llama_dir, src)))
        assert 0 < rel(logits(moved), logits(model)) < 3 * base_gap + 1e-6


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_peft_qlora_folder_round_trip(quant: str, llama_dir: str, tmp_path) -> None:
    """A LoRA folder peft saved on the same quantised model loads with from_peft and gives peft's outputs;
    export_peft writes it back for peft."""
    import peft

    torch.manual_seed(1)
    pm = peft.get_peft_model(load(llama_dir, quant), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    assert any("bnb" in type(m).__module__ for m in pm.modules())  # peft's own bnb LoRA layers
    expected = logits(pm)
    pm.save_pretrained(tmp_path / "peft")
    ours = orthotune.from_peft(load(llama_dir, quant), tmp_path / "peft")
    assert rel(logits(ours), expected) < 1e-5
    ours.export_peft(tmp_path / "back")
    back = peft.PeftModel.from_pretrained(load(llama_dir, quant), tmp_path / "back")
    assert rel(logits(back), expected) < 1e-5


def test_prepare_model_for_kbit_training(llama_dir: str) -> None:
    base = load(llama_dir, "nf4")
    for m in base.modules():
        if "Norm" in type(m).__name__:
            m.weight.data = m.weight.data.to(torch.bfloat16)
    out = orthotune.prepare_model_for_kbit_training(base)
    assert out is base and base.is_activation_checkpointing
    norms = [m.weight for m in base.modules() if "Norm" in type(m).__name__]
    assert norms and all(w.dtype == torch.float32 and not w.requires_grad for w in norms)
    assert all(not quantized.quantized_param(p) or p.dtype == torch.uint8 for p in base.parameters())
    model = orthotune.get_model(base, orthotune.OFTConfig(target_modules="all-linear", oft_block_size=4))
    model.train()
    model(TOKENS, labels=TOKENS).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("tied", [False, True])
def test_prepare_is_peft_preparation_with_16bit_embeddings(tied: bool, tmp_path) -> None:
    """On a model loaded in bf16 the preparation is peft's, loss for loss, but for untied input embeddings, which
    stay bf16 (2 bytes a parameter less) and return float32 (the same values as peft's float32 lookup); embeddings
    tied to the head are float32 with it. ``upcast_embeddings=True`` is peft's parameter by parameter;
    ``upcast_head=False`` keeps the head (and tied embeddings) in bf16, as QLoRA's script does: bf16 logits, the
    loss within 1%. A head cast to bf16 after the preparation works too (its input is cast); each hook is added
    once however often the model is prepared."""
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    quant = transformers.BitsAndBytesConfig(**QUANT["nf4"])

    def prepared(**flags: bool) -> torch.nn.Module:
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, quantization_config=quant, device_map="cpu")
        if flags.get("peft"):
            return peft.prepare_model_for_kbit_training(base)
        orthotune.prepare_model_for_kbit_training(base, **flags)
        return orthotune.prepare_model_for_kbit_training(base, **flags)  # twice: one hook each

    def loss(model: torch.nn.Module) -> tuple[float, torch.dtype]:
        torch.manual_seed(1)  # the same adapter for each preparation
        adapted = orthotune.get_model(model, orthotune.LoRAConfig(target_modules="all-linear", r=4))
        with torch.no_grad():
            for layer in adapted.adapter_layers():
                torch.nn.init.normal_(layer[1].adapters["default"].lora_B, std=0.02)
        out = adapted(TOKENS, labels=TOKENS)
        out.loss.backward()
        grads = [p.grad for p in adapted.parameters() if p.requires_grad]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
        return out.loss.item(), out.logits.dtype

    ours, upcast, bf16_head = prepared(), prepared(upcast_embeddings=True), prepared(upcast_head=False)
    theirs = prepared(peft=True)
    embedding, head = ours.get_input_embeddings().weight, ours.get_output_embeddings().weight
    assert (embedding is head) == tied
    sixteen = {"ours": set() if tied else {"model.embed_tokens.weight"},
               "bf16_head": {"model.embed_tokens.weight"} | (set() if tied else {"lm_head.weight"})}
    for (name, p), q, h, r in zip(ours.named_parameters(), upcast.parameters(), bf16_head.parameters(), theirs.parameters()):
        assert q.dtype == r.dtype and not p.requires_grad and not h.requires_grad, name  # upcast_embeddings: peft's
        assert p.dtype == (torch.bfloat16 if name in sixteen["ours"] else r.dtype), name
        assert h.dtype == (torch.bfloat16 if name in sixteen["bf16_head"] else r.dtype), name
    assert [n for n, p in ours.named_parameters() if "norm" in n and p.dtype != torch.float32] == []
    nbytes = {k: sum(p.numel() * p.element_size() for p in m.parameters())
              for k, m in (("ours", ours), ("bf16_head", bf16_head), ("peft", theirs))}
    assert nbytes["peft"] - nbytes["ours"] == (0 if tied else 2 * embedding.numel())
    assert nbytes["peft"] - nbytes["bf16_head"] == 2 * embedding.numel() * (1 if tied else 2)
    for model in (ours, upcast, bf16_head):
        assert list(model.get_output_embeddings()._forward_pre_hooks.values()).count(quantized._input_to_weight_dtype) == 1
        assert list(model.get_input_embeddings()._forward_hooks.values()).count(quantized._output_to_float32) == 1
    with torch.no_grad():
        for model in (ours, bf16_head):
            embedded = model.get_input_embeddings()(TOKENS)
            assert embedded.dtype == torch.float32 and torch.equal(embedded, theirs.get_input_embeddings()(TOKENS))
        reference = upcast(TOKENS).logits
        upcast.get_output_embeddings().to(torch.bfloat16)  # as QLoRA's script does after peft's preparation
        cast = upcast(TOKENS).logits
        assert cast.dtype == torch.bfloat16 and float((cast.float() - reference).norm() / reference.norm()) < 1e-2
        upcast.get_output_embeddings().to(torch.float32)  # exact: the values were bf16
    (ours_loss, ours_dtype), (up_loss, up_dtype), (h_loss, h_dtype), (peft_loss, peft_dtype) = map(
        loss, (ours, upcast, bf16_head, theirs))
    assert ours_dtype == up_dtype == peft_dtype == torch.float32 and h_dtype == torch.bfloat16
    assert ours_loss == up_loss == peft_loss and abs(h_loss - peft_loss) < 1e-2 * abs(peft_loss)


def test_clear_errors(llama_dir: str) -> None:
    layer = bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=True)
    assert "has_fp16_weights=True" in quantized.unsupported_reason(layer)
    layer4 = bnb.nn.Linear4bit(16, 16)  # never moved to a device: not quantised yet
    assert "not quantised yet" in quantized.unsupported_reason(layer4)
    net = torch.nn.Sequential(layer4)
    with pytest.raises(ValueError, match="not quantised yet"):
        orthotune.get_model(net, orthotune.LoRAConfig(target_modules=["0"]))
    model = orthotune.get_model(load(llama_dir, "nf4"), orthotune.LOFTConfig(target_modules="all-linear", support="gradient", r=4))
    with pytest.raises(ValueError, match="quantised"):
        orthotune.select_supports(model, [dict(input_ids=TOKENS, labels=TOKENS)], num_batches=1)
    with pytest.raises(ValueError, match="floating-point torch.dtype"):
        model.merge_and_unload(dequantize="bf16")


def assert_starts_at_the_rounding_errors_svd(model: orthotune.AdapterModel, llama_dir: str, r: int) -> None:
    """Each LoRA's s B A is the rank-r SVD of W - Q, Q its layer's base as it is now (an independent float64 SVD)."""
    float_state = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).state_dict()
    for name, layer in model.adapter_layers():
        W = float_state[f"{name}.weight"].double()
        U, S, Vh = torch.linalg.svd(W - quantized.dequantize(layer.base_layer).double())
        want = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        assert rel(layer.adapters["default"].delta_weight().detach().double(), want) < 1e-4


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_loftq_starts_lora_at_the_rounding_errors_principal_part(quant: str, llama_dir: str, tmp_path) -> None:
    """loftq_init sets s B A to the rank-r SVD of W - Q(W) (checked against an independent SVD), which brings
    the adapted model's logits closer to the float model's than QLoRA's zero start (r=16 of 64: 0.064 vs 0.099
    relative on NF4, 0.004 vs 0.008 on int8; a random model's rounding error is spread over all directions,
    so rank r recovers about r/d of it); it then trains as usual."""
    reference = logits(load(llama_dir, None))
    model = orthotune.get_model(load(llama_dir, quant), orthotune.LoRAConfig(target_modules="all-linear", r=16, lora_alpha=32))
    qlora = logits(model)
    report = orthotune.loftq_init(model, llama_dir)
    assert len(report) == 14 and all(after < before for before, after in report.values())
    assert_starts_at_the_rounding_errors_svd(model, llama_dir, 16)
    assert rel(logits(model), reference) < 0.8 * rel(qlora, reference)
    losses = train(model)
    assert losses[-1] < losses[0]
    model.save_adapter(tmp_path / "adapter")  # one alternation leaves the base as loaded: nothing to carry
    assert "own_base" not in json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_loftq_iterations_requantise_the_base_and_travel_with_the_adapter(quant: str, llama_dir: str, tmp_path) -> None:
    """iterations=5 (LoftQ's alternation): each layer's base becomes q(W - s B A), s B A is the rank-r SVD of
    W - Q_5 (an independent SVD), and the error left is below one alternation's on average (the alternation is not
    monotone layer by layer: a random model's int8 rounding is already tiny). That base
    differs from the checkpoint's rounding, so it is saved beside the adapter (save_loftq_base) and a fresh
    quantised base restored with it (load_loftq_base) gives the trained model's logits exactly; the adapter
    folder names those layers, so loading it onto a base without them is refused (a float base: a warning),
    and a peft export, which cannot carry them, warns."""
    lora = orthotune.LoRAConfig(target_modules="all-linear", r=16, lora_alpha=32)
    once = orthotune.loftq_init(orthotune.get_model(load(llama_dir, quant), lora), llama_dir)
    model = orthotune.get_model(load(llama_dir, quant), lora)
    before = packed(model)
    report = orthotune.loftq_init(model, llama_dir, iterations=5)
    assert report.keys() == once.keys()
    assert all(report[n][0] == once[n][0] for n in report)
    ratio = sum(report[n][1] / once[n][1] for n in report) / len(report)  # nf4 0.90, int8 0.96 (not every layer)
    assert ratio < 0.98, (report, once)
    assert all(not torch.equal(before[n], w) for n, w in packed(model).items())
    assert_starts_at_the_rounding_errors_svd(model, llama_dir, 16)
    assert quantized.merge_errors(dict(model.adapter_layers())) == {}  # a start: nothing for a merge to report
    train(model)
    trained = logits(model)
    model.save_adapter(tmp_path / "adapter")
    assert orthotune.save_loftq_base(model, tmp_path / "base.safetensors") == 14
    fresh = load(llama_dir, quant)
    assert orthotune.load_loftq_base(fresh, tmp_path / "base.safetensors") == 14
    assert torch.equal(logits(orthotune.load_adapter(fresh, tmp_path / "adapter")), trained)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["own_base"]
    assert saved == sorted(report)  # the folder says which layers it needs its own base for
    with pytest.raises(ValueError, match="restore them first with orthotune.load_loftq_base"):
        orthotune.load_adapter(load(llama_dir, quant), tmp_path / "adapter")  # the checkpoint's rounding instead
    later = orthotune.get_model(load(llama_dir, quant), lora)  # restored after the adapter is attached, as on resume
    assert orthotune.load_loftq_base(later, tmp_path / "base.safetensors") == 14
    later.load_adapter_weights(tmp_path / "adapter")
    assert torch.equal(logits(later), trained)
    with pytest.warns(UserWarning, match="on this float base \\(14 such layers\\)"):
        orthotune.load_adapter(load(llama_dir, None), tmp_path / "adapter")
    with pytest.warns(UserWarning, match="a peft folder cannot carry"):
        later.export_peft(tmp_path / "peft")
    edited = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**edited, "own_base": ["lm_head"]}))
    with pytest.raises(ValueError, match="invalid 'own_base'"):
        orthotune.load_adapter(load(llama_dir, quant), tmp_path / "adapter")


def test_loftq_base_errors_name_the_problem(llama_dir: str, tmp_path) -> None:
    """A base saved from NF4 layers goes only into the same NF4 layers of the same model; a model that was never
    re-quantised has nothing to save; iterations must be a positive integer and may not re-quantise a base
    that another adapter shares; a merged layer is refused; a refused load or start changes no layer."""
    lora = orthotune.LoRAConfig(target_modules=["q_proj", "v_proj"], r=2)
    model = orthotune.get_model(load(llama_dir, "nf4"), lora)
    with pytest.raises(ValueError, match="no layer of this model was re-quantised"):
        orthotune.save_loftq_base(model, tmp_path / "none.safetensors")
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=r"iterations \(LoftQ's alternations.*\) must be a positive integer"):
            orthotune.loftq_init(model, llama_dir, iterations=bad)
    orthotune.loftq_init(model, llama_dir, iterations=3)
    saved = tmp_path / "base.safetensors"
    assert orthotune.save_loftq_base(model, saved) == 4
    with pytest.raises(ValueError, match="is a Linear, but its stored weight is a bitsandbytes one"):
        orthotune.load_loftq_base(load(llama_dir, None), saved)
    with pytest.raises(ValueError, match="is 8-bit here, its stored weight is 4-bit"):
        orthotune.load_loftq_base(load(llama_dir, "int8"), saved)
    fp4 = load(llama_dir, "fp4")
    untouched = packed(fp4)
    with pytest.raises(ValueError, match=r"\(quant type, block size, shape\) \('nf4'"):
        orthotune.load_loftq_base(fp4, saved)
    assert all(torch.equal(untouched[n], w) for n, w in packed(fp4).items())
    with pytest.raises(FileNotFoundError, match="written by save_loftq_base"):
        orthotune.load_loftq_base(fp4, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="is not a file save_loftq_base wrote"):
        orthotune.load_loftq_base(fp4, f"{llama_dir}/model.safetensors")
    with pytest.raises(ValueError, match="which this model does not have"):
        orthotune.load_loftq_base(orthotune.get_model(load(llama_dir, "nf4"), lora).base_model.model.layers[0], saved)
    two = orthotune.get_model(load(llama_dir, "nf4"), lora)
    two.add_adapter("other", lora)
    with pytest.raises(ValueError, match=r"which adapters \['other'\] share"):
        orthotune.loftq_init(two, llama_dir, iterations=2)
    orthotune.loftq_init(two, llama_dir)  # one alternation leaves the base alone: allowed
    qv = orthotune.get_model(load(llama_dir, "nf4"), lora)
    state = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).state_dict()
    del state["model.layers.1.self_attn.v_proj.weight"]
    untouched = packed(qv)
    with pytest.raises(KeyError, match="model.layers.1.self_attn.v_proj.weight"):  # the last layer's key
        orthotune.loftq_init(qv, state, iterations=3)
    assert all(torch.equal(untouched[n], w) for n, w in packed(qv).items())
    assert all(float(layer.adapters["default"].lora_B.detach().abs().sum()) == 0 for _, layer in qv.adapter_layers())
    with pytest.warns(UserWarning, match="merged into 4 quantised layer"):
        qv.merge()
    with pytest.raises(ValueError, match=r"has adapters merged into its base \(\['default'\]\): unmerge\(\)"):
        orthotune.loftq_init(qv, llama_dir)


def test_loftq_reads_sharded_checkpoints_and_state_dicts(llama_dir: str, tmp_path) -> None:
    """The float weights come from a sharded folder, a single file or a state dict (keys with or without the
    model's base_model_prefix), with the same result."""
    float_model = load(llama_dir, None)
    float_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    state = {k.removeprefix("model."): v for k, v in float_model.state_dict().items()}  # as a bare LlamaModel's
    results = []
    for source in (tmp_path / "sharded", f"{llama_dir}/model.safetensors", state):
        model = orthotune.get_model(load(llama_dir, "nf4"), orthotune.LoRAConfig(target_modules=["q_proj"], r=2))
        orthotune.loftq_init(model, source)
        results.append(torch.cat([layer.adapters["default"].lora_B.flatten() for _, layer in model.adapter_layers()]))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_loftq_errors_name_the_problem(llama_dir: str, tmp_path) -> None:
    lora = orthotune.LoRAConfig(target_modules=["q_proj"], r=2)
    with pytest.raises(ValueError, match="no LoRA adapter 'default' on a bitsandbytes layer"):
        orthotune.loftq_init(orthotune.get_model(load(llama_dir, None), lora), llama_dir)
    with pytest.raises(TypeError, match="is OFT"):
        orthotune.loftq_init(orthotune.get_model(load(llama_dir, "nf4"), orthotune.OFTConfig(target_modules=["q_proj"], r=0, oft_block_size=8)), llama_dir)
    nf4 = orthotune.get_model(load(llama_dir, "nf4"), lora)
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        orthotune.loftq_init(nf4, tmp_path)
    with pytest.raises(KeyError, match="float checkpoint of this very model"):
        orthotune.loftq_init(nf4, {"other.weight": torch.zeros(1)})
