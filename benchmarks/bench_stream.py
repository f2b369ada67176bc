"""Streaming QA on SmolLM2-135M-Instruct: does the append cost stay flat, and are facts planted
early answered as full attention answers them?

A real-text stream (Python's reference docs) with the demo's facts planted at 10%-60% depth is
appended chunk by chunk to a StreamSession (device budget 1/8 of the KV, host 1/4, disk the rest
with the cachegen codec). Baseline in the same process: the same chunks appended to a DynamicCache
with full attention. For each, the per-chunk CPU time's Theil-Sen slope against the chunk index,
reported as the growth over the whole stream relative to the median chunk ("+0%" is flat; full
attention grows). Then each fact is asked of the session and of full attention over the same text.

    python benchmarks/bench_stream.py [--tokens 4096] [--chunk 128] [--budget 0.25]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import DynamicCache

from common import parse_args, print_table, write_results
from tiercache import RetrievalConfig, TierConfig
from tiercache.corpus import text_tokens
from tiercache.evaluation import FACTS, plant_facts, question_text
from tiercache.models import load_default_model
from tiercache.spec import kv_bytes_per_token
from tiercache.generation import full_attention_answers
from tiercache.stream import StreamSession


def theil_sen_slope(ys: list[float]) -> float:
    """Median of the pairwise slopes of ``ys`` against their index (robust to outliers)."""
    slopes = [(ys[j] - ys[i]) / (j - i) for i in range(len(ys)) for j in range(i + 1, len(ys))]
    return sorted(slopes)[len(slopes) // 2]


def growth(seconds: list[float]) -> dict:
    """Median chunk time, slope and the fitted growth over the stream relative to the median;
    the same growth over the second half alone (for the stream: once the disk tier is in use,
    which adds a step where the host tier fills)."""
    times = seconds[1:-1]  # the first chunk has no past, the last may be short
    slope, median = theil_sen_slope(times), sorted(times)[len(times) // 2]
    late = times[len(times) // 2 :]
    late_median = sorted(late)[len(late) // 2]
    return {"median_s": median, "slope_ms_per_chunk": 1000 * slope, "growth": slope * len(times) / median,
            "growth_2nd_half": theil_sen_slope(late) * len(late) / late_median}


@torch.no_grad()
def timed_chunks(append, ids: list[int], chunk: int) -> list[float]:
    """CPU seconds of each ``append(chunk_ids)``, on one compute thread: on a shared machine
    other processes neither stretch it nor add idle worker threads' spinning to it."""
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for a in range(0, len(ids), chunk):
            start = time.process_time()
            append(ids[a : a + chunk])
            out.append(time.process_time() - start)
    finally:
        torch.set_num_threads(threads)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="stream length in tokens (default 4096)")
    parser.add_argument("--chunk", type=int, default=128, help="tokens per appended chunk (default 128)")
    parser.add_argument("--budget", type=float, default=0.25,
                        help="retrieval budget, fraction of the stream per question step (default 0.25)")
    parser.add_argument("--new-tokens", type=int, default=6, help="most tokens per answer (default 6)")
    args = parse_args(parser)

    model, tok = load_default_model()
    ids = plant_facts(tok, text_tokens(tok, args.tokens, offset_tokens=1000))
    kv = kv_bytes_per_token(model) * len(ids)

    dense = DynamicCache(config=model.config)
    dense_s = timed_chunks(lambda x: model(torch.tensor([x]), past_key_values=dense, use_cache=True), ids,
                           args.chunk)
    del dense

    with tempfile.TemporaryDirectory() as tmp:
        config = TierConfig(device_budget_bytes=kv // 8, host_budget_bytes=kv // 4, disk_budget_bytes=4 * kv,
                            disk_path=tmp, disk_codec="cachegen", dtype=torch.float32,
                            retrieval=RetrievalConfig(budget=args.budget))
        with StreamSession(model, tok, config, chunk_tokens=args.chunk) as session:
            stream_s = timed_chunks(lambda x: session.append(x), ids, args.chunk)
            stats = session.cache.manager.stats()
            got = [session.ask(question_text(f), max_new_tokens=args.new_tokens) for f in FACTS]
    ref = full_attention_answers(model, tok, [question_text(f) for f in FACTS], input_ids=ids,
                                 max_new_tokens=args.new_tokens)
    answers = list(zip(FACTS, got, ref))

    rows = [{"attention": "tiercache stream (window)", **growth(stream_s)},
            {"attention": "full (DynamicCache, sdpa)", **growth(dense_s)}]
    print(f"stream of {len(ids)} tokens in chunks of {args.chunk}; device budget {kv // 8 / 2**20:.1f} MiB "
          f"(peak {stats.peak_bytes['device'] / 2**20:.1f} MiB) of {kv / 2**20:.1f} MiB of KV")
    print_table(rows)
    qa = [{"fact": f.answer, "tiercache": got, "full": ref, "tiercache_ok": f.answer in got, "full_ok": f.answer in ref}
          for f, got, ref in answers]
    print_table(qa)
    accuracy = {k: sum(r[f"{k}_ok"] for r in qa) / len(qa) for k in ("tiercache", "full")}
    print(f"QA accuracy: tiercache {accuracy['tiercache']:.2f}, full attention {accuracy['full']:.2f}")
    write_results("bench_stream", rows, tokens=len(ids), chunk=args.chunk, budget=args.budget, qa=qa, accuracy=accuracy,
                  chunk_cpu_seconds={"tiercache": stream_s, "full": dense_s})


if __name__ == "__main__":
    main()
