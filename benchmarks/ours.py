"""Our side of each benchmark, one measurement per process: `python benchmarks/ours.py TASK SPEC.json OUT.json`.

TASK: sft | rm_k4 | rm_k9 | generate | ppo | ppo_scaling | rloo. Run by run.py, which alternates it with theirs.py /
ppo_trl.py on the same workload (workload.py). Training goes through the real entry points
(`instructgpt.sft.train`, `instructgpt.rm.train`) with nothing changed but two wrappers that only observe: one counts
the work of each step (tokens, comparisons), one stamps the end of each optimizer step.
"""

from __future__ import annotations

import os
import shutil

import measure


def run_dir(out: str) -> str:
    d = out[: -len(".json")] + "_run"
    shutil.rmtree(d, ignore_errors=True)
    return d


def train_section(s: dict, steps: int, batch: int, lr: float) -> dict:
    o = s["optim"]
    return {"max_steps": steps, "batch_size": batch, "grad_accum": 1, "lr": lr, "warmup_steps": 0,
            "min_lr_ratio": o["min_lr_ratio"], "weight_decay": o["weight_decay"], "adam_beta1": o["beta1"],
            "adam_beta2": o["beta2"], "adam_eps": o["eps"], "max_grad_norm": o["max_grad_norm"],
            "mixed_precision": "no", "log_every": 10, "eval_every": 10**9, "save_every": 0}


def sft(spec: dict, out: str) -> dict:
    import instructgpt.sft as stage
    from instructgpt.config import load_config

    s = spec["settings"]
    cfg = load_config(stage.SFTConfig, extra={
        "model": {"name_or_path": "builtin:base", "dtype": "float32"},
        "data": {"train": spec["sft"]["demos"], "eval_size": 0, "max_length": s["max_length"]},
        "train": train_section(s, s["sft_steps"], s["sft_batch"], s["sft_lr"]),
        "out_dir": run_dir(out), "seed": s["seed"]})
    import instructgpt.supervised as loop  # SFT's training loop

    clock, tokens = measure.StepClock(), [0]
    loss_batch, optimizer_step = loop.loss_batch, loop.optimizer_step

    def counting_batch(examples, pad_token_id, **kwargs):  # the real batching; counts the (non-pad) tokens it batches
        b = loss_batch(examples, pad_token_id, **kwargs)
        tokens[0] += int(b["attention_mask"].sum())
        return b

    def timed_optimizer_step(*args, **kwargs):  # the real step; stamps its end
        optimizer_step(*args, **kwargs)
        clock.step_done(tokens[0])
        tokens[0] = 0

    loop.loss_batch, loop.optimizer_step = counting_batch, timed_optimizer_step
    stage.train(cfg)
    return {**clock.figures(s["sft_warmup"]), "unit": "tokens/s", "tokens_per_step": clock.amounts}


def rm(spec: dict, out: str, k: int) -> dict:
    from transformers import AutoModelForSequenceClassification

    import instructgpt.rm as stage
    from instructgpt.config import load_config
    from instructgpt.losses import ranking_pairs

    s, r = spec["settings"], spec["rm"][str(k)]
    out_dir = run_dir(out)
    cfg = load_config(stage.RMConfig, extra={
        "model": {"name_or_path": "builtin:base", "dtype": "float32"},
        "data": {"train": r["rankings"], "eval_size": 0, "max_length": s["max_length"]},
        "train": train_section(s, r["steps"], s["rm_prompts_per_step"], s["rm_lr"]),
        "normalize": {"demonstrations": None, "policy": None},
        "out_dir": out_dir, "seed": s["seed"]})
    import instructgpt.rankings as loop  # the ranking loop the RM (and DPO) trains in

    clock, comparisons = measure.StepClock(), [0]
    forward_rankings, optimizer_step = stage.forward_rankings, loop.optimizer_step

    def counting_forward(model, items, *args, **kwargs):  # the real forward; counts the comparisons it serves
        comparisons[0] += sum(len(ranking_pairs(it.ranks)) for it in items)
        return forward_rankings(model, items, *args, **kwargs)

    def timed_optimizer_step(*args, **kwargs):
        optimizer_step(*args, **kwargs)
        clock.step_done(comparisons[0])
        comparisons[0] = 0

    stage.forward_rankings, loop.optimizer_step = counting_forward, timed_optimizer_step
    stage.train(cfg)
    model = AutoModelForSequenceClassification.from_pretrained(os.path.join(out_dir, "model"))
    acc = measure.ranking_accuracy(model, measure.load_json(r["heldout"]), spec["pad_token_id"])
    return {**clock.figures(s["rm_warmup"]), "unit": "comparisons/s", "comparisons_per_step": clock.amounts,
            "heldout_accuracy": acc}


def generate(spec: dict, out: str) -> dict:
    import statistics
    import time

    import torch

    from instructgpt.batching import left_pad
    from instructgpt.generation import SamplingParams, sample
    from instructgpt.modeling import load_model

    s = spec["settings"]
    model, tok = load_model("builtin:base")
    model.eval()
    prompts = measure.load_json(spec["prompts"])
    n = s["gen_new_tokens"]
    # fixed-length responses: the same work as model.generate without an EOS token
    params = SamplingParams(max_new_tokens=n, temperature=1.0, top_p=1.0, top_k=0, stop_at_eos=False)
    g = torch.Generator().manual_seed(s["seed"])
    res = {}
    for b in s["gen_batches"]:
        ids, mask = left_pad(prompts[:b], tok.pad_token_id)
        times, cpu = [], []
        for call in range(1 + s["gen_calls"][str(b)]):  # call 0 is warm-up
            t, c = time.perf_counter(), time.process_time()
            batch = sample(model, ids, mask, params, tok.eos_token_id, tok.pad_token_id, generator=g)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            assert batch.tokens.shape == (b, n), batch.tokens.shape
        res[str(b)] = {"throughput": b * n / statistics.median(times[1:]),
                       "cpu_throughput": b * n / statistics.median(cpu[1:]),
                       "call_seconds": [round(x, 4) for x in times]}
    return {"unit": "new tokens/s", "batches": res}


def ppo_update(policy_dir: str, reward_dir: str, prompts: str, batch_size: int, response_length: int,
               ppo_epochs: int, num_minibatches: int, updates: int, overrides: tuple[str, ...] | list[str] = ()) -> dict:
    """`updates` plain-PPO updates of `instructgpt ppo` (no ptx, no monitor) on the prompt source `prompts` (the
    workload's, which TRL's side reads as token ids), timed from its own metrics:
    {episodes_per_s, seconds_per_update, mean_response_length, mean_prompt_tokens}; `overrides` (``key=value``) go
    last, e.g. ``ppo.advantage_estimator=rloo`` for the critic-free race."""
    import tempfile

    from instructgpt.config import load_config
    from instructgpt.ppo import PPOConfig
    from instructgpt.ppo import train as ppo_train
    from instructgpt.runs import read_metrics

    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(PPOConfig, None, [
            f"model.name_or_path={policy_dir}", f"reward_model.name_or_path={reward_dir}", f"data.train={prompts}",
            f"train.max_steps={updates}", f"train.batch_size={batch_size}", "train.save_every=0",
            "train.warmup_steps=0", f"ppo.response_length={response_length}", f"ppo.ppo_epochs={ppo_epochs}",
            f"ppo.num_minibatches={num_minibatches}", "ppo.ptx_coef=0", "ppo.eval_prompts=0", "ppo.sample_every=0",
            f"out_dir={d}/ppo", *overrides])
        ppo_train(cfg)
        rows = [r for r in read_metrics(f"{d}/ppo") if "time/update_s" in r]
    secs = [r["time/update_s"] for r in rows]
    return {"episodes_per_s": batch_size * len(secs) / sum(secs), "seconds_per_update": secs,
            "mean_response_length": sum(r["ppo/mean_response_length"] for r in rows) / len(rows)}


# bf16 mixed precision (TRL's bf16=True): autocast for the training forwards and the frozen models' scoring, fp32
# weights and optimizer; the ratio's old log-probs from the training forward (required under mixed precision); the
# rollouts sampled in fp32, as the tiny model samples no faster in bf16
BF16 = ("train.mixed_precision=bf16", "ppo.recompute_logprobs=true")


def ppo(spec: dict, out: str, configs: list[dict], overrides: tuple[str, ...] = ()) -> dict:
    p, res = spec["ppo"], []
    for c in configs:
        r = ppo_update(p["policy_dir"], p["reward_dir"], spec["prompts_jsonl"], c["batch"], c["length"],
                       p["epochs"], p["minibatches"], c["updates"], overrides)
        if "skipped" in r:
            return {"skipped": r["skipped"]}
        res.append({**c, **r})
    return {"unit": "episodes/s", "configs": res}


def ppo_work(spec: dict, out: str) -> dict:
    """The main PPO configuration once more, under the profiler: the matmul FLOPs and operator seconds of an update
    (`measure.matmul_work`); its own timing is the profiler's and is not compared."""
    p, c = spec["ppo"], spec["ppo"]["main"][0]
    _, work = measure.matmul_work(lambda: ppo_update(p["policy_dir"], p["reward_dir"], spec["prompts_jsonl"],
                                                     c["batch"], c["length"], p["epochs"], p["minibatches"],
                                                     c["updates"]), c["updates"])
    return {"batch": c["batch"], "length": c["length"], "updates": c["updates"], **work}


def rloo(spec: dict, out: str) -> dict:
    """RLOO through the PPO loop: ppo.advantage_estimator=rloo, one epoch over the whole batch, TRL's beta, no
    advantage whitening (TRL's normalize_advantages=False)."""
    r = spec["rloo"]
    res = ppo_update(r["policy_dir"], r["reward_dir"], spec["prompts_jsonl"], r["batch"], r["length"], 1, 1,
                     r["updates"], overrides=["ppo.advantage_estimator=rloo", f"ppo.samples_per_prompt={r['k']}",
                                              f"ppo.kl_coef={r['beta']}", "ppo.whiten_advantages=false",
                                              f"train.lr={r['lr']}"])
    if "skipped" in res:
        return {"skipped": res["skipped"]}
    return {"unit": "episodes/s", "configs": [{"batch": r["batch"], "length": r["length"], "updates": r["updates"],
                                               **res}]}


def versions(task: str) -> dict:
    import instructgpt

    return {"instructgpt": getattr(instructgpt, "__version__", "0.1.0")}


def main() -> None:
    measure.run_worker("ours", {
        "sft": sft,
        "rm_k4": lambda spec, out: rm(spec, out, 4),
        "rm_k9": lambda spec, out: rm(spec, out, 9),
        "generate": generate,
        "ppo": lambda spec, out: ppo(spec, out, spec["ppo"]["main"]),
        "ppo_scaling": lambda spec, out: ppo(spec, out, spec["ppo"]["scaling"]),
        "ppo_bf16": lambda spec, out: ppo(spec, out, spec["ppo"]["main"], BF16),
        "ppo_work": ppo_work,
        "rloo": rloo,
    }, versions)


if __name__ == "__main__":
    main()
