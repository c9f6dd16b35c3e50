"""Typed configs: one dataclass per stage, built from shared pieces, loaded from YAML, overridden with ``key.sub=value``.

``load_config(StageConfig, path, overrides)`` checks every key and type: an unknown key or a bad value is a
:class:`ConfigError` naming the key. Each stage's ``validate()`` holds its cross-field rules.

The other commands (eval, generate, label-sim, serve, label) keep their settings in dataclasses of their own, read the
same way: :func:`add_config_arguments` gives a parser ``--config FILE.yaml`` and dotted overrides, :func:`add_alias`
a flag that sets one key (the dataclass holds its default), and :func:`config_from_args` builds the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

BASE_MODEL = "builtin:base"  # the tiny GPT-2 shipped in the package (see instructgpt.builtin)


class ConfigError(ValueError):
    pass


# --------------------------------------------------------------------------------------------------------------------
# Shared pieces


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # None: peft's default for the architecture, else the query and value projections (modeling.lora_target_modules)
    target_modules: Optional[list[str]] = None


@dataclass
class ModelConfig:
    # a Hugging Face model id, a local directory, a .gguf file (de-quantised once into a cached checkpoint, see
    # gguf_checkpoint.py), or builtin:base
    name_or_path: str = BASE_MODEL
    gguf_file: Optional[str] = None  # with a directory (or hub id) in name_or_path: the GGUF file inside it
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    dropout: Optional[float] = None  # None keeps the model's own; the paper's SFT used residual dropout 0.2
    lora: LoraConfig = field(default_factory=LoraConfig)
    trust_remote_code: bool = False
    # recompute each layer's activations in the backward pass instead of keeping them (Hugging Face's
    # gradient_checkpointing_enable, non-reentrant): memory for long sequences and big models, at about a third more
    # compute. Training stages only; PPO then runs its updates in train mode with every dropout at 0 (see ppo.py)
    gradient_checkpointing: bool = False
    # a Jinja chat template that replaces the tokenizer's own; it is saved with every checkpoint trained from this
    # model, so the stages after SFT, evaluation and serving read prompts the same way
    chat_template: Optional[str] = None


@dataclass
class DataConfig:
    train: Optional[str] = None  # a file, a Hugging Face dataset name[@config][:split], or builtin:NAME
    eval: Optional[str] = None
    pretrain: Optional[str] = None  # pretraining text ({"text"} rows or .txt files), for the ptx mix
    # read at most this many tokens of `pretrain`, its documents in order (a Hugging Face dataset is then streamed,
    # not downloaded whole); None reads all of it, which suits a corpus of a few million tokens, not OpenWebText
    pretrain_max_tokens: Optional[int] = None
    max_length: int = 256  # tokens per example; longer examples are an error (or skipped), never cut
    skip_bad_lines: bool = False  # skip and count bad records instead of stopping at the first
    # concatenate examples into full rows (SFT); the loss mask still covers responses only, and positions restart at
    # each example, from which transformers (4.53 on) masks attention per example: no example sees another. A
    # model (or transformers) that would let them is refused (sft.packing_isolates)
    packing: bool = False
    eval_size: int = 200  # with no data.eval: hold this many training examples out for eval loss


@dataclass
class TrainConfig:
    max_steps: int = 200  # optimizer steps
    batch_size: int = 16  # examples per optimizer step (over all processes and accumulation steps)
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decay to 10% of the peak, as the paper's SFT and RM
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95  # the paper: Adam (0.9, 0.95) for all models
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    pretrain_coef: float = 0.0  # SFT: L = L_CE + pretrain_coef * L_LM on data.pretrain (0 = off)
    # SFT: pretraining blocks (of data.max_length tokens) in each step's mix; None: train.batch_size, as many blocks
    # as demonstrations. Fewer cost less: the paper's PPO starting point saw 10% pretraining data
    pretrain_batch_size: Optional[int] = None
    # SFT: batches of similar length, as HF's group_by_length: the example stream is cut into mega-batches of this
    # many batches, each sorted by length and served batch by batch in a seeded random order (HF uses 50; 0 = off).
    # Less padding (built-in demonstrations: padded tokens 1.56x the real ones at 0, 1.07x at 8), same examples per
    # epoch; but there a batch of one length is mostly one task family, and 8 cost quality (eval loss 1.88 -> 2.00,
    # greedy gold 0.236 -> 0.200), so the default pipeline leaves it off.
    group_by_length: int = 0
    # SFT, RM and PPO: each micro-batch forwarded as up to this many groups of similar length, each padded to its
    # own longest (`batching.length_groups`): the same examples and gradient as one padded batch, fewer padded
    # tokens (the built-in demonstrations: 1.24x the real ones at 2 groups, 1.09x at 4, against 1.57x), but a
    # forward more each. The forward and backward of a 32-demonstration batch of the built-in model in bf16 on a
    # 2-core CPU: 0.254 s at 1, 0.219 at 2, 0.249 at 4; SmolLM2-135M with LoRA, 16 demonstrations: 3.88, 1.55 and
    # 1.66 s. The RM forwards a batch's responses in groups, one backward through them all; PPO groups its rows by
    # query and response length (left- and right-padded), for the rollout's scoring forwards and each minibatch.
    # The RM and PPO keep one group with several processes. None: 2 on a CPU, 1 on a GPU, where one larger forward
    # costs little more than a smaller one
    length_groups: Optional[int] = None
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 100  # checkpoint every N steps (0 = only at the end)
    stop_after: Optional[int] = None  # stop (as if interrupted) after this step; for tests and for splitting a run
    # experiment trackers that get every metrics.jsonl row, with its keys, through accelerate (one or several; each
    # needs its package: pip install 'instructgpt[trackers]' for TensorBoard). TensorBoard writes out_dir/tensorboard/
    log_with: Optional[list[Literal["tensorboard", "wandb", "mlflow", "trackio"]]] = None


# Keys that do not change the result: they may differ between a run and its resume.
RUNTIME_KEYS = {"train.log_every", "train.save_every", "train.stop_after", "train.log_with"}


@dataclass
class StageConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "out"
    seed: int = 0

    # the least train.max_steps a stage takes (a stage that derives its length from epochs takes 0: "derive it")
    min_steps = 1

    def validate(self) -> None:
        t = self.train
        if t.max_steps < self.min_steps:
            raise ConfigError(f"train.max_steps: must be >= {self.min_steps}, got {t.max_steps}")
        for k in ("batch_size", "grad_accum"):
            if getattr(t, k) < 1:
                raise ConfigError(f"train.{k}: must be >= 1, got {getattr(t, k)}")
        if t.batch_size % t.grad_accum:
            raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of train.grad_accum "
                              f"({t.grad_accum})")
        if t.pretrain_batch_size is not None and (t.pretrain_batch_size < 1 or t.pretrain_batch_size % t.grad_accum):
            raise ConfigError(f"train.pretrain_batch_size ({t.pretrain_batch_size}) must be a positive multiple of "
                              f"train.grad_accum ({t.grad_accum})")
        if t.length_groups is not None and t.length_groups < 1:
            raise ConfigError(f"train.length_groups: must be >= 1 (or null), got {t.length_groups}")
        if t.lr <= 0:
            raise ConfigError(f"train.lr: must be > 0, got {t.lr}")
        if not 0 <= t.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
        if self.data.max_length < 8:
            raise ConfigError(f"data.max_length: must be >= 8, got {self.data.max_length}")
        if self.data.pretrain_max_tokens is not None and self.data.pretrain_max_tokens < self.data.max_length:
            raise ConfigError(f"data.pretrain_max_tokens: must be at least one block of data.max_length="
                              f"{self.data.max_length} tokens, got {self.data.pretrain_max_tokens}")
        if self.model.dropout is not None and not 0 <= self.model.dropout < 1:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.model.dropout}")
        if self.model.gguf_file and self.model.name_or_path.lower().endswith(".gguf"):
            raise ConfigError(f"model.gguf_file: model.name_or_path is already a GGUF file "
                              f"({self.model.name_or_path}); give the file in one of the two")


# --------------------------------------------------------------------------------------------------------------------
# Building a dataclass from nested dicts, with a clear error for every unknown key and bad value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: bad value {value!r} ({'; '.join(errors)})")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no/off/yes/on as a bool: mixed_precision=no
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((w for w in words if w in choices), value)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        (_, value_tp) = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer past float's range (about 1.8e308)
                raise ConfigError(f"{key}: expected a number, got an integer too large for one") from None
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, d: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in d if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known under '{prefix or '.'}': "
                          f"{', '.join(sorted(names))})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        f = fields[k]
        if isinstance(v, dict) and f.default_factory is not dataclasses.MISSING:
            # a section given in part keeps this stage's defaults for the rest (e.g. RMConfig's own train defaults)
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                v = deep_merge(dataclasses.asdict(default), v)
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: '{p}' is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=3e-4", "model.lora.enabled=true"]`` -> nested dict; values are parsed as YAML scalars, and a
    value that is not YAML (a Jinja template: ``model.chat_template={% for m in messages %}...``) is the string."""
    out: dict = {}
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            hint = (" (a file is given after its flag, e.g. --config or --input: see --help)"
                    if os.path.exists(item) else "")
            raise ConfigError(f"override '{item}': expected key.sub=value{hint}")
        try:
            value = _safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # the field's type check still applies
        problem = _alias_problem({key.strip(): value})
        if problem is not None:
            raise ConfigError(f"override '{item}': {problem}")
        _set_dotted(out, key.strip(), value)
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _safe_load(stream: Any) -> Any:
    """yaml.safe_load, every way it refuses a text a yaml.YAMLError: besides its own, PyYAML's constructors raise
    ValueError (``!!int x``, an integer past int()'s 4300 digits), KeyError (``!!bool x``), AttributeError
    (``!!timestamp x``), and its composer RecursionError (nesting deeper than Python's stack). A file that is not UTF-8
    stays a UnicodeDecodeError, for its own message."""
    try:
        return yaml.safe_load(stream)
    except (yaml.YAMLError, UnicodeDecodeError):
        raise
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    except Exception as e:  # the parser's own failures on odd input, whatever their class
        raise yaml.YAMLError(f"a value YAML cannot construct ({type(e).__name__}: {str(e).split(';')[0]})") from None


MAX_YAML_VALUES = 100_000  # a config holds hundreds; aliases of aliases can make billions ("billion laughs")


def _alias_problem(value: Any) -> Optional[str]:
    """What is wrong with `value`'s YAML aliases, naming the key (``a.b[0]``; ``.`` for the top), else None: a list or
    mapping that contains itself (an alias inside its own anchor, ``a: &x [*x]``), or aliases of aliases that expand to
    more than MAX_YAML_VALUES values. Merging, checking or walking either would never end."""
    on_path: set[int] = set()
    size: dict[int, int] = {}  # values under a list or mapping, aliases expanded; walked once however often aliased
    stack: list[tuple[bool, str, Any]] = [(False, "", value)]
    while stack:  # no recursion: YAML nests as deep as its own parser allows
        leaving, key, v = stack.pop()
        children = list(v.items()) if isinstance(v, dict) else list(enumerate(v)) if isinstance(v, list) else None
        if leaving:
            on_path.discard(id(v))
            size[id(v)] = 1 + sum(size.get(id(x), 1) if isinstance(x, (dict, list)) else 1 for _, x in children)
            if size[id(v)] > MAX_YAML_VALUES:
                return f"{key or '.'}: YAML aliases expand to more than {MAX_YAML_VALUES} values"
            continue
        if children is None or id(v) in size:
            continue
        if id(v) in on_path:
            return f"{key or '.'}: a YAML alias inside its own anchor (&a [*a]) never ends"
        on_path.add(id(v))
        stack.append((True, key, v))
        for k, x in children:
            sub = f"[{k}]" if isinstance(v, list) else f".{k}"
            stack.append((False, (key + sub) if key else sub.lstrip("."), x))
    return None


def _first_bad_byte(path: str) -> str:
    """Where a file that is not UTF-8 first goes wrong: line, column and the byte."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        raw.decode("utf-8")
        return "not UTF-8 text"
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = len(raw[raw.rfind(b"\n", 0, e.start) + 1:e.start].decode("utf-8", "replace")) + 1
        return f"line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {col}; save the file as UTF-8)"


def read_yaml_mapping(path: str, what: str = "config file") -> dict:
    """A YAML file whose top level is a mapping; a missing file, bad YAML or another shape is a ConfigError."""
    try:
        with open(path, encoding="utf-8") as fh:
            loaded = _safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except OSError as e:  # a directory, no permission
        raise ConfigError(f"{path}: cannot read the {what} ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}, {_first_bad_byte(path)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    problem = _alias_problem(loaded)
    if problem is not None:
        raise ConfigError(f"{path}: {problem}")
    return loaded


def load_config(cls: type, path: Optional[str] = None, overrides: Optional[list[str]] = None,
                extra: Optional[dict] = None) -> Any:
    """Stage defaults <- YAML file <- `extra` <- dotted overrides, validated."""
    d: dict = read_yaml_mapping(path, "config file") if path else {}
    d.pop("_stage", None)  # a run's own config.yaml (out_dir/config.yaml) names its stage; it reruns as --config
    if extra:
        d = deep_merge(d, extra)
    if overrides:
        d = deep_merge(d, parse_overrides(overrides))
    try:
        cfg = from_dict(cls, d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    cfg.validate()
    return cfg


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict, new: dict, ignore: set[str] = RUNTIME_KEYS) -> list[str]:
    """Keys whose values differ between two resolved configs (runtime-only keys ignored)."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))


# --------------------------------------------------------------------------------------------------------------------
# Command lines: --config FILE.yaml, dotted overrides, and flags that set one key each

ALIAS = "config:"  # the argparse dest prefix of a flag that sets a config key


def add_config_arguments(p: argparse.ArgumentParser, example: str = "max_new_tokens=64") -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config file (the defaults otherwise)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted overrides, e.g. {example}")


def field_type(cls: type, dotted: str) -> Any:
    """The type of `cls`'s field at `dotted` (``limits.max_tokens``), through nested dataclasses."""
    tp: Any = cls
    for part in dotted.split("."):
        tp = _strip_optional(tp)
        tp = typing.get_type_hints(tp)[part]
    return tp


def field_default(cls: type, dotted: str) -> Any:
    value: Any = cls()
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


class _Pairs(argparse.Action):
    """NAME=VALUE, repeatable, into a mapping (a dict-valued key: ``--policy sft=DIR`` is ``policy.sft=DIR``)."""

    def __call__(self, parser, namespace, value, option_string=None):
        name, sep, v = value.partition("=")
        if not sep or not name or not v:
            parser.error(f"{option_string} expects NAME=VALUE, got {value!r}")
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest, None) or {}), name: v})


def add_alias(p: Any, cls: type, *flags: str, key: str, help: Optional[str] = None, **kw: Any) -> None:
    """A flag of parser (or group) `p` that sets `key` of config class `cls`. It has no default of its own (the
    dataclass's is the one); unless `kw` says otherwise, the field's type picks the rest: a bool is an on-switch, a
    Literal gives the choices, a list repeats the flag, a mapping takes NAME=VALUE."""
    if "action" not in kw and "type" not in kw:
        tp = _strip_optional(field_type(cls, key))
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = "store_true"
        elif origin is Literal:
            kw["choices"] = typing.get_args(tp)
        elif tp in (int, float):
            kw["type"] = tp
        elif origin in (list, tuple):
            kw["action"] = "append"
        elif origin is dict:
            kw["action"] = _Pairs
    switch = kw.get("action") in ("store_true", "store_false", "store_const")
    if not switch and "choices" not in kw:
        kw.setdefault("metavar", key.rsplit(".", 1)[-1].upper())
    default = field_default(cls, key)
    if not (switch or default is None or default == [] or default == {}):
        shown = f"default: {str(default).replace('%', '%%')}"
        help = f"{help} ({shown})" if help else shown
    p.add_argument(*flags, dest=ALIAS + key, default=argparse.SUPPRESS, help=help, **kw)


def parse_command_line(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Flags and dotted overrides in any order."""
    return p.parse_intermixed_args(argv)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The config a command line asks for: defaults <- --config FILE <- the flags given <- dotted overrides."""
    flags: dict = {}
    for dest, value in vars(args).items():
        if dest.startswith(ALIAS):
            _set_dotted(flags, dest[len(ALIAS):], value)
    return load_config(cls, args.config, args.overrides, extra=flags)


def command_error(command: str, error: Any) -> int:
    """Print ``instructgpt <command>: error: ...`` and return the exit status of a refused command line."""
    print(f"instructgpt {command}: error: {error}", file=sys.stderr)
    return 2
