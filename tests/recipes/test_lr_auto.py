"""``orthotune finetune --lr auto``: the range test on held-out training batches, its record, then the full run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orthotune.cli import main
from orthotune.recipes.finetune import trial
from orthotune.recipes import lr_search
from orthotune.recipes.lr_search import FACTORS, MAX_EXTENSIONS, RECORD, TrainingSlice, next_factor, resolve_lr, validation_data
from orthotune.recipes.runconfig import load_run_config
from orthotune.recipes.task import Task, batch_indices

pytest.importorskip("transformers")
TEXT = Path(__file__).resolve().parents[2] / "recipes" / "text_banking77.yaml"


class Numbers(Task):
    """A task whose batches are their example indices: what a slice trains on and holds out is visible."""

    name, metric = "numbers", "loss"

    def __init__(self, n: int) -> None:
        self.n, self.seed, self.device = n, 7, torch.device("cpu")

    def train_size(self) -> int:
        return self.n

    def train_batch(self, epoch: int, index: int, batch_size: int) -> torch.Tensor:
        return torch.tensor(batch_indices(self.n, batch_size, self.seed, epoch, index), dtype=torch.float32)

    def loss(self, model, batch, step):
        return model(batch[:, None]).pow(2).mean()


def test_the_slice_never_trains_on_its_held_out_batches() -> None:
    view = TrainingSlice(Numbers(50), batch_size=8, holdout=2)  # 7 batches: 5 to train on, 2 held out
    assert view.batches_per_epoch(8) == 5
    trained = {int(i) for epoch in range(4) for index in range(5) for i in view.train_batch(epoch, index, 8)}
    held = {int(i) for b in view.heldout for i in b}
    assert len(held) == 50 - 40 and not trained & held and trained | held == set(range(50))
    model = torch.nn.Linear(1, 1)
    with torch.no_grad():
        expected = float(sum(model(b[:, None]).pow(2).mean() for b in view.heldout) / 2)
    assert view.evaluate(model)["heldout_loss"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="holds out 7 training batches .* only 7 batches"):
        TrainingSlice(Numbers(50), batch_size=8, holdout=7)


def test_resume_reads_the_recorded_choice(tmp_path) -> None:
    config = load_run_config(TEXT, ["train.lr=auto", f"output_dir={tmp_path}"])
    (tmp_path / RECORD).write_text(json.dumps({"chosen": 0.0042}))
    resolved, record = resolve_lr(config, tmp_path, resume=True, progress=False, prepare=trial)
    assert resolved.train.lr == 0.0042 and record["chosen"] == 0.0042
    same, none = resolve_lr(resolved, tmp_path, resume=False, progress=False, prepare=trial)
    assert same is resolved and none is None  # a number is kept as it is


def test_lr_auto_chooses_a_candidate_records_it_and_runs(tmp_path, capsys) -> None:
    out = tmp_path / "auto"
    main(["finetune", "--config", str(TEXT), "--quiet", "--device", "cpu", "--output-dir", str(out), "--steps", "8",
          "--lr", "auto", "--seed", "1", "--set", "data.train_size=48", "--set", "data.eval_size=40",
          "--set", "train.batch_size=8", "--set", "train.eval_every=0", "--set", "model.max_length=32"])
    assert "text_classification / loco (seed 1): accuracy" in capsys.readouterr().out
    record = json.loads((out / RECORD).read_text())
    centre = 3e-3  # LoCO's default (orthotune.methods.defaults)
    tried = [t["lr"] for t in record["trials"]]
    assert record["centre"] == centre and tried[:3] == pytest.approx([centre * f for f in FACTORS])
    assert record["extensions"] == len(tried) - 3 <= MAX_EXTENSIONS  # each one a factor 3 beyond the edge then best
    for i in range(3, len(tried)):
        assert tried[i] == pytest.approx(max(tried[:i]) * 3) or tried[i] == pytest.approx(min(tried[:i]) / 3)
    assert record["chosen"] in tried
    scores = {t["lr"]: t["score"] for t in record["trials"]}
    assert scores[record["chosen"]] == min(s for s in scores.values() if s is not None)
    assert all(t["score"] == -t["accuracy"] for t in record["trials"] if t["score"] is not None)  # higher accuracy wins
    assert record["score"] == "accuracy on the validation split (dev)" and record["steps_per_trial"] == 2
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["train"]["lr"] == record["chosen"] and results["lr_search"] == record
    assert results["steps"] == 8 and (out / "adapter").is_dir()


def test_lr_auto_refuses_full_fine_tuning(tmp_path) -> None:
    config = load_run_config(TEXT, ["train.lr=auto", "method=full", "adapter=null", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="full fine-tuning has none: set train.lr"):
        resolve_lr(config, tmp_path, resume=False, progress=False, prepare=trial)


def test_cli_refuses_a_bad_lr(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["finetune", "--config", str(TEXT), "--lr", "fast"])
    assert "expected a number or 'auto'" in capsys.readouterr().err


def _trials(scores: dict[float, float | None]) -> list[dict]:
    return [{"factor": f, "lr": f, "score": v} for f, v in scores.items()]


def test_the_grid_grows_past_an_edge_that_wins() -> None:
    assert next_factor(_trials({1 / 3: 2.0, 1.0: 1.0, 3.0: 1.5})) is None  # an interior best: done
    assert next_factor(_trials({1 / 3: 2.0, 1.0: 1.5, 3.0: 1.0})) == pytest.approx(9.0)
    assert next_factor(_trials({1 / 3: 1.0, 1.0: 1.5, 3.0: None})) == pytest.approx(1 / 9)
    assert next_factor(_trials({1 / 3: 2.0, 1.0: 1.5, 3.0: 1.0, 9.0: None})) is None  # the step beyond diverged
    assert next_factor(_trials({1 / 3: None, 1.0: None, 3.0: None})) is None


@pytest.mark.parametrize("best, expected", [(9.0, [1 / 3, 1, 3, 9, 27]), (81.0, [1 / 3, 1, 3, 9, 27]), (1 / 9, [1 / 3, 1, 3, 1 / 9, 1 / 27]),
                                            (1.0, [1 / 3, 1, 3])])
def test_the_range_test_finds_a_rate_beyond_the_default_grid(tmp_path, monkeypatch, best, expected) -> None:
    """A held-out loss that is lowest at ``best`` x the default: the search walks to it, at most two steps past the grid."""
    import math
    from types import SimpleNamespace

    config = load_run_config(TEXT, ["train.lr=auto", f"output_dir={tmp_path}", "data.train_size=48", "train.batch_size=8"])
    centre = config.adapter_config().default_learning_rate()
    view = SimpleNamespace(metric="heldout_loss", higher_is_better=False, train_batches=5)
    monkeypatch.setattr(lr_search, "fit", lambda model, task, settings, *a, **k: SimpleNamespace(
        history={"eval": [(1, {"heldout_loss": math.log(settings.lr / (centre * best)) ** 2})]}))
    record = lr_search.search_lr(config, lambda cfg, view_of: (view, None))
    assert [t["factor"] for t in record["trials"]] == pytest.approx(expected)
    assert record["chosen"] == pytest.approx(centre * min(expected, key=lambda f: abs(math.log(f / best))))


def test_trials_are_scored_on_the_validation_split_where_the_data_has_one(tmp_path) -> None:
    text = load_run_config(TEXT, ["train.lr=auto"])
    assert validation_data(text)["eval_split"] == "dev"  # BANKING77's dev split
    vit = load_run_config(TEXT.parent / "vit_digits.yaml", ["train.lr=auto"])
    assert validation_data(vit)["eval_split"] == "val"  # the recipe's held-out tuning images
    rows = "text,label\n" + "".join(f"example {i},{'ab'[i % 2]}\n" for i in range(20))
    (tmp_path / "train.csv").write_text(rows)
    (tmp_path / "val.csv").write_text(rows)
    own = load_run_config(TEXT, ["train.lr=auto", f"data.train_file={tmp_path / 'train.csv'}", "data.eval_split=test",
                                 f"data.test_file={tmp_path / 'val.csv'}"])
    assert validation_data(own) is None  # no validation_file: held-out training batches score instead
    with_val = own.with_overrides([f"data.validation_file={tmp_path / 'val.csv'}"])
    assert validation_data(with_val)["eval_split"] == "dev"



def test_without_a_validation_split_held_out_training_batches_score(tmp_path, capsys) -> None:
    rows = "text,label\n" + "".join(f"{'good' if i % 2 else 'bad'} example number {i},{'ab'[i % 2]}\n" for i in range(48))
    (tmp_path / "train.csv").write_text(rows)
    (tmp_path / "test.csv").write_text(rows)
    out = tmp_path / "auto"
    main(["finetune", "--config", str(TEXT), "--quiet", "--device", "cpu", "--output-dir", str(out), "--steps", "8",
          "--lr", "auto", "--set", f"data.train_file={tmp_path / 'train.csv'}", "--set", f"data.test_file={tmp_path / 'test.csv'}",
          "--set", "train.batch_size=8", "--set", "train.eval_every=0", "--set", "model.max_length=32"])
    capsys.readouterr()
    record = json.loads((out / RECORD).read_text())
    assert record["score"] == "mean training loss on held-out training batches"
    assert record["heldout_batches"] == 1 and record["train_batches"] == 5  # 6 batches of 8: the last one scores
    assert all(t["score"] == t["heldout_loss"] for t in record["trials"] if t["score"] is not None)
