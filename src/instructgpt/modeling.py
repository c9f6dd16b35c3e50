"""Loading and saving causal LMs and tokenizers, and the log-prob math every stage shares.

Everything goes through Hugging Face ``transformers``: a model id, a local directory, ``builtin:base`` (the tiny GPT-2
shipped in the package) or a GGUF file take the same path, and what we save loads with plain
``AutoModelForCausalLM.from_pretrained``. An encoder-decoder checkpoint (BART, T5: ``config.is_encoder_decoder``)
loads as ``AutoModelForSeq2SeqLM`` and saves the same way; SFT, generation, evaluation and serving take it, the
reward model, PPO and DPO do not (`require_decoder_only`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import shutil
import weakref

import numpy as np
import torch
from peft import LoraConfig as PeftLoraConfig, TaskType, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                          AutoTokenizer)
from transformers.pytorch_utils import Conv1D

from instructgpt import builtin
from instructgpt.config import ConfigError, ModelConfig
from instructgpt.files import replace_dir
from instructgpt.gguf_checkpoint import dequantize_gguf, drop_gguf_quantizer, is_gguf_source

try:  # transformers >= 4.53: attention functions registered by name
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:
    AttentionInterface = None

PAD_TOKEN = "<|pad|>"
_DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "attention_dropout",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout")


def pick_device(name: str = "auto") -> str:
    """The device inference runs on: "auto" is cuda when a GPU is visible, else cpu; anything else ("cpu", "cuda:1")
    is checked and returned as is. Training stages place their models through accelerate instead."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device: {e}") from None
    return name


def resolve_path(name_or_path: str, gguf_file: str | None = None) -> str:
    """``builtin:base`` -> the package's base model directory; a GGUF file (``x.gguf``, or a directory or hub id with
    `gguf_file`) -> its de-quantised Hugging Face checkpoint (converted on first use, see gguf_checkpoint); anything
    else unchanged."""
    if name_or_path.startswith("builtin:"):
        name_or_path = builtin.model_path(name_or_path)
        if not name_or_path.endswith(".gguf"):
            return name_or_path
    if is_gguf_source(name_or_path, gguf_file):
        return dequantize_gguf(name_or_path, gguf_file)
    return name_or_path


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    tok = AutoTokenizer.from_pretrained(resolve_path(name_or_path), trust_remote_code=trust_remote_code)
    tok.padding_side = "left"  # generation and PPO rollouts pad on the left
    return tok


def ensure_pad_token(model, tokenizer) -> None:
    """PPO needs a pad token distinct from EOS (so "stopped at EOS" is visible); add one if the tokenizer lacks it."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        model.config.pad_token_id = tokenizer.pad_token_id
        return
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if model is not None:
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id


def load_model(name_or_path: str | ModelConfig, *, for_training: bool = False, with_tokenizer: bool = True,
               model_class: str = "causal_lm", num_labels: int = 1):
    """Load (model, tokenizer). `name_or_path` may be a ModelConfig (dropout, dtype, GGUF file, chat template are
    then applied)."""
    mcfg = name_or_path if isinstance(name_or_path, ModelConfig) else ModelConfig(name_or_path=name_or_path)
    path = resolve_path(mcfg.name_or_path, mcfg.gguf_file)  # a GGUF file: its de-quantised copy, a plain checkpoint
    kwargs = {"trust_remote_code": mcfg.trust_remote_code}
    config = AutoConfig.from_pretrained(path, **kwargs)
    if mcfg.dropout is not None:
        for k in _DROPOUT_KEYS:
            if hasattr(config, k) and isinstance(getattr(config, k), float):
                setattr(config, k, mcfg.dropout)
    if getattr(config, "activation_function", None) == "gelu_new":
        # the same tanh-approximated GELU (to 1e-7) as one fused op instead of five: ~12% faster fwd+bwd on CPU
        config.activation_function = "gelu_pytorch_tanh"
    dtype = getattr(torch, mcfg.dtype)
    if model_class == "sequence_classification":
        config.num_labels = num_labels
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=dtype, **kwargs)
    elif getattr(config, "is_encoder_decoder", False):  # BART, T5: the encoder reads the prompt, the decoder answers
        model = AutoModelForSeq2SeqLM.from_pretrained(path, config=config, dtype=dtype, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, **kwargs)
    tokenizer = load_tokenizer(path, mcfg.trust_remote_code) if with_tokenizer else None
    if tokenizer is not None:
        if mcfg.chat_template:
            tokenizer.chat_template = mcfg.chat_template
        ensure_pad_token(model, tokenizer)
    if for_training and mcfg.gradient_checkpointing:
        # non-reentrant: works with frozen inputs (LoRA) without enable_input_require_grads; active in train mode only
        ckpt = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
    model.train(for_training)
    return model, tokenizer


def is_encoder_decoder(model) -> bool:
    """Whether `model` (a peft wrapper too) or a model config is an encoder-decoder (BART, T5)."""
    config = getattr(model, "config", model)
    return bool(getattr(config, "is_encoder_decoder", False))


def require_decoder_only(mcfg: ModelConfig, stage: str) -> None:
    """Refuse an encoder-decoder model (read from its config, before any weights load) in a stage that takes only
    decoder-only ones (the reward model, PPO, DPO)."""
    path = resolve_path(mcfg.name_or_path, mcfg.gguf_file)
    if is_encoder_decoder(AutoConfig.from_pretrained(path, trust_remote_code=mcfg.trust_remote_code)):
        raise ConfigError(f"{stage}: model.name_or_path={mcfg.name_or_path} is an encoder-decoder model; "
                          "encoder-decoder policies are supported in sft, generate, eval, serve and best-of-n only "
                          f"(the {stage} stage needs a decoder-only causal LM)")


def context_length(model_config, tokenizer=None, default: int = 2048) -> int:
    """The longest prompt + completion a model takes (GPT-2: n_positions; most others: max_position_embeddings)."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        v = getattr(model_config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    m = getattr(tokenizer, "model_max_length", None)
    return m if isinstance(m, int) and 0 < m < 10**7 else default


def disable_dropout(model) -> None:
    """Every dropout module's p to 0 (peft's LoRA dropout too), so train mode computes what eval mode does (DPO and
    PPO with gradient checkpointing, which Hugging Face models apply in train mode only). Dropout a model applies
    functionally from its config (attention dropout) is zeroed at load: `model.dropout=0`."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def check_context(model, max_length: int) -> None:
    """Refuse a data.max_length beyond the model's positions (`max_position_embeddings`): with learned positions
    (GPT-2) the first example that long fails with an IndexError mid-run, with rotary ones (Llama, Pythia) it runs on
    positions the model never saw."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context and max_length > context:
        raise ConfigError(f"data.max_length={max_length} is longer than the model's context ({context} positions)")


# The attention projections LoRA adapts where peft names none for a model type: the query and value projections (the
# LoRA paper's W_q and W_v, peft's choice for Llama, Qwen, Mistral ...), else a fused query-key-value projection
LORA_FALLBACK_TARGETS = (("q_proj", "v_proj"), ("qkv_proj",), ("query_key_value",), ("Wqkv",), ("c_attn",),
                         ("query", "value"))


def lora_target_modules(model, configured: list[str] | None) -> list[str]:
    """The modules LoRA adapts: `configured` (model.lora.target_modules) as given; else peft's default for the model
    type; else, where peft has none (Phi-3, SmolLM3, OLMo-2 ...), the first of LORA_FALLBACK_TARGETS whose names
    all name linear layers of `model`."""
    if configured:
        return list(configured)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    mapped = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if mapped:
        return [mapped] if isinstance(mapped, str) else sorted(mapped)
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, Conv1D))}
    for names in LORA_FALLBACK_TARGETS:
        if all(n in linear for n in names):
            return list(names)
    raise ConfigError(f"model.lora.target_modules: peft has no default for model type {model_type!r} and none of "
                      f"{[list(t) for t in LORA_FALLBACK_TARGETS]} names its layers; name the linear layers to adapt")


def apply_lora(model, lora_cfg, task: str = "causal_lm"):
    """Wrap `model` with a peft LoRA adapter (merged back into the weights on save) on `lora_target_modules`. task
    "seq_cls" (reward and value models) also trains the scalar head in full; an encoder-decoder model gets peft's
    seq2seq task."""
    if task == "seq_cls":
        task_type = TaskType.SEQ_CLS
    else:
        task_type = TaskType.SEQ_2_SEQ_LM if is_encoder_decoder(model) else TaskType.CAUSAL_LM
    targets = lora_target_modules(model, lora_cfg.target_modules)
    # GPT-2's Conv1D stores its weight transposed (in, out): peft's fan_in_fan_out, which peft would otherwise set
    # itself, with a warning, for every such layer
    targeted = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets]
    conv1d = bool(targeted) and all(isinstance(m, Conv1D) for m in targeted)
    pc = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=targets, task_type=task_type, fan_in_fan_out=conv1d)
    return get_peft_model(model, pc)


def save_model(model, tokenizer, out: str, *, consume: bool = False) -> None:
    """Save a plain Hugging Face checkpoint (safetensors + tokenizer) atomically, LoRA adapters merged.

    peft's ``merge_and_unload`` rewrites the model in place (its adapters gone), so by default a copy is merged and
    the model passed in goes on training as it was (PPO's ``keep_best`` saves mid-run). ``consume=True``, for a
    stage's last use of its model, merges in place instead and spares the copy's memory.
    """
    if hasattr(model, "merge_and_unload"):
        model = (model if consume else copy.deepcopy(model)).merge_and_unload()
    model = drop_gguf_quantizer(model)  # loaded by transformers straight from a GGUF: save_pretrained would refuse
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save (a full disk) leaves no half-written copy behind
        raise


# --------------------------------------------------------------------------------------------------------------------
# Log-prob math


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: exclusive cumsum of the mask (pad positions get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits divided by the sampling temperature (no division at 1, where it changes nothing)."""
    return logits.float() / temperature if temperature != 1.0 else logits.float()


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[labels] in fp32, without materialising the (B, T, V) log-softmax; its
    gradient is written into one tensor of the logits' shape (`LabelLogprobs`). Shapes (B, T, V) or (B, T + 1, V),
    (B, T) -> (B, T): logits at one position more than the labels (a model's logits up to a row's last position, which
    predicts nothing in the row) leave out the last, with a gradient of 0 there and no slice to copy it through."""
    return LabelLogprobs.apply(logits, labels, float(temperature))


class LabelLogprobs(torch.autograd.Function):
    """y = z[label] - logsumexp(z), z = logits / T, with the backward d logits = (onehot(label) - softmax(z)) * dy / T
    computed in place in one fresh tensor of the logits' shape (0 at a last position without a label). Autograd's
    gather + logsumexp (+ division) backward allocates three vocabulary-wide tensors and passes over them about eight
    times, a cost that grows with the vocabulary, and a slice of the logits adds a zero-filled one and a copy into it;
    the gradient is the same (bitwise at T = 1)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
        if logits.shape[1] not in (labels.shape[1], labels.shape[1] + 1):
            raise ValueError(f"logits at {logits.shape[1]} positions for {labels.shape[1]} labels")
        z = scaled_logits(logits[:, :labels.shape[1]], temperature)
        lse = torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature = temperature
        return torch.gather(z, -1, labels.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        t, T = ctx.temperature, labels.shape[1]
        d = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)  # fp32, as scaled_logits
        # softmax(z) into it: (z - lse).exp(), as logsumexp's own backward computes it
        p = torch.sub(scaled_logits(logits[:, :T], t), lse.unsqueeze(-1), out=d[:, :T]).exp_()
        g = scaled_logits(grad, t)
        p.mul_(g.neg().unsqueeze(-1)).scatter_add_(-1, labels.unsqueeze(-1), g.unsqueeze(-1))
        d[:, T:].zero_()
        return d.to(logits.dtype), None, None


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits with position ids that ignore left padding. (B, T) -> (B, T, V)."""
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..T-1, logits divided by `temperature` (as when sampling). (B, T) -> (B, T-1)."""
    logits = forward_logits(model, input_ids, attention_mask)  # (B, T, V): the last predicts nothing in the row
    return logprobs_from_logits(logits, input_ids[:, 1:], temperature)


def decoder_stack(model) -> tuple[torch.nn.Module, torch.nn.ModuleList] | None:
    """(the module that runs them, the layers): `model`'s one list of `config.num_hidden_layers` decoder layers (GPT-2's
    `h`, Llama's, Qwen's and GPT-NeoX's `layers`) and its owner (GPT2Model, LlamaModel, ...), through a DDP or peft
    wrapper. None where there is no such list."""
    inner = getattr(model, "module", model)  # DDP's and DeepSpeed's wrappers hold the model as .module
    n = getattr(getattr(inner, "config", None), "num_hidden_layers", None)
    if not n:
        return None
    lists = [m for m in inner.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if len(lists) != 1:
        return None
    owner = next(m for m in inner.modules() if any(c is lists[0] for c in m.children()))
    return owner, lists[0]


def last_layer_mlp(model) -> torch.nn.Module | None:
    """The MLP of `model`'s last decoder layer (`decoder_stack`): None where there is no stack, or its last layer has
    no `mlp`."""
    stack = decoder_stack(model)
    return getattr(stack[1][-1], "mlp", None) if stack is not None else None


@contextlib.contextmanager
def _on_rows(modules, take):
    """Within: each of `modules` (position-wise: an MLP, a projection) runs on some rows of its input alone.
    `take(x)` -> (those rows, put), or None to run the module whole; put(y) places the module's output on them back in
    the input's shape, with zeros elsewhere. Another input of the input's shape (BLOOM's MLP adds the residual
    itself) is taken at the same rows. An output tuple (a mixture of experts' router logits after the hidden states)
    keeps its other items."""
    pending: dict = {}  # a module -> its `put`, from its pre-hook to its hook

    def before(module, args, kwargs):
        x = args[0] if args else None
        picked = take(x) if torch.is_tensor(x) else None
        pending.pop(module, None)
        if picked is None:
            return None
        pending[module] = picked[1]

        def rows(t):
            return take(t)[0] if torch.is_tensor(t) and t.shape == x.shape else t

        return (picked[0], *map(rows, args[1:])), {k: rows(v) for k, v in kwargs.items()}

    def after(module, args, out):
        put = pending.pop(module, None)
        if put is None:
            return None
        y = put(out if torch.is_tensor(out) else out[0])
        return y if torch.is_tensor(out) else (y, *out[1:])

    hooks = [h for m in modules
             for h in (m.register_forward_pre_hook(before, with_kwargs=True), m.register_forward_hook(after))]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def mlps_skip_padding(model, skip_last: bool = False):
    """Within: each decoder layer's MLP runs at the real tokens alone (the 1s of the `attention_mask` its stack is
    called with) and adds 0 at the padding; `skip_last`: not the last layer's (`last_mlp_only_at` trims that one). An
    MLP reads its own position alone, and a padding position's hidden state reaches no real token (masked as a key),
    so every real token's result is the full forward's; the padding's are not the model's. A forward without padding,
    with a 4-D mask or none, or a decode step (one new token against a longer mask) runs as it would without. A no-op
    where `decoder_stack` finds no stack. Not under gradient checkpointing: its backward reruns a layer's forward
    after the stack's, without the mask."""
    found = decoder_stack(model)
    if found is None:
        yield
        return
    owner, layers = found
    state: dict = {}  # this stack forward's mask shape (B, T) and its real tokens' flat indices (N,)

    def read_mask(module, args, kwargs):
        state.clear()
        mask = kwargs.get("attention_mask")
        tokens = kwargs.get("inputs_embeds")
        tokens = kwargs.get("input_ids", args[0] if args else None) if tokens is None else tokens
        if (torch.is_tensor(mask) and mask.dim() == 2 and torch.is_tensor(tokens) and tokens.dim() >= 2
                and tokens.shape[1] == mask.shape[1] and not bool(mask.all())):  # not a decode step's forward
            state["shape"], state["real"] = tuple(mask.shape), mask.flatten().nonzero().squeeze(1)

    def forget(module, args, kwargs, out):
        state.clear()

    def take(x):
        if not state or x.dim() != 3 or tuple(x.shape[:2]) != state["shape"]:
            return None
        (B, T), real = state["shape"], state["real"]
        return (x.reshape(-1, x.shape[-1]).index_select(0, real)[None],  # (1, N, d)
                lambda y: y.new_zeros(B * T, y.shape[-1]).index_copy(0, real, y[0]).view(B, T, -1))

    hooks = [owner.register_forward_pre_hook(read_mask, with_kwargs=True),
             owner.register_forward_hook(forget, with_kwargs=True)]
    mlps = [layer.mlp for layer in (layers[:-1] if skip_last else layers) if hasattr(layer, "mlp")]
    try:
        with _on_rows(mlps, take):
            yield
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def last_mlp_only_at(model, where: int | torch.Tensor | None):
    """Within: the MLP of `model`'s last decoder layer runs only where its outputs are read, and adds 0 elsewhere:
    at the last `where` positions of every row (an int; PPO's response positions, left-padded queries), or at one
    position per row (a (B,) tensor; a right-padded row's last token, which a reward model reads). An MLP reads its
    own position alone and no layer reads the last one's output, so the final hidden states there, and the logits or
    values read there, are the full forward's; elsewhere they are not the model's. What `logits_to_keep` does for the
    LM head, one layer deeper. A no-op with `where` None, or where `last_layer_mlp` finds no MLP."""
    mlp = last_layer_mlp(model) if where is not None else None
    if mlp is None:
        yield
        return
    per_row = torch.is_tensor(where)

    def take(x):
        if x.dim() != 3 or (not per_row and x.shape[1] <= where) or (per_row and x.shape[0] != len(where)):
            return None
        B, T = x.shape[:2]
        if per_row:  # (B, 1, d): each row's one position, put back in place with zeros around it
            rows, cols = torch.arange(B, device=x.device), where.to(x.device)
            return (x[rows, cols].unsqueeze(1),
                    lambda y: y.new_zeros((B, T) + y.shape[2:]).index_put((rows, cols), y[:, 0]))
        return _last_positions(x, where)

    with _on_rows([mlp], take):
        yield


# The attention function `last_attention_only_at` gives the module it trims (by this name, in a copy of the module's
# config), and what each trimmed module keeps: module -> (the last positions whose queries attend, the attention
# function it uses otherwise)
LAST_POSITIONS_ATTENTION = "instructgpt_last_positions"
_TRIMMED_ATTENTION: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def last_positions_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention of a module that `last_attention_only_at` trims: its own function (sdpa, ...) for the queries
    of the last `where` positions alone, against the keys and values of every position, and zeros for the queries
    before them. query (B, H, T, D) -> (B, T, H, D), as every attention function returns it. A forward with a KV
    cache (fewer queries than keys), or with a position bias over every query, runs whole. Its masks are sdpa's:
    (B or 1, 1 or H, T, T) boolean, or None for plain causal attention."""
    where, impl = _TRIMMED_ATTENTION[module]
    attend = ALL_ATTENTION_FUNCTIONS[impl]
    T = query.shape[2]
    if T <= where or key.shape[2] != T or kwargs.get("position_bias") is not None:
        return attend(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None:  # the rows of the queries kept
        mask = attention_mask[:, :, -where:]
    elif getattr(module, "is_causal", True):  # no padding: causal, and the kept query i sits at position T - where + i
        mask = torch.ones(1, 1, where, T, dtype=torch.bool, device=query.device).tril(T - where)
    else:
        mask = None
    out, weights = attend(module, query[:, :, -where:], key, value, mask, **kwargs)  # (B, where, H, D)
    return torch.nn.functional.pad(out, (0, 0, 0, 0, T - where, 0)), weights


if AttentionInterface is not None:
    AttentionInterface.register(LAST_POSITIONS_ATTENTION, last_positions_attention)
    AttentionMaskInterface.register(LAST_POSITIONS_ATTENTION, sdpa_mask)


def last_layer_attention(model) -> torch.nn.Module | None:
    """The self-attention module of `model`'s last decoder layer (`decoder_stack`): Llama's `self_attn`, GPT-2's
    `attn`, GPT-NeoX's `attention`; None where there is no stack or no such module."""
    stack = decoder_stack(model)
    layer = stack[1][-1] if stack is not None else None
    return next((getattr(layer, n) for n in ("self_attn", "attn", "attention")
                 if isinstance(getattr(layer, n, None), torch.nn.Module)), None)


@contextlib.contextmanager
def last_attention_only_at(model, where: int | None):
    """Within: the self-attention of `model`'s last decoder layer attends from the last `where` positions of every
    row alone (PPO's response positions, left-padded queries), to the keys and values of every position, its query
    projection (where it has one of its own, `q_proj`) and output projection (`o_proj`, `c_proj`, `out_proj`,
    `dense`) run there alone, and it adds 0 elsewhere. No layer reads the last one's output, and its MLP reads its own
    position, so the final hidden states at those positions, and the logits or values read there, are the full
    forward's; elsewhere they are not the model's. With `last_mlp_only_at`, all of the last layer but its keys and
    values runs at the positions read. A no-op with `where` None, where `last_layer_attention` finds no module, or
    where that module's attention function does not take sdpa's masks (sdpa and `generation`'s do; flash attention
    and flex attention take others, and eager is each model's own)."""
    attn = last_layer_attention(model) if where is not None and AttentionInterface is not None else None
    config = getattr(attn, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if (attn is None or impl in (None, LAST_POSITIONS_ATTENTION) or impl not in ALL_ATTENTION_FUNCTIONS
            or ALL_MASK_ATTENTION_FUNCTIONS.get(impl) is not sdpa_mask):
        yield
        return
    trimmed = copy.copy(config)
    trimmed._attn_implementation_internal = LAST_POSITIONS_ATTENTION  # this module's config alone, not its sub-configs
    projections = [getattr(attn, n) for n in ("q_proj", "o_proj", "c_proj", "out_proj", "dense")
                   if isinstance(getattr(attn, n, None), torch.nn.Module)]

    def take(x):
        return _last_positions(x, where) if x.dim() == 3 and x.shape[1] > where else None

    _TRIMMED_ATTENTION[attn] = (where, impl)
    attn.config = trimmed
    try:
        with _on_rows(projections, take):
            yield
    finally:
        attn.config = config
        _TRIMMED_ATTENTION.pop(attn, None)


def _last_positions(x: torch.Tensor, where: int):
    """`_on_rows`' take for the last `where` positions of (B, T, d) rows: (B, where, d), contiguous for GPT-2's Conv1D
    view, put back with zeros before it."""
    T = x.shape[1]
    return x[:, -where:].contiguous(), lambda y: torch.nn.functional.pad(y, (0, 0, T - y.shape[1], 0))


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
