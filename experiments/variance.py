r"""Gradient-variance study: how much independent rollout draws spread each loss term's gradient.

The paper's central mechanism is that GAL lowers the variance of the RL gradient. This measures it
directly, at fixed parameters, whatever the accuracies say:

  python experiments/variance.py --study=/tmp/study --seeds=0,1,2      # after the compare part
  python experiments/variance.py --study=/tmp/study --seeds=0 --after=50   # one moved point
  python experiments/variance.py --study=/tmp/sq --size=quick --repeats=4 --prompts=4   # smoke

Parameter points: the seed's gated base (`<study>/seed<s>/base`), and the checkpoints of the seed's
DYPO cell (`<study>/seed<s>/dypo`; its reference is the base) after --after updates (default 25,
50 and 100; the study keeps a checkpoint every 25), when the cell is done: the ones it holds, or
its newest when it holds none of them (a short smoke cell). At the base, policy == reference, so
every Δ is 0 and GAL's gradient is exactly parallel to GRPO's within a group (a reweighting of
the group); GAL's pair weight σ(−βd) only acts once the policy has moved, so the later points
measure its mechanism. At every point GAL's pair statistics over the rounds are logged: η, the
mean over (success, failure) pairs of (1 − σ(βd))² (the squared pair weight, 1/4 at the base),
and pair accuracy, the fraction of pairs with margin d = Δ_s − Δ_f > 0 (0 at the base: no pair
is ranked yet), at the default Δ sum, β = 1.
At each point, for the first --prompts prompts of the seed's training pool, R = --repeats
independent rollout rounds are drawn (one group of k per prompt, graded and routed exactly as in
training: Easy dropped, Hard to one uniformly drawn teacher trace, Mid groups kept), and each
round's update batch gives one estimate of every term's gradient:

  GRPO             the GRPO term over the round's Mid groups;
  SFT (Hard)       the SFT term over the round's Hard teacher traces (for reference);
  GAL Δ sum|mean, β the GAL term with Δ summed over tokens or length-averaged, β in {0.1, 1, 2};
  α-mix            α·GRPO + (1-α)·GAL for each GAL variant (α = rl.alpha = 0.5);
  DYPO update      the routed weights · (SFT, GRPO, GAL) at the default (Δ sum, β = 1).

Per term (`evaluation.statistics.gradient_spread`): relative variance tr(Cov g) / ‖E g‖², mean
cosine between two rounds' estimates, mean norm, and in how many rounds the term was non-zero.
Intervals resample the R rounds (`statistics.resampled_relative_variance`), the same resamples for
every term, so a term's ratio to GRPO's relative variance is paired. Writes
`<study>/variance/variance.{md,json,png}`; each point's figures (with the Gram matrix of its
estimates) are saved when it is done (`point_<label>_seed<s>.json`) and skipped on a rerun.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))
import study as study_lib  # noqa: E402  pylint: disable=g-import-not-at-top

from dypo_jax import config as config_lib  # noqa: E402
from dypo_jax.evaluation import statistics  # noqa: E402

BETAS = (0.1, 1.0, 2.0)
NORMS = ("sum", "mean")
AFTER = (25, 50, 100)  # Updates of the DYPO cell at which its policy is measured.


def trainer_at_base(study_dir: str, seed: int, *, size: str, prompts: int, workdir: str):
  """A Trainer whose policy and reference are the seed's base model, on the study's data."""
  import jax  # pylint: disable=g-import-not-at-top
  from dypo_jax import build  # pylint: disable=g-import-not-at-top
  from dypo_jax.parallel import host  # pylint: disable=g-import-not-at-top
  from dypo_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from dypo_jax.rl import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  base = os.path.join(study_dir, study_lib.Cell("base", seed).name)
  c = config_lib.load_experiment(os.path.join(_HERE, "cpu_tiny.py"), size)
  c.seed = seed
  c.model.init, c.model.hf_path = "hf", os.path.join(base, "base_model")
  c.tokenizer.path = os.path.join(base, "tokenizer", "spm.model")
  c.pretrain.enabled = False
  c.train.update(dict(rollout_prompts=prompts, update_prompts=prompts, micro_batches=1))
  config_lib.validate(c)
  host.configure_host(c.mesh)
  mesh = sharding.build_mesh(c.mesh)
  pools = build.build_data(c, workdir)
  tokenizer = build.build_tokenizer(c, workdir, pools)
  model = build.build_model(c, mesh, tokenizer)
  del jax
  return trainer_lib.Trainer(c, workdir=workdir, mesh=mesh, tokenizer=tokenizer, model=model,
                             pools=pools)


def _step_cfg(trainer, norm: str = "sum", beta: float = 1.0):
  return dataclasses.replace(trainer.program.step_cfg, shared_prompt=False, micro_batches=1,
                             use_gal=True, beta_gal=beta, gal_length_norm=norm)


def term_gradient_fns(trainer, betas=BETAS) -> dict[tuple[str, float], object]:
  """{(Δ norm, β): jitted (params, ref, batch) -> (terms [3], grads [3, ...], metric sums)}."""
  import jax  # pylint: disable=g-import-not-at-top
  from dypo_jax.rl import train_step  # pylint: disable=g-import-not-at-top
  return {(norm, beta): jax.jit(train_step.build_term_gradients(
      trainer.graphdef, _step_cfg(trainer, norm, beta), with_metrics=True))
          for norm in NORMS for beta in betas}


def gal_pair_stats(rounds: list[dict]) -> dict:
  """GAL's pair statistics pooled over a point's rounds (each {"pairs", "eta_sum",
  "correct_sum"}, the step's metric sums): pairs, η = Σ (1 − σ(βd))² / pairs, pair accuracy =
  pairs with d > 0 / pairs (None without a pair), and the rounds' spread of each (sd over the
  rounds that had a pair)."""
  pairs = float(sum(r["pairs"] for r in rounds))
  with_pairs = [r for r in rounds if r["pairs"] > 0]
  per_round = lambda key: [r[key] / r["pairs"] for r in with_pairs]
  sd = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else None
  if not pairs:
    return {"pairs": 0.0, "rounds_with_pairs": 0, "eta": None, "pair_accuracy": None,
            "eta_sd": None, "pair_accuracy_sd": None}
  return {"pairs": pairs, "rounds_with_pairs": len(with_pairs),
          "eta": sum(r["eta_sum"] for r in rounds) / pairs,
          "pair_accuracy": sum(r["correct_sum"] for r in rounds) / pairs,
          "eta_sd": sd(per_round("eta_sum")), "pair_accuracy_sd": sd(per_round("correct_sum"))}


def measure_point(trainer, params, *, prompts: int, repeats: int, seed: int,
                  betas=BETAS) -> dict:
  """Every term's spread over `repeats` rollout rounds of the first `prompts` training prompts."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import flatten_util  # pylint: disable=g-import-not-at-top
  from dypo_jax.rl import queues as queues_lib  # pylint: disable=g-import-not-at-top
  from dypo_jax.rl import rollout  # pylint: disable=g-import-not-at-top
  alpha = trainer.config.rl.alpha
  fns = term_gradient_fns(trainer, betas)
  gal_rounds = []
  idx = list(range(prompts))
  rng = jax.random.key(10_000 + seed)  # Not the run's stream: fresh draws at every point.
  estimates: dict[str, list[np.ndarray]] = {}
  nonzero: dict[str, int] = {}
  counts = {"hard": [], "mid": []}
  flat = lambda tree: np.asarray(flatten_util.ravel_pytree(tree)[0], np.float32)
  for r in range(repeats):
    queues, stats = queues_lib.QueueSet(), rollout.RoundStats()
    trainer.rollouts.run_round(idx, params=params, step=trainer.run_state.step, rollout_round=r,
                               rng=rng, queues=queues,
                               teacher_counts=trainer.run_state.teacher_counts, stats=stats)
    hard, mid, _ = queues.pop_batch(len(queues)) if len(queues) else ([], [], [])
    counts["hard"].append(len(hard))
    counts["mid"].append(len(mid))
    if not hard and not mid:  # Every group Easy: the update (and every estimate) is zero.
      for name in estimates:
        estimates[name].append(np.zeros_like(estimates[name][0]))
      if not estimates:
        raise SystemExit("the first rollout round queued nothing; use more --prompts")
      continue
    batch, _ = trainer.build_batch(hard, mid)
    weights = batch["weights"].copy()
    device_batch = jax.device_put(batch)
    row: dict[str, np.ndarray] = {}
    for (norm, beta), fn in fns.items():
      _, grads, m = fn(params, trainer.run_state.ref_params, device_batch)
      sft, grpo, gal = (flat(jax.tree.map(lambda g, i=i: g[i], grads)) for i in range(3))
      row[f"GAL Δ {norm}, β={beta:g}"] = gal
      row[f"α-mix Δ {norm}, β={beta:g}"] = alpha * grpo + (1 - alpha) * gal
      if (norm, beta) == ("sum", 1.0):  # GAL's pair statistics at the default, this round.
        m = jax.device_get(m)
        gal_rounds.append({"pairs": float(m["gal/pairs"]), "eta_sum": float(m["gal/eta_sum"]),
                           "correct_sum": float(m["gal/pair_acc_sum"])})
        row["GRPO"], row["SFT (Hard)"] = grpo, sft
        row["DYPO update (Δ sum, β=1)"] = weights[0] * sft + weights[1] * grpo + weights[2] * gal
    for name, g in row.items():
      estimates.setdefault(name, []).append(g)
      nonzero[name] = nonzero.get(name, 0) + bool(np.any(g))
  out = {"repeats": repeats, "prompts": prompts,
         "mean_hard_items": float(np.mean(counts["hard"])),
         "mean_mid_items": float(np.mean(counts["mid"])),
         "gal": {**gal_pair_stats(gal_rounds), "rounds": gal_rounds}, "terms": {}}
  for name, gs in estimates.items():
    g = np.stack(gs).astype(np.float64)
    gram = g @ g.T  # Every figure, and its bootstrap over rounds, is a function of this.
    spread = statistics.spread_from_gram(gram)
    out["terms"][name] = {**dataclasses.asdict(spread), "nonzero_rounds": nonzero[name],
                          "gram": gram.tolist()}
  return out


def _order(names) -> list[str]:
  first = ["GRPO", "SFT (Hard)", "DYPO update (Δ sum, β=1)"]
  return [n for n in first if n in names] + sorted(n for n in names if n not in first)


def summarize(point: dict, *, resamples: int = 2000) -> dict[str, dict]:
  """Per term: relative variance and its ratio to GRPO's, each with a 95% interval from
  resampling the point's rounds (the same resamples for every term, so the ratio is paired)."""
  grams = {n: np.asarray(t["gram"]) for n, t in point["terms"].items() if t["nonzero_rounds"]}
  idx = statistics.resample_rounds(point["repeats"], resamples=resamples)
  samples = {n: statistics.resampled_relative_variance(g, idx) for n, g in grams.items()}
  grpo = point["terms"]["GRPO"]["relative_variance"] if "GRPO" in grams else None
  out = {}
  for name in _order(point["terms"]):
    t = point["terms"][name]
    if name not in grams:  # Never present (no Mid or no Hard item in any round).
      out[name] = None
      continue
    out[name] = {
        "relative_variance": statistics.percentile_interval(
            t["relative_variance"], samples[name], units=point["repeats"]),
        "ratio_to_grpo": None if grpo is None else statistics.percentile_interval(
            t["relative_variance"] / grpo, samples[name] / samples["GRPO"],
            units=point["repeats"]),
        "mean_cosine": t["mean_cosine"], "mean_norm": t["mean_norm"]}
  return out


def table(label: str, by_seed: dict[int, dict]) -> str:
  """One parameter point (`label`) over seeds: per term and seed, relative variance and its
  ratio to GRPO's with 95% intervals over rounds; cosine and norm averaged over seeds."""
  seeds = sorted(by_seed)
  summaries = {s: summarize(by_seed[s]) for s in seeds}
  head = (["term"] + [f"seed {s}: rel. var" for s in seeds]
          + [f"seed {s}: ÷ GRPO" for s in seeds] + ["cos (mean)", "‖g‖ (mean)"])
  lines = [f"{label}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in _order(by_seed[seeds[0]]["terms"]):
    rows = [summaries[s][name] for s in seeds]
    f = lambda iv: iv.format(1, 2)
    cells = [f(r["relative_variance"]) if r else "—" for r in rows]
    cells += ["" if name == "GRPO" else (f(r["ratio_to_grpo"]) if r and r["ratio_to_grpo"]
                                          else "—") for r in rows]
    present = [r for r in rows if r]
    cells += [f"{np.mean([r['mean_cosine'] for r in present]):.3f}" if present else "—",
              f"{np.mean([r['mean_norm'] for r in present]):.3g}" if present else "—"]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  notes = [f"seed {s}: {v['repeats']} rounds of {v['prompts']} prompts x k; per round "
           f"{v['mean_mid_items']:.1f} Mid and {v['mean_hard_items']:.1f} Hard items on average; "
           f"{gal_note(v.get('gal'))}; {v['wall_s']:.0f} s" for s, v in sorted(by_seed.items())]
  return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def gal_note(gal: dict | None) -> str:
  """GAL's pair statistics of a point, in words (Δ sum, β = 1)."""
  if not gal or not gal["pairs"]:
    return "GAL: no (success, failure) pair in any round"
  sd = lambda v: "" if v is None else f" (sd over rounds {v:.3f})"
  return (f"GAL over {gal['pairs']:.0f} pairs in {gal['rounds_with_pairs']} rounds: η = E[(1 − "
          f"σ(βd))²] = {gal['eta']:.4f}{sd(gal['eta_sd'])}, pair accuracy (d > 0) = "
          f"{gal['pair_accuracy']:.3f}{sd(gal['pair_accuracy_sd'])}")


def plot(points: dict[str, dict[int, dict]], out: str) -> None:
  """Per parameter point: each term's relative variance as a ratio to GRPO's (below 1: less
  spread than the RL gradient alone), one marker per seed with its 95% interval over rounds."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(points), figsize=(6.5 * len(points), 5), squeeze=False)
  for ax, (label, by_seed) in zip(axes[0], points.items()):
    seeds = sorted(by_seed)
    names = [n for n in _order(by_seed[seeds[0]]["terms"]) if n != "GRPO"]
    for j, seed in enumerate(seeds):
      summary = summarize(by_seed[seed])
      xs, ys, lo, hi = [], [], [], []
      for i, name in enumerate(names):
        if summary[name] is None or summary[name]["ratio_to_grpo"] is None:
          continue
        iv = summary[name]["ratio_to_grpo"]
        xs.append(i + (j - (len(seeds) - 1) / 2) * 0.2)
        ys.append(iv.mean)
        lo.append(iv.mean - iv.low)
        hi.append(iv.high - iv.mean)
      if xs:
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=2, label=f"seed {seed}")
    ax.axhline(1.0, color="gray", lw=1, ls="--")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set(yscale="log", ylabel="relative variance ÷ GRPO's", title=label)
    ax.legend(fontsize=8)
  fig.suptitle("tr(Cov g)/‖E g‖² of each term over independent rollout rounds, relative to GRPO")
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def _point_path(out_dir: str, label: str, seed: int) -> str:
  return os.path.join(out_dir, f"point_{label.replace(' ', '_')}_seed{seed}.json")


def points_after(available: list[int], after) -> list[int]:
  """The checkpoint steps to measure: those of `after` the cell holds, or its newest when it
  holds none of them; none without a checkpoint."""
  steps = [s for s in after if s in available]
  return steps or available[-1:]


def _checkpoint_steps(workdir: str) -> list[int]:
  from dypo_jax.io import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from dypo_jax.rl import run_checkpoint  # pylint: disable=g-import-not-at-top
  directory = run_checkpoint.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  with checkpoint_lib.Checkpointer(directory, keep=None, read_only=True) as ckpt:
    return ckpt.all_steps()


def measure_seed(args, seed: int, out_dir: str) -> dict[str, dict]:
  """Measures (or reads) the seed's parameter points: {label: figures}."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dypo_jax.rl import run_checkpoint  # pylint: disable=g-import-not-at-top
  study = study_lib.Study(args.study, size=args.size, steps=0)
  base_cell, dypo_cell = study_lib.Cell("base", seed), study_lib.Cell("dypo", seed)
  if not study.done(base_cell):
    raise SystemExit(f"no base model for seed {seed} in {study.dir(base_cell)}: run "
                     f"experiments/study.py --workdir={args.study} --seeds={seed} first")
  steps = []
  if study.done(dypo_cell):
    available = _checkpoint_steps(study.dir(dypo_cell))
    steps = points_after(available, args.after)
    missing = [s for s in args.after if s not in available]
    if missing:
      print(f"seed {seed}: the DYPO cell holds no checkpoint after {missing} updates "
            f"(it holds {available}); measuring after {steps}", flush=True)
  labels = ["base"] + [f"DYPO_{s}" for s in steps]
  results = {}
  for label in labels:
    path = _point_path(out_dir, label, seed)
    if os.path.exists(path):
      with open(path) as f:
        results[label] = json.load(f)
      print(f"seed {seed}, {label}: done, read {path}", flush=True)
  if len(results) == len(labels):
    return results
  trainer = trainer_at_base(args.study, seed, size=args.size, prompts=args.prompts,
                            workdir=os.path.join(out_dir, f"scratch_seed{seed}"))
  for label in labels:
    if label in results:
      continue
    params = trainer.run_state.train.params
    if label != "base":
      policy = run_checkpoint.read_policy(study.dir(dypo_cell), step=int(label.split("_")[1]))
      new = nnx.split(policy.model, nnx.Param)[1]
      params = jax.tree.map(lambda n, o: jax.device_put(n, o.sharding), new, params)
    start = time.perf_counter()
    point = measure_point(trainer, params, prompts=args.prompts, repeats=args.repeats, seed=seed,
                          betas=args.betas)
    point["wall_s"] = time.perf_counter() - start
    point["step"] = 0 if label == "base" else int(policy.step)
    with open(_point_path(out_dir, label, seed), "w") as f:
      json.dump(point, f)
    results[label] = point
    print(f"seed {seed}, {label}: {point['wall_s']:.0f} s on this machine", flush=True)
  return results


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--study", required=True, help="the workdir of experiments/study.py")
  ap.add_argument("--seeds", default="0", help="comma-separated; each with its base and DYPO cell")
  ap.add_argument("--repeats", type=int, default=32, help="R, independent rollout rounds")
  ap.add_argument("--prompts", type=int, default=16, help="fixed training prompts per round")
  ap.add_argument("--size", default="", choices=("", "quick"))
  ap.add_argument("--after", default=",".join(map(str, AFTER)),
                  help="the DYPO cell's updates at which to measure its policy (comma-separated)")
  ap.add_argument("--betas", default=",".join(f"{b:g}" for b in BETAS),
                  help="β_GAL values of the GAL terms (each one compiled program per Δ norm); "
                  "β = 1, where GRPO and the DYPO update are read, is always included")
  args = ap.parse_args()
  try:
    args.betas = tuple(sorted({1.0, *(float(b) for b in args.betas.split(",") if b)}))
  except ValueError:
    raise SystemExit(f"--betas={args.betas!r}: comma-separated numbers") from None
  try:
    args.after = tuple(int(s) for s in args.after.split(",") if s)
  except ValueError:
    raise SystemExit(f"--after={args.after!r}: comma-separated update counts") from None
  if args.repeats < 2:
    raise SystemExit(f"--repeats={args.repeats}: a spread needs at least 2 rounds")
  seeds = [int(s) for s in args.seeds.split(",") if s]
  from dypo_jax.parallel import host  # pylint: disable=g-import-not-at-top
  # Before any JAX call (listing a cell's checkpoints starts the backend): the host's dispatch
  # mode is read once, when the backend starts.
  host.configure_host(config_lib.load_experiment(os.path.join(_HERE, "cpu_tiny.py"),
                                                 args.size).mesh)
  out_dir = os.path.join(args.study, "variance")
  os.makedirs(out_dir, exist_ok=True)
  points: dict[str, dict[int, dict]] = {}
  for seed in seeds:
    for label, point in measure_seed(args, seed, out_dir).items():
      points.setdefault(label, {})[seed] = point
  titles = {label: ("At the gated base (policy = reference)" if label == "base" else
                    f"After {next(iter(p.values()))['step']} DYPO updates (reference = base)")
            for label, p in points.items()}
  text = ("Command: python experiments/variance.py " + " ".join(sys.argv[1:]) + "\n\n"
          "Relative variance tr(Cov g)/‖E g‖² [95% interval from resampling the rounds]; ÷ GRPO: "
          "the ratio to GRPO's relative variance on the same rounds (paired). η = E[(1 − σ(βd))²] "
          "over GAL's (success, failure) pairs (its squared pair weight: 1/4 while the policy is "
          "the reference), pair accuracy = the fraction of pairs with d = Δ_s − Δ_f > 0; both at "
          "Δ sum, β = 1, pooled over the point's rounds.\n\n"
          + "\n\n".join(table(titles[label], by_seed)
                        for label, by_seed in points.items()) + "\n")
  with open(os.path.join(out_dir, "variance.md"), "w") as f:
    f.write(text)
  summary = {label: {seed: {n: (None if v is None else {
      k: (dataclasses.asdict(x) if isinstance(x, statistics.Interval) else x)
      for k, x in v.items()}) for n, v in summarize(p).items()} for seed, p in by_seed.items()}
             for label, by_seed in points.items()}
  for label, by_seed in points.items():  # GAL's pair statistics (η, pair accuracy) per point.
    for seed, p in by_seed.items():
      summary[label][seed]["gal"] = {k: v for k, v in (p.get("gal") or {}).items()
                                     if k != "rounds"}
  with open(os.path.join(out_dir, "variance.json"), "w") as f:
    json.dump(summary, f, indent=1)
  plot({titles[k]: v for k, v in points.items()}, os.path.join(out_dir, "variance.png"))
  print(text)


if __name__ == "__main__":
  main()
