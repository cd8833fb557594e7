"""Draft vocabulary: hand example, invariants against a brute-force oracle, Vd = V, save/load, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lkjax.data.vocab import DraftVocab, build_draft_vocab, from_d2t


def test_hand_example():
  #            id: 0  1  2  3  4  5  6  7
  freqs = np.array([5, 0, 9, 5, 1, 9, 0, 3])
  vocab = build_draft_vocab(freqs, 4)
  # top-4: 2 and 5 (9 each), then 0 and 3 (5 each, tie kept in id order); 7 (3) is out.
  np.testing.assert_array_equal(vocab.token_ids, [0, 2, 3, 5])
  np.testing.assert_array_equal(vocab.d2t, [0, 1, 1, 2])
  np.testing.assert_array_equal(vocab.t2d, [1, 0, 1, 1, 0, 1, 0, 0])
  assert vocab.size == 4 and vocab.vocab_size == 8
  assert vocab.coverage == pytest.approx(28 / 32)
  np.testing.assert_array_equal(vocab.draft_to_target([[3, 0], [1, 2]]), [[5, 0], [2, 3]])
  np.testing.assert_array_equal(vocab.target_to_draft([0, 1, 2, 3, 4, 5, 6, 7]), [0, -1, 1, 2, -1, 3, -1, -1])


def test_tie_at_the_cut_goes_to_lower_id():
  vocab = build_draft_vocab([1, 1, 1, 1], 2)
  np.testing.assert_array_equal(vocab.token_ids, [0, 1])
  vocab = build_draft_vocab([0, 2, 1, 2, 1], 3)
  np.testing.assert_array_equal(vocab.token_ids, [1, 2, 3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_invariants_against_brute_force(seed):
  rng = np.random.default_rng(seed)
  v = 200
  freqs = rng.integers(0, 30, size=v)   # many ties
  vd = int(rng.integers(1, v))
  vocab = build_draft_vocab(freqs, vd)
  # Oracle: sort (freq desc, id asc) by Python's sort on tuples.
  expected = sorted(sorted(range(v), key=lambda i: (-freqs[i], i))[:vd])
  np.testing.assert_array_equal(vocab.token_ids, expected)
  assert np.all(np.diff(vocab.token_ids) > 0)
  assert vocab.d2t.dtype == np.int64 and vocab.d2t.shape == (vd,)
  np.testing.assert_array_equal(np.arange(vd) + vocab.d2t, vocab.token_ids)
  assert vocab.t2d.dtype == np.bool_ and vocab.t2d.shape == (v,) and vocab.t2d.sum() == vd
  assert vocab.coverage == pytest.approx(sum(freqs[i] for i in expected) / freqs.sum())
  assert vocab.coverage_of(freqs) == pytest.approx(vocab.coverage)
  # Round trips: every draft id maps to a target id and back; out-of-vocab targets map to -1.
  np.testing.assert_array_equal(vocab.target_to_draft(vocab.draft_to_target(np.arange(vd))), np.arange(vd))
  t2d_ids = vocab.target_to_draft(np.arange(v))
  np.testing.assert_array_equal(t2d_ids >= 0, vocab.t2d)
  rebuilt = from_d2t(vocab.d2t, v)
  np.testing.assert_array_equal(rebuilt.token_ids, vocab.token_ids)
  np.testing.assert_array_equal(rebuilt.t2d, vocab.t2d)
  assert math.isnan(rebuilt.coverage)


@pytest.mark.parametrize("vd", [0, 6])
def test_full_vocabulary(vd):
  vocab = build_draft_vocab([3, 0, 0, 1, 2, 0], vd)
  assert vocab.size == vocab.vocab_size == 6 and vocab.is_full
  np.testing.assert_array_equal(vocab.d2t, np.zeros(6))
  assert vocab.t2d.all() and vocab.coverage == 1.0
  np.testing.assert_array_equal(vocab.target_to_draft(np.arange(6)), np.arange(6))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_load_round_trip(tmp_path, suffix):
  vocab = build_draft_vocab(np.random.default_rng(3).integers(0, 100, size=64), 17)
  path = vocab.save(tmp_path / f"vocab{suffix}")
  loaded = DraftVocab.load(path)
  np.testing.assert_array_equal(loaded.token_ids, vocab.token_ids)
  np.testing.assert_array_equal(loaded.d2t, vocab.d2t)
  np.testing.assert_array_equal(loaded.t2d, vocab.t2d)
  assert loaded.d2t.dtype == np.int64 and loaded.t2d.dtype == np.bool_
  assert loaded.coverage == pytest.approx(vocab.coverage)


def test_arrays_are_immutable():
  vocab = build_draft_vocab([1, 2, 3], 2)
  with pytest.raises(ValueError):
    vocab.d2t[0] = 5


@pytest.mark.parametrize("vd", [-1, 11])
def test_bad_vd_names_argument(vd):
  with pytest.raises(ValueError, match="vd="):
    build_draft_vocab(np.ones(10), vd)


def test_bad_inputs():
  with pytest.raises(ValueError, match="token_freqs"):
    build_draft_vocab(np.ones((2, 3)), 2)
  with pytest.raises(ValueError, match="token_freqs"):
    build_draft_vocab([1, -1, 2], 2)
  with pytest.raises(ValueError, match="vd="):
    build_draft_vocab([1, 2, 3], 1.5)
  with pytest.raises(ValueError, match="ascending"):
    from_d2t(np.array([0, 0, -1]), 10)           # target ids 0, 1, 1
  with pytest.raises(ValueError, match="outside"):
    from_d2t(np.array([0, 9]), 10)               # target id 10 >= V
  vocab = build_draft_vocab([1, 2, 3], 2)
  with pytest.raises(ValueError, match="draft ids"):
    vocab.draft_to_target([2])
  with pytest.raises(ValueError, match="target ids"):
    vocab.target_to_draft([3])
  with pytest.raises(ValueError, match="coverage_of"):
    vocab.coverage_of([1, 2])


def test_load_rejects_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing"):
    DraftVocab.load(tmp_path / "nope.npz")
  bad = tmp_path / "bad.npz"
  np.savez(bad, d2t=np.array([0, 1], np.int64), t2d=np.array([True, False, True, True]))
  with pytest.raises(ValueError, match="bad.npz.*t2d disagrees"):
    DraftVocab.load(bad)
  with pytest.raises(ValueError, match=r"\.npz or \.safetensors"):
    build_draft_vocab([1, 2], 1).save(tmp_path / "vocab.txt")
