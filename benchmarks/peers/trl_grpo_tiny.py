"""TRL (trl 1.16.0, torch 2.13.0+cpu) GRPO peer baseline on CPU, tiny random Qwen2.

Tiny random Qwen2ForCausalLM (hidden 128, 2 layers, 4 heads / 2 kv heads,
MLP 512, vocab 512), local word-level tokenizer (tiny_tok.py, wrapped in
PreTrainedTokenizerFast), toy reward, GRPOTrainer with use_vllm=False
(transformers `generate`, KV cache on), bf16=False, report_to=none.

Per step: 8 prompts x 8 generations = 64 rollouts (per_device_train_batch_size
64, num_generations 8, grad-accum 1), prompt 32 tokens ("<s>" + 31 words,
identical token ids to the Tunix run), max_completion_length 32,
beta>0 => reference model, loss_type="grpo" (= Tunix's default
'sequence-mean-token-mean' aggregation), 1 optimizer step.

Also times plain `model.generate` for 64 seqs x 32 new tokens (sampling, KV
cache on) as a sampler-throughput baseline.

Workload W1: benchmarks/README.md. Run (from benchmarks/peers/, after setup.sh;
benchmarks/peers/run.sh does this in rounds):
  HF_HUB_OFFLINE=1 "$PEERS"/trl-venv/bin/python trl_grpo_tiny.py --steps 6
"""
import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import tiny_tok  # noqa: E402

import tempfile  # noqa: E402

OUT = os.environ.get("PEERS_OUT") or tempfile.mkdtemp(prefix="trl-peer-")


class StepTimer(TrainerCallback):
    def __init__(self):
        self.begins, self.ends = [], []

    def on_step_begin(self, args, state, control, **kw):
        self.begins.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        self.ends.append(time.perf_counter())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6, help="timed GRPO steps (after --warmup steps)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--gens", type=int, default=8)
    ap.add_argument("--prompt-words", type=int, default=31, help='"<s>" + 31 words => 32 prompt tokens')
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave default)")
    ap.add_argument("--skip-grpo", action="store_true")
    ap.add_argument("--skip-generate", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} threads={torch.get_num_threads()}", flush=True)

    tok = tiny_tok.build_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = Qwen2ForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: HF Qwen2ForCausalLM {args.layers}L d={args.hidden} heads=4/2 vocab={len(tok)} "
          f"params={n_params/1e6:.3f}M attn={model.config._attn_implementation}", flush=True)

    # GRPOTrainer builds the reference model with from_pretrained(config name_or_path) when
    # beta>0, so the random model must exist on local disk: save it (+ tokenizer) first.
    model_dir = os.path.join(OUT, "trl_tiny_model")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    bos = tok.bos_token  # "<s>": make TRL's prompt ids identical to Tunix's (BOS + 31 words)

    # ------------------------------------------------------------------ generate
    if not args.skip_generate:
        model.eval()
        n_seq = args.prompts * args.gens
        ps = [f"{bos} {p}" for p in tiny_tok.make_prompts(n_seq, args.prompt_words, seed=123)]
        tok.padding_side = "left"
        enc = tok(ps, return_tensors="pt", padding=True)
        assert enc["input_ids"].shape[1] == args.prompt_words + 1, enc["input_ids"].shape
        rates = []
        for rep in range(6):
            ts = time.perf_counter()
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=True,
                                     temperature=0.9, top_p=1.0, top_k=0, use_cache=True,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            te = time.perf_counter()
            comp = out[:, enc["input_ids"].shape[1]:]
            ntok = int((comp != tok.pad_token_id).sum())
            if rep >= 2:
                rates.append(ntok / (te - ts))
            print(f"generate rep{rep}: {n_seq} seqs, {ntok} new tokens, {te-ts:.3f}s -> {ntok/(te-ts):.1f} tok/s",
                  flush=True)
        print(f"RESULT trl_model.generate tokens/s = {np.median(rates):.1f} (median of reps 2-5; "
              f"{n_seq} seqs x {args.new_tokens} new tokens, prompt {enc['input_ids'].shape[1]})", flush=True)

    if args.skip_grpo:
        return

    # ------------------------------------------------------------------ GRPO
    total_steps = args.warmup + args.steps
    prompts = [f"{bos} {p}" for p in
               tiny_tok.make_prompts(args.prompts * total_steps, args.prompt_words, seed=0)]
    ds = Dataset.from_dict({"prompt": prompts})

    reward_means = []

    def reward_fn(prompts, completions, **kw):
        r = tiny_tok.toy_reward(prompts, completions)
        reward_means.append(float(np.mean(r)))
        return r

    gcfg = GRPOConfig(
        output_dir=os.path.join(OUT, "trl_out"),
        use_vllm=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=args.prompts * args.gens,   # counts completions: 64
        gradient_accumulation_steps=1,
        num_generations=args.gens,
        max_completion_length=args.new_tokens,
        temperature=0.9,
        top_p=1.0,
        beta=args.beta,
        loss_type="grpo",
        num_iterations=1,
        learning_rate=1e-5,
        max_steps=total_steps,
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=[reward_fn],
        args=gcfg,
        train_dataset=ds,
        processing_class=tok,
    )
    timer = StepTimer()
    trainer.add_callback(timer)

    # instrument the rollout: wrap the policy's generate
    gen_log = []
    pol = trainer.model
    orig_generate = pol.generate

    def timed_generate(*a, **kw):
        ts = time.perf_counter()
        out = orig_generate(*a, **kw)
        te = time.perf_counter()
        plen = kw["input_ids"].shape[1] if "input_ids" in kw else a[0].shape[1]
        comp = out[:, plen:]
        gen_log.append((ts, te, int((comp != tok.pad_token_id).sum()), out.shape[0], plen))
        return out

    pol.generate = timed_generate
    p_before = {k: v.detach().clone() for k, v in pol.state_dict().items()}

    t0 = time.perf_counter()
    trainer.train()
    t1 = time.perf_counter()
    delta = max(float((v - p_before[k]).abs().max()) for k, v in trainer.model.state_dict().items())
    print(f"sanity: max |param change| = {delta:.3e}; mean reward per step = "
          f"{[round(x, 3) for x in reward_means]}")
    print(f"train() wall {t1-t0:.1f}s, steps={len(timer.ends)}, rollouts={len(gen_log)}, "
          f"prompt len seen by generate={gen_log[0][4]}")
    W = args.warmup
    step_times = [e - b for b, e in zip(timer.begins, timer.ends)]
    # TRL generates inside training_step (between on_step_begin/on_step_end) when
    # steps_per_generation == 1, so these step times include the rollout.
    timed = step_times[W:]
    gl = gen_log[W:]
    gen_tok = sum(g[2] for g in gl)
    gen_time = sum(g[1] - g[0] for g in gl)
    print(f"warm-up steps: {[round(x, 2) for x in step_times[:W]]}")
    print(f"per-step times (s): {[round(x, 2) for x in timed]}")
    print(f"RESULT trl_grpo steps/s = {len(timed)/sum(timed):.3f}  (mean step {np.mean(timed):.3f}s, "
          f"median {np.median(timed):.3f}s, {gl[0][3]} seqs/step)")
    print(f"RESULT trl_grpo generated tokens/s (over whole step) = {gen_tok/sum(timed):.1f}")
    print(f"RESULT trl_grpo median-based: steps/s = {1/np.median(timed):.3f}, "
          f"generated tokens/s = {(gen_tok/len(timed))/np.median(timed):.1f}")
    print(f"RESULT trl_grpo rollout-only tokens/s = {gen_tok/gen_time:.1f} (rollout {gen_time/len(timed):.3f}s/step"
          f" = {100*gen_time/sum(timed):.0f}% of step; {gen_tok/len(timed):.0f} tokens/step)")


if __name__ == "__main__":
    main()
