"""What the demo, the tests and the benchmarks ask a model about: facts planted in real text
(``FACTS``, ``QA_FACTS``, ``plant_facts``, ``question_text``) and pass-key needles in a haystack
(``needle_parts``). The text is Python's own reference (``tiercache.corpus``), so nothing is
fetched."""

from __future__ import annotations

from dataclasses import dataclass

from .corpus import text_tokens


@dataclass(frozen=True)
class Fact:
    """A statement planted in a text stream, a question that cues it, and the answer (a word or
    number the reply must contain)."""

    statement: str
    question: str
    answer: str


#: The three facts ``tiercache demo`` plants and asks about.
FACTS = (
    Fact("The secret pass key is 71432. Remember it.",
         "What is the secret pass key? The secret pass key is", "71432"),
    Fact("The name of the ship's captain is Marisol. Remember it.",
         "What is the name of the ship's captain? The name of the ship's captain is", "Marisol"),
    Fact("The vault code is 58203. Remember it.", "What is the vault code? The vault code is", "58203"),
)


#: Facts of varied kinds for measuring streaming QA (benchmarks/bench_quality.py --qa): each is one
#: short sentence with a one-word answer, distinct enough from the others that SmolLM2-135M
#: rarely confuses them. With full attention over 4K tokens of text holding all of them, it
#: answers about half (the rest it confuses with a neighbour).
QA_FACTS = tuple(Fact(*x) for x in (
    ("The secret pass key is 71432.", "What is the secret pass key? The secret pass key is", "71432"),
    ("The name of the ship's captain is Marisol.",
     "What is the name of the ship's captain? The name of the ship's captain is", "Marisol"),
    ("The vault code is 58203.", "What is the vault code? The vault code is", "58203"),
    ("The capital of the island of Veltra is Osmund.",
     "What is the capital of the island of Veltra? The capital of the island of Veltra is", "Osmund"),
    ("Doctor Hanley's favourite fruit is papaya.",
     "What is Doctor Hanley's favourite fruit? Doctor Hanley's favourite fruit is", "papaya"),
    ("The password of the office wifi is tangerine.",
     "What is the password of the office wifi? The password of the office wifi is", "tangerine"),
    ("The lighthouse keeper's dog is called Biscuit.",
     "What is the lighthouse keeper's dog called? The lighthouse keeper's dog is called", "Biscuit"),
    ("The winner of the chess tournament was Ingrid.",
     "Who was the winner of the chess tournament? The winner of the chess tournament was", "Ingrid"),
    ("The hotel room number is 4417.", "What is the hotel room number? The hotel room number is", "4417"),
    ("The getaway car was painted purple.", "What colour was the getaway car painted? The getaway car was painted",
     "purple"),
    ("The museum guard's name is Theodore.", "What is the museum guard's name? The museum guard's name is",
     "Theodore"),
    ("The treasure is buried under the old oak tree.",
     "Where is the treasure buried? The treasure is buried under the old", "oak"),
    ("The professor's cat is named Pumpkin.", "What is the professor's cat named? The professor's cat is named",
     "Pumpkin"),
    ("The bakery on Elm Street sells cinnamon rolls.",
     "What does the bakery on Elm Street sell? The bakery on Elm Street sells", "cinnamon"),
))


def plant_facts(tokenizer, text_ids: list[int], facts: tuple[Fact, ...] = FACTS, first: float = 0.1,
                last: float = 0.6) -> list[int]:
    """``text_ids`` with each fact's statement inserted on its own line, at depths spread evenly
    from ``first`` to ``last`` of the text (fractions), so the answers lie far behind the end."""
    ids = list(text_ids)
    step = (last - first) / max(1, len(facts) - 1)
    for i, fact in reversed(list(enumerate(facts))):
        pos = int(len(text_ids) * (first + i * step))
        ids[pos:pos] = tokenizer(f"\n{fact.statement}\n", add_special_tokens=False)["input_ids"]
    return ids


def question_text(fact: Fact) -> str:
    """The text asked after the stream: the fact's question on a new line."""
    return f"\n{fact.question}"


def needle_parts(tokenizer, length: int, depth: float, seed: int) -> tuple[list[int], list[int], str]:
    """A haystack of real prose with a pass-key sentence at ``depth`` (0 to 1), and the question:
    ``(context ids, question ids, key)``, ``length`` tokens in all; the 5-digit key and the
    haystack's place in the text follow from ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    key = "".join(str(d) for d in torch.randint(0, 10, (5,), generator=g).tolist())
    needle = tokenizer(f"\nThe secret pass key is {key}. Remember it.\n",
                       add_special_tokens=False)["input_ids"]
    question = tokenizer("\nWhat is the secret pass key? The secret pass key is",
                         add_special_tokens=False)["input_ids"]
    hay = text_tokens(tokenizer, length - len(needle) - len(question), offset_tokens=2000 + 997 * (seed % 97))
    at = int(depth * len(hay))
    return hay[:at] + needle + hay[at:], question, key
