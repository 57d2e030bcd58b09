"""peft's decoder tests on the tiny Llama and GPT-2: ``_test_generate``, ``_test_generate_half_prec``,
``_test_passing_input_embeds_works`` and ``_test_disable_adapter`` on generation scores."""

from __future__ import annotations

import pytest
import torch

from .cases import CASES, params
from .harness import batch, make
from .models import KINDS, base_model

pytestmark = pytest.mark.parametrize("case", params([c for c in CASES if KINDS[c.kind].generates]))


def _scores(model, case) -> torch.Tensor:
    kwargs = {"max_new_tokens": 2, "do_sample": False, "return_dict_in_generate": True, "output_scores": True}
    out = model.generate(**batch(case), **kwargs)
    return out.scores[0]


@torch.no_grad()
def test_generate(case) -> None:
    model = make(case).eval()
    out = model.generate(**batch(case), max_new_tokens=3, do_sample=False)
    assert out.shape == (3, 4 + 3)


@torch.no_grad()
def test_generate_half_prec(case) -> None:
    model = make(case, dtype=torch.bfloat16).eval()
    ids = torch.LongTensor([[1, 1, 1], [2, 1, 2]])
    out = model.generate(input_ids=ids, attention_mask=torch.LongTensor([[1, 1, 1], [1, 0, 1]]), max_new_tokens=2)
    assert out.shape == (2, 5)


@torch.no_grad()
def test_generate_disable_adapter(case) -> None:
    scores_base = _scores(base_model(case.kind), case)
    model = make(case, init_identity=False).eval()
    scores_peft = _scores(model, case)
    assert not torch.allclose(scores_base, scores_peft)
    with model.disable_adapter():
        assert torch.allclose(_scores(model, case), scores_base, atol=1e-6, rtol=1e-6)
    assert torch.allclose(_scores(model, case), scores_peft, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_passing_input_embeds_works(case) -> None:
    model = make(case, adapter_name="test-adapter")
    embeds = model.get_input_embeddings()(batch(case)["input_ids"])
    model(inputs_embeds=embeds)
