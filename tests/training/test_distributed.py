"""DDP and FSDP2 on CPU with gloo: two spawned processes against one process on the same global batch.

Each strategy trains a tiny Llama's LoCO adapters for a few AdamW steps (global batch split over the
ranks, gradients clipped): the adapters must be bit-identical across ranks, equal to a single-process
run within float32 tolerance, the frozen base untouched; rank 0's saved folder must load in one
process with the same outputs, and reload into the distributed model. The real CLI runs under
torchrun (and accelerate launch): progress and results come from rank 0 alone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import orthotune
from orthotune.training import distributed

from ..processes import spawn_two

transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"),
    pytest.mark.xdist_group("distributed"),  # one xdist worker builds the module fixtures (two spawned processes) once
]

STEPS, BATCH, SEQ, VOCAB = 3, 4, 8, 64
TARGETS = ["q_proj", "v_proj", "down_proj"]
STRATEGIES = ("ddp", "fsdp")


def make_model() -> orthotune.OrthoModel:
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=SEQ)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    return orthotune.get_model(base, orthotune.LoCOConfig(target_modules=TARGETS, rank=2, chain_length=2))


def global_batch(step: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))
    return {"input_ids": ids, "labels": ids}


def train(model: torch.nn.Module, rank: int, world: int) -> None:
    """The runner's step: this rank's slice, the loss weighted so the averaged gradient is the batch's."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2)
    for step in range(STEPS):
        batch, share = distributed.shard_batch(global_batch(step), rank, world)
        loss = model(**batch).loss
        (loss * (share * world)).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)


def probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init("cpu")
    for strategy in STRATEGIES:  # one spawn for both: starting processes costs more than training here
        _train_and_save(rank, world, strategy, Path(out) / strategy)
    distributed.shutdown()


def _train_and_save(rank: int, world: int, strategy: str, out: Path) -> None:
    model = make_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    wrapped = distributed.wrap(model, strategy)
    train(wrapped, rank, world)
    report: dict = {"trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)}
    model(input_ids=probe())  # with autograd and no backward: the layers keep this forward's planned cores
    report["batched"] = sum(len(layer.planned) for _, layer in model.adapter_layers())
    report["base_change"] = max(
        float((distributed._full(p.detach()) - frozen[n]).abs().max()) for n, p in model.named_parameters() if not p.requires_grad
    )
    state = distributed.full_state(wrapped)
    with torch.no_grad():
        logits = model(input_ids=probe()).logits
        logits = distributed._full(logits)
    distributed.save_adapter(wrapped, out / "adapter")
    # the saved folder reloads into the live (sharded) model: perturb, load, compare
    with torch.no_grad():
        for t in distributed.live_state(wrapped).values():
            t.add_(1.0)
    distributed.load_adapter_weights(wrapped, out / "adapter")
    report["reload_error"] = max(float((distributed._full(v) - state[k]).abs().max()) for k, v in distributed.live_state(wrapped).items())
    if strategy == "ddp":
        merged = distributed.merge_and_unload(wrapped)
        with torch.no_grad():
            report["merge_error"] = float((merged(input_ids=probe()).logits - logits).abs().max())
    else:
        try:
            distributed.merge_and_unload(wrapped)
        except ValueError as err:
            report["merge_refused"] = str(err)
    torch.save({"state": state, "logits": logits, "report": report}, out / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference() -> tuple[dict, torch.Tensor]:
    """One process on the whole batch: the adapter state and the probe's logits."""
    model = make_model()
    train(model, 0, 1)
    with torch.no_grad():
        return distributed.full_state(model), model(input_ids=probe()).logits


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    """Both strategies trained, saved and reloaded by two gloo processes."""
    out = tmp_path_factory.mktemp("spawned")
    spawn_two(_worker, (2, _free_port(), str(out)))
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_match_one(strategy, spawned, reference) -> None:
    tmp_path = spawned / strategy
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ref_state, ref_logits = reference
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), f"{key} differs across ranks"
        torch.testing.assert_close(value, ref_state[key], rtol=1e-4, atol=1e-5, msg=f"{key} differs from one process")
    assert set(ranks[0]["state"]) == set(ref_state)
    for r in ranks:
        report = r["report"]
        assert all(".adapters.default." in n for n in report["trainable"]) and report["trainable"]
        assert report["base_change"] == 0.0  # only adapters train; the frozen base is not touched
        assert report["reload_error"] == 0.0
        # DDP: the model's plan computes every layer's core in one call; FSDP: each sharded block computes its own
        assert report["batched"] == (2 * len(TARGETS) if strategy == "ddp" else 0)
        torch.testing.assert_close(r["logits"], ref_logits, rtol=1e-4, atol=1e-5)
        if strategy == "ddp":
            assert report["merge_error"] < 1e-4
        else:
            assert "FSDP shards" in report["merge_refused"]

    # rank 0's folder is an ordinary adapter: it loads in one process with the distributed run's outputs, and merges
    loaded = orthotune.load_adapter(make_model().unload(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=probe()).logits, ranks[0]["logits"], rtol=1e-5, atol=1e-6)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=probe()).logits, ranks[0]["logits"], rtol=1e-4, atol=1e-5)
    assert not list(tmp_path.glob(".adapter.*"))  # atomic: no temporary folder left behind


def test_launch_env_and_strategy(monkeypatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.launch_env() is None and distributed.resolve("auto") == "none"
    with pytest.raises(ValueError, match="needs a launcher: run under `torchrun"):
        distributed.resolve("ddp")
    with pytest.raises(ValueError, match="distributed"):
        distributed.resolve("deepspeed")
    assert distributed.launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == distributed.Launch(1, 2, 1)
    with pytest.raises(ValueError, match="inconsistent"):
        distributed.launch_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert distributed.resolve("auto") == "ddp"
    assert distributed.is_main_process() and distributed.world_size() == 1  # no group joined


def test_shard_batch_covers_the_batch_once() -> None:
    batch = {"x": torch.arange(10).reshape(5, 2), "y": torch.arange(5), "meta": "kept"}
    parts = [distributed.shard_batch(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([p["x"] for p, _ in parts]), batch["x"]) and parts[0][0]["meta"] == "kept"
    assert [share for _, share in parts] == [3 / 5, 2 / 5]
    with pytest.raises(ValueError, match="cannot be split over 4 processes"):
        distributed.shard_batch({"x": torch.zeros(3)}, 0, 4)
    with pytest.raises(ValueError, match="first dimensions differ"):
        distributed.shard_batch({"x": torch.zeros(3), "y": torch.zeros(4)}, 0, 2)


def test_find_blocks() -> None:
    model = make_model()
    blocks = distributed.find_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * 2
    plain = torch.nn.Sequential(torch.nn.Embedding(4, 4), torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)]))
    assert len(distributed.find_blocks(plain)) == 3


# ---------------------------------------------------------------------------------------------- the CLI under launchers
TINY = ["--task", "text_classification", "--method", "loco", "--device", "cpu", "--steps", "3", "--batch-size", "8",
        "--seed", "1", "--set", "data.train_size=24", "--set", "data.eval_size=16", "--set", "data.eval_split=dev",
        "--set", "model.max_length=16", "--set", "train.eval_before=false", "--set", "train.save_every=2",
        "--set", "adapter.rank=2", "--set", "adapter.chain_length=1"]


def _run_launcher(launcher: list[str], out: Path, strategy: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(orthotune.__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = launcher + ["-m", "orthotune", "finetune", *TINY, "--output-dir", str(out), "--distributed", strategy]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def _check_run(out: Path, proc: subprocess.CompletedProcess, strategy: str) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("text_classification / loco (seed 1): accuracy") == 1  # rank 0 alone reports
    assert proc.stdout.count("x 2 processes") == 1
    results = json.loads((out / "results.json").read_text())
    assert results["distributed"] == {"strategy": strategy, "world_size": 2} and results["steps"] == 3
    assert (out / "curves.png").is_file() and not (out / "checkpoints").exists()
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    from orthotune.recipes.finetune import evaluate_adapter, load_run

    assert evaluate_adapter(*load_run(out)) == results["final"]  # the saved adapter scores what training reported


def _torchrun(*extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), *extra]


def test_cli_under_torchrun(tmp_path) -> None:
    logs = tmp_path / "logs"
    out = tmp_path / "run"
    proc = _run_launcher(_torchrun("--log-dir", str(logs), "--redirects", "3", "--tee", "3"), out, "auto")
    _check_run(out, proc, "ddp")
    rank1 = next(p for p in logs.rglob("*") if p.is_dir() and p.name == "1")
    quiet = (rank1 / "stdout.log").read_text() + (rank1 / "stderr.log").read_text()
    assert "fine-tune text_classification" not in quiet and "accuracy" not in quiet  # no progress bar, no report
    assert "fine-tune text_classification" in proc.stderr  # rank 0's bar



@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate is not installed (pip install orthotune[dist])")
def test_cli_fsdp_under_accelerate(tmp_path) -> None:
    """FSDP through accelerate's launcher: the step-2 checkpoint and the final adapter are gathered from shards.

    ``--multi_gpu`` is accelerate's multi-process launcher (torchrun's agent underneath); ``--cpu``
    would run a single process. Without GPUs the processes join with gloo.
    """
    accelerate = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    out = tmp_path / "run"
    _check_run(out, _run_launcher(accelerate, out, "fsdp"), "fsdp")


# ---------------------------------------------------------------------------------------------- resume under FSDP
def _resume_worker(rank: int, port: int, out: str) -> None:
    from orthotune.recipes.finetune import finetune
    from orthotune.recipes.runconfig import RunConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    for name, stop in (("full", None), ("cut", 2)):
        config = RunConfig.from_dict({
            "task": "text_classification", "method": "loco", "adapter": {"rank": 2, "chain_length": 1},
            "model": {"max_length": 16}, "data": {"train_size": 24, "eval_size": 16, "eval_split": "dev"},
            "train": {"steps": 4, "batch_size": 8, "lr": 5e-3, "warmup": 0.0, "eval_before": False, "save_every": 2},
            "seed": 1, "output_dir": f"{out}/{name}", "device": "cpu"})
        finetune(config, progress=False, stop_after=stop, distributed="fsdp")
    finetune(config, resume=True, progress=False, distributed="fsdp")
    distributed.shutdown()


def test_fsdp_run_resumes_bit_identically(tmp_path) -> None:
    """The runner's FSDP checkpoints (gathered adapter, full optimiser state dict) resume to the uninterrupted run."""
    from safetensors.torch import load_file

    spawn_two(_resume_worker, (_free_port(), str(tmp_path)))
    full, cut = (load_file(str(tmp_path / n / "adapter" / "adapter_model.safetensors")) for n in ("full", "cut"))
    assert all(torch.equal(full[k], cut[k]) for k in full)
    results = [json.loads((tmp_path / n / "results.json").read_text()) for n in ("full", "cut")]
    assert results[0]["history"]["train"] == results[1]["history"]["train"]
