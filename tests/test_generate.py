"""Sampling and the streaming generator on a tiny model."""

import pytest
import torch

from conftest import hf_model
from pocketquant.checkpoints import load_model
from pocketquant.errors import PocketQuantError
from pocketquant.runtime.generate import Sampling, sample, stream_tokens

LOGITS = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_greedy_is_argmax():
    assert torch.equal(sample(LOGITS, Sampling(), None), LOGITS.argmax(-1))


def test_top_k_1_and_tiny_top_p_are_greedy():
    for seed in range(5):
        assert torch.equal(sample(LOGITS, Sampling(temperature=1.0, top_k=1), gen(seed)), LOGITS.argmax(-1))
        assert torch.equal(sample(LOGITS, Sampling(temperature=1.0, top_p=1e-6), gen(seed)), LOGITS.argmax(-1))


def test_settings_too_small_to_tell_tokens_apart_keep_the_likeliest():
    """Tiny temperatures and top_p (which once gave NaN probabilities and killed the server) are greedy; ties
    at the top are drawn among; logits that are NaN are refused in one line."""
    for seed in range(3):
        for kw in ({"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 1.0, "top_p": 1e-300},
                   {"temperature": 2.0, "top_p": 5e-324, "top_k": 10 ** 9}):
            assert torch.equal(sample(LOGITS, Sampling(**kw), gen(seed)), LOGITS.argmax(-1)), kw
    tied = torch.tensor([[1.0, 3.0, 3.0, -2.0]])
    assert {int(sample(tied, Sampling(temperature=1e-300), gen(s))) for s in range(40)} == {1, 2}
    with pytest.raises(PocketQuantError, match="non-finite logits"):
        sample(torch.full((1, 4), float("nan")), Sampling(temperature=1.0), gen(0))


def test_top_k_only_draws_the_k_likeliest():
    top3 = set(torch.topk(LOGITS[0], 3).indices.tolist())
    g = gen(1)
    drawn = {int(sample(LOGITS[:1], Sampling(temperature=2.0, top_k=3), g)) for _ in range(200)}
    assert drawn == top3


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = gen(2)
    drawn = {int(sample(logits, Sampling(temperature=1.0, top_p=0.75), g)) for _ in range(300)}
    assert drawn == {0, 1}


def test_seed_makes_sampling_reproducible():
    s = Sampling(temperature=1.0)
    a = [int(sample(LOGITS[:1], s, g)) for g in [gen(3)] for _ in range(20)]
    b = [int(sample(LOGITS[:1], s, g)) for g in [gen(3)] for _ in range(20)]
    assert a == b and len(set(a)) > 1


@pytest.mark.parametrize("kw, message", [({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"),
                                         ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                         ({"temperature": True}, "temperature"), ({"top_k": 2.5}, "top_k"),
                                         ({"top_p": "1"}, "top_p"), ({"seed": 1.0}, "seed")])
def test_bad_sampling_parameters(kw, message):
    with pytest.raises(PocketQuantError, match=message):
        Sampling(**kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "m"
    hf_model().save_pretrained(path)
    return load_model(path).model


def test_stream_tokens_greedy_equals_full_forward_argmax(tiny):
    prompt = [5, 17, 99, 3]
    out = list(stream_tokens(tiny, prompt, 10))
    seq = prompt + out
    full = tiny(torch.tensor([seq[:-1]])).argmax(-1)[0, len(prompt) - 1:]
    assert out == full.tolist()


def test_stream_tokens_stops_after_a_stop_token(tiny):
    first = next(stream_tokens(tiny, [1, 2, 3], 10))
    assert list(stream_tokens(tiny, [1, 2, 3], 10, stop_ids={first})) == [first]


def test_context_overflow_and_empty_prompt_are_refused(tiny):
    with pytest.raises(PocketQuantError, match="exceeds the model's context of 256 tokens"):
        list(stream_tokens(tiny, [1] * 200, 100))
    with pytest.raises(PocketQuantError, match="prompt is empty"):
        list(stream_tokens(tiny, [], 5))
