"""Rollouts on their own data-parallel mesh (`mesh.rollout_data`) over a CPU host split into
devices (`mesh.host_devices`): the run is the one a single device gives."""
import subprocess

import pytest

import tiny_runs


@pytest.mark.slow
def test_host_devices_are_set_before_jax_starts_and_checked_after():
  out = tiny_runs.run_python("""
    from dypo_jax.parallel import host
    from dypo_jax.parallel import sharding
    host.configure_host_devices(3)
    import jax
    assert len(jax.devices()) == 3, jax.devices()
    host.configure_host_devices(3)  # Already so: nothing to do.
    try:
      host.configure_host_devices(2)
    except ValueError as e:
      print("ERR", e)
  """)
  assert "ERR mesh.host_devices=2, but JAX already started with 3 CPU device(s)" in out


@pytest.mark.slow
def test_rollout_mesh_needs_the_devices_it_names():
  out = tiny_runs.run_python("""
    import ml_collections
    from dypo_jax.parallel import host
    from dypo_jax.parallel import sharding
    cfg = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, rollout_data=4))
    try:
      sharding.build_rollout_mesh(cfg)
    except ValueError as e:
      print("ERR", e)
    cfg.rollout_data = 2
    print("TRAIN", sharding.build_mesh(cfg).devices.size, "ROLLOUT",
          sharding.build_rollout_mesh(cfg).devices.size)
  """, num_devices=2)
  assert "ERR mesh.rollout_data=4, but only 2 device(s) are here" in out
  assert "TRAIN 1 ROLLOUT 2" in out


@pytest.mark.slow
def test_rollouts_split_over_two_host_devices_give_the_single_device_run(tmp_path):
  # The sampler draws each row from its own key, so splitting rows over devices changes no
  # sample; the update runs on the first device in both runs.
  runs = {}
  for name, extra in (("one", {}),
                      ("two", {"mesh.host_devices": 2, "mesh.rollout_data": 2, "mesh.fsdp": 1})):
    workdir = str(tmp_path / name)
    proc = subprocess.run(tiny_runs.main_command(workdir, **{"train.num_steps": 3, **extra}),
                          capture_output=True, text=True, env=tiny_runs.subprocess_env(1),
                          cwd=tiny_runs.REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs[name] = tiny_runs.comparable_metrics(workdir)
  assert sorted(runs["one"]) == [1, 2, 3]
  tiny_runs.assert_same_metrics(runs["two"], runs["one"], rtol=1e-5)
