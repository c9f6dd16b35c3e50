"""Run SFT's loop under real DDP and write each rank's final weights checksum (used by test_ddp.py).

Launched by torchrun with 2 CPU processes (gloo); also run with 1 process for the single-process reference.
usage: ddp_worker.py MODEL_DIR DEMOS OUT_DIR, or ddp_worker.py dpo MODEL_DIR RANKINGS OUT_DIR (DPO's whole stage),
or ddp_worker.py rm MODEL_DIR RANKINGS DEMOS OUT_DIR (the RM's, normalised on DEMOS),
or ddp_worker.py rloo MODEL_DIR RM_DIR PROMPTS OUT_DIR (PPO's loop without a critic),
or ddp_worker.py ppo MODEL_DIR RM_DIR PROMPTS PTX OUT_DIR [OVERRIDES...] (PPO-ptx with its value model)
"""

import json
import os
import sys

import torch

from instructgpt.config import load_config
from instructgpt.data import load_demonstrations
from instructgpt.modeling import load_model, set_seed
from instructgpt.runs import StageRun
from instructgpt.sft import SFTConfig, build_examples
from instructgpt.supervised import fit
from instructgpt.training import make_accelerator

if sys.argv[1] == "dpo":  # usage: ddp_worker.py dpo MODEL_DIR RANKINGS OUT_DIR: the ranking loop (RM and DPO share it)
    from instructgpt.dpo import DPOConfig, train

    model_dir, rankings, out = sys.argv[2:5]
    train(load_config(DPOConfig, None, [f"model.name_or_path={model_dir}", f"data.train={rankings}", f"out_dir={out}",
                                        "train.batch_size=8", "train.max_steps=4", "train.lr=3e-3", "beta=0.5",
                                        "data.eval_size=0", "train.save_every=0", "train.log_every=1"]))
    sys.exit(0)

if sys.argv[1] == "rm":  # usage: ddp_worker.py rm MODEL_DIR RANKINGS DEMOS OUT_DIR: the reward model's whole stage
    from instructgpt.rm import RMConfig, train

    model_dir, rankings, demos, out = sys.argv[2:6]
    train(load_config(RMConfig, None, [f"model.name_or_path={model_dir}", f"data.train={rankings}", f"out_dir={out}",
                                       "train.batch_size=8", "train.max_steps=4", "train.lr=3e-3", "train.grad_accum=2",
                                       "data.eval_size=0", f"normalize.demonstrations={demos}",
                                       "normalize.max_demonstrations=16", "train.save_every=0"]))
    sys.exit(0)

if sys.argv[1] == "rloo":  # usage: ddp_worker.py rloo MODEL_DIR RM_DIR PROMPTS OUT_DIR: PPO's loop, no critic
    from instructgpt.ppo import PPOConfig, train

    model_dir, rm_dir, prompts, out = sys.argv[2:6]
    train(load_config(PPOConfig, None, [f"model.name_or_path={model_dir}", f"reward_model.name_or_path={rm_dir}",
                                        f"data.train={prompts}", "data.max_length=32", "ppo.ptx_coef=0",
                                        "ppo.eval_prompts=0", "ppo.missing_eos_penalty=null",
                                        "ppo.advantage_estimator=rloo", "ppo.samples_per_prompt=4",
                                        "ppo.response_length=8", "ppo.num_minibatches=2", "train.batch_size=16",
                                        "train.max_steps=2", "train.lr=1e-3", "train.save_every=0",
                                        f"out_dir={out}"]))
    sys.exit(0)

if sys.argv[1] == "ppo":  # usage: ddp_worker.py ppo MODEL_DIR RM_DIR PROMPTS PTX OUT_DIR EXTRA...: PPO-ptx's loop
    # with its value model; each rank records its rollouts (their rows in the whole batch) and advantages per update
    from instructgpt import ppo

    model_dir, rm_dir, prompts, ptx, out = sys.argv[2:7]
    seen = {"rollouts": [], "advantages": []}
    real_rollout, real_whiten = ppo.rollout, ppo.whiten

    def rollout(*args, draw_rows=None, **kw):
        b = real_rollout(*args, draw_rows=draw_rows, **kw)
        seen["rollouts"].append({"rows": draw_rows[0].tolist(), **{k: getattr(b, k).tolist() for k in (
            "response", "logprobs", "ref_logprobs", "values", "scores")}})
        return b

    def whiten(x, mask, shift_mean=True, all_sum=None):
        w = real_whiten(x, mask, shift_mean, all_sum)
        seen["advantages"].append(w.tolist())
        return w

    ppo.rollout, ppo.whiten = rollout, whiten
    ppo.train(load_config(ppo.PPOConfig, None, [
        f"model.name_or_path={model_dir}", f"reward_model.name_or_path={rm_dir}", f"data.train={prompts}",
        f"data.pretrain={ptx}", "data.max_length=32", "ppo.eval_prompts=0", "ppo.response_length=8",
        "train.batch_size=16", "ppo.num_minibatches=4", "ppo.ppo_epochs=2", "train.lr=3e-4", "train.warmup_steps=0",
        "ppo.ptx_coef=0.5", "ppo.ptx_token_ratio=1", "ppo.adaptive_kl=true", "ppo.kl_target=0.5",
        "train.max_steps=3", "train.save_every=0", f"out_dir={out}", *sys.argv[7:]]))
    rank = int(os.environ.get("RANK", 0))
    with open(os.path.join(out, f"seen-rank{rank}.json"), "w") as fh:
        json.dump(seen, fh)
    sys.exit(0)

model_dir, demos, out = sys.argv[1:4]
cfg = load_config(SFTConfig, None, [f"model.name_or_path={model_dir}", f"data.train={demos}", f"out_dir={out}",
                                    "train.batch_size=8", "train.max_steps=6", "train.lr=3e-3", "train.save_every=0"])
acc = make_accelerator(cfg)
run = StageRun(cfg, "sft", acc)
run.prepare()
set_seed(cfg.seed)
model, tok = load_model(cfg.model, for_training=True)
ex, _ = build_examples(tok, load_demonstrations(demos), 256)
fit(cfg, run, acc, model, tok, ex, [], desc="ddp")
flat = torch.cat([p.detach().flatten() for p in acc.unwrap_model(model).parameters()])
with open(os.path.join(out, f"rank{acc.process_index}-of-{acc.num_processes}.json"), "w") as fh:
    json.dump({"sum": float(flat.sum()), "abs": float(flat.abs().sum()), "head": flat[:64].tolist()}, fh)
