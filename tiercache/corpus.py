"""Real English text that ships with Python itself: the help topics of the language reference
(``pydoc_data.topics``, about 460 KB of prose). Used by tests, benchmarks and the demo, so no
data set is fetched."""

from __future__ import annotations


def reference_text() -> str:
    """All help topics of the Python language reference, in a fixed order, as one string."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def text_tokens(tokenizer, n_tokens: int, offset_tokens: int = 0) -> list[int]:
    """``n_tokens`` token ids of the reference text, starting ``offset_tokens`` into it.

    Raises ``ValueError`` if the text is shorter than ``offset_tokens + n_tokens`` tokens.
    """
    ids = tokenizer(reference_text(), add_special_tokens=False)["input_ids"]
    if offset_tokens + n_tokens > len(ids):
        raise ValueError(f"reference text has {len(ids)} tokens, asked for {offset_tokens}+{n_tokens}")
    return ids[offset_tokens : offset_tokens + n_tokens]
