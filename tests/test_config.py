"""Config schema: every experiment validates; unknown keys, bad types and bad values are named."""
import glob
import os
import subprocess
import sys

import ml_collections
import pytest

from dypo_jax import config as config_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_base_config_is_valid():
  config_lib.validate(config_lib.base_config())


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(_REPO, "experiments", "*.py"))))
def test_every_experiment_config_validates(path):
  module = config_lib.load_module(path)
  if not hasattr(module, "get_config"):
    pytest.skip(f"{path} is a script, not a config")
  variants = getattr(module, "VARIANTS", ("",))
  for variant in variants:
    config_lib.validate(module.get_config(variant))


def test_unknown_key_is_named_with_known_keys():
  c = config_lib.base_config()
  c.rl.alpah = 0.3
  with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'rl.alpah'.*'rl.alpha'"):
    config_lib.validate(c)


def test_bad_type_is_named():
  # ConfigDict refuses a type change on assignment; a config written as a plain dict does not.
  d = config_lib.base_config().to_dict()
  d["rl"]["num_samples"] = "eight"
  c = ml_collections.ConfigDict(d)
  with pytest.raises(config_lib.ConfigError, match=r"'rl.num_samples' = 'eight' has type str; "
                     r"expected int"):
    config_lib.validate(c)


@pytest.mark.parametrize("key,value,allowed", [
    ("rl.alpha", 1.5, r"\[0, 1\]"),
    ("rl.num_samples", 1, r"\[2, inf\]"),
    ("rl.agg_mode", "sum", "token-mean"),
    ("rl.kl_estimator", "k4", "k1"),
    ("rl.method", "ppo", "dypo"),
    ("rl.offline_loss_type", "dpo", "sft"),
    ("model.dtype", "int8", "bfloat16"),
    ("mesh.rollout_data", -1, r"\[0, inf\]"),
])
def test_out_of_range_value_is_named_with_allowed(key, value, allowed):
  c = config_lib.base_config()
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=rf"'{key}' = .* is not allowed; expected .*"
                     + allowed):
    config_lib.validate(c)


def test_relations_are_checked():
  c = config_lib.base_config()
  c.train.update_prompts, c.train.micro_batches = 6, 4
  with pytest.raises(config_lib.ConfigError, match="train.update_prompts=6 must be a multiple"):
    config_lib.validate(c)
  c = config_lib.base_config()
  c.model.num_heads = 6
  c.model.num_kv_heads = 4
  with pytest.raises(config_lib.ConfigError, match="model.num_heads=6"):
    config_lib.validate(c)
  c = config_lib.base_config()
  c.model.remat = "full"  # The shared-prompt update reads a cache, which is not rematerialised.
  with pytest.raises(config_lib.ConfigError, match="train.shared_prompt=True needs model.remat"):
    config_lib.validate(c)
  c.train.shared_prompt = False
  config_lib.validate(c)
  c = config_lib.base_config()
  c.data.eval_id_paths = ("/data/id.jsonl",)  # Read only with data.source="files".
  with pytest.raises(config_lib.ConfigError, match="data.eval_id_paths is set but data.source="):
    config_lib.validate(c)
  c.data.update(dict(source="files", train_path="/data/train.jsonl"))
  config_lib.validate(c)


def test_tfds_source_needs_its_dataset_and_its_keys_need_the_source():
  c = config_lib.base_config()
  c.data.update(dict(source="tfds", tfds_data_dir="/data/tfds"))
  with pytest.raises(config_lib.ConfigError, match="data.source='tfds' needs data.tfds_name"):
    config_lib.validate(c)
  c.data.tfds_name = "arith"
  config_lib.validate(c)
  c.data.source = "procedural"  # The TFDS keys would be silently ignored.
  with pytest.raises(config_lib.ConfigError, match="data.tfds_data_dir is set but data.source="):
    config_lib.validate(c)


def test_reward_must_be_registered_and_a_registered_one_is_accepted():
  from dypo_jax.evaluation import rewards  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.data.reward = "length_bonus"
  with pytest.raises(config_lib.ConfigError,
                     match=r"'data.reward' = 'length_bonus' is not a registered reward.*"
                           r"'exact_match', 'math_verify'"):
    config_lib.validate(c)
  rewards.register("length_bonus")(lambda record, response: float(len(response) > 3))
  try:
    config_lib.validate(c)  # An experiment file may register its own reward first.
  finally:
    del rewards.REWARDS["length_bonus"]


def _run_main(*args):
  return subprocess.run([sys.executable, "-m", "dypo_jax.main", *args], capture_output=True,
                        text=True, cwd=_REPO, timeout=300)


@pytest.mark.slow
def test_cli_unknown_override_key_is_named():
  proc = _run_main("--config=experiments/cpu_tiny.py", "--config.rl.alpah=0.3", "--mode=summary")
  assert proc.returncode != 0
  assert "unknown config key 'rl.alpah'" in proc.stderr and "'alpha'" in proc.stderr


@pytest.mark.slow
def test_cli_out_of_range_override_is_named():
  proc = _run_main("--config=experiments/cpu_tiny.py", "--config.rl.alpha=1.5", "--mode=summary")
  assert proc.returncode != 0
  assert "'rl.alpha' = 1.5 is not allowed" in proc.stderr


@pytest.mark.slow
def test_cli_bad_type_override_is_named():
  proc = _run_main("--config=experiments/cpu_tiny.py", "--config.rl.num_samples=abc",
                   "--mode=summary")
  assert proc.returncode != 0
  assert "rl.num_samples" in proc.stderr


@pytest.mark.parametrize("key", ["optim.learning_rate", "sampler.temperature", "rl.alpha",
                                 "rl.kl_coef", "optim.grad_clip", "sampler.top_p", "optim.b2",
                                 "rl.beta_gal", "eval.temperature"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused_for_every_float_key(key, value):
  c = config_lib.base_config()
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=f"'{key}' = {value!r} is not finite"):
    config_lib.validate(c)


def test_every_float_key_is_checked_for_finiteness():
  """One rule for all keys: setting any float key of the schema to nan is refused."""
  schema = config_lib.base_config()
  floats = [(s, k) for s in schema.keys() if isinstance(schema[s], ml_collections.ConfigDict)
            for k in schema[s].keys() if isinstance(schema[s][k], float)]
  assert len(floats) > 20
  for section, name in floats:
    c = config_lib.base_config()
    c[section][name] = float("nan")
    with pytest.raises(config_lib.ConfigError, match="not finite"):
      config_lib.validate(c)


@pytest.mark.parametrize("section", ["sampler", "eval"])
def test_max_new_tokens_must_leave_room_for_a_prompt(section):
  c = config_lib.base_config()
  c[section].max_new_tokens = c.model.max_seq_len
  with pytest.raises(config_lib.ConfigError,
                     match=f"{section}.max_new_tokens=512 must be < model.max_seq_len=512"):
    config_lib.validate(c)


@pytest.mark.slow
def test_cli_missing_config_file_is_a_sentence_and_exit_2():
  proc = _run_main("--config=experiments/no_such_file.py:quick", "--mode=summary")
  assert proc.returncode == 2, proc.stderr
  assert "there is no experiment file 'experiments/no_such_file.py'" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_non_finite_value_is_refused_with_exit_2():
  proc = _run_main("--config=experiments/cpu_tiny.py", "--config.optim.learning_rate=nan",
                   "--mode=summary")
  assert proc.returncode == 2, proc.stderr
  assert "'optim.learning_rate' = nan is not finite" in proc.stderr


def _parse(argv: list[str]) -> ml_collections.ConfigDict:
  """main's flag parse of `--config=...` flags, on flags of its own (in-process, no app.run)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ["main"] + argv
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flags.DEFINE_integer("step", None, "A tool's flag.", flag_values=flag_values)
  config_lib.parse_flags(argv, flag_values)
  return flag_values.config


def test_an_override_of_the_wrong_type_names_the_key_and_its_type():
  assert _parse([f"--config={_REPO}/experiments/cpu_tiny.py:quick",
                 "--config.train.num_steps=7"]).train.num_steps == 7
  with pytest.raises(config_lib.ConfigError) as e:
    _parse([f"--config={_REPO}/experiments/cpu_tiny.py:quick", "--config.train.num_steps=abc"])
  assert str(e.value) == ("--config.train.num_steps=abc: config key 'train.num_steps' takes an "
                          "int (the schema's default is 100), not 'abc'")
  with pytest.raises(config_lib.ConfigError, match=r"^--step=x: --step takes an int, not 'x'$"):
    _parse(["--step=x"])


@pytest.mark.parametrize("experiment,said", [
    ("baselines.py:nosuch", "unknown method 'nosuch' in variant 'nosuch'; allowed: sft, grpo"),
    ("cpu_tiny.py:nosuch", "unknown variant 'nosuch' of experiments/cpu_tiny.py; allowed: "
                           "('', 'quick')")])
def test_an_unknown_variant_is_the_experiment_files_sentence(experiment, said):
  flag = f"--config={_REPO}/experiments/{experiment}"
  with pytest.raises(config_lib.ConfigError) as e:
    _parse([flag])
  assert str(e.value).startswith(f"{flag}: {said}") and "\n" not in str(e.value), str(e.value)


@pytest.mark.slow
def test_cli_flag_errors_exit_2_with_one_line():
  for args, said in ((["--config=experiments/cpu_tiny.py:quick", "--config.train.num_steps=abc"],
                      "config error: --config.train.num_steps=abc: config key 'train.num_steps' "
                      "takes an int"),
                     (["--config=experiments/baselines.py:nosuch"],
                      "config error: --config=experiments/baselines.py:nosuch: unknown method "
                      "'nosuch'")):
    proc = _run_main(*args, "--mode=summary")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(said) and proc.stderr.count("\n") == 1, proc.stderr
