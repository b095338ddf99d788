"""The feature cache on its own: round trip, and every kind of damage detected (never silently used)."""

from __future__ import annotations

import json

import pytest
import torch

from probing.cache import FeatureCache


def _key(layer: str = "final", **extra) -> dict:
    return {"backbone": {"id": "tiny@random", "fingerprint": "abc"}, "dataset": {"label": "digits"},
            "split": "train", "layer": layer, **extra}


def _features(n: int = 7, d: int = 5, superclass: bool = True) -> dict:
    generator = torch.Generator().manual_seed(0)
    out = {"embedding": torch.randn(n, d, generator=generator), "label": torch.arange(n) % 3,
           "index": torch.arange(n)}
    if superclass:
        out["superclass"] = torch.arange(n) % 2
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_round_trip_and_stats(tmp_path):
    cache = FeatureCache(tmp_path)
    assert cache.load(_key()) is None and cache.stats["misses"] == 1
    path = cache.save(_key(), _features())
    assert path.exists() and cache.sidecar(path).exists()
    _assert_same(cache.load(_key()), _features())
    assert cache.stats["hits"] == 1 and cache.stats["written"] == 1
    meta = json.loads(cache.sidecar(path).read_text())
    assert meta["size"] == path.stat().st_size and len(meta["sha256"]) == 64 and meta["rows"] == 7
    # Each layer, split or fingerprint is its own entry.
    assert cache.path_for(_key("block00")) != path
    assert cache.path_for({**_key(), "backbone": {"id": "tiny@random", "fingerprint": "xyz"}}) != path


def test_stored_and_loaded_features_carry_the_file_digest_the_result_cache_keys_on(tmp_path):
    from probing.result_cache import tensor_digest

    cache = FeatureCache(tmp_path)
    written = cache.stored(_key(), _features())
    loaded = cache.load(_key())
    _assert_same(written, _features())
    meta = json.loads(cache.sidecar(cache.path_for(_key())).read_text())
    assert written.content_digest == loaded.content_digest == f"cache-file-sha256:{meta['sha256']}"
    assert tensor_digest(loaded) == tensor_digest(written) == loaded.content_digest
    # another entry's content has another digest; a derived plain dict is hashed from its tensors
    other = cache.stored(_key("block00"), {**_features(), "embedding": _features()["embedding"] + 1})
    assert tensor_digest(other) != tensor_digest(loaded)
    assert tensor_digest(dict(loaded)) == tensor_digest(_features()) != loaded.content_digest
    # nothing written (cache off): the features come back unchanged, without a digest
    off = FeatureCache(tmp_path / "off", enabled=False).stored(_key(), _features())
    assert not hasattr(off, "content_digest")


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":  # same size, one byte of the embedding changed
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "no_sidecar":
        FeatureCache.sidecar(path).unlink()
    elif how == "bad_sidecar":
        FeatureCache.sidecar(path).write_text("{not json")
    elif how == "other_key":
        meta = json.loads(FeatureCache.sidecar(path).read_text())
        meta["key"]["split"] = "test"
        FeatureCache.sidecar(path).write_text(json.dumps(meta))


@pytest.mark.parametrize("how", ["truncate", "flip", "empty", "no_sidecar", "bad_sidecar", "other_key"])
def test_damaged_entries_are_detected_and_rebuilt(tmp_path, how, caplog):
    cache = FeatureCache(tmp_path)
    path = cache.save(_key(), _features())
    _damage(path, how)
    with caplog.at_level("WARNING"):
        assert cache.load(_key()) is None
    assert cache.stats["corrupt"] == 1 and "rebuilding" in caplog.text
    cache.save(_key(), _features())  # the rebuild overwrites the damaged entry
    _assert_same(cache.load(_key()), _features())


def test_modes_no_cache_rebuild_and_read_only(tmp_path):
    FeatureCache(tmp_path).save(_key(), _features(superclass=False))
    off = FeatureCache(tmp_path, enabled=False)
    assert off.load(_key()) is None and off.save(_key("x"), _features()) is None
    assert not off.path_for(_key("x")).exists()
    rebuild = FeatureCache(tmp_path, rebuild=True)
    assert rebuild.load(_key()) is None
    assert rebuild.save(_key(), _features()) is not None
    _assert_same(FeatureCache(tmp_path).load(_key()), _features())
    reader = FeatureCache(tmp_path, writable=False)  # a DDP rank > 0
    assert reader.load(_key()) is not None and reader.save(_key("y"), _features()) is None


def _stamp(path) -> dict:
    return json.loads(FeatureCache.sidecar(path).read_text()).get("stat")


def test_a_verified_unchanged_entry_is_served_without_reading_it_whole(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    path = cache.save(_key(), _features())
    stamp = _stamp(path)
    assert stamp["size"] == path.stat().st_size and stamp["ctime_ns"] == path.stat().st_ctime_ns
    assert stamp["checked_ns"] > stamp["ctime_ns"]  # the save waited for the clock to pass the file's ctime
    monkeypatch.setattr(FeatureCache, "_checksummed", lambda *_: pytest.fail("a trusted entry was read whole"))
    loaded = cache.load(_key())
    _assert_same(loaded, _features())
    assert cache.stats["hits"] == 1 and cache.stats["checksummed"] == 0
    assert loaded.content_digest.endswith(json.loads(cache.sidecar(path).read_text())["sha256"])


@pytest.mark.parametrize("change", ["touched", "no_stamp", "racy_stamp", "rewritten"])
def test_an_entry_changed_since_its_check_is_checksummed_again_and_restamped(tmp_path, change):
    import os

    cache = FeatureCache(tmp_path)
    path = cache.save(_key(), _features())
    meta = json.loads(cache.sidecar(path).read_text())
    if change == "touched":  # same bytes, another mtime
        os.utime(path, ns=(meta["stat"]["mtime_ns"] + 10**9, meta["stat"]["mtime_ns"] + 10**9))
    elif change == "no_stamp":  # an entry from an older fmprobe
        del meta["stat"]
        cache.sidecar(path).write_text(json.dumps(meta))
    elif change == "racy_stamp":  # checked within the file's own clock tick: a later write could keep its ctime
        meta["stat"]["checked_ns"] = meta["stat"]["ctime_ns"]
        cache.sidecar(path).write_text(json.dumps(meta))
    else:  # the same bytes written again in place (a new ctime)
        path.write_bytes(path.read_bytes())
    _assert_same(cache.load(_key()), _features())
    assert cache.stats["checksummed"] == 1
    assert _stamp(path)["ctime_ns"] == path.stat().st_ctime_ns  # stamped again: the next run trusts it
    _assert_same(FeatureCache(tmp_path).load(_key()), _features())
    reader = FeatureCache(tmp_path)
    reader.load(_key())
    assert reader.stats["checksummed"] == 0


def test_a_read_only_cache_checksums_but_never_stamps(tmp_path):
    cache = FeatureCache(tmp_path)
    path = cache.save(_key(), _features())
    meta = json.loads(cache.sidecar(path).read_text())
    del meta["stat"]
    cache.sidecar(path).write_text(json.dumps(meta))
    reader = FeatureCache(tmp_path, writable=False)  # a DDP rank > 0, or a read-only folder
    _assert_same(reader.load(_key()), _features())
    assert reader.stats["checksummed"] == 1 and _stamp(path) is None


@pytest.mark.parametrize("metadata", [None, {"fmprobe_cache_format": "1", "key": '{"a":"b\\"c"}'}])
def test_streamed_file_is_byte_identical_to_safetensors_save(metadata):
    from safetensors.torch import load, save

    from probing.cache import safetensors_pieces

    generator = torch.Generator().manual_seed(1)
    tensors = {"embedding": torch.randn(9, 5, generator=generator), "half": torch.randn(4, 3).half(),
               "brain": torch.randn(2, 3).bfloat16(), "label": torch.arange(9), "mask": torch.arange(6) % 2 == 0,
               "bytes": torch.arange(7, dtype=torch.uint8), "wide": torch.randn(3, 2).double(),
               "empty": torch.zeros(0, 4), "int32": torch.arange(5, dtype=torch.int32),
               "strided": torch.arange(12.0).reshape(3, 4).T}  # not contiguous: written in row-major order
    streamed = b"".join(bytes(piece) for piece in safetensors_pieces(tensors, metadata))
    expected = save({name: value.contiguous() for name, value in tensors.items()}, metadata=metadata)

    def header(data: bytes) -> tuple[int, dict]:
        size = int.from_bytes(data[:8], "little")
        return size, json.loads(data[8 : 8 + size])

    if metadata is None:
        assert streamed == expected
    else:  # save() writes metadata in a per-process hash order; ours in key order, so the bytes are reproducible
        assert header(streamed) == header(expected) and streamed[header(streamed)[0] + 8 :] == expected[
            header(expected)[0] + 8 :]
        assert b'"fmprobe_cache_format":"1","key":' in streamed
    loaded = load(streamed)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name
