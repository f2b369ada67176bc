"""The reference text (``tiercache.corpus``): asking for more of it than there is, or for a
negative amount, is a ``ConfigError`` that says what to ask for instead."""

from __future__ import annotations

import pytest

from tiercache.corpus import reference_text, text_tokens
from tiercache.errors import ConfigError


def words(text: str, add_special_tokens: bool = False) -> dict:
    """A tokenizer of one token per word (enough to count the text in tokens)."""
    return {"input_ids": list(range(len(text.split())))}


def test_text_tokens_slices_the_text():
    n = len(reference_text().split())
    assert text_tokens(words, 10, offset_tokens=n - 10) == list(range(n - 10, n))


@pytest.mark.parametrize("n_tokens, offset_tokens, message", [
    (10, None, "ask for fewer, or start earlier"),
    (-1, 0, ">= 0"),
    (1, -1, ">= 0"),
])
def test_bad_requests_raise_config_error(n_tokens, offset_tokens, message):
    n = len(reference_text().split())
    with pytest.raises(ConfigError, match=message):
        text_tokens(words, n_tokens, n - 5 if offset_tokens is None else offset_tokens)
