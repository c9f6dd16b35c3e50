"""Supervised fine-tuning on demonstrations: ``instructgpt sft`` (the paper's step 1).

Loss on response (assistant) tokens only; optional packing; cosine decay to 10% of the peak (the paper); optional
LoRA (merged on save); optional pretraining mix L = L_CE + pretrain_coef * L_LM (the paper's PPO starting point was an
SFT run with 10% pretraining data). The loop is `supervised.fit`, shared with ``instructgpt pretrain``.

An encoder-decoder model (BART, T5) trains on the last assistant turn of each demonstration: the encoder reads the
conversation before it, the loss is on the decoder's tokens (`Seq2SeqExample`); packing and the pretraining mix are
decoder-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from instructgpt.batching import Example, Seq2SeqExample, pack, pretrain_blocks, split_eval
from instructgpt.config import ConfigError, StageConfig
from instructgpt.data import DataError, Demonstration, check_sources, encode_each, load_demonstrations
from instructgpt.modeling import apply_lora, check_context, is_encoder_decoder, load_model, save_model, set_seed
from instructgpt.prompting import encode_answers, encode_exchange
from instructgpt.runs import StageRun, releases_out_dir
from instructgpt.supervised import fit, packing_isolates
from instructgpt.training import full_model, make_accelerator

DEFAULT_DEMOS = "builtin:task-demos"


@dataclass
class SFTConfig(StageConfig):
    def __post_init__(self):
        if self.data.train is None:
            self.data.train = DEFAULT_DEMOS


# --------------------------------------------------------------------------------------------------------------------
# Data -> examples


def demonstration_examples(tokenizer, demo: Demonstration, max_length: int) -> list[Example]:
    """A demonstration's training rows: one, or one per answer where the chat template rewrites earlier turns
    (`prompting.encode_answers`)."""
    encoded = encode_answers(tokenizer, demo.messages)
    for ids, mask in encoded:
        if not any(mask):
            raise DataError(demo.file, demo.line, "response", "empty response (no tokens to learn from)")
        if len(ids) > max_length:
            # Never cut the response away silently: the example is an error (or a counted skip).
            raise DataError(demo.file, demo.line, "response",
                            f"example is {len(ids)} tokens, longer than data.max_length={max_length}")
    return [Example(ids, mask) for ids, mask in encoded]


def seq2seq_example(tokenizer, demo: Demonstration, max_length: int, decoder_start_token_id: int) -> Seq2SeqExample:
    """An encoder-decoder model's row: the prompt for the encoder, the last assistant turn (with EOS) for the decoder;
    each at most `max_length` tokens."""
    prompt, response = encode_exchange(tokenizer, demo.messages)
    for name, ids in (("prompt", prompt), ("response", response)):
        if len(ids) > max_length:
            raise DataError(demo.file, demo.line, name,
                            f"{name} is {len(ids)} tokens, longer than data.max_length={max_length}")
    return Seq2SeqExample(prompt, [decoder_start_token_id] + response[:-1], response)


def build_examples(tokenizer, demos: Sequence[Demonstration], max_length: int, skip_bad: bool = False,
                   decoder_start_token_id: int | None = None) -> tuple[list[Example | Seq2SeqExample], int]:
    """Training rows of `demos` (`demonstration_examples`), and how many demonstrations were skipped (`skip_bad`).
    With `decoder_start_token_id` (an encoder-decoder model's), `Seq2SeqExample` s."""

    def rows(demo: Demonstration) -> list[Example | Seq2SeqExample]:
        if decoder_start_token_id is None:
            return demonstration_examples(tokenizer, demo, max_length)
        return [seq2seq_example(tokenizer, demo, max_length, decoder_start_token_id)]

    encoded, skipped = encode_each(demos, rows, skip_bad)
    return [row for _, demo_rows in encoded for row in demo_rows], skipped


def data_sources(cfg: SFTConfig) -> list[str | None]:
    """The data the run reads (None: none there): demonstrations, held-out ones, the pretraining mix's text."""
    return [cfg.data.train, cfg.data.eval, cfg.data.pretrain if cfg.train.pretrain_coef > 0 else None]


@releases_out_dir
def train(cfg: SFTConfig) -> str:
    """Run SFT; returns the out_dir. Rerun on the same out_dir to resume; a finished run says so and exits."""
    acc = make_accelerator(cfg)
    run = StageRun(cfg, "sft", acc)
    status = run.prepare()
    if status == "done":
        acc.print(f"[sft] {cfg.out_dir} is already finished (DONE.json); nothing to do")
        return cfg.out_dir
    set_seed(cfg.seed)
    check_sources(*data_sources(cfg))
    # the demonstrations read before the model loads (minutes for a large one): a bad line is named first
    demos = load_demonstrations(cfg.data.train, skip_bad=cfg.data.skip_bad_lines)
    eval_demos = load_demonstrations(cfg.data.eval, skip_bad=cfg.data.skip_bad_lines) if cfg.data.eval else None
    model, tokenizer = load_model(cfg.model, for_training=True)
    check_context(model, cfg.data.max_length)
    start_id = None  # a decoder-only model's examples; an encoder-decoder's decoder starts with this token
    if is_encoder_decoder(model):
        start_id = model.config.decoder_start_token_id
        if start_id is None:
            raise ConfigError(f"model.name_or_path={cfg.model.name_or_path}: an encoder-decoder model without a "
                              "decoder_start_token_id in its config")
        if cfg.data.packing or (cfg.data.pretrain and cfg.train.pretrain_coef > 0):
            raise ConfigError("data.packing and the pretraining mix (data.pretrain, train.pretrain_coef) are for "
                              f"decoder-only models; {cfg.model.name_or_path} is an encoder-decoder model")
    if cfg.model.lora.enabled:
        model = apply_lora(model, cfg.model.lora)

    train_ex, skipped = build_examples(tokenizer, demos, cfg.data.max_length, cfg.data.skip_bad_lines, start_id)
    skipped += demos.skipped
    if eval_demos is not None:
        eval_ex, _ = build_examples(tokenizer, eval_demos, cfg.data.max_length, cfg.data.skip_bad_lines, start_id)
    else:
        train_ex, eval_ex = split_eval(train_ex, cfg.data.eval_size, cfg.seed)
    if skipped:
        acc.print(f"[sft] skipped {skipped} bad examples (data.skip_bad_lines)")
    if cfg.data.packing:
        if not packing_isolates(model):
            raise ConfigError("data.packing: this model's attention does not keep packed examples apart (a packed "
                              "example's logits differ from its own; transformers >= 4.53 and a model that builds its "
                              "masks through it are needed); set data.packing=false")
        train_ex = pack(train_ex, cfg.data.max_length)
    ptx_ex = None
    if cfg.data.pretrain and cfg.train.pretrain_coef > 0:
        ptx_ex = pretrain_blocks(tokenizer, cfg.data)

    res = fit(cfg, run, acc, model, tokenizer, train_ex, eval_ex, ptx_ex, desc="sft")
    if res.step < cfg.train.max_steps:
        return cfg.out_dir
    whole = full_model(acc, res.model)  # every process: a sharded model is gathered onto the main one
    if acc.is_main_process:
        with run.writing(run.path("model")):
            save_model(whole, tokenizer, run.path("model"), consume=True)
    run.finish({"steps": res.step, "eval_loss": res.eval_loss, "tokens_per_s": res.tokens_per_s,
                "train_examples": len(train_ex), "skipped": skipped})
    return cfg.out_dir
