"""How small, how accurate and how fast is each KV codec, on SmolLM2-135M's real KV cache?

For every codec setting, in one run:
- bits per element of the payload (scales, tables, escapes: all metadata included);
- relative error of decoded K and V, and of the attention output of the last 32 real queries of
  every layer (mean and worst layer); also with the first 4 (sink) and last 64 (window) tokens
  kept raw, as the device tier keeps them;
- greedy generation: 64 tokens after a 2K-token prompt, with the whole prompt cache passed through
  the codec, compared with the uncompressed fp32 cache: tokens until the first divergence, for 5
  prompts at different offsets of the reference text;
- a stored context's far tokens: a 4K-token haystack with a pass key at 5 depths, its whole cache
  through the codec as a saved context, then the question (computed exactly) answered greedily:
  how often the key comes out, against the uncompressed cache;
- encode and decode throughput in MB/s of fp16 KV per core: the run uses one thread and times
  with the process's CPU clock, so other load on a shared machine does not count;
  ``quant`` rows go through ``encode_many``/``decode_many`` (the host tier's path).

Usage: ``python benchmarks/bench_codecs.py [--quick]``. Prints a table and writes
``benchmarks/results/bench_codecs.json`` (``--out NAME``: ``NAME.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import asdict, dataclass, field

import torch

from common import warm_up, write_results
from kv_capture import CapturedKV, attention_output, capture_kv

from tiercache.blocks import BlockLayout
from tiercache.corpus import reference_text, text_tokens
from tiercache.evaluation import needle_parts
from tiercache.io.cachegen import CacheGenCodec
from tiercache.io.codec import Codec, make_codec
from tiercache.models import load_default_model

#: (label, codec name, params, saved). Baselines first. ``saved``: blocks get the sequence's final
#: length (``encode_at``'s ``end``), as a saved context's records do; otherwise only positions, as
#: the disk tier codes blocks of a sequence that may still grow.
SETTINGS: list[tuple[str, str, dict, bool]] = [
    ("raw fp16", "raw", {}, True),
    ("zstd fp16 (shuffled)", "zstd", {"level": 3, "shuffle": True}, True),
    ("zstd fp16 (plain)", "zstd", {"level": 3, "shuffle": False}, True),
    ("8-bit per-token", "quant", {"bits": 8, "group_size": 64, "key_mode": "token"}, True),
    ("KIVI 4-bit g32", "quant", {"bits": 4, "group_size": 32}, True),
    ("KIVI 2-bit g32", "quant", {"bits": 2, "group_size": 32}, True),
    ("cachegen default", "cachegen", {}, True),
    ("  without raw sink tokens", "cachegen", {"sink_tokens": 0}, True),
    ("  as growing-sequence blocks (no end)", "cachegen", {}, False),
    # A cap of 64 is never reached by 8K-token contexts: (8192 / 64) ** 0.75 < 64.
    ("  recency uncapped", "cachegen", {"key_step": 0.896, "value_step": 1.216, "recency_max": 64.0}, True),
    ("  recency off, k.03 v.04 (old default)", "cachegen",
     {"key_step": 0.03, "value_step": 0.04, "recency_exponent": 0}, True),
    ("cachegen compact", "cachegen", dict(CacheGenCodec.COMPACT), True),
    ("  recency off, k.1 v.11 (old compact)", "cachegen",
     {"key_step": 0.1, "value_step": 0.11, "recency_exponent": 0}, True),
    ("cachegen k.8 v1.04", "cachegen", {"key_step": 0.8, "value_step": 1.04}, True),
    ("cachegen k.25 v.33, recency off", "cachegen",
     {"key_step": 0.25, "value_step": 0.33, "recency_exponent": 0}, True),
]
#: Tokens kept raw at the start (attention sinks) and end (recent window) of a sequence in the
#: ``attn s+w`` column, as the device tier keeps them.
SINK, WINDOW = 4, 64


@dataclass
class Row:
    label: str
    codec: str
    params: dict
    saved: bool
    bits_per_element: float = 0.0
    k_rel_error: float = 0.0
    v_rel_error: float = 0.0
    attn_rel_error_mean: float = 0.0
    attn_rel_error_max: float = 0.0
    attn_rel_error_sink_window_raw: float = 0.0
    encode_mb_s: float = 0.0
    decode_mb_s: float = 0.0
    tokens_to_divergence: list[int] = field(default_factory=list)
    needle_found: list[bool] = field(default_factory=list)


def _blocks(x: torch.Tensor, block_tokens: int) -> list[torch.Tensor]:
    return [x[:, s : s + block_tokens] for s in range(0, x.shape[1], block_tokens)]


def roundtrip_layer(
    codec: Codec, k: torch.Tensor, v: torch.Tensor, block_tokens: int, saved: bool = True
) -> tuple[torch.Tensor, torch.Tensor, int, float, float]:
    """Pass one layer's fp16 ``k``, ``v`` ``(H, T, D)`` through ``codec`` block by block.

    Returns decoded keys, values, payload bytes, encode and decode CPU seconds. Fixed-size codecs
    go through ``encode_many``/``decode_many`` for the whole blocks; the others get each block's
    position (``encode_at``), and with ``saved`` the sequence's length ``T`` too, as a saved
    context's records do (without it, as the disk tier codes blocks of a growing sequence).
    """
    end = k.shape[1] if saved else None
    layout = BlockLayout(k.shape[0], block_tokens, k.shape[2], k.dtype)
    full = k.shape[1] // block_tokens * block_tokens
    nbytes, t_enc, t_dec, out_k, out_v = 0, 0.0, 0.0, [], []
    if codec.fixed_nbytes(layout, block_tokens) is not None and full:
        kv = torch.stack(
            [
                torch.stack(_blocks(k[:, :full], block_tokens)),
                torch.stack(_blocks(v[:, :full], block_tokens)),
            ],
            1,
        )
        t0 = time.process_time()
        payloads = codec.encode_many(kv, layout)
        t1 = time.process_time()
        dec = codec.decode_many(payloads, layout, "cpu")
        t_enc, t_dec = t1 - t0, time.process_time() - t1
        nbytes += payloads.numel()
        out_k.append(dec[:, 0].permute(1, 0, 2, 3).reshape(k.shape[0], full, k.shape[2]))
        out_v.append(dec[:, 1].permute(1, 0, 2, 3).reshape(k.shape[0], full, k.shape[2]))
        k, v = k[:, full:], v[:, full:]
    else:
        full = 0
    for i, (kb, vb) in enumerate(zip(_blocks(k, block_tokens), _blocks(v, block_tokens))):
        t0 = time.process_time()
        payload = codec.encode_at(kb, vb, full + i * block_tokens, end)
        t1 = time.process_time()
        dk, dv = codec.decode(payload, layout, kb.shape[1], "cpu")
        t_enc, t_dec = t_enc + t1 - t0, t_dec + time.process_time() - t1
        nbytes += payload.numel()
        out_k.append(dk)
        out_v.append(dv)
    return torch.cat(out_k, 1), torch.cat(out_v, 1), nbytes, t_enc, t_dec


def whole_cache_through(
    codec: Codec, layers: list[tuple[torch.Tensor, torch.Tensor]], block_tokens: int, saved: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's fp32 ``(k, v)`` passed through ``codec`` as fp16 (``roundtrip_layer``)."""
    return [roundtrip_layer(codec, k.half(), v.half(), block_tokens, saved)[:2] for k, v in layers]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def measure_quality(
    row: Row, codec: Codec, cap: CapturedKV, block_tokens: int, sink: int = SINK, window: int = WINDOW
) -> None:
    """Fill size, K/V/attention errors and throughput of ``row`` from the captured cache."""
    warm_up(codec, BlockLayout(cap.keys[0].shape[0], block_tokens, cap.keys[0].shape[2], torch.float16))
    nbytes = elements = 0
    t_enc = t_dec = 0.0
    k_err, v_err, attn, attn_sw = [], [], [], []
    for q, k32, v32 in zip(cap.queries, cap.keys, cap.values):
        k, v = k32.half(), v32.half()
        dk, dv, nb, te, td = roundtrip_layer(codec, k, v, block_tokens, row.saved)
        nbytes, elements, t_enc, t_dec = nbytes + nb, elements + 2 * k.numel(), t_enc + te, t_dec + td
        k_err.append(_rel(dk, k))
        v_err.append(_rel(dv, v))
        exact = attention_output(q, k32, v32, cap.scaling)
        attn.append(_rel(attention_output(q, dk, dv, cap.scaling), exact))
        keep = torch.cat([torch.arange(sink), torch.arange(k.shape[1] - window, k.shape[1])])
        dk[:, keep], dv[:, keep] = k[:, keep], v[:, keep]
        attn_sw.append(_rel(attention_output(q, dk, dv, cap.scaling), exact))
    mb = elements * 2 / 1e6
    row.bits_per_element = nbytes * 8 / elements
    row.k_rel_error, row.v_rel_error = sum(k_err) / len(k_err), sum(v_err) / len(v_err)
    row.attn_rel_error_mean, row.attn_rel_error_max = sum(attn) / len(attn), max(attn)
    row.attn_rel_error_sink_window_raw = sum(attn_sw) / len(attn_sw)
    row.encode_mb_s, row.decode_mb_s = mb / t_enc, mb / t_dec


@torch.no_grad()
def greedy(model, cache, first_token: int, n_new: int, reference: list[int] | None = None) -> list[int]:
    """Up to ``n_new`` greedy tokens continuing ``cache`` from ``first_token``; with a
    ``reference``, stops at the first token that differs from it (that token included)."""
    out, token = [], first_token
    for i in range(n_new):
        logits = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        if reference is not None and token != reference[i]:
            break
    return out


def _cache_from(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k[None].float().clone(), v[None].float().clone(), i)
    return cache


@torch.no_grad()
def prompt_caches(model, tokenizer, n_prompts: int, prompt_tokens: int) -> list[tuple[list, int]]:
    """Prefilled fp32 caches (as per-layer ``(k, v)``) of ``n_prompts`` prompts spread over the
    reference text, each with the prompt's last token (fed first during generation)."""
    if not n_prompts:
        return []
    total = len(tokenizer(reference_text(), add_special_tokens=False)["input_ids"])
    stride = (total - prompt_tokens) // n_prompts
    out = []
    for p in range(n_prompts):
        ids = text_tokens(tokenizer, prompt_tokens, p * stride)
        cache = model(torch.tensor([ids[:-1]]), use_cache=True).past_key_values
        out.append(([(layer.keys[0].clone(), layer.values[0].clone()) for layer in cache.layers], ids[-1]))
    return out


@torch.no_grad()
def needle_contexts(model, tokenizer, n_depths: int, tokens: int) -> list[tuple[list, list[int], str]]:
    """Prefilled fp32 caches (per-layer ``(k, v)``) of pass-key haystacks at ``n_depths`` depths,
    each with its question's ids and the key."""
    out = []
    for d in range(n_depths):
        context, question, key = needle_parts(tokenizer, tokens, (d + 0.5) / n_depths, seed=tokens + d)
        cache = model(torch.tensor([context]), use_cache=True).past_key_values
        out.append(([(layer.keys[0].clone(), layer.values[0].clone()) for layer in cache.layers], question, key))
    return out


@torch.no_grad()
def answers_key(model, tokenizer, layers: list, question: list[int], key: str, n_new: int = 8) -> bool:
    """Whether greedy decoding after ``question``, over the context cache ``layers``, says ``key``."""
    cache = _cache_from(layers)
    model(torch.tensor([question[:-1]]), past_key_values=cache, use_cache=True)
    return key in tokenizer.decode(greedy(model, cache, question[-1], n_new))


def _digest(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for k, v in layers:
        h.update(k.contiguous().view(torch.uint8).numpy().tobytes())
        h.update(v.contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


def divergence(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (``len(a)`` if none)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small run: 1K-token capture, 2 prompts of 512 tokens, 16 new tokens",
    )
    parser.add_argument(
        "--block-tokens", type=int, default=256, help="tokens per encoded block (default 256)"
    )
    parser.add_argument("--needle-depths", type=int, default=5, help="pass-key depths (0: skip)")
    parser.add_argument("--capture-tokens", type=int, default=None,
                        help="tokens of the captured cache for the error columns (default 4096)")
    parser.add_argument("--no-generation", action="store_true",
                        help="sizes, errors and speed only: no greedy divergence, no pass key")
    parser.add_argument("--out", default="bench_codecs", help="results/NAME.json (default bench_codecs)")
    args = parser.parse_args()
    capture_tokens, n_prompts, prompt_tokens, n_new = (
        (1024, 2, 512, 16) if args.quick else (4096, 5, 2048, 64)
    )
    needle_tokens = capture_tokens
    capture_tokens = args.capture_tokens or capture_tokens
    if args.no_generation:
        n_prompts = args.needle_depths = 0

    # One thread throughout: throughput is per core, and on a shared 2-core machine many small
    # ops (greedy decoding) run far faster without cross-thread synchronisation.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    started = time.time()
    model, tokenizer = load_default_model()
    cap = capture_kv(model, text_tokens(tokenizer, capture_tokens, 0), n_queries=32)
    prompts = prompt_caches(model, tokenizer, n_prompts, prompt_tokens)
    references = [greedy(model, _cache_from(layers), last, n_new) for layers, last in prompts]
    needles = needle_contexts(model, tokenizer, args.needle_depths, needle_tokens)

    rows = []
    # Settings that decode to identical tensors (lossless codecs) generate identical tokens:
    # generate once per distinct decoded cache.
    generated: dict[bytes, int] = {}
    for label, name, params, saved in SETTINGS:
        codec = make_codec(name, **params)
        row = Row(label, name, params, saved)
        measure_quality(row, codec, cap, args.block_tokens)
        for (layers, last), ref in zip(prompts, references):
            decoded = whole_cache_through(codec, layers, args.block_tokens, saved)
            key = _digest(decoded)
            if key not in generated:
                generated[key] = divergence(greedy(model, _cache_from(decoded), last, n_new, ref), ref)
            row.tokens_to_divergence.append(generated[key])
        for layers, question, key in needles:
            decoded = whole_cache_through(codec, layers, args.block_tokens, saved)
            row.needle_found.append(answers_key(model, tokenizer, decoded, question, key))
        rows.append(row)
        _print_row(row, n_new)

    write_results(
        args.out,
        [asdict(r) for r in rows],
        quick=args.quick,
        model="SmolLM2-135M-Instruct (fp32 weights, fp16 KV into the codecs)",
        capture_tokens=capture_tokens,
        queries_per_layer=32,
        block_tokens=args.block_tokens,
        sink_window_raw=[SINK, WINDOW],
        prompts=n_prompts,
        prompt_tokens=prompt_tokens,
        new_tokens=n_new,
        needle_tokens=needle_tokens,
        needle_found_uncompressed=[answers_key(model, tokenizer, layers, q, key) for layers, q, key in needles],
        throughput_clock="process CPU time, one thread",
    )
    print(f"\n{len(rows)} settings in {time.time() - started:.1f} s")


_HEADER = (
    f"{'setting':30} {'bits/el':>7} {'K err':>7} {'V err':>7} {'attn':>7} {'attn max':>8} "
    f"{'attn s+w':>8} {'enc MB/s':>8} {'dec MB/s':>8} {'needle':>6}  tokens to divergence"
)


def _print_row(row: Row, n_new: int) -> None:
    if row.label == SETTINGS[0][0]:
        print(_HEADER)
    div = " ".join(str(d) for d in row.tokens_to_divergence)
    full = sum(d == n_new for d in row.tokens_to_divergence)
    print(
        f"{row.label:30} {row.bits_per_element:7.3f} {row.k_rel_error:7.4f} {row.v_rel_error:7.4f} "
        f"{row.attn_rel_error_mean:7.4f} {row.attn_rel_error_max:8.4f} "
        f"{row.attn_rel_error_sink_window_raw:8.4f} "
        f"{row.encode_mb_s:8.1f} {row.decode_mb_s:8.1f} {sum(row.needle_found):>3}/{len(row.needle_found):<2} "
        f"{div} ({full}/{len(row.tokens_to_divergence)} full)",
        flush=True,
    )


if __name__ == "__main__":
    main()
