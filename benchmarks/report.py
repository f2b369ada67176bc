"""Writes ``benchmarks/RESULTS.md`` from the benchmarks' JSON (``results/*.json``) and the
per-section prose in ``templates/`` (Jinja2), and draws the plots (``plots.py``) when matplotlib
is installed.

Every figure in RESULTS.md comes from a JSON file: the templates hold prose, table layouts and
expressions over the results, never a typed-in measurement (``tests/test_benchmark_report.py``
checks both that RESULTS.md is what this module makes of the committed JSON and that the
templates hold no numbers of their own). A result transcribed from an earlier RESULTS.md, not
rerun, says so in its ``transcribed`` field, and ``provenance`` says so in the section.

    python -m benchmarks report [--no-plots]
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jinja2

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TEMPLATES = HERE / "templates"
OUTPUT = HERE / "RESULTS.md"
#: The sections of RESULTS.md in order (``templates/<name>.md``), grouped as the suites are, each
#: with the results it cannot render without (the GPU sections say themselves that they did not run).
SECTIONS: dict[str, tuple[str, ...]] = {
    "intro": (),
    "tiers": ("bench_tiers",),
    "codecs": ("bench_codecs", "bench_codecs_8k"),
    "entropy": ("bench_entropy",),
    "disk": ("bench_disk",),
    "remote": ("bench_remote",),
    "decode_overhead": ("bench_decode_overhead",),
    "decode_gpu": (),
    "kernels": (),
    "beam": ("bench_beam",),
    "threads": ("bench_threads",),
    "retrieval": ("bench_retrieval", "bench_retrieval_8k"),
    "question": ("bench_question",),
    "quality": ("bench_quality", "bench_quality_quick10", "bench_quality_qa10", "bench_quality_softmax",
                "bench_quality_units4"),
    "stream": ("bench_stream",),
    "stop": ("bench_stop",),
}
#: Targets the issues set (requirements, not measurements), by name, for the templates' verdicts.
TARGETS = {
    "h2d_vs_copy": 0.8,           # host-to-device gathers at >= 0.8 of a pinned copy
    "disk_vs_raw": 0.8,           # store reads >= 0.8 of raw from 256 KiB records up
    "disk_vs_raw_from_kib": 256,
    "redis_vs_recompute": 5,      # loading from Redis >= 5x faster than recomputing
    "codec_decode_mbps": 100,     # cachegen decode >= 100 MB/s per core
    "codec_bits": 4,              # 8-bit quality at 4 bits/element
    "codec_compact_bits": 2.5,    # <= 3% attention error at 2.5 bits/element
    "codec_compact_error": 0.03,
    "codec_error": 0.01,          # 8-bit quality: <= 1% attention-output error
    "ops_per_layer": 140,         # issue 21: <= 140 aten ops per layer at a 10% read
    "speed_at_5pct": 1.5,         # a 5% step at 32K tokens >= 1.5x DynamicCache's speed
    "speed_at_5pct_context": 32768,
    "fits_overhead": 1.2,         # a full-budget step where nothing moves <= 1.2x DynamicCache's
    "append_vs_prefill": 0.5,     # a streaming append >= 0.5x a chunked prefill's tokens/s
    "recall": 0.95,               # recall with estimation >= 0.95 at 10%
    "agreement": 0.99,            # teacher-forced agreement with full attention >= 99% at 10%
    "needle": 0.95,               # needle agreement >= 95% at every length, 10%
    "stream_qa": 0.8,             # stream QA: >= 80% of full attention's facts, 10%
}


def load_results(folder: Path = RESULTS) -> dict[str, dict]:
    """Every ``<name>.json`` of ``folder`` by name."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


# ----------------------------------------------------------------- helpers the templates call


def rows(result: dict | None, **match: Any) -> list[dict]:
    """The rows of ``result`` whose fields equal ``match`` (none when the result is missing)."""
    if result is None:
        return []
    return [r for r in result["rows"] if all(r.get(k) == v for k, v in match.items())]


def row(result: dict | None, **match: Any) -> dict:
    """The one row of ``result`` matching ``match`` (an empty dict when there is none, so that a
    table of a partial, transcribed run shows an empty cell)."""
    found = rows(result, **match)
    if len(found) > 1:
        raise ValueError(f"{len(found)} rows match {match}")
    return found[0] if found else {}


def num(x: float | None, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, thousands separated, no exponent ('' for None)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, bool):
        return str(x)
    if x == 0:
        return "0"
    rounded = float(f"{x:.{digits}g}")  # first, so that 99.95 becomes 100 and is shown as such
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(rounded))))
    return f"{rounded:,.{decimals}f}"


def fixed(x: float | None, decimals: int = 2) -> str:
    """``x`` with ``decimals`` decimals ('' for None)."""
    return "" if x is None else f"{x:,.{decimals}f}"


def short(x: float | None, digits: int = 2) -> str:
    """``num`` without trailing zeros after the point (``0.80`` -> ``0.8``, ``5.0`` -> ``5``)."""
    text = num(x, digits)
    return text.rstrip("0").rstrip(".") if "." in text else text


def pct(x: float | None, digits: int = 2) -> str:
    """``x`` (a fraction) as a percentage to ``digits`` significant digits ('' for None)."""
    return "" if x is None else short(100 * x, digits) + "%"


def size(nbytes: float | None) -> str:
    """Bytes in KB, MB or GB (powers of ten, 3 significant digits)."""
    if nbytes is None:
        return ""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{num(nbytes / scale, 3)} {unit}"
    return f"{num(nbytes)} B"


def kib(n: int) -> str:
    """A count in K (``2048`` -> ``2K``) or, for record sizes given in KiB, see ``size_kib``."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def size_kib(kib_: int) -> str:
    """A size given in KiB as KiB or MiB (``1024`` -> ``1 MiB``)."""
    return f"{kib_ // 1024} MiB" if kib_ % 1024 == 0 else f"{kib_} KiB"


def verdict(met: bool) -> str:
    """A target's verdict, in bold."""
    return "**met**" if met else "**missed**"


def on_gpu(result: dict | None) -> bool:
    """Whether ``result`` was taken on a GPU (its device is not a CPU)."""
    return result is not None and not result["machine"]["device"].startswith("CPU")


def differences(found: list[dict], a: str, b: str) -> list[float]:
    """``row[a] - row[b]`` of each row."""
    return [x[a] - x[b] for x in found]


def provenance(result: dict | None) -> str:
    """Where a result comes from: its command, date, machine and load, or why it is transcribed."""
    if result is None:
        return "**Not run.**"
    run, machine = result["run"], result["machine"]
    load = ""
    if "load_average_start" in machine:
        lo = min(machine["load_average_start"][0], machine["load_average_end"][0])
        hi = max(machine["load_average_start"][0], machine["load_average_end"][0])
        load = f", load average {num(lo, 2)} to {num(hi, 2)}"
    seconds = run.get("seconds")
    took = "" if not seconds else f", {num(seconds, 2)} s" if seconds < 90 else f", {num(seconds / 60, 2)} min"
    text = (f"`{run['command']}` ({run.get('date') or 'date not recorded'}, {machine['device']}, "
            f"torch {machine['torch']}, {machine['torch_threads']} thread(s){load}{took})")
    if "transcribed" in result:
        text = f"**Transcribed, not rerun**: {result['transcribed']}. The command was " + text
    return text


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=num, short=short, fixed=fixed, pct=pct, size=size, kib=kib, size_kib=size_kib)
    env.tests["contains"] = lambda value, text: text in value
    env.globals.update(rows=rows, row=row, provenance=provenance, verdict=verdict, on_gpu=on_gpu,
                       differences=differences, targets=TARGETS, min=min, max=max, abs=abs)
    return env


def render(results: dict[str, dict] | None = None) -> str:
    """RESULTS.md's text from ``results`` (default: the committed JSON)."""
    results = load_results() if results is None else results
    env = environment()
    gpus = sorted({f"{res['machine']['device']} ({name})" for name, res in results.items() if on_gpu(res)})
    from .suites import SUITES

    context = {"r": _Results(results), "gpu_results": lambda: gpus, "suites": SUITES}
    parts = []
    for name, needs in SECTIONS.items():
        missing = [n for n in needs if n not in results]
        if missing:  # say so rather than fail: a fresh suite, or a result deleted to be rerun
            parts.append(f"**Section `{name}`: not run yet** (no {', '.join(f'results/{n}.json' for n in missing)}; "
                         f"see `python -m benchmarks list`).")
        else:
            parts.append(env.get_template(f"{name}.md").render(context).strip())
    return "\n\n".join(parts) + "\n"


class _Results(dict):
    """The results by name; a name with no JSON is None (not run), not an error."""

    def __getattr__(self, name: str) -> dict | None:
        if name.startswith("__"):
            raise AttributeError(name)
        return self.get(name)


def write_report(plots: bool = True) -> None:
    """Write RESULTS.md, and the plots when ``plots`` and matplotlib is installed."""
    results = load_results()
    if plots:
        try:
            from .plots import draw_all
        except ImportError as exc:  # matplotlib is the ``bench`` extra
            print(f"plots left as they are: {exc} (pip install -e '.[bench]')")
        else:
            for path in draw_all(results):
                print(f"drew {path.relative_to(HERE.parent)}")
    OUTPUT.write_text(render(results))
    print(f"wrote {OUTPUT.relative_to(HERE.parent)}")
