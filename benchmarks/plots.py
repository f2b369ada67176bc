"""The curves people would rather look at than read, drawn from the benchmarks' JSON into
``benchmarks/plots/*.png`` (RESULTS.md shows them). Needs matplotlib (the ``bench`` extra);
``report.py`` draws them when it is installed.

- ``recall.png``: recall of attention mass against the share of the context read (bench_retrieval);
- ``decode_step.png``: decode step time and KV bytes read per step against context length
  (bench_decode_overhead, CPU);
- ``decode_gpu.png``: the same on a GPU at long contexts (bench_decode, when a GPU run exists).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .report import HERE, on_gpu, rows  # noqa: E402

PLOTS = HERE / "plots"
#: PNG metadata left out so that a redraw of the same JSON gives the same bytes.
_METADATA = {"Software": None}


def _save(fig, name: str) -> Path:
    PLOTS.mkdir(exist_ok=True)
    path = PLOTS / name
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=_METADATA)
    plt.close(fig)
    return path


def _subtitle(result: dict) -> str:
    machine = result["machine"]
    note = ", transcribed from an earlier RESULTS.md" if "transcribed" in result else ""
    return f"{machine['device']}, {result['run'].get('date') or 'undated'}{note}"


def recall(retrieval: list[dict]) -> Path:
    """Recall (exact reads, with the estimate, and the oracle) against the read budget, for the
    library's default variant at each context length of the ``retrieval`` results."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for result, style in zip(retrieval, ("-", "--")):
        default = result["rows"][0]["variant"]
        found = sorted(rows(result, variant=default), key=lambda r: r["budget"])
        tokens = found[0]["tokens"]
        x = [r["budget"] for r in found]
        for key, label, color in (("recall", "read exactly", "C0"), ("est_recall", "with the estimate", "C1"),
                                  ("oracle", "oracle (best blocks)", "C2")):
            points = [(a, r[key]) for a, r in zip(x, found) if key in r]
            if points:
                ax.plot(*zip(*points), style, marker="o", color=color, label=f"{label}, {tokens} tokens")
    ax.set_xlabel("read budget (share of the context's tokens read)")
    ax.set_ylabel("recall of full attention's mass")
    ax.set_title(f"Retrieval recall, SmolLM2-135M\n{_subtitle(retrieval[0])}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, "recall.png")


def _label(kind: str) -> str:
    """``tiercache-0.1`` -> ``tiercache, 10% read``; ``dynamic`` -> ``DynamicCache``."""
    if kind.startswith("tiercache-"):
        budget = kind.removeprefix("tiercache-").rstrip("%")
        share = float(budget) / (100 if kind.endswith("%") else 1)
        return f"tiercache, {share:.0%} read"
    return {"dynamic": "DynamicCache", "offloaded": "DynamicCache (offloading)"}.get(kind, kind)


def decode_step(result: dict, name: str, x_key: str, time_key: str, time_label: str, bytes_key: str,
                bytes_label: str) -> Path:
    """Step time and bytes per step against context length, a line per cache kind."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    for kind in dict.fromkeys(r["kind"] for r in result["rows"]):
        found = [r for r in rows(result, kind=kind) if not r.get("fits") and time_key in r]
        if not found:
            continue
        xs = [r[x_key] for r in found]
        left.plot(xs, [r[time_key] for r in found], marker="o", label=_label(kind))
        if all(bytes_key in r for r in found):
            right.plot(xs, [r[bytes_key] for r in found], marker="o", label=_label(kind))
    for ax, label in ((left, time_label), (right, bytes_label)):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    left.legend(fontsize=7)
    fig.suptitle(f"One decode step against context length\n{_subtitle(result)}", fontsize=10)
    return _save(fig, name)


def draw_all(results: dict[str, dict]) -> list[Path]:
    """Every plot whose results are present; the paths drawn."""
    drawn = []
    retrieval = [results[n] for n in ("bench_retrieval", "bench_retrieval_8k") if n in results]
    if retrieval:
        drawn.append(recall(retrieval))
    if "bench_decode_overhead" in results:
        drawn.append(decode_step(results["bench_decode_overhead"], "decode_step.png", "context", "step_ms",
                                 "step time (ms, median)", "kv_read_bytes", "KV bytes read per step"))
    if on_gpu(results.get("bench_decode")):
        drawn.append(decode_step(results["bench_decode"], "decode_gpu.png", "context", "step_s",
                                 "step time (s, median)", "device_kv_GiB", "KV on the device (GiB)"))
    return drawn
