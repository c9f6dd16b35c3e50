"""Encoder-decoder models (BART, T5) in SFT, generation and serving, on tiny random ones built here from configs with
the tiny tokenizer; the reward model, PPO and DPO refuse them."""

from __future__ import annotations

import re

import openai
import pytest
import torch
from conftest import live_server, read_jsonl, saved_weights, write_jsonl
from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, BartConfig, BartForConditionalGeneration, T5Config,
                          T5ForConditionalGeneration)

from instructgpt.batching import Seq2SeqExample, collate_seq2seq, left_pad
from instructgpt.config import ConfigError, load_config
from instructgpt.data import Demonstration
from instructgpt.dpo import DPOConfig
from instructgpt.dpo import train as dpo_train
from instructgpt.evaluate import response_logprobs
from instructgpt.generation import SamplingParams, eos_ids, generate, sample
from instructgpt.judges import GOLD
from instructgpt.modeling import is_encoder_decoder, load_model
from instructgpt.ppo import PPOConfig
from instructgpt.ppo import train as ppo_train
from instructgpt.prompting import encode_prompt, encode_response, render_prompt
from instructgpt.rm import RMConfig
from instructgpt.rm import train as rm_train
from instructgpt.serving.app import create_app, load_server
from instructgpt.serving.config import ServeConfig
from instructgpt.sft import SFTConfig, build_examples, train
from instructgpt.supervised import decoder_loss_sum

ARCHS = ("bart", "t5")


def build_seq2seq(arch: str, tokenizer_dir: str, out: str) -> str:
    """A tiny random BART or T5 with the tiny tokenizer, saved to `out`."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    torch.manual_seed(0)
    if arch == "bart":
        cfg = BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, decoder_start_token_id=tok.eos_token_id,
                         forced_eos_token_id=None, forced_bos_token_id=None, init_std=0.3, dropout=0.0,
                         attention_dropout=0.0, **ids)
        model = BartForConditionalGeneration(cfg)
    else:
        cfg = T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
                       decoder_start_token_id=tok.pad_token_id, dropout_rate=0.0, **ids)
        model = T5ForConditionalGeneration(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def seq2seq_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("seq2seq")
    return {a: build_seq2seq(a, tiny_model_dir, str(d / a)) for a in ARCHS}


def varied(model):
    """`model` with its matrices redrawn wide (seeded): a tiny random model's greedy answer is one token over and
    over (or EOS at once), which would make comparing decoders too easy."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    return model.eval()


def _cfg(model_dir, demos, out, **kw):
    over = [f"model.name_or_path={model_dir}", f"data.train={demos}", f"out_dir={out}", "train.batch_size=4",
            "train.lr=3e-3", "data.eval_size=0", "train.eval_every=1000", "train.log_every=1", "data.max_length=64"]
    return load_config(SFTConfig, None, over + [f"{k}={v}" for k, v in kw.items()])


def _losses(out) -> list[float]:
    return [r["train/loss"] for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]


def _prompts(tok) -> list[str]:
    return [render_prompt(tok, p) for p in ("add 3 plus 4", "reverse the word dog and the cat", "count")]


@pytest.mark.parametrize("arch", ARCHS)
def test_load_model_and_examples(seq2seq_dirs, arch):
    model, tok = load_model(seq2seq_dirs[arch])
    assert is_encoder_decoder(model) and type(model).__name__.endswith("ForConditionalGeneration")
    d = Demonstration([{"role": "user", "content": "add 2 plus 3"}, {"role": "assistant", "content": "five"}])
    (ex,), _ = build_examples(tok, [d], 64, decoder_start_token_id=model.config.decoder_start_token_id)
    assert ex.input_ids == encode_prompt(tok, d.messages[:1])  # the encoder reads the prompt as generation renders it
    assert ex.labels == encode_response(tok, "five") and ex.labels[-1] == tok.eos_token_id
    assert ex.decoder_input_ids == [model.config.decoder_start_token_id] + ex.labels[:-1]
    # the loss is taken on the decoder's tokens only, and equals transformers' own (mean) loss
    short = Seq2SeqExample(ex.input_ids[:3], ex.decoder_input_ids[:1], ex.labels[:1])  # padded in both parts
    b = collate_seq2seq([ex, short], tok.pad_token_id)
    loss, n = decoder_loss_sum(model.eval(), b)
    assert n == len(ex.labels) + 1
    want = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    torch.testing.assert_close(loss / n, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_sft_loss_falls_and_saves_a_seq2seq_model(seq2seq_dirs, demos_file, tmp_path, arch):
    out = tmp_path / "sft"
    train(_cfg(seq2seq_dirs[arch], demos_file, out, **{"train.max_steps": 20}))
    losses = _losses(out)
    assert len(losses) == 20 and sum(losses[-3:]) < 0.75 * sum(losses[:3])
    assert (out / "DONE.json").exists()
    model, tok = load_model(str(out / "model"))
    assert is_encoder_decoder(model)
    texts = [c[0].text for c in generate(model, tok, _prompts(tok), SamplingParams(max_new_tokens=8, temperature=0))]
    assert all(isinstance(t, str) for t in texts)


def test_resume_equals_uninterrupted(seq2seq_dirs, demos_file, tmp_path):
    kw = {"train.max_steps": 6}
    train(_cfg(seq2seq_dirs["bart"], demos_file, tmp_path / "a", **kw))
    b = tmp_path / "b"
    train(_cfg(seq2seq_dirs["bart"], demos_file, b, **kw, **{"train.stop_after": 3}))
    assert not (b / "DONE.json").exists() and (b / "checkpoint" / "trainer_state.json").exists()
    train(_cfg(seq2seq_dirs["bart"], demos_file, b, **kw))
    wa, wb = saved_weights(tmp_path / "a"), saved_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    assert [r["step"] for r in read_jsonl(b / "metrics.jsonl")] == list(range(1, 7))


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_sft_saves_a_merged_model(seq2seq_dirs, demos_file, tmp_path, arch):
    out = tmp_path / "lora"
    train(_cfg(seq2seq_dirs[arch], demos_file, out, **{"train.max_steps": 3, "model.lora.enabled": "true"}))
    assert not any("lora" in k for k in saved_weights(out))  # merged: the base model's own tensor names
    model = AutoModelForSeq2SeqLM.from_pretrained(out / "model")
    before = AutoModelForSeq2SeqLM.from_pretrained(seq2seq_dirs[arch])
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, dict(before.named_parameters())[n])]
    # peft's default targets: the attention's query and value projections (BART q_proj/v_proj, T5 q/v)
    assert changed and all(re.search(r"(q_proj|v_proj|\.q|\.v)\.weight$", n) for n in changed)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_sample_equals_model_generate(seq2seq_dirs, arch):
    model, tok = load_model(seq2seq_dirs[arch])
    varied(model)
    prompts = [encode_prompt(tok, p) for p in ("add 3 plus 4", "reverse the word dog and the cat", "count")]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    out = sample(model, ids, mask, SamplingParams(max_new_tokens=12, temperature=0), eos_ids(model, tok),
                 tok.pad_token_id)
    said = set()
    for r, p in enumerate(prompts):  # each prompt alone, unpadded: ours in a padded batch must equal it
        want = model.generate(torch.tensor([p]), do_sample=False, num_beams=1, max_new_tokens=12)[0, 1:].tolist()
        got = out.tokens[r, :int(out.lengths[r])].tolist()
        assert got == want[:len(got)] and (len(got) == len(want) or want[len(got):] == [tok.pad_token_id] *
                                            (len(want) - len(got)))
        said.update(got)
    assert len(said) > 3  # the test model says more than EOS, or one token over and over
    # the sampled tokens' log-probs are the decoder's own (as the evaluation's KL scores them)
    lp = response_logprobs(model, prompts, [out.tokens[r, :int(out.lengths[r])].tolist() for r in range(3)],
                           tok.pad_token_id)
    for r in range(3):
        torch.testing.assert_close(torch.tensor(lp[r]), out.logprobs[r, :int(out.lengths[r])], atol=1e-4, rtol=1e-4)


def test_sampling_parameters_penalties_stops_and_n(seq2seq_dirs):
    model, tok = load_model(seq2seq_dirs["t5"])
    varied(model)
    prompt = _prompts(tok)[:1]
    p = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50, n=3, seed=5, logprobs=2,
                       frequency_penalty=0.5)
    a, b = generate(model, tok, prompt, p)[0], generate(model, tok, prompt, p)[0]
    assert [c.token_ids for c in a] == [c.token_ids for c in b] and len(a) == 3  # seeded: the same samples
    assert all(len(c.top_logprobs) == len(c.token_ids) for c in a)
    greedy = generate(model, tok, prompt, SamplingParams(max_new_tokens=10, temperature=0))[0][0]
    stop = greedy.text[2:4]
    cut = generate(model, tok, prompt, SamplingParams(max_new_tokens=10, temperature=0, stop=[stop]))[0][0]
    assert cut.finish_reason == "stop" and cut.text == greedy.text[:greedy.text.find(stop)]


@pytest.mark.usefixtures("one_torch_thread")
def test_serve_answers_the_openai_client(seq2seq_dirs, tmp_path):
    server = load_server(ServeConfig(model=seq2seq_dirs["bart"], device="cpu", audit_log=str(tmp_path / "a.jsonl")))
    model, tok = load_model(seq2seq_dirs["bart"])
    varied(model)
    varied(server.engine.runner.model)  # the server's copy, as the one compared with
    try:
        with live_server(create_app(server)) as url:
            c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
            prompt = _prompts(tok)[0]
            r = c.completions.create(model="bart", prompt=prompt, max_tokens=8, n=2, seed=3, temperature=0.8)
            want = generate(model, tok, [prompt], SamplingParams(max_new_tokens=8, n=2, seed=3, temperature=0.8))[0]
            assert [ch.text for ch in r.choices] == [w.text for w in want]
            chat = c.chat.completions.create(model="bart", messages=[{"role": "user", "content": "add 3 plus 4"}],
                                             max_tokens=8, temperature=0)
            greedy = generate(model, tok, [prompt], SamplingParams(max_new_tokens=8, temperature=0))[0][0]
            assert chat.choices[0].message.content == greedy.text
            stream = c.completions.create(model="bart", prompt=prompt, max_tokens=8, temperature=0, stream=True)
            assert "".join(ch.choices[0].text for ch in stream if ch.choices) == greedy.text
    finally:
        server.close()


def test_rm_ppo_and_dpo_refuse_an_encoder_decoder_model(seq2seq_dirs, tmp_path):
    d = seq2seq_dirs["t5"]
    ranks = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "hi", "responses": ["a", "b"], "ranks": [1, 2]}] * 4)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}] * 4)
    want = r"is an encoder-decoder model; encoder-decoder policies are supported in sft, generate, eval, serve"
    with pytest.raises(ConfigError, match=f"rm: model.name_or_path={d} " + want):
        rm_train(load_config(RMConfig, None, [f"model.name_or_path={d}", f"data.train={ranks}",
                                              f"out_dir={tmp_path / 'rm'}"]))
    with pytest.raises(ConfigError, match="dpo: .*" + want):
        dpo_train(load_config(DPOConfig, None, [f"model.name_or_path={d}", f"data.train={ranks}",
                                                f"out_dir={tmp_path / 'dpo'}"]))
    with pytest.raises(ConfigError, match="ppo: .*" + want):
        ppo_train(load_config(PPOConfig, None, [f"model.name_or_path={d}", f"reward_model.name_or_path={GOLD}",
                                                "ppo.value_model=policy", "ppo.ptx_coef=0", f"data.train={prompts}",
                                                f"out_dir={tmp_path / 'ppo'}"]))
    assert not (tmp_path / "rm").exists() and not (tmp_path / "dpo").exists() and not (tmp_path / "ppo").exists()


def test_eval_and_generate_best_of_n_with_a_causal_reward_model(seq2seq_dirs, tiny_model_dir, tmp_path):
    from instructgpt.evaluate import evaluate
    from instructgpt.modeling import save_model
    from instructgpt.reward import RewardNorm, init_reward_head

    rm_dir = str(tmp_path / "rm")  # the reward model is a causal LM with the same tokenizer
    rm, tok = load_model(tiny_model_dir, model_class="sequence_classification")
    init_reward_head(rm.score)
    save_model(rm, tok, rm_dir)
    RewardNorm().save(rm_dir)
    report = evaluate({"sft": seq2seq_dirs["bart"], "t5": seq2seq_dirs["t5"]}, reward_model=rm_dir, heldout=6,
                      best_of=2, max_new_tokens=4, batch_size=8, kl_prompts=3, n_resamples=50,
                      out_dir=str(tmp_path / "eval"))
    assert report["kl.sft"] == 0.0 and report["kl.t5"] == report["kl.t5"]  # a number, not NaN
    assert "ptx_perplexity.t5" not in report and "rm_score.best_of_2" in report
    # `instructgpt generate --best-of`: the encoder-decoder policy samples, the causal reward model picks
    from instructgpt.generate_cli import main as generate_main
    out = tmp_path / "best.jsonl"
    assert generate_main(["--model", seq2seq_dirs["bart"], "--prompt", "add 3 plus 4", "--best-of", "3",
                          "--reward-model", rm_dir, "--max-new-tokens", "4", "--seed", "0", "--out", str(out)]) == 0
    rows = read_jsonl(out)
    assert len(rows) == 1 and rows[0]
