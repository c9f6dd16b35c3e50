"""The baseline side, one measurement per process: `python benchmarks/theirs.py TASK SPEC.json OUT.json`.

TASK: sft (TRL `SFTTrainer`) | rm_k4, rm_k9 (TRL `RewardTrainer` on the rankings expanded to pairs) | generate
(plain `model.generate`) | rloo (TRL `RLOOTrainer`). run.py puts the current TRL (benchmarks/.trl/current) on PYTHONPATH; nothing here imports
`instructgpt`. TRL's defaults are kept except where they would make the two sides do different work; each such
setting is named below:
- `bf16=False`: TRL turns bf16 autocast on by default, even on CPU; both sides run fp32.
- `activation_checkpointing=False` (transformers 5's name for `gradient_checkpointing`): TRL's default recomputes
  activations (~20% slower by its own docs); ours does not checkpoint, so the baseline should not pay for it either.
- AdamW betas/eps, cosine decay to 10% (`cosine_with_min_lr`), no warm-up, clip 1.0: as ours.
- `train_sampling_strategy="sequential"` over rows already in our batch order: step i trains on the same rows.
- The reward model starts from the weights ours starts from (workload.rm_start: our head initialisation), not
  from a fresh `score` head of TRL's own, so held-out accuracies compare trainers, not initial draws.
"""

from __future__ import annotations

import measure


def trainer_args(s: dict, out: str, steps: int, batch: int, lr: float) -> dict:
    o = s["optim"]
    return {"output_dir": out[: -len(".json")] + "_run", "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": 1, "max_steps": steps, "learning_rate": lr, "adam_beta1": o["beta1"],
            "adam_beta2": o["beta2"], "adam_epsilon": o["eps"], "weight_decay": o["weight_decay"],
            "max_grad_norm": o["max_grad_norm"], "lr_scheduler_type": "cosine_with_min_lr",
            "lr_scheduler_kwargs": {"min_lr_rate": o["min_lr_ratio"]}, "warmup_steps": 0, "bf16": False,
            "fp16": False, "activation_checkpointing": False, "use_cpu": True, "report_to": "none",
            "save_strategy": "no", "logging_steps": 10, "dataloader_num_workers": 0, "seed": s["seed"],
            "train_sampling_strategy": "sequential", "max_length": s["max_length"]}


def step_clock_callback(clock: measure.StepClock, amounts: list[float]):
    """A TrainerCallback that stamps the end of each optimizer step (the work of step i is amounts[i])."""
    from transformers import TrainerCallback

    class StepClockCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_done(amounts[len(clock.ends)])

    return StepClockCallback()


def sft(spec: dict, out: str) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    s = spec["settings"]
    clock = measure.StepClock()
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    ds = Dataset.from_list(measure.load_json(spec["sft"]["trl_rows"]))  # input_ids + completion_mask
    args = SFTConfig(**trainer_args(s, out, s["sft_steps"], s["sft_batch"], s["sft_lr"]), packing=False,
                     completion_only_loss=True)
    trainer = SFTTrainer(model=spec["model_dir"], args=args, train_dataset=ds, processing_class=tok,
                         callbacks=[step_clock_callback(clock, spec["sft"]["tokens_per_step"])])
    trainer.train()
    return {**clock.figures(s["sft_warmup"]), "unit": "tokens/s", "tokens_per_step": clock.amounts}


def rm(spec: dict, out: str, k: int) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    s, r = spec["settings"], spec["rm"][str(k)]
    clock = measure.StepClock()
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    ds = Dataset.from_list(measure.load_json(r["trl_pairs"]))  # chosen_ids / rejected_ids, in our batch order
    per_step = r["comparisons_per_step"]  # the same comparisons per optimizer step as ours, as pairs
    args = RewardConfig(**trainer_args(s, out, r["steps"], per_step, s["rm_lr"]))
    trainer = RewardTrainer(model=spec["rm_start"], args=args, train_dataset=ds, processing_class=tok,
                            callbacks=[step_clock_callback(clock, [per_step] * r["steps"])])
    trainer.train()
    acc = measure.ranking_accuracy(trainer.model, measure.load_json(r["heldout"]), spec["pad_token_id"])
    return {**clock.figures(s["rm_warmup"]), "unit": "comparisons/s", "comparisons_per_step": clock.amounts,
            "heldout_accuracy": acc}


def generate(spec: dict, out: str) -> dict:
    import statistics
    import time

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    s = spec["settings"]
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"]).eval()
    prompts = measure.load_json(spec["prompts"])
    n, pad = s["gen_new_tokens"], spec["pad_token_id"]
    # pure sampling at temperature 1, no EOS: every call makes exactly n new tokens per row, as ours
    gen_cfg = GenerationConfig(do_sample=True, max_new_tokens=n, top_k=0, top_p=1.0, temperature=1.0,
                               pad_token_id=pad, eos_token_id=None)
    torch.manual_seed(s["seed"])
    res = {}
    for b in s["gen_batches"]:
        width = max(len(p) for p in prompts[:b])
        ids = torch.full((b, width), pad, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, p in enumerate(prompts[:b]):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        times, cpu = [], []
        for call in range(1 + s["gen_calls"][str(b)]):  # call 0 is warm-up
            t, c = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            assert seqs.shape == (b, width + n), seqs.shape
        res[str(b)] = {"throughput": b * n / statistics.median(times[1:]),
                       "cpu_throughput": b * n / statistics.median(cpu[1:]),
                       "call_seconds": [round(x, 4) for x in times]}
    return {"unit": "new tokens/s", "batches": res}


def rloo(spec: dict, out: str) -> dict:
    """TRL's RLOOTrainer: `updates` steps of `batch` responses (batch / k prompts, k each), the policy, its reference
    (beta > 0) and the reward model from the same files as ours. An update is the interval between consecutive
    `on_step_end` callbacks; the first, from `on_train_begin`, is warm-up."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    r, s = spec["rloo"], spec["settings"]
    clock = measure.StepClock()
    tok = AutoTokenizer.from_pretrained(r["policy_dir"], padding_side="left")
    prompts = measure.load_json(r["prompts_text"])
    args = RLOOConfig(output_dir=out[: -len(".json")] + "_run", per_device_train_batch_size=r["batch"],
                      num_generations=r["k"], max_completion_length=r["length"], max_steps=r["updates"],
                      learning_rate=r["lr"], beta=r["beta"], num_iterations=1, temperature=1.0, top_k=0, top_p=1.0,
                      disable_dropout=True, bf16=False, fp16=False, activation_checkpointing=False, use_cpu=True,
                      report_to="none", save_strategy="no", logging_steps=1, seed=s["seed"])
    trainer = RLOOTrainer(model=r["policy_dir"], reward_funcs=[r["reward_dir"]], args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                          callbacks=[clock.update_callback(r["batch"])])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"unit": "episodes/s", "configs": [{
        "batch": r["batch"], "length": r["length"], "updates": r["updates"], **clock.update_figures(r["batch"]),
        "mean_response_length": sum(lengths) / len(lengths) if lengths else None}]}


def versions(task: str) -> dict:
    if task == "generate":  # plain transformers: TRL is not imported
        return {}
    import trl

    return {"trl": trl.__version__}


def main() -> None:
    measure.run_worker("trl", {
        "sft": sft,
        "rm_k4": lambda spec, out: rm(spec, out, 4),
        "rm_k9": lambda spec, out: rm(spec, out, 9),
        "generate": generate,
        "rloo": rloo,
    }, versions)


if __name__ == "__main__":
    main()
