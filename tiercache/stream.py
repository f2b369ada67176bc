"""Streaming QA sessions (ReKV / LiveVLM style): append a long text or frame stream chunk by
chunk, ask questions at any time, persist the stream and reopen it in another process.

- **Append.** Each chunk attends the attention sinks and the recent window only (``TieredCache``
  with ``prefill="window"``), so the work per chunk does not grow with the stream; every chunk's
  KV goes into the tiers and cascades down to host and disk as their budgets fill.
- **Ask** (``generation.ask_cache``). A question is prefilled with ``prefill="retrieval"`` (its queries pick the relevant
  units of the whole stream), answered greedily with retrieval at every decode step (or from the
  question's selection: ``hold=True``), and then truncated away, so the stream is untouched and never
  re-encoded.
- **Persist.** ``save()`` writes the stream's KV as one saved context (the config's disk codec)
  into a ``DiskStore`` under ``<path>/saved`` and a JSON manifest ``<path>/stream.json`` (model
  id, fingerprint, tokens, config); ``StreamSession.open`` imports it without any prefill, into
  a model whose fingerprint (config, weights, dtype) is the saved one; any other model is
  refused with a ``FingerprintError``. No pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .hf.cache import TieredCache
from .config import RetrievalConfig, TierConfig
from .blocks import BlockLayout
from .errors import ConfigError, FingerprintError, ShapeError, StoreError
from .fingerprint import Fingerprint, model_fingerprint, model_id, storage_fingerprint
from .contexts.kv import CHUNK_TOKENS, load_kv_context, save_kv_context
from .generation import ask_cache
from .io.codec import make_codec
from .io.jsonfile import write_json_atomic
from .io.store import DiskStore
from .stopping import DEFAULT_STOP

MANIFEST_NAME = "stream.json"
SAVED_DIR = "saved"
_FORMAT = "tiercache-stream"
_VERSION = 2  # 2: the manifest holds the KV's fingerprint


class StreamSession:
    """A stream appended chunk by chunk into a ``TieredCache`` and questioned at any time.

    ``config``: the tiers (``tiercache.hf.cache.default_config(model)`` if None). ``path``: the
    session directory for ``save`` (default ``config.disk_path``; it may also hold the disk
    tier). ``chunk_tokens``: the largest piece one forward encodes; longer appends are split, so
    memory and time per forward stay bounded (tokens).
    """

    def __init__(self, model, tokenizer, config: TierConfig | None = None, *,
                 path: str | os.PathLike | None = None, chunk_tokens: int = 128) -> None:
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ConfigError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.cache = TieredCache(model, config, prefill="window")
        self.config = self.cache.config
        self.path = Path(path) if path is not None else self.config.disk_path
        self.hidden_size = model.config.hidden_size
        self.vocab_size = model.config.vocab_size

    @property
    def tokens(self) -> int:
        """Tokens (or frame embeddings) in the stream so far."""
        return self.cache.get_seq_length()

    def append(self, input_ids: torch.Tensor | Sequence[int] | None = None,
               inputs_embeds: torch.Tensor | None = None) -> int:
        """Append token ids ``(tokens,)`` / ``(1, tokens)``, or embeddings already projected to
        the model's hidden size ``(tokens, hidden)`` / ``(1, tokens, hidden)``, to the stream;
        returns the stream's length in tokens. Exactly one of the two. ``input_ids`` may also be
        what a tokenizer returns (a ``BatchEncoding`` or any mapping with ``"input_ids"``; an
        ``attention_mask`` in it must be all ones). Text is refused with a ``ShapeError``: tokenize
        it first, so that the choice of special tokens stays the caller's."""
        ids, embeds = self._check_input(input_ids, inputs_embeds)
        n = (ids if ids is not None else embeds).shape[1]
        with torch.no_grad():  # TieredCache's forwards switch the model to its attention themselves
            for a in range(0, n, self.chunk_tokens):
                if ids is not None:
                    self.model(input_ids=ids[:, a : a + self.chunk_tokens], past_key_values=self.cache, use_cache=True)
                else:
                    self.model(inputs_embeds=embeds[:, a : a + self.chunk_tokens], past_key_values=self.cache,
                               use_cache=True)
        return self.tokens

    def ask(self, question: str, max_new_tokens: int = 32, stop: str | Sequence[str] | None = DEFAULT_STOP,
            hold: bool = False) -> str:
        """Answer ``question`` (text appended after the stream verbatim: end it with a cue such as
        "Answer:") from blocks retrieved over the whole stream; the stream is left as it was.
        The answer ends as ``generation.greedy_answer`` says: at an end-of-sequence or end-of-turn token, the
        first ``stop`` string (default: the first line or sentence) or ``max_new_tokens`` tokens.
        ``hold``: the answer's decode steps keep the question's selection (see ``ask_cache``).
        ``ShapeError`` on an empty stream."""
        return ask_cache(self.model, self.tokenizer, self.cache, question, max_new_tokens, stop, hold)

    def save(self) -> int:
        """Persist the stream's KV (with the config's disk codec) and its manifest under
        ``path``; returns the bytes the saved KV takes on disk. A crash leaves the previous save
        readable: the new context is committed before the manifest is switched to it. Saves a
        crash left behind (committed, but never or no longer named by the manifest) are removed."""
        if self.path is None:
            raise ConfigError("save() needs a session directory: pass path= or set config.disk_path")
        kv = self.cache.export_kv()
        codec = make_codec(self.config.disk_codec, **self.config.disk_codec_params)
        layers, _, heads, tokens, head_dim = kv.shape
        fingerprint = storage_fingerprint(model_fingerprint(self.model), layers,
                                          BlockLayout(heads, CHUNK_TOKENS, head_dim, kv.dtype), codec)
        name = f"stream-{fingerprint.digest[:16]}-{tokens}"
        try:
            old = self._read_manifest(self.path)["context"]
        except StoreError:  # no earlier save, or an unreadable manifest
            old = None
        # Which saves the manifest names is known unless it is there but unreadable.
        known = old is not None or not (self.path / MANIFEST_NAME).exists()
        # Room for the previous save and this one during the switch, whatever their encoding.
        budget = 3 * kv.numel() * kv.element_size() + (64 << 20)
        with DiskStore(self.path / SAVED_DIR, budget) as store:
            if known:  # orphans first: they would take the room this save needs
                for orphan in [c for c in store.contexts() if c not in (old, name)]:
                    store.delete_context(orphan)
            nbytes = save_kv_context(store, name, kv, codec, fingerprint, CHUNK_TOKENS)
            write_json_atomic(self.path / MANIFEST_NAME, {
                "format": _FORMAT, "version": _VERSION, "model_id": model_id(self.model),
                "fingerprint": fingerprint.to_json(), "tokens": tokens, "context": name,
                "config": config_to_json(self.config),
            })
            for previous in [c for c in store.contexts() if c != name]:
                store.delete_context(previous)
        return nbytes

    @classmethod
    def open(cls, path: str | os.PathLike, model, tokenizer, config: TierConfig | None = None, *,
             chunk_tokens: int = 128) -> "StreamSession":
        """Reopen a saved stream: its KV is imported into fresh tiers (no prefill) and the session
        continues where ``save`` left it. ``config`` defaults to the saved one, with the disk tier
        (if it had one) under ``path``. ``FingerprintError`` if ``model`` is not the model that
        saved it (config, weights or dtype differ; the directory's name is not compared), or if
        it was saved before fingerprints existed."""
        path = Path(path)
        manifest = cls._read_manifest(path)
        if "fingerprint" not in manifest:
            raise FingerprintError(f"stream {path} was saved by a tiercache without model fingerprints "
                                   f"({MANIFEST_NAME} version {manifest.get('version')}): nothing says which "
                                   "model's KV it holds, so it is not reopened; stream the input again and "
                                   "save")
        saved = Fingerprint.from_json(manifest["fingerprint"])
        mine = model_fingerprint(model)
        if not saved.model.same_model(mine):
            raise FingerprintError(
                f"stream {path} was saved by another model: {saved.model.name!r} with " + ", ".join(
                    f"{what} {getattr(saved.model, what)[:24]}" for what in ("weights", "config", "dtype")
                    if getattr(saved.model, what) != getattr(mine, what))
                + f"; this is {mine.name!r} with weights {mine.weights[:24]}, config {mine.config[:24]}, "
                f"dtype {mine.dtype}: refused")
        if config is None:
            config = config_from_json(manifest["config"], path)
        with DiskStore(path / SAVED_DIR, 0, readonly=True) as store:
            kv = load_kv_context(store, manifest["context"], saved)
        if kv.shape[3] != manifest["tokens"]:
            raise StoreError(f"stream {path}: saved context holds {kv.shape[3]} tokens, manifest says "
                             f"{manifest['tokens']}")
        session = cls(model, tokenizer, config, path=path, chunk_tokens=chunk_tokens)
        session.cache.import_kv(kv.to(session.cache.layout.dtype))
        return session

    def close(self) -> None:
        """Release the tiers (the prefetch worker and the disk tier's store)."""
        self.cache.close()

    def __enter__(self) -> "StreamSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _read_manifest(path: Path) -> dict:
        file = path / MANIFEST_NAME
        try:
            doc = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(f"{path} holds no saved stream ({MANIFEST_NAME} is missing)") from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read stream manifest {file}: {exc}") from exc
        missing = {"model_id", "tokens", "context", "config"} - set(doc) if isinstance(doc, dict) else {"all"}
        # Version 1 (no fingerprint) is read so that a save replaces it and open refuses it clearly.
        if missing or doc.get("format") != _FORMAT or doc.get("version") not in (1, _VERSION):
            raise StoreError(f"{file} is not a version-{_VERSION} {_FORMAT} manifest (missing {sorted(missing)})")
        return doc

    @staticmethod
    def _ids_of_encoding(encoding: Mapping) -> torch.Tensor | Sequence[int]:
        """The ``input_ids`` of a tokenizer's output, refusing padded ones (padding tokens would
        be streamed as content)."""
        if "input_ids" not in encoding:
            raise ShapeError(f"append got a mapping without 'input_ids' (keys {sorted(map(str, encoding))})")
        mask = encoding.get("attention_mask")
        if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
            raise ShapeError("append got a padded encoding (attention_mask has zeros): append one unpadded "
                             "sequence at a time")
        return encoding["input_ids"]

    def _check_input(self, input_ids, inputs_embeds) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Validate and normalise the inputs of ``append`` to batch-of-one tensors."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ShapeError("append takes exactly one of input_ids and inputs_embeds")
        device = next(self.model.parameters()).device
        if isinstance(input_ids, str):
            raise ShapeError(f"append takes token ids, not text ({input_ids!r:.40}): tokenize it first, e.g. "
                             "append(tokenizer(text, add_special_tokens=False)[\"input_ids\"])")
        if isinstance(input_ids, Mapping):
            input_ids = self._ids_of_encoding(input_ids)
        if input_ids is not None:
            try:
                ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(list(input_ids))
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ShapeError(f"input_ids must be integer token ids (a tensor, a list of ints or a "
                                 f"tokenizer's output), got {type(input_ids).__name__} {input_ids!r:.60}: "
                                 f"{exc}") from None
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise ShapeError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
            if ids.dim() == 1:
                ids = ids.unsqueeze(0)
            if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
                raise ShapeError(f"input_ids must be (tokens,) or (1, tokens) with tokens >= 1, "
                                 f"got shape {tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else ids.shape}")
            if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
                raise ShapeError(f"input_ids must lie in [0, {self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
            return ids.to(device, torch.long), None
        embeds = inputs_embeds
        if not isinstance(embeds, torch.Tensor) or not embeds.dtype.is_floating_point:
            raise ShapeError(f"inputs_embeds must be a floating-point tensor, got "
                             f"{getattr(embeds, 'dtype', type(embeds).__name__)}")
        if embeds.dim() == 2:
            embeds = embeds.unsqueeze(0)
        if embeds.dim() != 3 or embeds.shape[0] != 1 or embeds.shape[1] == 0 or embeds.shape[2] != self.hidden_size:
            raise ShapeError(f"inputs_embeds must be (tokens, {self.hidden_size}) or (1, tokens, {self.hidden_size}) "
                             f"with tokens >= 1 (the model's hidden size), got {tuple(inputs_embeds.shape)}")
        return None, embeds.to(device, self.model.dtype)


# ---------------------------------------------------------------------- config <-> JSON

def config_to_json(config: TierConfig) -> dict:
    """The machine-independent part of ``config`` as JSON data (no device, no disk path, no
    remote tier: those belong to the machine that reopens it)."""
    doc = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
           if f.name not in ("device", "disk_path", "retrieval", "dtype")
           and not f.name.startswith("remote_")}
    doc["dtype"] = str(config.dtype).removeprefix("torch.") if config.dtype is not None else None
    retrieval = dataclasses.asdict(config.retrieval)
    retrieval["layer_budgets"] = {str(k): v for k, v in config.retrieval.layer_budgets.items()}
    doc["retrieval"] = retrieval
    try:
        json.dumps(doc)
    except TypeError as exc:
        raise ConfigError(f"config cannot be saved as JSON (codec parameters must be JSON values): {exc}") from exc
    return doc


def config_from_json(doc: dict, disk_path: Path | None) -> TierConfig:
    """The ``TierConfig`` of ``config_to_json``'s ``doc``; a disk tier, if any, under ``disk_path``."""
    try:
        r = dict(doc["retrieval"])
        r["full_attention_layers"] = tuple(r["full_attention_layers"])
        if r.get("selection_layers") is not None:
            r["selection_layers"] = tuple(r["selection_layers"])
        r["layer_budgets"] = {int(k): v for k, v in r["layer_budgets"].items()}
        fields = {k: v for k, v in doc.items() if k != "retrieval"}
        return TierConfig(**fields, retrieval=RetrievalConfig(**r),
                          disk_path=disk_path if doc["disk_budget_bytes"] > 0 else None)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"saved stream config is not valid: {exc!r}") from exc
