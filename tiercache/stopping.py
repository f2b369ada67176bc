"""When a greedy answer ends, as transformers' ``generate`` decides it: at an end-of-sequence token
(the tokenizer's and the generation config's), at the chat template's end-of-turn token, and at
optional stop strings.

The end-of-turn token is read from the chat template itself (the first special token the
template writes after an assistant message's content: ``<|im_end|>`` for SmolLM2 and Qwen,
``<|eot_id|>`` for Llama 3), so no model's token is hard-coded here.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import ConfigError

#: The default stop strings: an answer ends with its first line break or sentence end (the
#: punctuation is kept and whitespace stripped, so "58203." either way). tiercache's questions
#: end with a cue ("The vault code is") that the model completes in one sentence before it runs
#: on into whatever its training text would say next; on the planted-fact questions of
#: ``tiercache.cli`` these stops keep every answer that contained the fact
#: (benchmarks/bench_stop.py). ``stop=None`` ends answers only at the end-of-sequence and
#: end-of-turn tokens and ``max_new_tokens`` (for chat-formatted questions).
DEFAULT_STOP: tuple[str, ...] = ("\n", ". ", "? ", "! ")

_MARKER = "tiercache-end-of-turn-probe"


def stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """``stop`` as a tuple of strings: one string, several, or none (``None`` or empty).
    ``ConfigError`` for an empty string or a value that is not a string."""
    items = (stop,) if isinstance(stop, str) else tuple(stop or ())
    for s in items:
        if not isinstance(s, str) or not s:
            raise ConfigError(f"stop strings must be non-empty str, got {s!r} in {stop!r}")
    return items


def end_of_turn_ids(tokenizer) -> set[int]:
    """The special token(s) the tokenizer's chat template writes right after an assistant
    message's content (empty if it has no chat template)."""
    if not getattr(tokenizer, "chat_template", None):
        return set()
    chat = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARKER}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:  # noqa: BLE001 - a template may reject any conversation; then it marks no turn end
        return set()
    if not isinstance(text, str) or _MARKER not in text:
        return set()
    tail = tokenizer(text[text.rindex(_MARKER) + len(_MARKER):], add_special_tokens=False)["input_ids"]
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return next(({i} for i in tail if i in special), set())


def stop_token_ids(model, tokenizer) -> set[int]:
    """Token ids that end an answer: the tokenizer's end-of-sequence token, the generation
    config's (one id or a list), and the chat template's end-of-turn token."""
    ids = set(end_of_turn_ids(tokenizer))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is not None:
        ids.update(int(i) for i in ([eos] if isinstance(eos, int) else eos))
    return ids


def cut_at_stop(text: str, stops: Sequence[str]) -> str | None:
    """``text`` up to and including the first stop string to complete after its leading
    whitespace (the model often starts with a line break), stripped of surrounding whitespace
    (``generate``'s ``stop_strings`` keep the stop string too); None if no stop string occurs."""
    body = text.lstrip()
    ends = [i + len(s) for i, s in ((body.find(s), s) for s in stops) if i >= 0]
    return body[: min(ends)].strip() if ends else None
