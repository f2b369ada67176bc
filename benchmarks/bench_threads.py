"""Torch intra-op threads on this CPU: how fast is plain transformers ``generate`` of SmolLM2 with
1 thread and with more, on a quiet machine and beside other work?

SmolLM2-135M-Instruct (fp32, SDPA, DynamicCache) prefills a prompt of ``--prompt`` tokens of
real text and greedily generates ``--new-tokens`` tokens (``min_new_tokens`` forces the length).
Each thread count is timed ``--repeats`` times, interleaved with the others so that a change in
the machine's load hits them alike; the median is reported. ``--busy N`` runs the whole
measurement again beside N processes that spin on a core each (what another job does to a
shared 2-core machine). Only ratios within one load level mean anything.

    OMP_NUM_THREADS=1 python benchmarks/bench_threads.py [--threads 1,2] [--busy 0,1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

import torch

from common import print_table, write_results
from tiercache.corpus import text_tokens
from tiercache.models import load_default_model


def spin() -> None:
    """Keep one core busy until terminated."""
    while True:
        pass


@torch.no_grad()
def timed(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds of a prefill forward of ``prompt`` and of ``generate`` of ``new_tokens`` after it."""
    start = time.perf_counter()
    model(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return prefill, time.perf_counter() - start


def measure(model, prompt: torch.Tensor, threads: list[int], new_tokens: int,
            repeats: int) -> dict[int, list]:
    """(prefill s, generate s) per thread count, ``repeats`` times each, interleaved."""
    times: dict[int, list] = {t: [] for t in threads}
    for _ in range(repeats):
        for t in threads:
            torch.set_num_threads(t)
            times[t].append(timed(model, prompt, new_tokens))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default=f"1,{os.cpu_count() or 1}",
                        help="torch intra-op thread counts, comma-separated (default 1 and the CPU count)")
    parser.add_argument("--busy", default="0,1",
                        help="busy-spinning processes to run beside, comma-separated levels (default 0,1)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per thread count (default 3)")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    model, tok = load_default_model()
    prompt = torch.tensor([text_tokens(tok, args.prompt, offset_tokens=2000)])
    load_before = os.getloadavg()
    model.generate(prompt[:, :32], max_new_tokens=2, do_sample=False)  # warm-up
    rows = []
    for busy in (int(b) for b in args.busy.split(",")):
        spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(busy)]
        for p in spinners:
            p.start()
        try:
            times = measure(model, prompt, threads, args.new_tokens, args.repeats)
        finally:
            for p in spinners:
                p.terminate()
                p.join()
        base = statistics.median(g for _, g in times[threads[0]])
        for t in threads:
            prefill = statistics.median(p for p, _ in times[t])
            generate = statistics.median(g for _, g in times[t])
            rows.append({"busy processes": busy, "threads": t, "prefill tok/s": args.prompt / prefill,
                         "generate s": generate,
                         "decode tok/s": args.new_tokens / max(1e-9, generate - prefill),
                         f"generate speed vs {threads[0]} thread(s)": base / generate})
        print_table(rows[-len(threads):])
    print(f"load average before: {load_before[0]:.2f}; prompt {args.prompt} tokens, {args.new_tokens} new "
          f"tokens, median of {args.repeats}")
    print_table(rows)
    write_results("bench_threads", rows, prompt_tokens=args.prompt, new_tokens=args.new_tokens,
                  repeats=args.repeats, load_average_before=load_before)


if __name__ == "__main__":
    main()
