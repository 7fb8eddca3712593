"""Tests for dypo_jax.data.pipeline: seeded epochs, process shards, exact resumption."""
import dataclasses
import json

import grain
import pytest

from dypo_jax.data import pipeline
from dypo_jax.data import tasks
from dypo_jax.data.records import RecordError


def _stream(n=10, seed=3, shuffle=True, pid=0, count=1):
  return pipeline.IndexStream(n, seed=seed, shuffle=shuffle, process_index=pid,
                              process_count=count)


def _json_round_trip(state):
  return json.loads(json.dumps(state))


# ---------------------------------------------------------------------------------- ordering


def test_same_seed_same_order_and_other_seed_other_order():
  a, b, c = _stream(seed=3), _stream(seed=3), _stream(seed=4)
  first = a.take(35)
  assert first == b.take(35)
  assert first != c.take(35)
  assert all(isinstance(i, int) for i in first)


def test_every_epoch_is_a_new_permutation_of_the_pool():
  s = _stream(n=20)
  epochs = [s.take(20) for _ in range(4)]
  for e in epochs:
    assert sorted(e) == list(range(20))
  assert len({tuple(e) for e in epochs}) == 4  # Reshuffled every epoch.
  assert epochs[0] != list(range(20))
  assert s.epoch == 4 and s.consumed == 80


def test_shuffle_off_keeps_pool_order_every_epoch():
  s = _stream(n=7, shuffle=False)
  assert s.take(16) == list(range(7)) * 2 + [0, 1]


def test_nearby_seeds_do_not_share_epochs():
  # grain adds the epoch to the shuffle seed; the seed mixing keeps seed s+1 from replaying
  # seed s's second epoch.
  s0, s1 = _stream(n=30, seed=0), _stream(n=30, seed=1)
  s0.take(30)
  assert s0.take(30) != s1.take(30)


def test_two_processes_get_disjoint_complete_shards():
  n = 21  # Odd: shards of 11 and 10.
  p0, p1 = _stream(n=n, pid=0, count=2), _stream(n=n, pid=1, count=2)
  assert (p0.shard_size, p1.shard_size) == (11, 10)
  for _ in range(3):  # Every epoch.
    e0, e1 = p0.take(11), p1.take(10)
    assert not set(e0) & set(e1)
    assert sorted(e0 + e1) == list(range(n))
    assert sorted(e0) == list(range(0, n, 2)) and sorted(e1) == list(range(1, n, 2))


def test_processes_do_not_apply_the_same_permutation():
  p0, p1 = _stream(n=40, pid=0, count=2), _stream(n=40, pid=1, count=2)
  ranks0 = [i // 2 for i in p0.take(20)]
  ranks1 = [i // 2 for i in p1.take(20)]
  assert ranks0 != ranks1


def test_bad_arguments_name_the_value():
  with pytest.raises(ValueError, match="none for process 3 of 4"):
    _stream(n=3, pid=3, count=4)
  with pytest.raises(ValueError, match="process_index"):
    _stream(n=10, pid=2, count=2)
  with pytest.raises(ValueError, match="num_records"):
    _stream(n=0)
  with pytest.raises(ValueError, match="n must be an int >= 0"):
    _stream().take(-1)


# ---------------------------------------------------------------------------- save / restore


@pytest.mark.parametrize("k,m", [(7, 9), (10, 5), (17, 12), (0, 4)],
                         ids=["mid_epoch", "at_boundary", "across_boundary", "at_start"])
@pytest.mark.parametrize("count", [1, 2])
def test_restore_continues_exactly(k, m, count):
  for pid in range(count):
    uninterrupted = _stream(n=10, pid=pid, count=count).take(k + m)
    first = _stream(n=10, pid=pid, count=count)
    head = first.take(k)
    state = _json_round_trip(first.state())
    resumed = _stream(n=10, pid=pid, count=count)
    resumed.take(3)  # A fresh process may have moved on before restoring; restore rewinds.
    resumed.restore(state)
    assert resumed.state() == state
    assert head + resumed.take(m) == uninterrupted


def test_state_is_plain_json_with_settings():
  s = _stream(n=10, seed=5)
  s.take(13)
  state = s.state()
  assert json.loads(json.dumps(state)) == state
  assert state["iterator"] == {"next_index": 13}
  assert (state["num_records"], state["seed"], state["shuffle"]) == (10, 5, True)


@pytest.mark.parametrize("key,value", [("seed", 4), ("num_records", 11), ("shuffle", False),
                                       ("process_count", 2), ("version", 99)])
def test_restore_refuses_other_settings(key, value):
  state = _stream().state()
  state[key] = value
  with pytest.raises(ValueError, match=f"'{key}'"):
    _stream().restore(state)


def test_restore_refuses_malformed_state():
  state = _stream().state()
  del state["iterator"]
  with pytest.raises(ValueError, match="'iterator' is missing"):
    _stream().restore(state)
  state = _stream().state()
  state["iterator"] = {"next_index": "7"}
  with pytest.raises(ValueError, match="'iterator'"):
    _stream().restore(state)


def test_restore_reads_the_earlier_epoch_pos_state():
  s = _stream(n=10)
  s.restore({"epoch": 2, "pos": 3})
  assert s.epoch == 2 and s.consumed == 23
  ref = _stream(n=10)
  ref.take(23)
  assert s.take(5) == ref.take(5)
  with pytest.raises(ValueError, match="out of range"):
    s.restore({"epoch": 0, "pos": 10})


# --------------------------------------------------------------------------------- records


@pytest.fixture(scope="module")
def pool():
  return tasks.generate(["add"], num=20, seed=0, split="train")


def test_record_pipeline_follows_the_index_stream(pool):
  it = iter(pipeline.record_pipeline(pipeline.records_source(pool), seed=9, process_index=1,
                                     process_count=2))
  idx = _stream(n=len(pool), seed=9, pid=1, count=2).take(25)
  assert [next(it) for _ in range(25)] == [pool[i] for i in idx]


def test_record_pipeline_state_resumes_exactly(pool):
  ds = pipeline.record_pipeline(pool, seed=2)  # A plain list works as a source too.
  reference = iter(ds)
  expected = [next(reference) for _ in range(33)]
  it = iter(ds)
  head = [next(it) for _ in range(14)]
  state = _json_round_trip(it.get_state())
  again = iter(pipeline.record_pipeline(pool, seed=2))
  again.set_state(state)
  assert head + [next(again) for _ in range(19)] == expected


def test_record_pipeline_finite_epochs_and_decode(pool):
  ds = pipeline.record_pipeline(pool, seed=0, num_epochs=2, decode=lambda r: r.uid)
  uids = list(ds)
  assert len(uids) == 40
  assert sorted(uids[:20]) == sorted(r.uid for r in pool) == sorted(uids[20:])
  assert uids[:20] != uids[20:]


def test_records_source_rejects_duplicates_and_bad_records(pool):
  src = pipeline.records_source(pool)
  assert isinstance(src, grain.MapDataset) and len(src) == 20 and src[3] == pool[3]
  with pytest.raises(RecordError, match=r"record 20: field 'uid': duplicate"):
    pipeline.records_source(pool + [pool[0]])
  with pytest.raises(RecordError, match=r"record 1: field 'answer'"):
    pipeline.records_source([pool[0], dataclasses.replace(pool[1], answer=" ")])


# --------------------------------------------------------------------------------- trainer


def test_the_trainers_index_stream_resumes_exactly():
  stream = pipeline.IndexStream(12, seed=7, shuffle=True)  # The trainer's own call.
  assert (stream.process_index, stream.process_count) == (0, 1)  # From jax.
  head = stream.take(5)
  state = _json_round_trip(stream.state())
  tail = stream.take(15)
  resumed = pipeline.IndexStream(12, seed=7, shuffle=True)
  resumed.restore(state)
  assert resumed.take(15) == tail
  assert sorted(head + tail[:7]) == list(range(12))
  assert head + tail == _stream(n=12, seed=7).take(20)
