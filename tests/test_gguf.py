"""GGUF input: a tiny random Llama written to a .gguf file with the `gguf` package (F32 tensors, llama.cpp names and
metadata keys), read back through instructgpt's path and compared with the original."""

import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from instructgpt.config import ConfigError, ModelConfig, StageConfig, load_config
from instructgpt.gguf_checkpoint import MARKER, GGUFError, cache_dir_for, dequantize_gguf
from instructgpt.modeling import load_model, save_model

N_LAYER, HIDDEN, FFN, N_HEAD, N_KV_HEAD, CTX = 2, 64, 128, 4, 2, 256
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_end|>"]  # eos, pad, and an end-of-turn token written as eot_token_id
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
TEXT = "the cat sees one apple and two pears.\n### Instruction:\nadd 12 plus 7"


def corpus(n: int = 400) -> list[str]:
    words = "apple pear plum cat dog bird red blue one two three four five add plus the word sort list of".split()
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) + f". {rng.randint(0, 99)}"
            for _ in range(n)]


def build_tokenizer():
    """A byte-level BPE (what GGUF calls tokenizer model 'gpt2'), trained offline in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[0],
                                   pad_token=SPECIALS[1], chat_template=CHAT_TEMPLATE)


def to_llama_cpp_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF keeps each head's rotary pairs as (first half, second half); llama.cpp interleaves them. (out, in) -> same."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, tok, path: str) -> str:
    """Write `model` and `tok` as an F32 GGUF file the way llama.cpp's converter lays one out."""
    cfg = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # tokenizer: vocabulary in id order, merges as "a b", special tokens marked CONTROL
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_eot_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for key, t in model.state_dict().items():
        module, kind = key.rsplit(".", 1)  # "model.layers.0.self_attn.q_proj", "weight"
        a = t.float().numpy()
        if module.endswith("q_proj"):
            a = to_llama_cpp_rotary(a, cfg.num_attention_heads)
        elif module.endswith("k_proj"):
            a = to_llama_cpp_rotary(a, cfg.num_key_value_heads)
        w.add_tensor(f"{names.get_name(module)}.{kind}", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """(original model, original tokenizer, path of its .gguf)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=N_LAYER,
                      num_attention_heads=N_HEAD, num_key_value_heads=N_KV_HEAD, max_position_embeddings=CTX,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    path = write_llama_gguf(model, tok, str(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"))
    return model, tok, path


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTRUCTGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def read_json(folder, name) -> dict:
    return json.loads(Path(folder, name).read_text())


def logits(model, tok, text=TEXT):
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(ids).logits  # (1, T, V)


def test_gguf_path_gives_the_original_logits_tokens_and_template(tiny_llama, cache):
    model, tok, path = tiny_llama
    loaded, ltok = load_model(path)
    assert ltok(TEXT)["input_ids"] == tok(TEXT, add_special_tokens=False)["input_ids"]
    assert (logits(loaded, ltok) - logits(model, tok)).abs().max() < 1e-4
    assert ltok.chat_template == CHAT_TEMPLATE and ltok.eos_token == "<|endoftext|>"
    assert ltok.pad_token == "<|pad|>" and len(ltok) == len(tok)  # pad already distinct: no embedding resize
    # the conversion went to the shared cache, and a directory + gguf_file names the same file (same cache entry)
    out = cache_dir_for(path)
    assert out.startswith(str(cache)) and os.path.exists(os.path.join(out, MARKER))
    again, _ = load_model(ModelConfig(name_or_path=os.path.dirname(path), gguf_file=os.path.basename(path)))
    assert torch.equal(logits(again, ltok), logits(loaded, ltok))
    name = os.path.basename(out)
    assert sorted(os.listdir(os.path.join(str(cache), "gguf"))) == [name, name + ".lock"]


def test_dequantized_checkpoint_is_plain_safetensors(tiny_llama, tmp_path, monkeypatch):
    model, tok, path = tiny_llama
    out = dequantize_gguf(path, out_dir=str(tmp_path / "base_model"))
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", MARKER} <= files
    assert not any(f.endswith(".gguf") for f in files)
    config = read_json(out, "config.json")
    assert "quantization_config" not in config and config["model_type"] == "llama"
    gen = read_json(out, "generation_config.json")
    assert gen["eos_token_id"] == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    marker = read_json(out, MARKER)
    assert marker["source"] == os.path.realpath(path) and marker["size"] == os.path.getsize(path)

    # loads with plain transformers, the `gguf` package out of reach
    monkeypatch.setitem(sys.modules, "gguf", None)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ptok = AutoTokenizer.from_pretrained(out)
    assert next(plain.parameters()).dtype == torch.float32
    assert ptok.chat_template == CHAT_TEMPLATE
    assert (logits(plain, ptok) - logits(model, tok)).abs().max() < 1e-4


def test_second_call_is_a_noop_and_a_changed_source_is_converted_again(tiny_llama, tmp_path, monkeypatch):
    import instructgpt.gguf_checkpoint as gc

    _, _, src = tiny_llama
    path = str(tmp_path / "copy.gguf")
    Path(path).write_bytes(Path(src).read_bytes())
    out = dequantize_gguf(path)
    weights = os.path.join(out, "model.safetensors")
    before = os.stat(weights).st_mtime_ns

    def no_load(p):
        raise AssertionError("converted again")

    with monkeypatch.context() as m:
        m.setattr(gc, "load_dense", no_load)
        assert dequantize_gguf(path) == out  # complete and unchanged: nothing is read
    assert os.stat(weights).st_mtime_ns == before

    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the source changes (a new mtime)
    assert dequantize_gguf(path) == out
    assert read_json(out, MARKER)["mtime_ns"] == st.st_mtime_ns + 10**9
    assert not [f for f in os.listdir(os.path.dirname(out)) if ".tmp-" in f or f.endswith(".old")]


def test_finetuned_gguf_model_saves_and_reloads(tiny_llama, tmp_path, demos_file):
    """SFT through its real entry point from a .gguf, then the saved model/ reloads as a plain checkpoint."""
    from transformers import AutoModelForCausalLM

    from instructgpt.sft import SFTConfig, train

    model, tok, path = tiny_llama
    out = tmp_path / "sft"
    train(load_config(SFTConfig, None, [f"model.name_or_path={path}", f"data.train={demos_file}", f"out_dir={out}",
                                        "train.max_steps=2", "train.batch_size=4", "train.lr=1e-2",
                                        "data.eval_size=0", "train.log_every=1"]))
    tuned = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    diff = (logits(tuned, tok) - logits(model, tok)).abs().max()
    assert diff > 1e-3  # it trained
    again, ltok = load_model(str(out / "model"))
    assert torch.equal(logits(again, ltok), logits(tuned, tok))


def test_model_transformers_loaded_from_gguf_saves_through_save_model(tiny_llama, tmp_path):
    """transformers' own GGUF loading leaves a quantizer that refuses save_pretrained; save_model drops it."""
    from transformers import AutoModelForCausalLM

    model, tok, path = tiny_llama
    direct = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=torch.float32)
    if getattr(direct, "hf_quantizer", None) is not None:  # transformers >= 5
        with pytest.raises(ValueError, match="not serializable"):
            direct.save_pretrained(str(tmp_path / "refused"))
    save_model(direct, tok, str(tmp_path / "saved"))
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved")).eval()
    assert "quantization_config" not in read_json(tmp_path / "saved", "config.json")
    assert (logits(plain, tok) - logits(model, tok)).abs().max() < 1e-4


def test_missing_or_corrupt_gguf_is_an_error_naming_the_file(tiny_llama, tmp_path):
    _, _, path = tiny_llama
    missing = str(tmp_path / "nowhere" / "model.gguf")
    with pytest.raises(GGUFError, match="not found: .*nowhere/model.gguf"):
        load_model(missing)
    with pytest.raises(GGUFError, match="not found: .*other.gguf"):
        dequantize_gguf(os.path.dirname(path), "other.gguf")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(GGUFError, match="garbage.gguf: not a GGUF file"):
        load_model(str(garbage))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(Path(path).read_bytes()[:5000])  # right magic, cut in the middle of the metadata
    with pytest.raises(GGUFError, match="truncated.gguf: cannot load"):
        dequantize_gguf(str(truncated))
    assert not os.path.exists(cache_dir_for(str(truncated)))  # nothing half-written is left as "converted"
    # through a stage's CLI: a clean error message and exit code 2, not a traceback
    from instructgpt.cli import main

    assert main(["sft", f"model.name_or_path={missing}", f"out_dir={tmp_path / 'sft'}"]) == 2
    with pytest.raises(ConfigError, match="model.gguf_file"):
        load_config(StageConfig, None, [f"model.name_or_path={path}", "model.gguf_file=x.gguf"])


def test_generate_cli_takes_a_gguf_file(tiny_llama, capsys):
    from instructgpt.generate_cli import main
    from instructgpt.generation import SamplingParams, generate
    from instructgpt.prompting import render_prompt

    _, _, path = tiny_llama
    assert main(["--model", path, "--prompt", "add 1 plus 2", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    model, tok = load_model(path)
    want = generate(model, tok, [render_prompt(tok, "add 1 plus 2")], SamplingParams(max_new_tokens=5, temperature=0))
    assert capsys.readouterr().out == want[0][0].text + "\n"
