"""The command that built the shipped base model still runs (a few steps, at a tiny size)."""

import json
import os

from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_corpus, write_jsonl
from instructgpt.config import load_config
from instructgpt.pretrain import PretrainConfig, train

ROOT = os.path.dirname(os.path.dirname(__file__))


def test_pretrain_config_rebuild_command_runs_a_few_steps(tmp_path):
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join(tiny_corpus(40, seed=i))} for i in range(6)])
    cfg = load_config(PretrainConfig, os.path.join(ROOT, "configs", "pretrain.yaml"), [
        f"data.train={text}", f"data.eval={text}", "init.vocab_size=300", "init.n_layer=1", "init.n_embd=32",
        "init.n_head=2", "data.max_length=64", "train.max_steps=30", "train.batch_size=4", "train.warmup_steps=2", "train.lr=3e-3",
        "train.log_every=1", "train.eval_every=30", f"out_dir={tmp_path / 'pt'}"])
    train(cfg)
    rows = [json.loads(l) for l in open(tmp_path / "pt" / "metrics.jsonl")]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.5
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "pt" / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "pt" / "model")
    assert m.config.n_layer == 1 and len(tok) == m.config.vocab_size == 300
    assert tok.pad_token_id != tok.eos_token_id
    # the second phase (configs/pretrain-continue.yaml) continues that model: same tokenizer, loss keeps falling
    cont = load_config(PretrainConfig, os.path.join(ROOT, "configs", "pretrain-continue.yaml"), [
        f"model.name_or_path={tmp_path / 'pt' / 'model'}", f"data.train={text}", f"data.eval={text}",
        "data.max_length=64", "train.max_steps=10", "train.batch_size=4", "train.warmup_steps=1", "train.lr=1e-3",
        "train.log_every=1", "train.eval_every=10", f"out_dir={tmp_path / 'pt2'}"])
    assert not cont.init.from_scratch
    train(cont)
    rows2 = [json.loads(l) for l in open(tmp_path / "pt2" / "metrics.jsonl")]
    assert rows2[-1]["train/loss"] < rows[-1]["train/loss"] + 0.5  # started from the trained model, not from scratch
    assert AutoTokenizer.from_pretrained(tmp_path / "pt2" / "model").get_vocab() == tok.get_vocab()
    # the third phase (configs/pretrain-assistant.yaml) continues the second on text with the assistant suite's domain
    third = load_config(PretrainConfig, os.path.join(ROOT, "configs", "pretrain-assistant.yaml"), [
        f"model.name_or_path={tmp_path / 'pt2' / 'model'}", f"data.eval={text}", "data.max_length=64",
        "train.max_steps=4", "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=4",
        f"out_dir={tmp_path / 'pt3'}", "data.train=builtin:pretrain?n=200&seed=2&assistant=200"])
    assert not third.init.from_scratch and "assistant=" in load_config(
        PretrainConfig, os.path.join(ROOT, "configs", "pretrain-assistant.yaml")).data.train
    train(third)
    assert AutoTokenizer.from_pretrained(tmp_path / "pt3" / "model").get_vocab() == tok.get_vocab()
