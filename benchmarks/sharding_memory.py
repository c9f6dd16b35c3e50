"""Memory per process under FSDP2: the bytes of parameters, gradients and Adam state each process holds, one process
(no sharding) against two sharded with FSDP2 (CPU, gloo), on the same model through the stages' own path
(training.make_accelerator and make_optimizer, as SFT, RM, DPO and pretraining use them).

The figures count tensors, not the process's RSS: on a CPU the RSS is mostly the libraries, and the question is what
sharding saves on what grows with the model. One optimizer step is taken first, so Adam's state exists.

usage: python benchmarks/sharding_memory.py [--model builtin:base] [--out benchmarks/sharding_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def _local_bytes(t) -> int:
    """Bytes this process holds of `t` (its own shard, for a DTensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def worker(model_name: str, out: str) -> None:
    import torch

    from instructgpt.config import load_config
    from instructgpt.modeling import load_model, set_seed
    from instructgpt.sft import SFTConfig
    from instructgpt.training import fsdp_sharding, make_accelerator, make_optimizer

    cfg = load_config(SFTConfig, None, [f"model.name_or_path={model_name}", f"out_dir={out}", "train.batch_size=4"])
    acc = make_accelerator(cfg)
    set_seed(0)
    model, _ = load_model(cfg.model, for_training=True)
    n_params = sum(p.numel() for p in model.parameters())
    model, opt, _ = make_optimizer(acc, model, cfg.train, 2)
    rows = 4 // acc.num_processes
    g = torch.Generator().manual_seed(acc.process_index)
    ids = torch.randint(0, model.config.vocab_size, (rows, 64), generator=g)  # (rows, T): this process's share
    acc.backward(model(input_ids=ids.to(acc.device), labels=ids.to(acc.device), use_cache=False).loss)
    grads = sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    opt.step()
    params = sum(_local_bytes(p) for p in model.parameters())
    state = sum(_local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    result = {"rank": acc.process_index, "processes": acc.num_processes,
              "sharded": fsdp_sharding(cfg.train) is not None, "model_parameters": n_params,
              "parameter_bytes": params, "gradient_bytes": grads, "adam_state_bytes": state,
              "parameters_plus_adam_bytes": params + state}
    with open(os.path.join(out, f"rank{acc.process_index}.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _run(model: str, processes: int, out: str) -> list[dict]:
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    me = [os.path.abspath(__file__), "--worker", "--model", model, "--out", out]
    if processes == 1:
        cmd = [sys.executable, *me]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(port), *me]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return [json.load(open(os.path.join(out, f"rank{r}.json"), encoding="utf-8")) for r in range(processes)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:base")
    p.add_argument("--out", default=os.path.join(HERE, "sharding_memory.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.model, args.out)
        return
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        one = _run(args.model, 1, os.path.join(tmp, "one"))[0]
        two = _run(args.model, 2, os.path.join(tmp, "fsdp2"))
    key = "parameters_plus_adam_bytes"
    result = {
        "what": "bytes of parameters, gradients and Adam state held by each process after one optimizer step",
        "model": args.model, "model_parameters": one["model_parameters"],
        "one_process": one, "fsdp2_two_processes": two,
        "ratio_parameters_plus_adam_per_rank": max(r[key] for r in two) / one[key],
        "ratio_gradients_per_rank": max(r["gradient_bytes"] for r in two) / one["gradient_bytes"],
        "target": "ratio_parameters_plus_adam_per_rank <= 0.6",
        "machine": {"platform": platform.platform(), "processor": _cpu_model(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "backend": "gloo (CPU)"},
        "command": "python benchmarks/sharding_memory.py" + (f" --model {args.model}" if args.model != "builtin:base"
                                                             else ""),
    }
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    print(f"{args.model}: {one['model_parameters'] / 1e6:.2f}M parameters; parameters + Adam state per process: "
          f"{one[key] / 2**20:.1f} MiB in one process, {max(r[key] for r in two) / 2**20:.1f} MiB in each of two "
          f"under FSDP2 (ratio {result['ratio_parameters_plus_adam_per_rank']:.3f}); gradients "
          f"{result['ratio_gradients_per_rank']:.3f} -> {args.out}")


if __name__ == "__main__":
    main()
