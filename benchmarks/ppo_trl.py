"""TRL's PPO (1.12.0, the last release that has it: `trl.experimental.ppo`), one process per call:
`python benchmarks/ppo_trl.py ppo|ppo_scaling SPEC.json OUT.json` with benchmarks/.trl/ppo on PYTHONPATH.

Each configuration (batch, response length, updates) builds a fresh PPOTrainer: policy and reference from
`builtin:base`, reward and value models from the same seeded SequenceClassification checkpoint (num_labels=1) that
our side loads. An update is TRL's whole loop body: rollout (sampling), scoring, reference/value forwards, GAE,
`num_ppo_epochs` epochs over `num_mini_batches` minibatches, logging. Its time is the interval between consecutive
`on_step_end` callbacks (the first, from `on_train_begin`, is warm-up and left out of episodes/s).

Settings beyond TRL's defaults, each to make both sides do the same work: fp32 (`bf16=False`; `ppo_bf16`: `bf16=True`,
against ours with `train.mixed_precision=bf16`), no gradient
checkpointing, temperature 1, `num_sample_generations=0` (no extra sample generation), the whole batch in one
rollout forward (`local_rollout_forward_batch_size=batch`). TRL's default `stop_token=None` keeps every response
exactly `response_length` tokens long, so the work per update does not depend on what the policy samples.
"""

from __future__ import annotations

import gc
import os

import measure


def one_config(spec: dict, out: str, batch: int, length: int, updates: int, bf16: bool = False) -> dict:
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    p, s = spec["ppo"], spec["settings"]
    if bf16:
        # TRL 1.12's PPOTrainer makes its own Accelerator without a mixed_precision argument, so `bf16=True` alone
        # leaves it in fp32 (its forwards run without autocast); accelerate reads this variable instead
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    clock = measure.StepClock()
    tok = AutoTokenizer.from_pretrained(p["policy_dir"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(p["policy_dir"])
    ref = AutoModelForCausalLM.from_pretrained(p["policy_dir"])
    value = AutoModelForSequenceClassification.from_pretrained(p["reward_dir"], num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(p["reward_dir"], num_labels=1)
    ds = Dataset.from_dict({"input_ids": measure.load_json(spec["prompts"])})
    nmb = p["minibatches"]
    # TRL 1.12: rollout batch = per_device_train_batch_size x gradient_accumulation_steps; minibatch = batch / nmb
    args = PPOConfig(output_dir=os.path.join(out[: -len(".json")] + "_run", f"b{batch}_n{length}"),
                     per_device_train_batch_size=batch // nmb, gradient_accumulation_steps=nmb,
                     num_mini_batches=nmb, num_ppo_epochs=p["epochs"], total_episodes=batch * updates,
                     response_length=length, local_rollout_forward_batch_size=batch, num_sample_generations=0,
                     temperature=1.0, learning_rate=p["lr"], bf16=bf16, fp16=False, activation_checkpointing=False,
                     use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=s["seed"])
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=ds, callbacks=[clock.update_callback(batch)])
    trainer.train()
    del trainer, policy, ref, value, reward
    gc.collect()
    return {"batch": batch, "length": length, "updates": updates, **clock.update_figures(batch)}


def ppo(spec: dict, out: str, configs: list[dict], bf16: bool = False) -> dict:
    return {"unit": "episodes/s",
            "configs": [one_config(spec, out, c["batch"], c["length"], c["updates"], bf16) for c in configs]}


def ppo_work(spec: dict, out: str) -> dict:
    """The main configuration once more, under the profiler (`measure.matmul_work`, as ours.ppo_work)."""
    c = spec["ppo"]["main"][0]
    _, work = measure.matmul_work(lambda: one_config(spec, out, c["batch"], c["length"], c["updates"]), c["updates"])
    return {"batch": c["batch"], "length": c["length"], "updates": c["updates"], **work}


def trl_version(task: str) -> dict:
    import trl

    return {"trl": trl.__version__}


def main() -> None:
    measure.run_worker("trl", {"ppo": lambda spec, out: ppo(spec, out, spec["ppo"]["main"]),
                               "ppo_scaling": lambda spec, out: ppo(spec, out, spec["ppo"]["scaling"]),
                               "ppo_bf16": lambda spec, out: ppo(spec, out, spec["ppo"]["main"], bf16=True),
                               "ppo_work": ppo_work},
                       trl_version)


if __name__ == "__main__":
    main()
