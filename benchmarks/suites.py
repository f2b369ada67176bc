"""The benchmark suites: which script answers which question, with which arguments.

A suite groups the scripts that answer one kind of question; ``python -m benchmarks SUITE`` runs
them in order, each in its own process (``runner.py``). ``minutes`` is the rough length of a full
run on the shared 2-core CPU machine, to plan by; ``quick`` are the arguments of ``--quick``, a
smoke run that writes under ``results/quick/`` and so never replaces the figures RESULTS.md is
made from.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bench:
    """One run of one script: ``benchmarks/<script>`` with ``args`` (``quick`` under ``--quick``)."""

    script: str
    what: str
    args: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()
    #: Needs a CUDA device: the runner skips it elsewhere, saying so.
    gpu: bool = False
    #: Rough minutes of a full run on the shared 2-core CPU machine (a GPU run: on one GPU).
    minutes: float = 1

    @property
    def name(self) -> str:
        """The JSON name the run writes (its ``--out``, else the script's name)."""
        return self.args[self.args.index("--out") + 1] if "--out" in self.args else self.script.removesuffix(".py")


SUITES: dict[str, tuple[Bench, ...]] = {
    "tiers": (
        Bench("bench_tiers.py", "block movement between host and device against a plain copy", minutes=1),
        Bench("bench_codecs.py", "KV codecs: size, error, divergence, pass key, speed (4K tokens)",
              quick=("--quick",), minutes=15),
        Bench("bench_codecs.py", "KV codecs: size and error over 8K tokens",
              ("--capture-tokens", "8192", "--no-generation", "--out", "bench_codecs_8k"),
              ("--quick", "--no-generation", "--out", "bench_codecs_8k"), minutes=10),
        Bench("bench_entropy.py", "the cachegen entropy coder: size against entropy, decode speed", minutes=3),
        Bench("bench_disk.py", "disk store against raw reads; a saved context against its prefill",
              quick=("--quick",), minutes=8),
        Bench("bench_remote.py", "a context loaded from Redis against recomputing it and the disk store",
              quick=("--tokens", "2048", "--repeats", "1"), minutes=10),
    ),
    "decode": (
        Bench("bench_decode_overhead.py", "one decode step's ops, syncs and time against DynamicCache (4K-64K)",
              quick=("--contexts", "4096,8192", "--steps", "4", "--stream-tokens", "1024"), minutes=15),
        Bench("bench_beam.py", "beam search's reorder: bytes and time against DynamicCache",
              quick=("--contexts", "1024", "--beams", "2"), minutes=6),
        Bench("bench_threads.py", "torch intra-op threads on this CPU, quiet and beside a busy process",
              quick=("--repeats", "1", "--new-tokens", "16"), minutes=8),
        Bench("bench_kernels.py", "paged decode attention and host-to-device gathers, 32K-1M tokens",
              ("--repeats", "10"), ("--repeats", "2"), gpu=True, minutes=1.5),
        Bench("bench_decode.py", "decode on a Llama-3-8B-shape model at 32K-1M tokens against dense caches",
              ("--shape", "llama3-8b", "--contexts", "32768,131072,524288,1048576", "--steps", "4",
               "--kinds", "dynamic,offloaded,tiercache-5%,tiercache-10%"),
              ("--shape", "llama3-8b", "--contexts", "32768", "--steps", "2",
               "--kinds", "dynamic,tiercache-10%"), gpu=True, minutes=4),
    ),
    "retrieval": (
        Bench("bench_retrieval.py", "recall of attention mass at a read budget, 4K tokens",
              ("--contexts", "4096"), ("--quick",), minutes=12),
        Bench("bench_retrieval.py", "recall of attention mass at a read budget, 8K tokens",
              ("--contexts", "8192", "--only", "default|units 4|calibrated", "--out", "bench_retrieval_8k"),
              ("--quick", "--out", "bench_retrieval_8k"), minutes=15),
        Bench("bench_question.py", "which blocks a question should read", quick=("--quick",), minutes=5),
        Bench("bench_quality.py", "agreement, needles and stream QA against full attention and the peers",
              ("--agree-tokens", "128", "--depths", "5"), ("--quick", "--no-peers"), minutes=420),
        Bench("bench_quality.py", "agreement and needles against the peers at a 10% read, short cases",
              ("--quick", "--agree", "--needle", "--budgets", "0.1", "--out", "bench_quality_quick10"),
              ("--quick", "--agree", "--needle", "--budgets", "0.1", "--no-peers", "--out", "bench_quality_quick10"),
              minutes=12),
        Bench("bench_quality.py", "stream QA against the peers at a 10% read",
              ("--qa", "--budgets", "0.1", "--out", "bench_quality_qa10"),
              ("--qa", "--budgets", "0.1", "--no-peers", "--out", "bench_quality_qa10"), minutes=35),
        *(Bench("bench_quality.py", f"the defaults with {change}, end to end at a 10% read",
                ("--quick", "--budgets", "0.1", "--no-peers", "--retrieval", change, "--out", f"bench_quality_{name}"),
                ("--quick", "--agree", "--budgets", "0.1", "--no-peers", "--retrieval", change,
                 "--out", f"bench_quality_{name}"), minutes=15)
          for name, change in (("softmax", "gqa_aggregate=softmax"), ("units4", "unit_tokens=4"))),
    ),
    "apps": (
        Bench("bench_stream.py", "a stream's append cost and its answers against full attention",
              ("--tokens", "4096"), ("--tokens", "1024"), minutes=10),
        Bench("bench_stop.py", "where answers stop: stop strings against the planted facts",
              quick=("--max-new-tokens", "8"), minutes=7),
    ),
}
