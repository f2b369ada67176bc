"""Model fingerprints: what stored KV must match to be served.

Stored KV is what one model computed for some tokens, stored one way. It is valid only for the
same weights, config and dtype, read back with the same layout, codec and record format. A
``Fingerprint`` holds all of these; its ``digest`` goes into every content key (``content_key``)
and every record header (``tiercache.io.record``), so that

- a model never finds another model's contexts under its own keys (two fine-tunes saved in
  directories of the same name get different keys), and
- a context loaded by name (a saved stream, an explicit key) whose records carry another
  digest, or none, is refused with a ``FingerprintError`` naming what differs.

The weights' hash is computed once per model and cached beside it: on the model object, checked
against every tensor's storage and version counter (an in-place update or a replaced tensor
means a new hash), and, for a model ``tiercache.models.load_model`` read from safetensors files
and not changed since, the files' hash, kept in ``$TIERCACHE_HOME/fingerprints`` keyed by the
files' sizes and modification times so that other processes (batch workers) reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .blocks import BlockLayout
from .errors import FingerprintError, StoreError
from .paths import cache_home

#: Config entries that do not change what the model computes (runtime switches, provenance).
_RUNTIME_CONFIG_KEYS = frozenset({"name_or_path", "transformers_version", "dtype", "torch_dtype",
                                  "attn_implementation", "use_cache", "output_attentions",
                                  "output_hidden_states", "return_dict"})
#: Bytes hashed per read of a weights file.
_FILE_CHUNK = 16 << 20
#: Hex digits of a fingerprint digest (128 bits).
DIGEST_CHARS = 32


@dataclass(frozen=True)
class ModelFingerprint:
    """What a model is: ``config`` (sha256 of its config, runtime switches left out),
    ``weights`` (``"files:<sha256>"`` of its safetensors files or ``"tensors:<sha256>"`` of its
    state dict) and ``dtype``. ``name`` is for people only and is not compared."""

    name: str
    config: str
    weights: str
    dtype: str

    def same_model(self, other: "ModelFingerprint") -> bool:
        return (self.config, self.weights, self.dtype) == (other.config, other.weights, other.dtype)


@dataclass(frozen=True)
class Fingerprint:
    """A model (``ModelFingerprint``) and how its KV is stored: ``layers`` x ``kv_heads`` x
    ``head_dim`` in ``kv_dtype``, ``block_tokens`` tokens per record, ``codec`` with
    ``codec_params``, record format ``record_version``."""

    model: ModelFingerprint
    layers: int
    kv_heads: int
    head_dim: int
    kv_dtype: str
    block_tokens: int
    codec: str
    codec_params: dict = field(default_factory=dict)
    record_version: int = 0

    @property
    def digest(self) -> str:
        """Hex digest of every field but the model's name (the same model under another
        directory name has the same digest)."""
        doc = self.to_json()
        del doc["model"]["name"]
        blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:DIGEST_CHARS]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> "Fingerprint":
        """The fingerprint ``to_json`` gave; ``FingerprintError`` if ``doc`` is not one."""
        try:
            fields = dict(doc)
            fields["model"] = ModelFingerprint(**fields["model"])
            return cls(**fields)
        except (TypeError, KeyError, ValueError) as exc:
            raise FingerprintError(f"not a tiercache fingerprint: {exc!r}") from None

    def differences(self, other: "Fingerprint") -> list[str]:
        """What differs from ``other``, in words (empty when the digests agree)."""
        diffs = [f"model {name}" for name in ("weights", "config", "dtype")
                 if getattr(self.model, name) != getattr(other.model, name)]
        for name in ("layers", "kv_heads", "head_dim", "kv_dtype", "block_tokens", "codec", "codec_params",
                     "record_version"):
            if getattr(self, name) != getattr(other, name):
                diffs.append(f"{name} {getattr(self, name)!r} vs {getattr(other, name)!r}")
        return diffs

    def describe(self) -> str:
        """One line for messages and ``tiercache inspect``."""
        return (f"{self.digest[:16]} ({self.model.name}, weights {self.model.weights[:22]}, "
                f"{self.model.dtype}; {self.layers}x{self.kv_heads}x{self.head_dim} {self.kv_dtype}, "
                f"{self.block_tokens}-token records, {self.codec} {self.codec_params}, "
                f"record v{self.record_version})")


def model_id(model) -> str:
    """A stable name of ``model`` for people (messages, manifests): the last part of the
    checkpoint path it was loaded from (``"SmolLM2-135M-Instruct"`` for the default model), else
    its model type. Never a key on its own: two fine-tunes may share it (see ``Fingerprint``)."""
    name = getattr(model.config, "name_or_path", "") or ""
    return Path(str(name).rstrip("/")).name or str(model.config.model_type)


def model_fingerprint(model) -> ModelFingerprint:
    """The fingerprint of a transformers ``model`` as it is now (the weights' hash is cached)."""
    return ModelFingerprint(model_id(model), config_digest(model.config), weights_digest(model),
                            dtype_name(model.dtype))


def storage_fingerprint(model: ModelFingerprint, layers: int, layout: BlockLayout, codec) -> Fingerprint:
    """``model``'s KV of ``layers`` layers stored in records of ``layout`` (tokens per record,
    heads, dims, dtype) encoded by ``codec`` (a ``tiercache.io.codec.Codec``)."""
    from .io.record import VERSION

    return Fingerprint(model, layers, layout.kv_heads, layout.head_dim, dtype_name(layout.dtype),
                       layout.block_tokens, codec.name, dict(codec.params()), VERSION)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_digest(config) -> str:
    """sha256 of a transformers config's entries that shape what the model computes (a config
    read from a checkpoint directory gives the same digest as the loaded model's)."""
    doc = {k: v for k, v in config.to_dict().items()
           if not k.startswith("_") and k not in _RUNTIME_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------- weights


def weights_digest(model) -> str:
    """``"files:<sha256>"`` when ``model`` still holds exactly what ``load_model`` read from its
    safetensors files, else ``"tensors:<sha256>"`` of its state dict; cached on the model."""
    signature = _tensor_signature(model)
    cached = model.__dict__.get("_tiercache_weights")
    if cached is not None and cached[0] == signature:
        return cached[1]
    source = model.__dict__.get("_tiercache_source")
    if source is not None and source[1] == signature:
        digest = "files:" + files_digest(source[0])
    else:
        digest = "tensors:" + _state_dict_digest(model)
    model.__dict__["_tiercache_weights"] = (signature, digest)
    return digest


def note_source(model, files: list[Path]) -> None:
    """Record that ``model``'s weights were just read from ``files`` (safetensors), so that its
    fingerprint may hash the files (cached across processes) while the tensors stay unchanged."""
    model.__dict__["_tiercache_source"] = ([Path(f) for f in files], _tensor_signature(model))


def _tensor_signature(model) -> tuple:
    """Which tensors the model holds and whether any changed: storage, shape, dtype and version
    counter (bumped by every in-place update) of each named tensor."""
    return tuple((name, t.data_ptr(), t._version, tuple(t.shape), t.dtype)
                 for name, t in model.state_dict(keep_vars=True).items())


def _state_dict_digest(model) -> str:
    """sha256 over the state dict in name order: each name, dtype, shape and bytes; a tensor
    sharing another's storage (tied embeddings) is hashed as a reference to it."""
    h = hashlib.sha256()
    seen: dict[tuple, str] = {}
    for name, t in sorted(model.state_dict().items()):
        ident = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        h.update(f"{name}\0{dtype_name(t.dtype)}\0{tuple(t.shape)}\0".encode())
        if ident in seen:
            h.update(f"tied:{seen[ident]}\0".encode())
            continue
        seen[ident] = name
        data = t.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            h.update(memoryview(data.view(torch.uint8).numpy()))
    return h.hexdigest()


def files_digest(files: list[Path]) -> str:
    """sha256 over ``files`` (names and bytes, in name order), cached in
    ``$TIERCACHE_HOME/fingerprints`` under the files' paths, sizes and modification times."""
    from .io.jsonfile import write_json_atomic

    files = sorted(Path(f).resolve() for f in files)
    stats = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    where = cache_home() / "fingerprints"
    entry = where / (hashlib.sha256("\0".join(map(str, files)).encode()).hexdigest()[:32] + ".json")
    try:
        doc = json.loads(entry.read_text(encoding="utf-8"))
        if doc["files"] == stats:
            return str(doc["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as src:
            while chunk := src.read(_FILE_CHUNK):
                h.update(chunk)
    digest = h.hexdigest()
    try:
        os.makedirs(where, exist_ok=True)
        write_json_atomic(entry, {"files": stats, "sha256": digest})
    except (OSError, StoreError):  # a cache only: hashing again next time is correct
        pass
    return digest
