"""``instructgpt pretrain``: language-model pretraining, from scratch or continued.

From scratch (``init.from_scratch: true``, the default) it trains a byte-level BPE tokenizer with ``tokenizers`` on
the training text and initialises a GPT-2 of the configured size; this is how the shipped base model
(``builtin:base``) was made, with ``configs/pretrain.yaml``. Otherwise it continues pretraining
``model.name_or_path``. The loop is SFT's (`supervised.fit`) with every token trainable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from instructgpt.batching import text_blocks
from instructgpt.config import ConfigError, StageConfig
from instructgpt.data import load_pretrain_text
from instructgpt.modeling import load_model, load_tokenizer, save_model, set_seed
from instructgpt.runs import StageRun, releases_out_dir
from instructgpt.supervised import fit
from instructgpt.training import full_model, make_accelerator

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


@dataclass
class InitConfig:
    from_scratch: bool = True  # train a tokenizer and initialise a GPT-2; false: continue model.name_or_path
    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 512
    tokenizer_chars: int = 4_000_000  # characters of training text the tokenizer is trained on


@dataclass
class PretrainConfig(StageConfig):
    init: InitConfig = field(default_factory=InitConfig)
    eval_blocks: int = 64  # held-out blocks for eval loss (data.eval, default: the held-out plays)

    def __post_init__(self):
        if self.data.train is None:
            self.data.train = "builtin:pretrain"
        if self.data.eval is None:
            self.data.eval = "builtin:shakespeare?split=heldout"

    def validate(self) -> None:
        super().validate()
        if self.init.n_embd % self.init.n_head:
            raise ConfigError(f"init.n_embd ({self.init.n_embd}) must be a multiple of init.n_head "
                              f"({self.init.n_head})")
        if self.data.max_length > self.init.n_positions and self.init.from_scratch:
            raise ConfigError("data.max_length must be <= init.n_positions")


def train_tokenizer(texts: list[str], vocab_size: int, max_chars: int):
    """Byte-level BPE (GPT-2 style) trained on the first `max_chars` characters of `texts`."""

    def sample():
        used = 0
        for t in texts:
            if used >= max_chars:
                return
            yield t[: max_chars - used]
            used += len(t)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|pad|>")


def init_model(tokenizer, init: InitConfig, dropout: float | None):
    p = 0.0 if dropout is None else dropout  # one pass over a few MB: dropout only slows learning
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=init.n_positions, n_embd=init.n_embd,
                     n_layer=init.n_layer, n_head=init.n_head, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@releases_out_dir
def train(cfg: PretrainConfig) -> str:
    acc = make_accelerator(cfg)
    run = StageRun(cfg, "pretrain", acc)
    if run.prepare() == "done":
        acc.print(f"[pretrain] {cfg.out_dir} is already finished (DONE.json); nothing to do")
        return cfg.out_dir
    set_seed(cfg.seed)
    texts = list(load_pretrain_text(cfg.data.train, skip_bad=cfg.data.skip_bad_lines))
    if cfg.init.from_scratch:
        # the tokenizer is part of the checkpoint: train it once, then reuse it on resume
        tok_dir = run.path("tokenizer")
        if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
            tokenizer = train_tokenizer(texts, cfg.init.vocab_size, cfg.init.tokenizer_chars)
            if acc.is_main_process:
                with run.writing(tok_dir):
                    tokenizer.save_pretrained(tok_dir + ".tmp")
                    os.replace(tok_dir + ".tmp", tok_dir)
            acc.wait_for_everyone()
        tokenizer = load_tokenizer(tok_dir)
        set_seed(cfg.seed)  # the initial weights depend on the seed only
        model = init_model(tokenizer, cfg.init, cfg.model.dropout)
        model.train()
    else:
        model, tokenizer = load_model(cfg.model, for_training=True)
    train_ex = text_blocks(tokenizer, texts, cfg.data.max_length)
    eval_ex = []
    if cfg.data.eval:
        eval_ex = text_blocks(tokenizer, list(load_pretrain_text(cfg.data.eval)), cfg.data.max_length)
        eval_ex = eval_ex[:: max(1, len(eval_ex) // cfg.eval_blocks)][: cfg.eval_blocks]
    acc.print(f"[pretrain] {len(train_ex)} blocks of {cfg.data.max_length} tokens, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    res = fit(cfg, run, acc, model, tokenizer, train_ex, eval_ex, desc="pretrain")
    if res.step < cfg.train.max_steps:
        return cfg.out_dir
    whole = full_model(acc, res.model)  # every process: a sharded model is gathered onto the main one
    if acc.is_main_process:
        with run.writing(run.path("model")):
            save_model(whole, tokenizer, run.path("model"), consume=True)
    run.finish({"steps": res.step, "eval_loss": res.eval_loss, "tokens_per_s": res.tokens_per_s,
                "train_blocks": len(train_ex)})
    return cfg.out_dir
