"""``TierConfig``: every setting of a tiercache instance, validated on construction.

Budgets are in bytes of the tier's own encoding, block sizes in tokens. A config is immutable;
derive a changed copy with ``dataclasses.replace``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from .blocks import BlockLayout
from .errors import ConfigError
from .io.codec import CODECS
from .io.redis_store import REDIS_SCHEMES

#: What a step selects from (``RetrievalConfig.index``).
INDEXES = ("tokens", "blocks")
#: KV and model dtypes by name (the names the CLI and saved configs use).
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def default_device() -> torch.device:
    """The compute device: the current CUDA device when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` this process can use (``None``: ``default_device()``).
    ``ConfigError`` if it is not a device name, or names an accelerator this torch build or
    machine does not have (rather than torch's error at the first allocation)."""
    if device is None or device == "":
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device: {exc}") from exc
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        why = (f"this torch ({torch.__version__}) was built without CUDA" if dev.type == "cuda"
               and torch.version.cuda is None else f"no {dev.type} device is visible to this process")
        raise ConfigError(f"device {str(dev)!r} is not available: {why}; use device='cpu' (or None to pick "
                          "CUDA when present, else the CPU)")
    count = getattr(backend, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"device {str(dev)!r} does not exist: this machine has {count} {dev.type} "
                          "device(s)")
    return dev


def parse_summary(spec: str) -> tuple[str, int]:
    """A unit summary's config name as ``(kind, rows)``: ``"mean"`` and ``"minmax"`` (one row),
    ``"landmarks"`` (4 rows) or ``"landmarks:R"`` (``R`` >= 1 rows); ``ConfigError`` otherwise.
    ``tiercache.retrieval.summaries.make_summary`` builds the summary."""
    name, _, arg = str(spec).partition(":")
    if name in ("mean", "minmax") and not arg:
        return name, 1
    if name == "landmarks" and (not arg or (arg.isdigit() and int(arg) >= 1)):
        return name, int(arg) if arg else 4
    raise ConfigError(f"unknown summary {spec!r}; use 'mean', 'minmax', 'landmarks' or 'landmarks:R' (R >= 1 "
                      "landmarks per unit)")


@dataclass(frozen=True)
class RetrievalConfig:
    """What the decode step reads for each layer (see ``tiercache.retrieval.selector``).

    - ``budget``: tokens whose K/V one step reads per layer, sink, window and retrieved blocks
      together: a float in (0, 1] is a fraction of the cached tokens, an int >= 1 a number of
      tokens. It is rounded down to whole storage blocks (``TierConfig.block_tokens``); when sink
      and window would exceed it (short contexts), the window shrinks, down to the open block.
      ``layer_budgets`` overrides it for some layers ({layer: budget}).
    - ``sink_tokens`` / ``window_tokens``: the first and the most recent tokens, always read
      (rounded up to whole blocks).
    - ``prefill_window_tokens``: the recent window a ``"window"`` prefill attends (a stream's
      chunks: sink + this window, a flat cost per chunk).
    - ``summary``: how units are summarised for scoring (``tiercache.retrieval.make_summary``);
      ``unit_tokens``: tokens per unit (a divisor of the block size; ``None``: whole blocks). The
      heads' best units vote for the storage blocks that are read.
    - ``gqa_aggregate``: how the scores of query heads sharing a KV head combine: ``"max"``,
      ``"sum"`` or ``"softmax"``.
    - ``estimate``: add to each decode step's attention an estimate of the blocks it does not read:
      each sealed block as one virtual token, its mean key weighted by its count of tokens, with
      its mean value (RetroInfer's estimation zone; ``tiercache.retrieval.estimate``).
    - ``index``: what a step selects from: ``"tokens"`` (every KV head scores every token from a
      4-bit code of its key and reads its own best tokens; the rest is estimated per run of
      ``run_tokens`` tokens; codebooks per segment of ``segment_tokens`` tokens;
      ``tiercache.retrieval.token_index``) or ``"blocks"`` (storage blocks ranked by their unit
      summaries, Quest style; ``summary``, ``unit_tokens``, ``gqa_aggregate`` and
      ``selection_layers`` apply to it).
    - ``full_attention_layers``: layers that read every block.
    - ``selection_layers``: when set, the only layers that score units; every other layer reads
      the blocks of the nearest selecting layer below it at the same step (TidalDecode).

    Defaults follow benchmarks/bench_retrieval.py and bench_quality.py on SmolLM2 (the reasons are
    in docs/architecture.md): the Quest bound (``minmax``) beats mean keys; the ``max`` aggregate
    finds needles and planted facts the ``softmax`` one misses (needle 6/8 against 3/8, stream QA
    4/14 against 2/14 at 10%); units the size of the (8-token) blocks score within 0.005 of
    4-token units; sink 8 and window 32 tokens leave most of a small budget to retrieval.
    """

    sink_tokens: int = 8
    window_tokens: int = 32
    prefill_window_tokens: int = 128
    budget: float | int = 0.1
    summary: str = "minmax"
    gqa_aggregate: str = "max"
    full_attention_layers: tuple[int, ...] = ()
    layer_budgets: dict[int, float | int] = field(default_factory=dict)
    selection_layers: tuple[int, ...] | None = None
    unit_tokens: int | None = None
    estimate: bool = True
    index: str = "tokens"
    segment_tokens: int = 1024
    run_tokens: int = 128

    def __post_init__(self) -> None:
        if self.unit_tokens is not None and (isinstance(self.unit_tokens, bool) or not isinstance(self.unit_tokens, int)
                                             or self.unit_tokens < 1):
            raise ConfigError(f"unit_tokens must be a positive int or None, got {self.unit_tokens!r}")
        if self.sink_tokens < 0 or self.window_tokens < 0 or self.prefill_window_tokens < 0:
            raise ConfigError(
                f"sink_tokens ({self.sink_tokens}), window_tokens ({self.window_tokens}) and "
                f"prefill_window_tokens ({self.prefill_window_tokens}) must be >= 0"
            )
        budgets = [("budget", self.budget)]
        budgets += [(f"layer_budgets[{k}]", v) for k, v in self.layer_budgets.items()]
        for where, b in budgets:
            if isinstance(b, bool) or not isinstance(b, (int, float)):
                raise ConfigError(f"retrieval {where} must be a fraction or a token count, got {b!r}")
            if isinstance(b, float) and not 0.0 < b <= 1.0:
                raise ConfigError(f"retrieval {where} fraction must be in (0, 1], got {b}")
            if isinstance(b, int) and b < 1:
                raise ConfigError(f"retrieval {where} in tokens must be >= 1, got {b}")
        if self.index not in INDEXES:
            raise ConfigError(f"retrieval index must be one of {INDEXES}, got {self.index!r}")
        for name in ("segment_tokens", "run_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"retrieval {name} must be an int >= 1, got {value!r}")
        if self.segment_tokens % self.run_tokens:
            raise ConfigError(f"retrieval segment_tokens ({self.segment_tokens}) must be a multiple of "
                              f"run_tokens ({self.run_tokens})")
        if self.gqa_aggregate not in ("max", "sum", "softmax"):
            raise ConfigError(f"gqa_aggregate must be 'max', 'sum' or 'softmax', got {self.gqa_aggregate!r}")
        for name in ("full_attention_layers", "selection_layers"):
            layers = getattr(self, name) or ()
            if any(not isinstance(i, int) or i < 0 for i in layers):
                raise ConfigError(f"{name} must be layer indices >= 0, got {layers}")
        if any(not isinstance(i, int) or i < 0 for i in self.layer_budgets):
            raise ConfigError(f"layer_budgets keys must be layer indices >= 0: {list(self.layer_budgets)}")
        parse_summary(self.summary)


@dataclass(frozen=True)
class TierConfig:
    """Budgets, block size, encodings and places of the tiers.

    - ``device_budget_bytes``: raw bytes of KV the compute device may hold (at least one block).
    - ``host_budget_bytes``: bytes of host memory for the warm tier, in ``host_codec``'s encoding. A
      ceiling, not a reservation: memory is taken as blocks arrive. A budget above the machine's
      available memory is refused.
    - ``disk_budget_bytes``: bytes on disk for the cold tier; 0 disables the disk tier.
    - ``block_tokens``: tokens per block.
    - ``dtype``: KV dtype on the device (``None``: the model's).
    - ``host_codec`` / ``disk_codec``: registered codec names (see ``tiercache.io.codec.CODECS``),
      with their parameters in ``host_codec_params`` / ``disk_codec_params``.
    - ``disk_path``: directory of the disk tier (created if missing; must be writable).
    - ``remote_url``: a Redis server (``redis://host:port/db``) for a remote tier below host
      memory and disk, written through as blocks are sealed (``tiercache.tiers.remote``);
      ``remote_budget_bytes`` bounds the bytes it may hold there (in ``remote_codec``'s encoding,
      with ``remote_codec_params``). Its blocks are live data: give such a server
      ``maxmemory-policy noeviction`` (an evicted block is a clear ``BlockNotFoundError``).
    - ``device``: compute device; ``None`` picks CUDA when available, else the CPU. A device this
      machine lacks is a ``ConfigError``.
    """

    device_budget_bytes: int
    host_budget_bytes: int
    disk_budget_bytes: int = 0
    block_tokens: int = 8
    dtype: torch.dtype | str | None = None
    host_codec: str = "raw"
    host_codec_params: dict = field(default_factory=dict)
    disk_codec: str = "raw"
    disk_codec_params: dict = field(default_factory=dict)
    disk_path: str | os.PathLike | None = None
    remote_url: str | None = None
    remote_budget_bytes: int = 0
    remote_codec: str = "raw"
    remote_codec_params: dict = field(default_factory=dict)
    device: str | torch.device | None = None
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    def __post_init__(self) -> None:
        for name in ("device_budget_bytes", "host_budget_bytes", "disk_budget_bytes", "remote_budget_bytes",
                     "block_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an int, got {value!r}")
        if self.block_tokens <= 0:
            raise ConfigError(f"block_tokens must be positive, got {self.block_tokens}")
        if self.device_budget_bytes <= 0:
            raise ConfigError(f"device_budget_bytes must be positive, got {self.device_budget_bytes}")
        if self.host_budget_bytes < 0 or self.disk_budget_bytes < 0 or self.remote_budget_bytes < 0:
            raise ConfigError(
                f"host_budget_bytes ({self.host_budget_bytes}), disk_budget_bytes ({self.disk_budget_bytes}) "
                f"and remote_budget_bytes ({self.remote_budget_bytes}) must be >= 0"
            )
        available = psutil.virtual_memory().available
        if self.host_budget_bytes > available:
            raise ConfigError(
                f"host_budget_bytes={self.host_budget_bytes} ({self.host_budget_bytes / 2**30:.1f} GiB) is more than "
                f"this machine's available memory, {available} bytes ({available / 2**30:.1f} GiB); lower it, "
                "and let the disk tier (disk_budget_bytes, disk_path) take the rest"
            )
        if isinstance(self.dtype, str):
            if self.dtype not in DTYPES:
                raise ConfigError(f"dtype {self.dtype!r} not supported; use one of {sorted(DTYPES)}")
            object.__setattr__(self, "dtype", DTYPES[self.dtype])
        elif self.dtype is not None and self.dtype not in DTYPES.values():
            raise ConfigError(f"dtype {self.dtype} not supported; use float16, bfloat16 or float32")
        for tier in ("host", "disk", "remote"):
            codec = getattr(self, f"{tier}_codec")
            if codec not in CODECS:
                raise ConfigError(f"{tier}_codec {codec!r} is unknown; known codecs: {sorted(CODECS)}")
        unit = self.retrieval.unit_tokens
        if unit is not None and self.block_tokens % unit:
            raise ConfigError(f"block_tokens ({self.block_tokens}) must be a multiple of retrieval.unit_tokens ({unit})")
        object.__setattr__(self, "device", resolve_device(self.device))
        if self.disk_budget_bytes > 0 and self.disk_path is None:
            raise ConfigError("disk_budget_bytes > 0 needs a disk_path")
        if self.disk_path is not None:
            object.__setattr__(self, "disk_path", Path(self.disk_path))
            _check_writable(self.disk_path)
        if (self.remote_url is None) != (self.remote_budget_bytes == 0):
            raise ConfigError("a remote tier needs both remote_url and remote_budget_bytes > 0, got "
                              f"remote_url={self.remote_url!r}, "
                              f"remote_budget_bytes={self.remote_budget_bytes}")
        if self.remote_url is not None and not str(self.remote_url).startswith(REDIS_SCHEMES):
            raise ConfigError(f"remote_url {self.remote_url!r} is not a Redis address (redis://host:port/db, "
                              "rediss://... or unix:///path?db=N)")

    def layout(self, kv_heads: int, head_dim: int, dtype: torch.dtype | None = None) -> BlockLayout:
        """The block layout of a model with ``kv_heads`` KV heads of ``head_dim`` dims.

        ``dtype`` is used when the config leaves it open (``dtype=None``); float16 if neither does.
        """
        return BlockLayout(kv_heads, self.block_tokens, head_dim, self.dtype or dtype or torch.float16)

    def check_budgets(self, layout: BlockLayout) -> None:
        """Raise ``ConfigError`` if the device budget cannot hold one block of ``layout``."""
        if self.device_budget_bytes < layout.nbytes:
            raise ConfigError(
                f"device_budget_bytes={self.device_budget_bytes} is smaller than one block: "
                f"{layout.nbytes} bytes ({layout.kv_heads} KV heads x {layout.block_tokens} tokens x "
                f"{layout.head_dim} dims x 2 (K,V) x {layout.dtype.itemsize} bytes)"
            )


def _check_writable(path: Path) -> None:
    """Raise ``ConfigError`` unless ``path`` is, or can be created as, a writable directory."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"disk_path {str(path)!r} exists and is not a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"disk_path {str(path)!r} is not writable ({str(probe)!r} denies writes)")
