"""The peft user's workflow on orthotune: task_type, deleting the active adapter, the hub workflow
(offline: uploads intercepted), peft's names and utilities, and peft folders peft itself loads."""

from __future__ import annotations

import json
import warnings

import pytest
import safetensors.torch
import torch
import transformers
from torch import nn

import orthotune
from orthotune import HRAConfig, LoRAConfig, OFTConfig, OrthoModel
from orthotune.model.io import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict
from orthotune.layer.adapter_layer import ModulesToSave

from ..conftest import MLP, MODELS
from .test_peft_interop import fresh, perturb

peft = pytest.importorskip("peft")


def tiny_bert(tmp_path=None, cls: type = transformers.BertForSequenceClassification) -> nn.Module:
    """A tiny BERT with a head; saved and reloaded from ``tmp_path`` so its config names a base model."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, num_labels=3)  # fmt: skip
    model = cls(cfg).eval()
    if tmp_path is None:
        return model
    model.save_pretrained(tmp_path)
    return cls.from_pretrained(tmp_path).eval()


def tiny_llama_cls() -> nn.Module:
    """A tiny Llama sequence classifier: its head is ``score``."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, num_labels=3, pad_token_id=0)  # fmt: skip
    return transformers.LlamaForSequenceClassification(cfg).eval()


IDS = torch.tensor([[1, 5, 7, 9, 2], [3, 4, 8, 6, 2]])


# ------------------------------------------------------------------------------------------------ bug 1 + task_type
@pytest.mark.parametrize("peft_cls,kwargs", [("LoraConfig", dict(r=2, init_lora_weights=False)), ("OFTConfig", dict(oft_block_size=4, init_weights=False))])
def test_peft_seq_cls_folder_loads_with_its_head(peft_cls, kwargs, tmp_path) -> None:
    config = getattr(peft, peft_cls)(task_type="SEQ_CLS", target_modules=["query", "value"], **kwargs)
    theirs = peft.get_peft_model(tiny_bert(), config)
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / CONFIG_NAME).read_text())["modules_to_save"] == ["classifier", "score"]
    ours = orthotune.from_peft(tiny_bert(), tmp_path / "p")  # bert has "classifier", not "score"
    assert ours.configs["default"].task_type == "SEQ_CLS" and ours.configs["default"].modules_to_save is None
    assert [n for n, _ in ours.saved_modules()] == ["classifier"]
    assert torch.allclose(ours(IDS).logits, theirs(IDS).logits, atol=1e-5)


def test_modules_to_save_error_names_its_field() -> None:
    with pytest.raises(ValueError, match="modules_to_save entry 'classifer' matches no module.*did you mean"):
        orthotune.get_model(tiny_bert(), LoRAConfig(target_modules=["query"], modules_to_save=["classifer"]))


@pytest.mark.parametrize("make,head", [(tiny_bert, "classifier"), (tiny_llama_cls, "score")])
def test_task_type_trains_and_saves_the_tasks_head(make, head, tmp_path) -> None:
    targets = ["query", "value"] if head == "classifier" else ["q_proj", "v_proj"]
    model = orthotune.get_model(make(), OFTConfig(target_modules=targets, oft_block_size=4, task_type=orthotune.TaskType.SEQ_CLS))
    assert model.configs["default"].task_type == "SEQ_CLS"
    saved = dict(model.saved_modules())
    assert list(saved) == [head] and all(p.requires_grad for p in saved[head].copies["default"].parameters())
    with torch.no_grad():
        for p in saved[head].copies["default"].parameters():
            p.add_(0.1)
    model.save_pretrained(tmp_path / "a")
    again = orthotune.load_adapter(make(), tmp_path / "a")
    assert torch.allclose(again(IDS).logits, model(IDS).logits, atol=1e-6)
    model.export_peft(tmp_path / "p")  # peft reads the task back and picks its sequence-classification class
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "p")
    assert isinstance(theirs, peft.PeftModelForSequenceClassification)
    assert torch.allclose(theirs(IDS).logits, model(IDS).logits, atol=1e-5)


def test_task_type_heads_absent_from_the_model_are_skipped_and_bad_names_refused() -> None:
    model = orthotune.get_model(tiny_bert(), LoRAConfig(target_modules=["query"], task_type="QUESTION_ANS"))
    assert list(model.saved_modules()) == []  # a classifier model has no qa_outputs
    with pytest.raises(ValueError, match="task_type='SEQ_CLASSIFICATION' is not a peft task type"):
        LoRAConfig(task_type="SEQ_CLASSIFICATION")


# ------------------------------------------------------------------------------------------------ bug 2
def test_deleting_the_active_adapter_falls_back_then_reports_the_base_model(tmp_path) -> None:
    model = orthotune.get_model(MLP(), LoRAConfig(target_modules=["lin0"], init_identity=False), "b")
    model.add_adapter("a", LoRAConfig(target_modules=["lin1"], init_identity=False))
    with pytest.warns(UserWarning, match="adapter 'b' was active and is deleted: adapter 'a' is active now"):
        model.delete_adapter("b")
    assert model.active_adapters == ["a"] and model.active_adapter == "a"
    assert all(p.requires_grad for n, p in model.named_parameters() if ".adapters.a." in n)
    x = torch.randn(3, 16)
    with pytest.warns(UserWarning, match="last adapter: the model now computes its base model"):
        model.delete_adapter("a")
    assert model.active_adapters == []
    with pytest.raises(ValueError, match="no adapter is active, so the model computes its base model"):
        model.active_adapter  # noqa: B018
    with pytest.raises(ValueError, match="the model has no adapters"):
        model.save_pretrained(tmp_path / "s")
    torch.manual_seed(0)
    assert torch.equal(model(x), MLP()(x))


def test_deleting_one_of_two_active_adapters_keeps_the_other() -> None:
    model = orthotune.get_model(MLP(), LoRAConfig(target_modules=["lin0"]), "a")
    model.add_adapter("b", LoRAConfig(target_modules=["lin1"]))
    model.add_adapter("c", LoRAConfig(target_modules=["lin2"]))
    model.set_adapter(["b", "c"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.delete_adapter("b")
    assert model.active_adapters == ["c"]


# ------------------------------------------------------------------------------------------------ bug 3 + hub
@pytest.fixture
def hub(monkeypatch):
    """huggingface_hub's create_repo/upload_folder intercepted: records the uploaded files (no hub here)."""
    from huggingface_hub import HfApi

    calls: dict = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        from pathlib import Path

        root = Path(folder_path)
        calls["files"] = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        calls["upload"] = (repo_id, kwargs)
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_adapter_folder_only(hub, tmp_path) -> None:
    model = orthotune.get_model(tiny_bert(tmp_path / "base"), LoRAConfig(target_modules=["query"], task_type="SEQ_CLS"))
    model.add_adapter("other", HRAConfig(target_modules=["value"], r=2))
    assert model.push_to_hub("me/adapter", private=True, commit_message="hi") == "commit-info"
    assert hub["repo"] == ("me/adapter", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert hub["upload"][1]["commit_message"] == "hi"
    assert sorted(hub["files"]) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md", f"other/{CONFIG_NAME}",
                                           f"other/{WEIGHTS_NAME}"])  # fmt: skip
    for name, folder in (("default", ""), ("other", "other/")):  # the adapters' tensors, nothing of the base model
        uploaded = safetensors.torch.load(hub["files"][folder + WEIGHTS_NAME])
        assert uploaded.keys() == adapter_state_dict(model, name).keys()
    card = hub["files"]["README.md"].decode()
    assert "library_name: orthotune" in card and f"base_model: {tmp_path / 'base'}" in card


def test_from_pretrained_is_orthotunes_and_full_model_io_is_not_reached(tmp_path) -> None:
    model = orthotune.get_model(tiny_bert(tmp_path / "base"), OFTConfig(target_modules=["query"], oft_block_size=4, init_identity=False))
    model.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    loaded = orthotune.PeftModel.from_pretrained(tiny_bert(tmp_path / "base"), tmp_path / "a")
    assert isinstance(loaded, OrthoModel) and torch.allclose(loaded(IDS).logits, model(IDS).logits, atol=1e-6)
    assert type(model).from_pretrained.__func__ is OrthoModel.from_pretrained.__func__
    for name in ("_upload_modified_files", "save_distributed_checkpoint"):
        with pytest.raises(AttributeError, match="would write or upload the full base model"):
            getattr(model, name)


def test_from_pretrained_downloads_a_hub_id(monkeypatch, tmp_path) -> None:
    model = orthotune.get_model(fresh("mlp"), LoRAConfig(target_modules=["lin0"], init_identity=False))
    model.save_pretrained(tmp_path / "repo" / "sub")
    seen = {}

    def snapshot_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(tmp_path / "repo")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = OrthoModel.from_pretrained(fresh("mlp"), "me/adapter", subfolder="sub", revision="v1")
    assert seen["repo_id"] == "me/adapter" and seen["revision"] == "v1" and seen["allow_patterns"] == ["sub/*"]
    x = torch.randn(2, 16)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_unreachable_model_id_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="neither a local folder nor a Hub repo that could be downloaded"):
        OrthoModel.from_pretrained(MLP(), "nobody/nothing-here")


def test_auto_model_loads_base_and_adapter_from_the_folder(tmp_path) -> None:
    model = orthotune.get_model(tiny_bert(tmp_path / "base"), OFTConfig(target_modules=["query"], oft_block_size=4,
                                                                         init_identity=False, task_type="SEQ_CLS"))  # fmt: skip
    model.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["base_model_name_or_path"] == str(tmp_path / "base")
    for cls in (orthotune.AutoOrthoModel, orthotune.AutoOrthoModelForSequenceClassification):
        loaded = cls.from_pretrained(tmp_path / "a")
        assert isinstance(loaded.base_model, transformers.BertForSequenceClassification)
        assert torch.allclose(loaded(IDS).logits, model(IDS).logits, atol=1e-6)
        assert loaded.get_nb_trainable_parameters()[0] == 0 and not loaded.training  # is_trainable=False


# ------------------------------------------------------------------------------------------------ bug 4
def test_adapter_names_is_honoured_not_swallowed() -> None:
    """``adapter_names`` reaches the adapters (it used to vanish into transformers' ``**kwargs``)."""
    model = orthotune.get_model(tiny_llama_cls(), LoRAConfig(target_modules=["q_proj"], init_identity=False)).eval()
    one = IDS[:1]
    with torch.no_grad():
        mixed = model(torch.cat([one, one]), adapter_names=["default", "__base__"]).logits
        adapted = model(one).logits
        with model.disable_adapter():
            base = model(one).logits
    assert not torch.allclose(adapted, base)
    assert torch.allclose(mixed[:1], adapted, atol=1e-6) and torch.allclose(mixed[1:], base, atol=1e-6)


# ------------------------------------------------------------------------------------------------ bug 5
@pytest.mark.parametrize(
    "cls,kwargs,edit,warns",
    [
        ("BOFTConfig", dict(boft_block_size=2, boft_n_butterfly_factor=2), None, "boft_n_butterfly_factor=2, its boft_R tensors hold 1 factor"),
        ("OFTConfig", dict(oft_block_size=5), None, "oft_block_size=5, its oft_R tensors hold blocks of size 4"),
        ("OFTConfig", dict(oft_block_size=4), {"peft_version": "0.17.1"}, "Cayley-Neumann series of peft < 0.18"),
        ("OFTConfig", dict(oft_block_size=4, module_dropout=0.1), None, None),
        ("OFTConfig", dict(r=2, oft_block_size=0, use_cayley_neumann=False), None, None),
    ],
    ids=["boft-without-cuda-extension", "oft-adjusted-block", "oft-old-neumann", "oft-module-dropout", "oft-r-exact"],
)
def test_folders_peft_loads_load_and_compute_what_peft_computes(cls, kwargs, edit, warns, tmp_path) -> None:
    """No ``boft_factors`` fixture: peft here runs without its CUDA extension, as the folder's maker did."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(fresh("mlp"), getattr(peft, cls)(target_modules=MODELS["mlp"][1], init_weights=False, **kwargs))
        perturb(theirs)
        theirs.save_pretrained(tmp_path / "p")
    if edit:
        cfg = json.loads((tmp_path / "p" / CONFIG_NAME).read_text())
        (tmp_path / "p" / CONFIG_NAME).write_text(json.dumps({**cfg, **edit}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(fresh("mlp"), tmp_path / "p").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = orthotune.from_peft(fresh("mlp"), tmp_path / "p").eval()
    messages = [str(w.message) for w in caught]
    assert (warns is None) or any(warns in m for m in messages), messages
    x = MODELS["mlp"][2]()
    assert torch.allclose(ours(x), reloaded(x), atol=1e-5)


# ------------------------------------------------------------------------------------------------ peft's names
def test_peft_names_behave_as_in_peft() -> None:
    model = orthotune.get_peft_model(MLP(), HRAConfig(target_modules=["lin0", "lin1"], r=2, init_identity=False))
    x = torch.randn(4, 16)
    y = model(x)
    assert model.peft_config is model.configs and model.active_peft_config is model.configs["default"]
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) and total > trainable
    model.merge_adapter()
    assert model.merged and torch.allclose(model(x), y, atol=1e-5)
    model.unmerge_adapter()
    assert not model.merged
    model.disable_adapter_layers()
    torch.manual_seed(0)
    assert torch.allclose(model(x), MLP()(x), atol=1e-6) and model.get_nb_trainable_parameters()[0] == 0
    assert model.get_model_status().enabled is False
    model.enable_adapter_layers()
    assert torch.allclose(model(x), y, atol=1e-6) and model.get_nb_trainable_parameters()[0] == trainable
    model.set_requires_grad("default", False)
    assert model.get_nb_trainable_parameters()[0] == 0
    status = model.get_model_status()
    assert status.requires_grad == {"default": False} and status.num_adapter_layers == 2
    assert status.peft_types == {"default": "HRA"} and status.active_adapters == ["default"] and status.enabled is True
    layers = orthotune.get_layer_status(model)
    assert [s.name for s in layers] == ["lin0", "lin1"] and layers[0].available_adapters == ["default"]


def test_peft_model_state_dict_round_trip_and_inject() -> None:
    config = LoRAConfig(target_modules=["lin0"], init_identity=False)
    model = orthotune.get_model(fresh("mlp"), config)
    state = orthotune.get_peft_model_state_dict(model)
    from_full = orthotune.get_peft_model_state_dict(model, state_dict=model.state_dict())
    assert state.keys() == from_full.keys() and all(torch.equal(state[k], from_full[k]) for k in state)
    other = orthotune.get_model(fresh("mlp"), config)
    result = orthotune.set_peft_model_state_dict(other, state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(2, 16)
    assert torch.equal(other(x), model(x))
    with pytest.raises(ValueError, match="has shape .* ignore_mismatched_sizes=True"):
        orthotune.set_peft_model_state_dict(other, {k: v[:1] for k, v in state.items()})
    plain = orthotune.inject_adapter_in_model(config, fresh("mlp"), state_dict=state)
    assert type(plain) is MLP and torch.equal(plain(x), model(x))
    assert {n for n, p in plain.named_parameters() if p.requires_grad} == {n for n in dict(plain.named_parameters()) if ".adapters." in n}


def test_save_selected_adapters_and_load_frozen(tmp_path) -> None:
    model = orthotune.get_model(MLP(), LoRAConfig(target_modules=["lin0"], init_identity=False, modules_to_save=["head"]))
    model.add_adapter("b", OFTConfig(target_modules=["lin1"], oft_block_size=4, init_identity=False))
    model.save_pretrained(tmp_path / "s", selected_adapters=["b"])
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["README.md", "b"]
    with pytest.raises(ValueError, match=r"selected_adapters \['zz'\] do not exist"):
        model.save_pretrained(tmp_path / "t", selected_adapters=["zz"])
    model.save_pretrained(tmp_path / "all")
    loaded = orthotune.PeftModel.from_pretrained(MLP(), tmp_path / "all")  # is_trainable=False, peft's default
    assert loaded.get_nb_trainable_parameters()[0] == 0 and not loaded.training
    loaded.load_adapter(tmp_path / "all" / "b", "b", is_trainable=True)
    loaded.set_adapter("b")
    assert loaded.get_nb_trainable_parameters()[0] == sum(p.numel() for p in dict(model.adapter_layers())["lin1"].adapters["b"].parameters())
    loaded.set_adapter("default", inference_mode=True)  # frozen, as peft's inference_mode
    assert loaded.get_nb_trainable_parameters()[0] == 0
    loaded.set_adapter("default")  # peft's set_adapter makes the adapter trainable
    assert loaded.get_nb_trainable_parameters()[0] > 0
    trainable = orthotune.PeftModel.from_pretrained(MLP(), tmp_path / "all", is_trainable=True)
    saved = dict(trainable.saved_modules())["head"].copies["default"]
    assert all(p.requires_grad for p in saved.parameters())
    assert isinstance(trainable.base_model.head, ModulesToSave)
