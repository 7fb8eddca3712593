"""Tests for dypo_jax.rl.queues: FIFO across queues, exact serialisation, corrupt bytes named."""
import numpy as np
import pytest

from dypo_jax.rl.queues import HardItem
from dypo_jax.rl.queues import MidItem
from dypo_jax.rl.queues import QueueSet


def _hard(uid, step=0, n=5, teacher="r1", index=0):
  rng = np.random.default_rng(abs(hash(uid)) % 2**32)
  return HardItem(uid=uid, prompt_tokens=rng.integers(0, 100, size=3 + n % 4, dtype=np.int32),
                  teacher=teacher, teacher_index=index,
                  response_tokens=rng.integers(0, 100, size=n, dtype=np.int32), step=step)


def _mid(uid, step=0, k=4, t=6, teacher_len=None):
  rng = np.random.default_rng(abs(hash(uid)) % 2**32)
  lengths = rng.integers(1, t + 1, size=k).astype(np.int32)
  rewards = (np.arange(k) % 2).astype(np.float32)
  return MidItem(
      uid=uid, prompt_tokens=rng.integers(0, 100, size=2 + t % 3, dtype=np.int32),
      response_tokens=rng.integers(0, 100, size=(k, t), dtype=np.int32),
      response_lengths=lengths, rewards=rewards, shaped_rewards=rewards - 0.25,
      logprobs=rng.normal(size=(k, t)).astype(np.float32), step=step,
      teacher_tokens=(None if teacher_len is None
                      else rng.integers(0, 100, size=teacher_len, dtype=np.int32)),
      teacher=None if teacher_len is None else "qwen")


def _assert_items_equal(a, b):
  assert type(a) is type(b)
  for field in a.__dataclass_fields__:
    x, y = getattr(a, field), getattr(b, field)
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
      assert isinstance(x, np.ndarray) and isinstance(y, np.ndarray), field
      assert x.dtype == y.dtype and x.shape == y.shape, field
      np.testing.assert_array_equal(x, y, err_msg=field)
    else:
      assert x == y, field


def _assert_queuesets_equal(a: QueueSet, b: QueueSet):
  assert a.depths() == b.depths() and a.counter == b.counter
  for x, y in zip(a.hard + a.mid, b.hard + b.mid):
    _assert_items_equal(x, y)
  # The arrival order survives too: popping everything gives the same sequence.
  ha, ma, oa = a.pop_batch(len(a)) if len(a) else ([], [], [])
  hb, mb, ob = b.pop_batch(len(b)) if len(b) else ([], [], [])
  assert oa == ob
  for x, y in zip(ha + ma, hb + mb):
    _assert_items_equal(x, y)


def _mixed_queueset():
  qs = QueueSet()
  qs.push_mid(_mid("m0", step=1, k=4, t=6))
  qs.push_hard(_hard("h0", step=1, n=7))
  qs.push_hard(_hard("h1", step=2, n=3, teacher="qwen3", index=2))
  qs.push_mid(_mid("m1", step=2, k=2, t=9, teacher_len=5))  # Ragged T, optional fields set.
  qs.push_hard(_hard("h2", step=3, n=1))
  qs.push_mid(_mid("m2", step=3, k=8, t=4))
  return qs


def test_pop_batch_is_fifo_across_queues_in_arrival_order():
  qs = QueueSet()
  qs.push_hard(_hard("h0"))
  qs.push_mid(_mid("m0"))
  qs.push_mid(_mid("m1"))
  qs.push_hard(_hard("h1"))
  qs.push_mid(_mid("m2"))
  assert len(qs) == 5 and qs.depths() == {"hard": 2, "mid": 3}
  assert qs.ready(5) and not qs.ready(6)
  hard, mid, order = qs.pop_batch(3)
  assert [h.uid for h in hard] == ["h0"]
  assert [m.uid for m in mid] == ["m0", "m1"]
  assert order == ["hard", "mid", "mid"]
  qs.push_hard(_hard("h2"))  # Arrives after m2: must come out after it.
  hard, mid, order = qs.pop_batch(3)
  assert [h.uid for h in hard] == ["h1", "h2"] and [m.uid for m in mid] == ["m2"]
  assert order == ["hard", "mid", "hard"]
  assert len(qs) == 0 and qs.depths() == {"hard": 0, "mid": 0}


def test_pop_batch_errors_name_the_depths():
  qs = QueueSet()
  qs.push_hard(_hard("h0"))
  with pytest.raises(ValueError, match=r"pop_batch\(n=2\).*only 1"):
    qs.pop_batch(2)
  with pytest.raises(ValueError, match="n must be positive"):
    qs.pop_batch(0)
  assert len(qs) == 1  # Nothing was popped by the failed calls.


def test_items_validate_and_coerce():
  item = HardItem(uid="a", prompt_tokens=[1, 2], teacher="t", teacher_index=0,
                  response_tokens=np.array([3, 4], np.int64), step=0)
  assert item.prompt_tokens.dtype == np.int32 and item.response_tokens.dtype == np.int32
  with pytest.raises(ValueError, match=r"uid='f'.*response_tokens.*integer"):
    HardItem(uid="f", prompt_tokens=[1], teacher="t", teacher_index=0,
             response_tokens=np.array([0.5]), step=0)
  with pytest.raises(ValueError, match=r"uid='b'.*logprobs"):
    MidItem(uid="b", prompt_tokens=[1], response_tokens=np.zeros((2, 3), np.int32),
            response_lengths=[1, 2], rewards=[0, 1], shaped_rewards=[0, 1],
            logprobs=np.zeros((2, 4)), step=0)
  with pytest.raises(ValueError, match=r"uid='c'.*response_lengths"):
    MidItem(uid="c", prompt_tokens=[1], response_tokens=np.zeros((2, 3), np.int32),
            response_lengths=[1, 5], rewards=[0, 1], shaped_rewards=[0, 1],
            logprobs=np.zeros((2, 3)), step=0)
  with pytest.raises(ValueError, match="push_mid expects a MidItem"):
    QueueSet().push_mid(item)


def test_bytes_round_trip_exact_with_ragged_and_optional_fields():
  qs = _mixed_queueset()
  qs.pop_batch(1)  # The counter and arrival numbers no longer start at 0.
  restored = QueueSet.from_bytes(qs.to_bytes())
  mids = restored.mid
  assert mids[0].teacher_tokens is not None and mids[0].teacher == "qwen"
  assert mids[1].teacher_tokens is None and mids[1].teacher is None
  assert mids[1].response_tokens.shape == (8, 4)
  # Pushing after a restore continues the arrival counter.
  qs.push_hard(_hard("h3"))
  restored.push_hard(_hard("h3"))
  _assert_queuesets_equal(qs, restored)


def test_empty_round_trip():
  empty = QueueSet.from_bytes(QueueSet().to_bytes())
  assert len(empty) == 0 and empty.counter == 0


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_corrupt_bytes_raise_value_error_naming_the_source(damage):
  data = _mixed_queueset().to_bytes()
  if damage == "truncate":
    data = data[:len(data) // 2]
  elif damage == "garbage":
    data = b"not a zip file at all"
  else:  # Flip bytes in the middle of the compressed payload: the zip CRC catches it.
    mid = len(data) // 3
    data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 16]) + data[mid + 16:]
  with pytest.raises(ValueError, match="ckpt/7 item 'queues'"):
    QueueSet.from_bytes(data, source="ckpt/7 item 'queues'")
