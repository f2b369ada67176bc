"""Real English text that ships with Python itself: the help topics of the language reference
(``pydoc_data.topics``, about 460 KB of prose). Used by tests, benchmarks and the demo, so no
data set is fetched."""

from __future__ import annotations

from .errors import ConfigError


def reference_text() -> str:
    """All help topics of the Python language reference, in a fixed order, as one string."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def text_tokens(tokenizer, n_tokens: int, offset_tokens: int = 0) -> list[int]:
    """``n_tokens`` token ids of the reference text, starting ``offset_tokens`` into it.

    Raises ``ConfigError`` if either is negative or the text is shorter than ``offset_tokens +
    n_tokens`` tokens.
    """
    if n_tokens < 0 or offset_tokens < 0:
        raise ConfigError(f"text_tokens: n_tokens and offset_tokens must be >= 0, got {n_tokens} and "
                          f"{offset_tokens}")
    ids = tokenizer(reference_text(), add_special_tokens=False)["input_ids"]
    if offset_tokens + n_tokens > len(ids):
        raise ConfigError(f"the reference text has {len(ids)} tokens with this tokenizer, asked for "
                          f"{n_tokens} from token {offset_tokens}: ask for fewer, or start earlier")
    return ids[offset_tokens : offset_tokens + n_tokens]
