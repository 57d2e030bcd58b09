"""The Hugging Face Hub side of adapter folders: resolving a model id, the model card, uploading.

Everything goes through ``huggingface_hub`` (``snapshot_download``, ``create_repo`` +
``upload_folder``, ``ModelCard``) and only ever touches adapter folders: the base model's weights
are never written or uploaded (``AdapterModel.push_to_hub`` uploads what ``save_pretrained`` wrote).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..version import __version__
from .io import CONFIG_NAME

if TYPE_CHECKING:
    from .adapter_model import AdapterModel

CARD_NAME = "README.md"


def resolve_folder(
    model_id: str | Path,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local adapter folder for ``model_id``: a local path as it is, else the Hub repo's adapter files, downloaded."""
    local = Path(model_id) / (subfolder or "")
    if local.is_dir():
        return local
    if Path(model_id).exists():
        raise ValueError(f"{local} is not a folder: pass the adapter folder (holding {CONFIG_NAME}) or a Hub repo id")
    from huggingface_hub import snapshot_download

    pattern = f"{subfolder}/*" if subfolder else "*"
    try:
        root = snapshot_download(
            str(model_id), revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only,
            allow_patterns=[pattern], library_name="orthotune",
        )  # fmt: skip
    except Exception as err:  # huggingface_hub raises many types (offline, not found, gated, network)
        raise ValueError(
            f"{model_id!r} is neither a local folder nor a Hub repo that could be downloaded ({type(err).__name__}: {err}); "
            "pass the path of a saved adapter folder, or check the repo id and your connection/token"
        ) from err
    return Path(root) / (subfolder or "")


def is_peft_folder(folder: Path) -> bool:
    """Whether ``folder``'s adapter config was written by peft (it names a ``peft_type``)."""
    try:
        data = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False  # the orthotune reader names what is wrong with the folder
    return isinstance(data, dict) and "peft_type" in data


def read_base_model_name(folder: Path) -> str | None:
    """``base_model_name_or_path`` from an adapter config (orthotune's or peft's), or None."""
    data = json.loads((folder / CONFIG_NAME).read_text())
    return data.get("base_model_name_or_path") or None


def write_model_card(model: AdapterModel, directory: str | Path, adapter_names: list[str]) -> None:
    """Create or update ``README.md`` in an adapter folder: library, base model, methods (as peft does)."""
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(directory) / CARD_NAME
    card = ModelCard.load(path) if path.is_file() else ModelCard.from_template(ModelCardData())
    card.data.library_name = "orthotune"
    base_cfg = getattr(model.base_model, "config", None)
    base = getattr(base_cfg, "name_or_path", None)
    if base:
        card.data.base_model = base
    tags = set(card.data.tags or []) | {"orthotune", *(model.configs[n].method for n in adapter_names)}
    card.data.tags = sorted(tags)
    line = f"- orthotune {__version__}"
    if line not in card.text.splitlines():
        card.text = card.text.rstrip("\n") + f"\n\n### Framework versions\n\n{line}\n"
    card.save(path)


def push_adapters(
    model: AdapterModel,
    repo_id: str,
    commit_message: str | None,
    private: bool | None,
    token: str | bool | None,
    revision: str | None,
    create_pr: bool,
    selected_adapters: list[str] | None,
) -> Any:
    """``save_pretrained`` into a temporary folder, then ``create_repo`` + ``upload_folder`` of that folder only."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="orthotune-push-") as tmp:
        model.save_pretrained(tmp, selected_adapters=selected_adapters)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id, folder_path=tmp, commit_message=commit_message or "Upload orthotune adapter",
            revision=revision, create_pr=create_pr, repo_type="model",
        )  # fmt: skip
