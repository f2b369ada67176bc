"""Model fingerprints in keys and records: two fine-tunes saved in directories of the same name
(the case the old directory-name key confused) get different keys and refuse each other's
contexts and streams; the same weights elsewhere share; the cached weights' hash follows
in-place changes; stores and streams written before fingerprints are refused clearly."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from tiercache import ConfigError, TierConfig
from tiercache.contexts.store import ContextStore
from tiercache.errors import FingerprintError
from tiercache.fingerprint import Fingerprint, model_fingerprint, weights_digest
from tiercache.io.checksum import crc32
from tiercache.io.codec import make_codec
from tiercache.contexts.kv import load_kv_context, save_kv_context
from tiercache.io.store import DiskStore
from tiercache.models import load_model
from tiercache.stream import StreamSession

pytestmark = pytest.mark.model

DOCUMENT = "The vault code is 58203. The lamp turned slowly while the ship sailed on. " * 3


@pytest.fixture(scope="module")
def fine_tunes(smollm2, tmp_path_factory):
    """Two 2-layer Llamas of one config and different weights, each saved with SmolLM2's
    tokenizer in a directory named ``ckpt`` (under ``a/`` and ``b/``), and a copy of the first
    under another name."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = smollm2
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=4096)
    root = tmp_path_factory.mktemp("fine-tunes")
    paths = []
    for seed, where in ((0, "a/ckpt"), (1, "b/ckpt"), (0, "copy/other-name")):
        torch.manual_seed(seed)
        path = root / where
        LlamaForCausalLM(config).save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths


@pytest.fixture
def home(smollm2, tmp_path, monkeypatch):
    """A private $TIERCACHE_HOME (the files' hash cache), set after the default model is loaded."""
    monkeypatch.setenv("TIERCACHE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def config_for(model) -> TierConfig:
    return TierConfig(device_budget_bytes=4 << 20, host_budget_bytes=16 << 20, block_tokens=32,
                      dtype=torch.float32, device="cpu")


def test_fine_tunes_with_the_same_directory_name_never_share_kv(fine_tunes, home, tmp_path):
    (a, tok), (b, _) = load_model(fine_tunes[0]), load_model(fine_tunes[1])
    assert fine_tunes[0].name == fine_tunes[1].name == "ckpt"
    fa, fb = model_fingerprint(a), model_fingerprint(b)
    assert fa.name == fb.name == "ckpt" and fa.config == fb.config
    assert fa.weights != fb.weights and fa.weights.startswith("files:")
    store = tmp_path / "store"
    with ContextStore(store, a, tok, codec="zstd", config=config_for(a)) as sa:
        key_a = sa.encode(DOCUMENT)
    with ContextStore(store, b, tok, codec="zstd", config=config_for(b)) as sb:
        key_b = sb.key(DOCUMENT)
        assert key_b != key_a, "the same document under the same directory name must not share a key"
        assert not sb.backend.has_context(key_b)
        with pytest.raises(FingerprintError, match=r"not of this model and setting"):
            sb.load(key_a)  # asked by name anyway: refused, never served
        assert sb.encode(DOCUMENT) == key_b and sb.misses == 1, "B encodes its own"
        ka = load_kv_context(sb.backend, key_a, sa.fingerprint)
        kb = load_kv_context(sb.backend, key_b, sb.fingerprint)
        assert not torch.equal(ka, kb)


def test_the_same_weights_elsewhere_share_and_settings_change_the_key(fine_tunes, home, tmp_path):
    (a, tok), (copy, _) = load_model(fine_tunes[0]), load_model(fine_tunes[2])
    assert model_fingerprint(copy).name == "other-name"
    with ContextStore(tmp_path / "s", a, tok, codec="zstd", config=config_for(a)) as sa:
        key = sa.encode(DOCUMENT)
    with ContextStore(tmp_path / "s", copy, tok, codec="zstd", config=config_for(copy)) as sc:
        assert sc.key(DOCUMENT) == key, "the same weights and config under another name share contexts"
        assert torch.equal(sc.load(key).export_kv(), load_kv_context(sc.backend, key, sa.fingerprint))
    # Every part of the storage is in the fingerprint: another codec, its parameters, the dtype.
    keys = set()
    for codec, params in (("zstd", None), ("cachegen", None), ("quant", {"bits": 4}), ("quant", {"bits": 8})):
        with ContextStore(tmp_path / f"s-{codec}-{params}", a, tok, codec=codec, codec_params=params) as s:
            keys.add(s.key(DOCUMENT))
    assert len(keys) == 4
    half = load_model(fine_tunes[0], dtype=torch.bfloat16)[0]
    fh, fa = model_fingerprint(half), model_fingerprint(a)
    assert fh.weights == fa.weights and fh.dtype == "bfloat16" != fa.dtype


def test_the_weights_hash_is_cached_and_follows_in_place_changes(fine_tunes, home):
    a, _ = load_model(fine_tunes[0])
    first = weights_digest(a)
    assert first.startswith("files:")
    assert list((home / "fingerprints").glob("*.json")), "cached for other processes"
    assert weights_digest(a) == first
    weight = a.model.layers[0].mlp.up_proj.weight
    before = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] += 1.0  # a fine-tune step, in place
    changed = weights_digest(a)
    assert changed.startswith("tensors:"), "the files no longer describe the weights"
    with torch.no_grad():
        weight[0, 0] = before
    assert weights_digest(a).startswith("tensors:") and weights_digest(a) != changed
    # A model not read by load_model: the state dict is hashed; equal weights, equal hash.
    from transformers import LlamaForCausalLM

    fresh = LlamaForCausalLM(a.config)
    fresh.load_state_dict(load_model(fine_tunes[0])[0].state_dict())
    assert weights_digest(fresh) == weights_digest(a)


def test_a_stream_saved_by_one_fine_tune_is_refused_by_the_other(fine_tunes, home, tmp_path):
    (a, tok), (b, _) = load_model(fine_tunes[0]), load_model(fine_tunes[1])
    ids = tok(DOCUMENT, add_special_tokens=False)["input_ids"]
    config = TierConfig(device_budget_bytes=4 << 20, host_budget_bytes=16 << 20, block_tokens=32,
                        dtype=torch.float32, device="cpu", disk_codec="zstd")
    with StreamSession(a, tok, config, path=tmp_path / "stream") as s:
        s.append(ids)
        s.save()
    with pytest.raises(FingerprintError, match=r"saved by another model: 'ckpt' with weights files:"):
        StreamSession.open(tmp_path / "stream", b, tok)
    reopened = StreamSession.open(tmp_path / "stream", a, tok)
    assert reopened.tokens == len(ids)
    reopened.close()
    # A stream saved before fingerprints (manifest version 1) is refused, not reopened.
    manifest = tmp_path / "stream" / "stream.json"
    doc = json.loads(manifest.read_text())
    del doc["fingerprint"]
    doc["version"] = 1
    manifest.write_text(json.dumps(doc))
    with pytest.raises(FingerprintError, match="without model fingerprints"):
        StreamSession.open(tmp_path / "stream", a, tok)


def test_records_without_a_fingerprint_are_refused(tmp_path, fingerprint_for):
    kv = torch.randn(2, 2, 2, 300, 16)
    raw = make_codec("raw")
    fingerprint = fingerprint_for(kv, raw)
    with DiskStore(tmp_path, 64 << 20, sync=False) as store:
        save_kv_context(store, "new", kv, raw, fingerprint)
        # What tiercache wrote before fingerprints: record format 3, no "fp" in the header.
        old = []
        for record in store.load_context("new"):
            body = bytearray(record[:-4])
            hlen = struct.unpack_from("<I", body, 6)[0]
            header = json.loads(bytes(body[18 : 18 + hlen]))
            del header["fp"]
            new_header = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
            body = body[:18] + new_header + body[18 + hlen :]
            struct.pack_into("<HI", body, 4, 3, len(new_header))
            old.append(bytes(body) + struct.pack("<I", crc32(bytes(body))))
        store.save_context("old", old)
        assert torch.equal(load_kv_context(store, "new", fingerprint), kv)
        with pytest.raises(FingerprintError, match="record format 3 was written by a tiercache without model "
                                                   "fingerprints"):
            load_kv_context(store, "old", fingerprint)
        # A fingerprint that does not describe the KV and codec is a mistake, said at once.
        with pytest.raises(ConfigError, match="codec 'raw' vs 'zstd'"):
            save_kv_context(store, "x", kv, make_codec("zstd"), fingerprint)
        other = fingerprint_for(kv, raw, weights="tensors:other")
        with pytest.raises(FingerprintError, match="refused"):
            load_kv_context(store, "new", other)
    assert Fingerprint.from_json(fingerprint.to_json()) == fingerprint
    assert fingerprint.differences(other) == ["model weights"]
