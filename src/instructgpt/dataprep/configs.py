"""One typed config per ``instructgpt data`` subcommand, read as every command's (``--config FILE.yaml``, flags,
``key=value`` overrides; see :mod:`instructgpt.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from instructgpt.config import BASE_MODEL, ConfigError

Kind = Literal["auto", "demonstrations", "prompts", "comparisons", "text"]


@dataclass
class OutputConfig:
    """What every subcommand shares: the file it writes and how it reads its sources."""

    out: Optional[str] = None  # the JSONL file to write; the report goes beside it, OUT.report.json
    kind: Kind = "auto"  # the kind of data; auto: the kind most rows are, a row of another kind is bad
    skip_bad_lines: bool = False  # skip and count bad lines (named in the report) instead of stopping at the first
    examples: int = 5  # rows named in the report for each rule, as examples

    def validate(self) -> None:
        if self.examples < 0:
            raise ConfigError(f"examples: must be >= 0, got {self.examples}")


@dataclass
class InputConfig(OutputConfig):
    input: Optional[str] = None  # a file, a directory, a Hugging Face dataset or builtin:NAME

    def validate(self) -> None:
        super().validate()
        if not self.input:
            raise ConfigError("input: required (--input SOURCE or input=SOURCE)")


@dataclass
class NearDuplicateSettings(InputConfig):
    """MinHash-LSH settings, shared by ``dedup`` and ``inspect``'s duplicate rate."""

    # near duplicates: estimated Jaccard similarity of the rows' word n-gram sets at least this (0.8: the usual
    # setting for web text, e.g. the Pile, RefinedWeb); 1.0 finds only rows whose word n-grams are all equal
    threshold: float = 0.8
    num_perm: int = 128  # MinHash permutations (the estimate's standard error is about sqrt(J(1-J)/num_perm))
    ngram: int = 3  # words per shingle (lower-cased word characters); a row of fewer words is one shingle
    on: Literal["row", "prompt", "response"] = "row"  # what is compared: the whole row, its prompt or its response(s)
    seed: int = 1  # the MinHash permutations' seed

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"threshold: must be in (0, 1], got {self.threshold}")
        if self.num_perm < 16:
            raise ConfigError(f"num_perm: must be >= 16, got {self.num_perm}")
        if self.ngram < 1:
            raise ConfigError(f"ngram: must be >= 1, got {self.ngram}")


@dataclass
class InspectConfig(NearDuplicateSettings):
    """``instructgpt data inspect``: one row per input line (its schema, token lengths, duplicate) and the summary."""

    tokenizer: str = BASE_MODEL  # token lengths are this model's tokenizer's, with its prompt template
    max_length: int = 256  # a row longer than this many tokens (what data.max_length counts) is over-long

    def validate(self) -> None:
        super().validate()
        if self.max_length < 1:
            raise ConfigError(f"max_length: must be >= 1, got {self.max_length}")


@dataclass
class CleanConfig(InputConfig):
    """``instructgpt data clean``: text rules, then row filters, each counted in the report."""

    tokenizer: str = BASE_MODEL
    unicode: Literal["NFC", "NFKC", "none"] = "NFC"  # Unicode normal form (NFKC also folds compatibility forms)
    control_chars: bool = True  # drop control and invisible characters; \r\n, \r, \v, \f become \n
    whitespace: bool = True  # trim texts and lines, one space between words, at most one blank line in a row
    redact_pii: bool = False  # emails, card-like and phone numbers -> [EMAIL] [CARD] [PHONE], as serving's audit log
    drop_echo: bool = True  # drop demonstrations whose response repeats their prompt
    echo_min_words: int = 4  # ... a prompt of fewer words is an echo only when the response is the prompt itself
    max_length: Optional[int] = 256  # drop rows longer than this many tokens (what data.max_length counts); null: off
    min_response_tokens: int = 0  # drop rows with a response (or a document) shorter than this many tokens

    def validate(self) -> None:
        super().validate()
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"max_length: must be >= 1 or null, got {self.max_length}")
        if self.min_response_tokens < 0 or self.echo_min_words < 1:
            raise ConfigError("min_response_tokens >= 0 and echo_min_words >= 1, got "
                              f"{self.min_response_tokens} and {self.echo_min_words}")


@dataclass
class DedupConfig(NearDuplicateSettings):
    """``instructgpt data dedup``: exact duplicates, then near duplicates by MinHash-LSH; the first of each kept."""

    exact: bool = True  # drop rows equal to an earlier one (after parsing: the same content in any schema)
    near: bool = True  # drop rows whose similarity to an earlier kept row reaches `threshold`

    def validate(self) -> None:
        super().validate()
        if not (self.exact or self.near):
            raise ConfigError("exact, near: at least one must be true")


@dataclass
class MixConfig(OutputConfig):
    """``instructgpt data mix``: rows from several sources in proportion to their weights, to a target size."""

    sources: dict[str, str] = field(default_factory=dict)  # name -> source (--source NAME=SOURCE)
    weights: dict[str, float] = field(default_factory=dict)  # name -> weight (--weight NAME=W); 1 when not given
    # rows in the mix; null: as many as the sources give at these weights without repeating a row
    size: Optional[int] = None
    repeat: bool = True  # a source asked for more rows than it has gives each row again (whole passes first)
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if not self.sources:
            raise ConfigError("sources: at least one (--source NAME=SOURCE)")
        unknown = sorted(set(self.weights) - set(self.sources))
        if unknown:
            raise ConfigError(f"weights.{unknown[0]}: no such source (sources: {', '.join(self.sources)})")
        for name, w in self.weights.items():
            if not w >= 0:  # NaN too
                raise ConfigError(f"weights.{name}: must be >= 0, got {w}")
        if sum(self.weight(n) for n in self.sources) <= 0:
            raise ConfigError("weights: at least one source must have a positive weight")
        if self.size is not None and self.size < 1:
            raise ConfigError(f"size: must be >= 1 or null, got {self.size}")

    def weight(self, name: str) -> float:
        return self.weights.get(name, 1.0)


DEFAULT_TEMPLATES = [
    "Please help me with this. {prompt}",
    "{prompt}\n\nThank you!",
    "I have a request: {prompt}",
    "Could you do this for me? {prompt}",
    "Hi! {prompt}",
]
NOISE = ("case", "punctuation", "whitespace", "typo")


@dataclass
class AugmentConfig(InputConfig):
    """``instructgpt data augment``: instruction filling (prompt rewrites and meaning-keeping noise) or answer
    diversity (the best of n sampled answers by a reward model: rejection-sampling data for SFT)."""

    mode: Literal["instructions", "answers"] = "instructions"
    seed: int = 0
    # instructions: `variants` rewritten copies of each row's prompt beside the original
    variants: int = 1
    keep_original: bool = True
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))  # each holds {prompt} once
    noise: list[str] = field(default_factory=lambda: ["case", "punctuation", "whitespace"])  # of NOISE
    noise_prob: float = 0.3  # each noise is applied to a copy with this probability
    # answers: n samples of `model` per prompt, the one `reward_model` scores highest kept
    model: Optional[str] = None
    reward_model: Optional[str] = None  # an `instructgpt rm` out_dir, or builtin:gold (the built-in suites' oracle)
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    min_reward: Optional[float] = None  # drop prompts whose best answer scores below this (null: keep every one)
    batch_size: int = 32
    device: str = "auto"

    def validate(self) -> None:
        super().validate()
        if self.mode == "instructions":
            if self.variants < 1:
                raise ConfigError(f"variants: must be >= 1, got {self.variants}")
            bad = next((t for t in self.templates if t.count("{prompt}") != 1), None)
            if bad is not None or not self.templates:
                raise ConfigError(f"templates: each must hold {{prompt}} exactly once, got {bad!r}")
            unknown = sorted(set(self.noise) - set(NOISE))
            if unknown:
                raise ConfigError(f"noise: unknown {unknown[0]!r} (known: {', '.join(NOISE)})")
            if not 0.0 <= self.noise_prob <= 1.0:
                raise ConfigError(f"noise_prob: must be in [0, 1], got {self.noise_prob}")
        else:
            if not self.model or not self.reward_model:
                raise ConfigError("model, reward_model: answers mode needs both (the policy sampled, the scorer)")
            if self.n < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
                raise ConfigError("n, max_new_tokens, batch_size: each must be >= 1")
            if not self.temperature >= 0:
                raise ConfigError(f"temperature: must be >= 0, got {self.temperature}")
