"""Where answers stop: do the default stop strings keep the planted facts, and what do they save?

SmolLM2-135M-Instruct answers each planted-fact question of ``tiercache.evaluation`` with full
attention (SDPA) over real text (Python's reference docs) holding the facts: the demo's 3
``FACTS`` in a 1.5K-token stream, and the 14 ``QA_FACTS`` split over two 4K-token streams as in
bench_quality.py --qa (``common.qa_streams``). Each question is answered with up to
``--max-new-tokens`` tokens under each stop setting; the end-of-sequence and end-of-turn tokens
end every answer. Reported per setting: answers containing the fact, mean answer length in
tokens, and the seconds spent answering (the prefill of each stream is counted once per setting).

    OMP_NUM_THREADS=1 python benchmarks/bench_stop.py [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import time

from common import parse_args, print_table, qa_streams, write_results
from tiercache.corpus import text_tokens
from tiercache.evaluation import FACTS, plant_facts, question_text
from tiercache.generation import full_attention_answers
from tiercache.models import load_default_model
from tiercache.stopping import DEFAULT_STOP

SETTINGS = {"line break only": "\n", "default (line or sentence end)": DEFAULT_STOP,
            "none (tokens only)": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="most tokens per answer (default 32)")
    args = parse_args(parser)
    model, tok = load_default_model()
    streams = [(plant_facts(tok, text_tokens(tok, 1500, offset_tokens=1000)), FACTS)]
    streams += qa_streams(tok)
    rows, answers = [], []
    for name, stop in SETTINGS.items():
        ok, lengths, seconds = 0, [], 0.0
        for stream, (ids, facts) in enumerate(streams):
            start = time.perf_counter()
            got = full_attention_answers(model, tok, [question_text(f) for f in facts], input_ids=ids,
                                         max_new_tokens=args.max_new_tokens, stop=stop)
            seconds += time.perf_counter() - start
            ok += sum(f.answer in a for f, a in zip(facts, got))
            lengths += [len(tok(a, add_special_tokens=False)["input_ids"]) for a in got]
            answers += [{"setting": name, "stream": stream, "fact": f.answer, "answer": a}
                        for f, a in zip(facts, got)]
        rows.append({"stop": name, "contain the fact": ok, "of": len(lengths),
                     "mean answer tokens": sum(lengths) / len(lengths), "seconds": seconds})
        print(f"{name}: {ok}/{len(lengths)} in {seconds:.0f} s", flush=True)
    print_table(rows)
    print_table(answers)
    write_results("bench_stop", rows, max_new_tokens=args.max_new_tokens, answers=answers)


if __name__ == "__main__":
    main()
