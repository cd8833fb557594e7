"""The shared alignment helpers and TargetInfo against hand-checked examples."""
import numpy as np
import pytest

from lkjax.models.base import head_mask, head_targets, shift_left, shift_right
from lkjax.targets.info import TargetInfo, eagle3_aux_layer_ids


def test_shift_left_pads_with_fill():
  x = np.arange(10).reshape(2, 5)
  np.testing.assert_array_equal(shift_left(x, 2, axis=1, fill=-1), [[2, 3, 4, -1, -1], [7, 8, 9, -1, -1]])
  np.testing.assert_array_equal(shift_left(x, 0), x)
  np.testing.assert_array_equal(shift_left(x, 7, fill=3), np.full_like(x, 3))


def test_shift_right_pads_with_fill_and_undoes_shift_left():
  x = np.arange(10).reshape(2, 5)
  np.testing.assert_array_equal(shift_right(x, 2, axis=1, fill=-1), [[-1, -1, 0, 1, 2], [-1, -1, 5, 6, 7]])
  np.testing.assert_array_equal(shift_right(x, 0), x)
  np.testing.assert_array_equal(shift_right(x, 5, fill=3), np.full_like(x, 3))
  np.testing.assert_array_equal(shift_right(shift_left(x, 2), 2)[:, 2:], x[:, 2:])


def test_head_mask_hand_example():
  # Row: doc 1 = positions 0..3 (assistant tokens at 2, 3), doc 2 = positions 4..5 (assistant 5), pad at 6.
  loss_mask = np.array([[0, 0, 1, 1, 0, 1, 0]])
  segment_ids = np.array([[1, 1, 1, 1, 2, 2, 0]])
  m = np.asarray(head_mask(loss_mask, segment_ids, 3))
  # head k at t predicts x[t+k+2]: trained iff that token is an assistant token of t's document.
  expected = np.zeros((3, 1, 7), bool)
  expected[0, 0, [0, 1]] = True      # x2, x3 (x6 is padding; x5 would cross from doc 1 to doc 2 for t=3)
  expected[0, 0, 3] = False
  expected[1, 0, 0] = True           # x3
  expected[2, 0, :] = False          # x4 is not an assistant token; x5 from t=1 crosses documents
  np.testing.assert_array_equal(m, expected)


def test_head_targets_positions():
  x = np.arange(6)[None, :, None] * np.ones((1, 1, 2))
  t = np.asarray(head_targets(x, 2))
  assert t.shape == (2, 1, 6, 2)
  np.testing.assert_array_equal(t[0, 0, :, 0], [1, 2, 3, 4, 5, 0])   # head 0 compares with target at t+1
  np.testing.assert_array_equal(t[1, 0, :, 0], [2, 3, 4, 5, 0, 0])   # head 1 at t+2


def _info(**kw):
  d = dict(name="tiny", model_type="llama", num_layers=30, hidden_size=576, vocab_size=49152,
           num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536,
           rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192)
  d.update(kw)
  return d


def test_target_info_defaults_and_roundtrip():
  info = TargetInfo.from_dict(_info())
  assert info.aux_layer_ids == (2, 15, 27) == eagle3_aux_layer_ids(30)
  assert info.num_aux == 3
  assert TargetInfo.from_dict(info.to_dict()) == info


def test_target_info_bad_input_names_fields():
  with pytest.raises(ValueError, match="missing target fields.*hidden_size"):
    TargetInfo.from_dict({k: v for k, v in _info().items() if k != "hidden_size"}, source="m.json")
  with pytest.raises(ValueError, match="unknown target fields.*bogus"):
    TargetInfo.from_dict(_info(bogus=1))
  with pytest.raises(ValueError, match="num_layers=3"):
    eagle3_aux_layer_ids(3)
