r"""Compile time and peak host memory against depth: parameter init, every DYPO update variant
(the reference forward is inside the update) and the sampler, each compiled ahead of time on the
CPU exactly as the Trainer jits it.

  python benchmarks/compile_time.py                                  # The issue's depths.
  python benchmarks/compile_time.py --cases w1:2,w1:24 --plot /tmp/compile.png
  python benchmarks/compile_time.py --plot=new.png --compare=old_output.txt  # Beside another run.

A case is WIDTH:LAYERS with WIDTH "w1" (workload W1: hidden 128, 4/2 heads, MLP 512, vocab 512,
8 prompts x 8 samples, 32 + 32 tokens) or "qwen0.5b" (Qwen2.5-0.5B: hidden 896, 14/2 heads of 64,
MLP 4,864, vocab 151,936, tied; the same rollout shape). Each case runs in its own process, so its
peak resident memory (ru_maxrss) is its own. Nothing is executed: `jit(...).lower().compile()` of
  init      the jitted parameter initialisation `build.build_model` runs (fresh weights);
  update    `rl.program.UpdateProgram.jit` for each (shared_prompt, term_norms) variant that
            `routing.update_variants` gives a DYPO run of this config;
  generate  the sampler's prefill + decode loop for one rollout round (`tools.aot`).
Figures: seconds per program, their sum, and the process's peak RSS. No compilation cache is
used (each program is compiled from scratch).
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_CASES = ("w1:2", "w1:8", "w1:24", "w1:28", "qwen0.5b:24")
QWEN05_WIDTH = dict(embed_dim=896, num_heads=14, num_kv_heads=2, head_dim=64, mlp_dim=4864,
                    vocab_size=151936, tie_embeddings=True, rope_theta=1000000.0)


def case_config(case: str):
  """The DYPO config of a WIDTH:LAYERS case (see module docstring)."""
  import w1_step  # pylint: disable=g-import-not-at-top
  width, _, layers = case.partition(":")
  if width not in ("w1", "qwen0.5b") or not layers.isdigit() or int(layers) < 1:
    raise SystemExit(f"--cases: {case!r} is not WIDTH:LAYERS with WIDTH w1 or qwen0.5b")
  config = w1_step.w1_config("dypo", layers=int(layers))
  if width == "qwen0.5b":
    config.model.update(QWEN05_WIDTH)
  return config


def measure(case: str) -> dict:
  """Compiles the case's programs in this process; returns seconds per program and peak RSS."""
  import jax  # pylint: disable=g-import-not-at-top
  from dypo_jax import build  # pylint: disable=g-import-not-at-top
  from dypo_jax.models import builder  # pylint: disable=g-import-not-at-top
  from dypo_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from dypo_jax.rl import program as program_lib  # pylint: disable=g-import-not-at-top
  from dypo_jax.rl import routing  # pylint: disable=g-import-not-at-top
  from dypo_jax.tools import aot  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_enable_compilation_cache", False)  # Compiles, not cache reads.
  config = case_config(case)
  mesh = sharding.build_mesh(config.mesh)
  options = build.model_options(config)
  rules, mc = options.rules, options.config
  seconds = {}

  def timed(name, compile_fn):
    start = time.perf_counter()
    compile_fn()
    seconds[name] = time.perf_counter() - start

  init = builder.initializer(options, mesh, seed=config.seed)
  timed("init", lambda: init.lower().compile())

  graphdef, params = builder.abstract_params(options, mesh)
  prompt_len = aot.worst_prompt_len(config, mc)
  prog = program_lib.UpdateProgram.build(config, graphdef=graphdef, params=params, mesh=mesh,
                                         rules=rules, prompt_len=prompt_len,
                                         num_teachers=aot.NUM_TEACHERS)
  policy = routing.Policy.from_config(config.rl)
  variants = routing.update_variants(
      policy, shared_prompt=config.train.shared_prompt,
      term_norms=prog.step_cfg.per_term_grad_norms,
      every_update_logged=config.train.log_every == 1)
  args = (prog.abstract_state(params), params,
          prog.abstract_batch(config.train.update_prompts), prog.abstract_key())
  for shared, norms in variants:
    jitted = prog.jit(shared_prompt=shared, term_norms=norms)
    name = f"update{'/shared' if shared else '/rows'}{'/norms' if norms else ''}"
    timed(name, lambda j=jitted: j.lower(*args).compile())

  report = aot.compile_generate(config, mesh, prompt_len=prompt_len)
  if report.error:
    raise SystemExit(f"{case}: generate did not compile: {report.error}")
  seconds["generate"] = report.compile_s
  return {"case": case, "layers": mc.num_layers, "params_m": mc.num_params / 1e6,
          "seconds": seconds, "total_s": sum(seconds.values()),
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_case(case: str) -> dict:
  """`measure(case)` in a fresh process (its own peak RSS, no compiled program reused)."""
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case],
                        capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT_JSON ")]
  if proc.returncode != 0 or not lines:
    raise SystemExit(f"{case}: failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT_JSON "):])


def format_table(results: list[dict]) -> str:
  programs = sorted({p for r in results for p in r["seconds"]},
                    key=lambda p: (("init", "update", "generate").index(p.split("/")[0]), p))
  head = ["case", "params (M)"] + [f"{p} s" for p in programs] + ["total s", "peak RSS MB"]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    cells = [r["case"], f"{r['params_m']:.2f}"]
    cells += [f"{r['seconds'][p]:.1f}" if p in r["seconds"] else "" for p in programs]
    cells += [f"{r['total_s']:.1f}", f"{r['peak_rss_mb']:.0f}"]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def parse_results(text: str) -> list[dict]:
  """The cases of another run's printed output (its RESULT lines), e.g. an older checkout's."""
  results = []
  for line in text.splitlines():
    match = re.match(r"RESULT (\S+): (.*); total ([\d.]+)s; peak RSS ([\d.]+) MB", line)
    if match:
      case, programs, total, rss = match.groups()
      seconds = {name: float(value[:-1]) for name, value in
                 (item.split(" ") for item in programs.split(", "))}
      results.append({"case": case, "layers": int(case.split(":")[1]), "seconds": seconds,
                      "total_s": float(total), "peak_rss_mb": float(rss)})
  return results


def plot(results: list[dict], path: str, before: list[dict] = ()) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_s, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
  for width in sorted({r["case"].split(":")[0] for r in results}):
    rs = sorted((r for r in results if r["case"].startswith(width + ":")),
                key=lambda r: r["layers"])
    layers = [r["layers"] for r in rs]
    ax_s.plot(layers, [r["total_s"] for r in rs], "o-", label=f"{width} total")
    for program in ("init", "generate"):
      ax_s.plot(layers, [r["seconds"][program] for r in rs], ".--", label=f"{width} {program}")
    ax_m.plot(layers, [r["peak_rss_mb"] for r in rs], "o-", label=width)
  for width in sorted({r["case"].split(":")[0] for r in before}):
    rs = sorted((r for r in before if r["case"].startswith(width + ":")),
                key=lambda r: r["layers"])
    layers = [r["layers"] for r in rs]
    ax_s.plot(layers, [r["total_s"] for r in rs], "x:", color="grey", label=f"{width} total, before")
    ax_m.plot(layers, [r["peak_rss_mb"] for r in rs], "x:", color="grey", label=f"{width} before")
  ax_s.set(xlabel="layers", ylabel="compile seconds", title="compile time vs depth")
  ax_m.set(xlabel="layers", ylabel="peak RSS MB", title="peak host memory vs depth")
  for ax in (ax_s, ax_m):
    ax.legend(fontsize=7)
    ax.set_ylim(bottom=0)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--cases", default=",".join(DEFAULT_CASES),
                  help="comma-separated WIDTH:LAYERS, WIDTH w1 or qwen0.5b")
  ap.add_argument("--plot", default="", help="write a PNG of seconds and RSS against depth")
  ap.add_argument("--compare", default="",
                  help="another run's printed output (e.g. of an older checkout): its cases are "
                  "plotted beside these as 'before'")
  ap.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    print("RESULT_JSON " + json.dumps(measure(args.child)), flush=True)
    return
  print("command: " + " ".join([os.path.basename(sys.executable)] + sys.argv), flush=True)
  results = []
  for case in args.cases.split(","):
    result = run_case(case.strip())
    results.append(result)
    print(f"RESULT {result['case']}: " + ", ".join(
        f"{k} {v:.1f}s" for k, v in result["seconds"].items())
          + f"; total {result['total_s']:.1f}s; peak RSS {result['peak_rss_mb']:.0f} MB",
          flush=True)
  print(format_table(results))
  if args.plot:
    before = []
    if args.compare:
      with open(args.compare) as f:
        before = parse_results(f.read())
    plot(results, args.plot, before)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
  main()
