"""Answering questions greedily over a cache: ``greedy_answer`` (a question and its answer fed
after what a cache holds, ended as ``generate`` ends it), ``ask_cache`` (one question over a
``TieredCache``'s context, truncated away afterwards) and ``full_attention_answers`` (the same
questions over the whole context with the model's own attention: the reference tiercache's
answers are compared with)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch

from .errors import ConfigError, ShapeError, TiercacheError
from .hf.cache import TieredCache
from .stopping import DEFAULT_STOP, cut_at_stop, stop_strings, stop_token_ids


@torch.no_grad()
def greedy_answer(model, tokenizer, cache, question_ids: Sequence[int], max_new_tokens: int = 32,
                  stop: str | Sequence[str] | None = DEFAULT_STOP) -> str:
    """Feed ``question_ids`` after what ``cache`` holds and decode greedily, as ``generate``
    does: the answer ends at an end-of-sequence or end-of-turn token (``stopping.stop_token_ids``),
    with the first of the ``stop`` strings after its leading whitespace (kept, as ``generate``
    keeps it; default ``stopping.DEFAULT_STOP``: the first line or sentence; ``None``: none), or
    after ``max_new_tokens`` tokens. Returns the answer stripped of surrounding whitespace;
    leaves the question and answer in ``cache``."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    stops = stop_strings(stop)
    end_ids = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    out = model(torch.tensor([list(question_ids)], device=device), past_key_values=cache, use_cache=True)
    generated: list[int] = []
    for step in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        if token in end_ids:
            break
        generated.append(token)
        answer = cut_at_stop(tokenizer.decode(generated, skip_special_tokens=True), stops)
        if answer is not None:
            return answer
        if step + 1 < max_new_tokens:
            out = model(torch.tensor([[token]], device=device), past_key_values=cache, use_cache=True)
    return tokenizer.decode(generated, skip_special_tokens=True).strip()


def question_ids(tokenizer, question: str) -> list[int]:
    """Token ids of ``question`` (no special tokens); ``ShapeError`` if it is empty."""
    if not isinstance(question, str) or not question.strip():
        raise ShapeError(f"a question must be a non-empty str, got {question!r:.80}")
    return tokenizer(question, add_special_tokens=False)["input_ids"]


def ask_cache(model, tokenizer, cache: TieredCache, question: str, max_new_tokens: int = 32,
              stop: str | Sequence[str] | None = DEFAULT_STOP, hold: bool = False) -> str:
    """Answer ``question`` over the context ``cache`` holds and truncate the question and answer
    away again. The question is prefilled with ``prefill="retrieval"``: all its query positions
    score the units of the whole context together and each layer attends sink + window + the top
    units. With ``hold`` (ReKV) the answer's decode steps attend that same selection (plus sink and
    the recent window, which holds the question and answer); without, every decode step selects
    anew from its own query. See ``greedy_answer`` for ``max_new_tokens`` and ``stop``.
    ``ShapeError`` if the cache holds no context yet."""
    ids = question_ids(tokenizer, question)
    tokens = cache.get_seq_length()
    if tokens == 0:
        raise ShapeError("nothing to answer from: the context is empty (append to the stream, or load a "
                         "stored context, before asking)")
    mode, held = cache.prefill, cache.hold_selection
    cache.prefill, cache.hold_selection = "retrieval", hold
    try:
        answer = greedy_answer(model, tokenizer, cache, ids, max_new_tokens, stop)
        cache.truncate(tokens)
        return answer
    except BaseException:
        # Interrupted inside a forward (Ctrl-C), the layers hold different lengths and the cache
        # refuses the truncation: the interruption is the error to report, not the truncation.
        with contextlib.suppress(TiercacheError):
            cache.truncate(tokens)
        raise
    finally:
        cache.prefill, cache.hold_selection = mode, held


@torch.no_grad()
def full_attention_answers(model, tokenizer, questions: Sequence[str], *,
                           input_ids: Sequence[int] | None = None, inputs_embeds: torch.Tensor | None = None,
                           max_new_tokens: int = 32, stop: str | Sequence[str] | None = DEFAULT_STOP,
                           progress: bool = False) -> list[str]:
    """The reference: each of ``questions`` answered with the model's own attention (what it was
    loaded with: TieredCache's forwards alone switch it) over the whole context (``input_ids``,
    or ``inputs_embeds`` of shape ``(tokens, hidden)``) in a ``DynamicCache``, prefilled once;
    each question is answered from a copy of it. ``progress``: a progress bar on stderr (the
    first step includes the prefill). See ``greedy_answer`` for ``max_new_tokens`` and ``stop``."""
    from tqdm import tqdm
    from transformers import DynamicCache

    if (input_ids is None) == (inputs_embeds is None):
        raise ShapeError("full_attention_answers takes exactly one of input_ids and inputs_embeds")
    ids = [question_ids(tokenizer, q) for q in questions]
    device = next(model.parameters()).device
    context = DynamicCache(config=model.config)
    answers = []
    with tqdm(total=len(ids), desc="full attention", unit="q", disable=not progress) as bar:
        if input_ids is not None:
            model(torch.tensor([list(input_ids)], device=device), past_key_values=context, use_cache=True)
        else:
            model(inputs_embeds=inputs_embeds.reshape(1, -1, inputs_embeds.shape[-1]).to(device, model.dtype),
                  past_key_values=context, use_cache=True)
        for q in ids:
            # A copy, not a crop afterwards: sliding-window layers drop what falls out of their
            # window, which no crop restores. Copying SmolLM2's 1.5K-token context took 35 ms,
            # prefilling it again 9.4 s (2 loaded CPU cores).
            answers.append(greedy_answer(model, tokenizer, copy.deepcopy(context), q, max_new_tokens, stop))
            bar.update(1)
    return answers
