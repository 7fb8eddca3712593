"""The peer: the same GRPO step shape in PyTorch, through TRL's GRPOTrainer (HF generate, no vLLM),
or, with --impl manual (or when TRL fails to import/start), a minimal hand-written loop: HF
`generate` with KV cache + one GRPO forward/backward per micro-batch (reference forward for the
k3 KL), AdamW. Same model shape as the project's own GPU benchmark from `transformers.Qwen2Config` random
init, same vocabulary of words, prompts of exactly P tokens, K samples per prompt, T new tokens,
temperature 0.9, beta 0.04, lr 1e-6, grad clip 1.0, seq-mean-token-mean loss.

Figures: steps/s (the time between consecutive optimizer steps, the rollout inside), generate
tokens/s (the policy's `generate` calls, wrapped and timed), peak torch CUDA memory, and whether
generation ran in bf16 (a forward hook reads one MLP output's dtype during `generate`).

Workload G1 and the packages it needs: benchmarks/gpu/README.md. Run (from the repository root):
      python3 benchmarks/gpu/trl_grpo_gpu.py --impl trl --json $OUT/peer.json
      python3 benchmarks/gpu/trl_grpo_gpu.py --tiny --impl trl            # CPU smoke run
"""
import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

T_START = time.time()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

SPECIALS = ("<pad>", "<s>", "</s>")


def word(i: int) -> str:
  return f"w{i:06d}"


def toy_reward_text(response: str) -> float:
  ws = response.split()
  good = sum(1 for w in ws if len(w) == 7 and w[0] == "w" and w[1:].isdigit()
             and int(w[1:]) % 2 == 0)
  # No length bonus: correct (> 0.5) about half the time, so Easy / Hard groups (all K
  # alike) stay rare (~0.3% / 0.5% of groups at T = 512) and DYPO's batches stay full.
  return good / max(len(ws), 1)


def build_tokenizer(vocab: int):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  v = {s: i for i, s in enumerate(SPECIALS)}
  v.update({word(i): i for i in range(len(SPECIALS), vocab)})
  tok = Tokenizer(models.WordLevel(vocab=v, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##")  # Joins words with spaces.
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                               eos_token="</s>", unk_token="<pad>")
  assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
  return hf


def prompt_texts(n: int, words: int, vocab: int, seed: int) -> list[str]:
  rng = random.Random(seed)
  return ["<s> " + " ".join(word(rng.randrange(3, vocab)) for _ in range(words))
          for _ in range(n)]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--impl", choices=("trl", "manual"), default="trl")
  ap.add_argument("--fallback", action="store_true",
                  help="with --impl trl: run the manual loop if TRL fails before its first step")
  ap.add_argument("--hidden", type=int, default=896)
  ap.add_argument("--layers", type=int, default=24)
  ap.add_argument("--heads", type=int, default=14)
  ap.add_argument("--kv-heads", type=int, default=2)
  ap.add_argument("--mlp", type=int, default=4864)
  ap.add_argument("--vocab", type=int, default=151936)
  ap.add_argument("--prompts", type=int, default=32)
  ap.add_argument("--k", type=int, default=8)
  ap.add_argument("--prompt-len", type=int, default=128)
  ap.add_argument("--new-tokens", type=int, default=512)
  ap.add_argument("--micro-batches", type=int, default=8)
  ap.add_argument("--param-dtype", default="float32",
                  help="float32: fp32 master weights + bf16 autocast (TRL bf16=True); "
                  "bfloat16: weights in bf16 too")
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--steps", type=int, default=2)
  ap.add_argument("--deadline", type=float, default=0.0)
  ap.add_argument("--json", default="")
  ap.add_argument("--tiny", action="store_true")
  a = ap.parse_args()
  if a.tiny:
    (a.hidden, a.layers, a.heads, a.kv_heads, a.mlp, a.vocab, a.prompts, a.k, a.prompt_len,
     a.new_tokens, a.micro_batches) = (64, 2, 4, 2, 128, 1024, 2, 4, 16, 16, 2)
  cuda = torch.cuda.is_available()
  dev = torch.device("cuda" if cuda else "cpu")
  res = {"check": f"torch_peer_{a.impl}", "ok": False, "args": vars(a),
         "torch": torch.__version__, "transformers": transformers.__version__,
         "device": torch.cuda.get_device_name(0) if cuda else "cpu"}
  try:
    import trl  # pylint: disable=g-import-not-at-top
    res["trl"] = trl.__version__
  except Exception as e:  # pylint: disable=broad-except
    res["trl_import_error"] = repr(e)[:500]

  def dump():
    res["wall_s"] = round(time.time() - T_START, 1)
    if cuda:
      res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
      res["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    if a.json:
      with open(a.json + ".tmp", "w") as f:
        json.dump(res, f, indent=1, default=str)
      os.replace(a.json + ".tmp", a.json)

  print(f"[peer] torch {torch.__version__} transformers {transformers.__version__} "
        f"trl {res.get('trl')} device {res['device']}", flush=True)
  t0 = time.perf_counter()
  tok = build_tokenizer(a.vocab)
  cfg = Qwen2Config(
      vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.mlp,
      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
      max_position_embeddings=max(2048, a.prompt_len + a.new_tokens), rope_theta=1e6,
      rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
      eos_token_id=2, use_sliding_window=False)
  torch.manual_seed(0)
  pdt = torch.float32 if a.param_dtype == "float32" else torch.bfloat16
  with torch.device(dev):
    model = Qwen2ForCausalLM(cfg).to(pdt)
  n_params = sum(p.numel() for p in model.parameters())
  res["setup"] = {"params": n_params, "attn": model.config._attn_implementation,  # pylint: disable=protected-access
                  "head_dim": getattr(model.config, "head_dim", None),
                  "rope": str(getattr(model.config, "rope_parameters", None))}
  print(f"[peer] model Qwen2ForCausalLM {a.layers}L d={a.hidden} heads={a.heads}/{a.kv_heads} "
        f"vocab={a.vocab} tied params={n_params / 1e6:.1f}M {pdt} attn="
        f"{model.config._attn_implementation}; built in {time.perf_counter() - t0:.1f}s",  # pylint: disable=protected-access
        flush=True)
  gen_log = []
  gen_dtypes = set()

  def wrap_generate(m):
    orig = m.generate
    probe = m.model.layers[0].mlp.down_proj

    def timed_generate(*args, **kw):
      h = probe.register_forward_hook(lambda mod, i, o: gen_dtypes.add(str(o.dtype)))
      if cuda:
        torch.cuda.synchronize()
      ts = time.perf_counter()
      out = orig(*args, **kw)
      if cuda:
        torch.cuda.synchronize()
      te = time.perf_counter()
      h.remove()
      ids = kw.get("input_ids", args[0] if args else None)
      plen = ids.shape[1]
      comp = out[:, plen:] if not hasattr(out, "sequences") else out.sequences[:, plen:]
      gen_log.append({"s": te - ts, "tokens": int((comp != tok.pad_token_id).sum()),
                      "rows": int(comp.shape[0]), "prompt_len": int(plen),
                      "new_len": int(comp.shape[1])})
      return out

    m.generate = timed_generate

  ends = []
  impl = a.impl
  try:
    if impl == "trl":
      try:
        run_trl(a, res, tok, model, cuda, wrap_generate, ends, dump)
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        res["trl_error"] = repr(e)[:2000]
        if not (a.fallback and not ends):
          raise
        print("[peer] TRL failed before its first step: the manual loop instead", flush=True)
        impl = "manual"
        res["check"] = "torch_peer_manual"
        gen_log.clear()
        if cuda:
          torch.cuda.empty_cache()
        with torch.device(dev):
          torch.manual_seed(0)
          model = Qwen2ForCausalLM(cfg).to(pdt)
    if impl == "manual":
      run_manual(a, tok, model, cuda, dev, wrap_generate, ends, gen_log, dump)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    res["error"] = repr(e)[:2000]
  # Figures.
  steps = [ends[0][1] - ends[0][0]] + [e[1] - p[1] for p, e in zip(ends, ends[1:])]
  res["step_s"] = [round(s, 3) for s in steps]
  res["generate"] = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in g.items()}
                     for g in gen_log]
  res["generate_dtypes"] = sorted(gen_dtypes)
  w = a.warmup
  timed, gl = steps[w:], gen_log[w:]
  if timed:
    tok_n = sum(g["tokens"] for g in gl[:len(timed)])
    gen_s = sum(g["s"] for g in gl[:len(timed)])
    res["summary"] = {
        "impl": impl, "timed_steps": len(timed), "steps_per_s": round(len(timed) / sum(timed), 4),
        "median_step_s": round(float(np.median(timed)), 3),
        "gen_tok_s_whole_step": round(tok_n / sum(timed), 1),
        "generate_tok_s": round(tok_n / gen_s, 1) if gen_s else None,
        "rollout_share": round(gen_s / sum(timed), 3),
        "first_step_s": round(steps[0], 2)}
    res["ok"] = "error" not in res
  elif steps:  # Only the first step fit: report it (torch has no compile; CUDA/cuBLAS warm-up in).
    tok_n = sum(g["tokens"] for g in gen_log[:len(steps)])
    gen_s = sum(g["s"] for g in gen_log[:len(steps)])
    res["summary"] = {"impl": impl, "timed_steps": 0, "first_step_only": True,
                      "steps_per_s": round(len(steps) / sum(steps), 4),
                      "median_step_s": round(float(np.median(steps)), 3),
                      "gen_tok_s_whole_step": round(tok_n / sum(steps), 1),
                      "generate_tok_s": round(tok_n / gen_s, 1) if gen_s else None,
                      "rollout_share": round(gen_s / sum(steps), 3),
                      "first_step_s": round(steps[0], 2)}
    res["ok"] = "error" not in res
  dump()
  print(f"[peer] RESULT {impl}: {json.dumps(res.get('summary'))}; generate dtypes "
        f"{sorted(gen_dtypes)}; peak mem {res.get('peak_mem_gib')} GiB; steps "
        f"{res['step_s']}", flush=True)
  print(f"[peer] done in {time.time() - T_START:.1f}s ok={res['ok']}", flush=True)
  sys.exit(0 if res["ok"] else 1)


def run_trl(a, res, tok, model, cuda, wrap_generate, ends, dump):
  from datasets import Dataset  # pylint: disable=g-import-not-at-top
  from transformers import TrainerCallback  # pylint: disable=g-import-not-at-top
  from trl import GRPOConfig, GRPOTrainer  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  out = tempfile.mkdtemp(prefix="trl-peer-")
  # With beta > 0 GRPOTrainer loads the reference from the policy's name: save it first.
  model_dir = os.path.join(out, "model")
  model.save_pretrained(model_dir)
  tok.save_pretrained(model_dir)
  del model
  if cuda:
    torch.cuda.empty_cache()
  total = a.warmup + a.steps
  prompts = prompt_texts(a.prompts * (total + 1), a.prompt_len - 1, a.vocab, seed=0)
  ds = Dataset.from_dict({"prompt": prompts})

  def reward_fn(prompts, completions, **kw):
    del prompts, kw
    return [toy_reward_text(c) for c in completions]

  rows = a.prompts * a.k
  kw = dict(
      output_dir=os.path.join(out, "out"), use_vllm=False, bf16=cuda, fp16=False,
      use_cpu=not cuda, report_to="none",
      per_device_train_batch_size=rows // a.micro_batches,
      gradient_accumulation_steps=a.micro_batches,  # One generation of U*K serves all of them.
      num_generations=a.k, max_completion_length=a.new_tokens, temperature=0.9, top_p=1.0,
      top_k=0, beta=0.04, loss_type="grpo", num_iterations=1, epsilon=0.2,
      learning_rate=1e-6, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
      max_steps=total, logging_steps=1, save_strategy="no", dataloader_num_workers=0, seed=0,
      disable_tqdm=True, gradient_checkpointing=False, shuffle_dataset=False,
      model_init_kwargs={"dtype": torch.float32 if a.param_dtype == "float32" else torch.bfloat16})
  gcfg = GRPOConfig(**kw)
  trainer = GRPOTrainer(model=model_dir, reward_funcs=[reward_fn], args=gcfg, train_dataset=ds,
                        processing_class=tok)

  class StepTimer(TrainerCallback):
    def __init__(self):
      self.t_begin = None

    def on_train_begin(self, args, state, control, **k):
      self.t_begin = time.perf_counter()

    def on_step_end(self, args, state, control, **k):
      if cuda:
        torch.cuda.synchronize()
      now = time.perf_counter()
      ends.append((self.t_begin, now))
      print(f"[peer] trl step {len(ends) - 1}: {now - (ends[-2][1] if len(ends) > 1 else self.t_begin):.2f}s",
            flush=True)
      if a.deadline and len(ends) > a.warmup and time.time() + (ends[-1][1] - ends[-2][1] if len(ends) > 1 else 0) * 1.3 + 10 > a.deadline:
        print("[peer] deadline: stopping", flush=True)
        control.should_training_stop = True
      dump()

  trainer.add_callback(StepTimer())
  wrap_generate(trainer.model)
  res["setup"]["trl_setup_s"] = round(time.perf_counter() - t0, 1)
  res["setup"]["trl_args"] = {k: str(v) for k, v in kw.items() if k != "output_dir"}
  print(f"[peer] TRL GRPOTrainer ready in {res['setup']['trl_setup_s']}s: "
        f"{rows // a.micro_batches} rows x {a.micro_batches} accumulation steps, one generation "
        f"of {rows} per step", flush=True)
  trainer.train()


def run_manual(a, tok, model, cuda, dev, wrap_generate, ends, gen_log, dump):
  """HF generate (KV cache) + GRPO loss with the k3 KL, seq-mean-token-mean, one AdamW step."""
  ref = copy.deepcopy(model).eval()
  for p in ref.parameters():
    p.requires_grad_(False)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
  wrap_generate(model)
  ac = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else (
      lambda: torch.autocast("cpu", enabled=False))
  total = a.warmup + a.steps
  texts = prompt_texts(a.prompts * total, a.prompt_len - 1, a.vocab, seed=0)
  p_len, t_len, k, m = a.prompt_len, a.new_tokens, a.k, a.micro_batches
  beta, eps = 0.04, 0.2

  def token_logps(mdl, ids, attn):
    with ac():
      logits = mdl(input_ids=ids, attention_mask=attn).logits[:, p_len - 1:-1].float()
    return torch.gather(logits, -1, ids[:, p_len:, None])[..., 0] - torch.logsumexp(logits, -1)

  t_begin = time.perf_counter()
  for step in range(total):
    batch = texts[step * a.prompts:(step + 1) * a.prompts]
    enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
    assert enc["input_ids"].shape[1] == p_len, enc["input_ids"].shape
    ids = enc["input_ids"].repeat_interleave(k, 0)
    attn = enc["attention_mask"].repeat_interleave(k, 0)
    model.eval()
    with torch.no_grad(), ac():
      out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=t_len,
                           do_sample=True, temperature=0.9, top_p=1.0, top_k=0, use_cache=True,
                           pad_token_id=0, eos_token_id=2)
    comp = out[:, p_len:]
    if comp.shape[1] < t_len:
      comp = torch.nn.functional.pad(comp, (0, t_len - comp.shape[1]), value=0)
    is_eos = comp == 2
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], t_len, dtype=torch.long))
    mask = (torch.arange(t_len, device=dev)[None] <= first[:, None]).float()
    texts_out = tok.batch_decode(comp, skip_special_tokens=True)
    r = torch.tensor([toy_reward_text(t) for t in texts_out], device=dev).view(-1, k)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
    full = torch.cat([ids, comp], 1)
    full_attn = torch.cat([attn, mask.long()], 1)
    model.train()
    rows = full.shape[0] // m
    for j in range(m):
      sl = slice(j * rows, (j + 1) * rows)
      with torch.no_grad():
        ref_lp = token_logps(ref, full[sl], full_attn[sl])
      lp = token_logps(model, full[sl], full_attn[sl])
      ratio = torch.exp(lp - lp.detach())
      pg = -torch.minimum(ratio * adv[sl, None],
                          torch.clamp(ratio, 1 - eps, 1 + eps) * adv[sl, None])
      d = ref_lp - lp
      kl = torch.exp(d) - d - 1
      per_tok = (pg + beta * kl) * mask[sl]
      loss = (per_tok.sum(1) / mask[sl].sum(1).clamp(min=1)).mean() / m
      loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
      torch.cuda.synchronize()
    now = time.perf_counter()
    ends.append((t_begin, now))
    print(f"[peer] manual step {step}: {now - (ends[-2][1] if len(ends) > 1 else t_begin):.2f}s "
          f"(generate {gen_log[-1]['s']:.2f}s, {gen_log[-1]['tokens']} tokens) loss "
          f"{float(loss.detach()) * m:.4f}", flush=True)
    dump()
    if a.deadline and step + 1 >= a.warmup and step + 1 < total:
      last = ends[-1][1] - (ends[-2][1] if len(ends) > 1 else t_begin)
      if time.time() + last * 1.3 + 10 > a.deadline:
        print("[peer] deadline: stopping", flush=True)
        break


if __name__ == "__main__":
  main()
