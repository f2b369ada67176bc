"""Where greedy answers end: end-of-sequence and the chat template's end-of-turn token (read from
the tokenizer, not hard-coded), the generation config's end tokens, stop strings and
``max_new_tokens``. A scripted stand-in model emits a fixed token sequence, so every case is
exact; the tokenizer is SmolLM2's."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from tiercache.errors import ConfigError
from tiercache.stopping import DEFAULT_STOP, cut_at_stop, end_of_turn_ids, stop_token_ids
from tiercache.generation import greedy_answer

pytestmark = pytest.mark.model


class Scripted(torch.nn.Module):
    """Predicts ``script[i]`` at its i-th forward, whatever the input (as a greedy model would)."""

    def __init__(self, script: list[int], vocab: int, eos=None) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # greedy_answer reads the device from it
        self.script, self.vocab, self.forwards = script, vocab, 0
        self.generation_config = SimpleNamespace(eos_token_id=eos)

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[0, -1, self.script[self.forwards]] = 1.0
        self.forwards += 1
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


def scripted(tok, text: str, eos=None) -> Scripted:
    return Scripted(tok(text, add_special_tokens=False)["input_ids"], len(tok), eos)


def answer(model, tok, **kwargs) -> str:
    return greedy_answer(model, tok, None, [1, 2, 3], **kwargs)


def test_the_default_answer_ends_with_its_first_sentence_or_line(tok):
    model = scripted(tok, " The code is 4417. The code is 4417. The code is 4417. The code is 4417.")
    assert answer(model, tok) == "The code is 4417."
    assert model.forwards == len(tok(" The code is 4417. The", add_special_tokens=False)["input_ids"])
    assert answer(scripted(tok, "\n58203.\nWhat is the vault code?"), tok) == "58203."
    assert answer(scripted(tok, " Is it? Yes it is."), tok) == "Is it?"
    assert answer(scripted(tok, " Version 3.12 of Python. More"), tok) == "Version 3.12 of Python."


def test_stop_strings_are_kept_as_generate_keeps_them(tok):
    text = " 4417 Question: what else? The code is"
    assert answer(scripted(tok, text), tok, stop="Question:") == "4417 Question:"
    assert answer(scripted(tok, text), tok, stop=["else", "4417"]) == "4417"
    whole = scripted(tok, text)
    assert answer(whole, tok, stop=None, max_new_tokens=len(whole.script)) == text.strip()
    assert cut_at_stop("\n\nno stop here", DEFAULT_STOP) is None


def test_end_of_turn_token_is_read_from_the_chat_template(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tok) == {im_end}
    # A tokenizer whose end-of-sequence token is not the end of a turn: the template still ends it.
    other = copy.deepcopy(tok)
    other.eos_token = "<|endoftext|>"
    assert other.eos_token_id != im_end
    model = scripted(other, " Paris<|im_end|> is the capital of France")
    assert stop_token_ids(model, other) == {im_end, other.eos_token_id}
    assert answer(model, other, stop=None) == "Paris"
    assert model.forwards == 2
    other.chat_template = None
    assert end_of_turn_ids(other) == set()


def test_end_of_sequence_tokens_of_tokenizer_and_generation_config(tok):
    eos = tok.eos_token_id
    model = Scripted(tok(" 12 34 56", add_special_tokens=False)["input_ids"] + [eos, 5, 5], len(tok))
    assert answer(model, tok, stop=None) == "12 34 56"
    ids = tok(" red green blue", add_special_tokens=False)["input_ids"]
    model = Scripted(ids, len(tok), eos=[ids[1], 7])  # generate's list of end tokens
    assert answer(model, tok, stop=None) == "red"


def test_max_new_tokens_bounds_the_answer(tok):
    model = scripted(tok, " one two three four five six seven eight")
    assert answer(model, tok, stop=None, max_new_tokens=3) == "one two three"
    assert model.forwards == 3, "the last token needs no forward"
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="max_new_tokens"):
            answer(model, tok, max_new_tokens=bad)
    for bad in ("", ["\n", ""], [3]):
        with pytest.raises(ConfigError, match="stop strings"):
            answer(model, tok, stop=bad)
