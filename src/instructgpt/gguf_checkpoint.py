"""GGUF files as model input: de-quantised once into an ordinary Hugging Face checkpoint, then used from there.

``model.name_or_path`` may be a ``.gguf`` file, or a directory (or hub id) with ``model.gguf_file`` naming the file in
it. transformers reads GGUF, but a model it loads from one carries a GGUF "quantizer" that refuses
``save_pretrained`` (and training), and every load de-quantises every tensor again. So we convert once, into a
directory that loads with plain ``from_pretrained`` and no ``gguf`` package: fp32 safetensors (a de-quantised weight
is exact in fp32), a config without the quantisation entry, the tokenizer with its chat template, and a generation
config with the EOS ids. It is written atomically into a cache shared by every stage and command naming that file::

    $INSTRUCTGPT_CACHE/gguf/<file stem>-<hash of the file's real path>/    (INSTRUCTGPT_CACHE: ~/.cache/instructgpt)

One cache rather than one copy per stage ``out_dir``: SFT, RM and PPO (and ``generate``) may all start from the same
file, and a de-quantised model is several times the size of the GGUF. ``gguf_source.json``, written last, records the
source's path, size and mtime: a later call finds it and does nothing; a changed file (other size or mtime) is
converted again. A lock file serialises processes that convert the same file at once (``torchrun`` ranks).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.utils import cached_file

from instructgpt.config import ConfigError
from instructgpt.files import replace_dir

MARKER = "gguf_source.json"
GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
# llama.cpp's metadata keys for the tokens that end a turn; a chat model may stop on any of them
EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


class GGUFError(ConfigError):
    """A GGUF input that cannot be used; the message names the file. A ConfigError: the CLI reports it as one."""


def is_gguf_source(name_or_path: str, gguf_file: str | None = None) -> bool:
    return bool(gguf_file) or name_or_path.lower().endswith(".gguf")


def locate_gguf(name_or_path: str, gguf_file: str | None = None) -> str:
    """The GGUF file on disk: `name_or_path` itself, or `gguf_file` in the directory (or hub repo) `name_or_path`."""
    if gguf_file and name_or_path.lower().endswith(".gguf"):
        raise GGUFError(f"model.name_or_path is already a GGUF file ({name_or_path}); leave model.gguf_file empty")
    if not gguf_file:
        path = name_or_path
    elif os.path.isabs(gguf_file) or os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, gguf_file)  # join ignores the directory when gguf_file is absolute
    else:  # a hub id: the file comes through the Hugging Face cache like any other model file
        try:
            path = cached_file(name_or_path, gguf_file)
        except OSError as e:
            raise GGUFError(f"GGUF file '{gguf_file}' of '{name_or_path}' not found: {e}") from None
    if not os.path.isfile(path):
        raise GGUFError(f"GGUF file not found: {path}")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with {GGUF_MAGIC!r})")
    return os.path.realpath(path)


def cache_dir_for(gguf_path: str) -> str:
    """Where the de-quantised checkpoint of `gguf_path` lives: one directory per source file path."""
    root = os.environ.get("INSTRUCTGPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "instructgpt")
    real = os.path.realpath(gguf_path)
    stem = os.path.basename(real)
    stem = stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
    return os.path.join(root, "gguf", f"{stem}-{hashlib.sha256(real.encode()).hexdigest()[:12]}")


def source_stamp(gguf_path: str) -> dict:
    """What identifies one version of the source file (hashing a multi-GB file on every load would cost more)."""
    st = os.stat(gguf_path)
    return {"source": os.path.realpath(gguf_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_converted(out_dir: str, stamp: dict) -> bool:
    """True when `out_dir` holds a finished conversion of exactly this version of the source."""
    try:
        with open(os.path.join(out_dir, MARKER), encoding="utf-8") as fh:
            done = json.load(fh)
    except (OSError, ValueError):
        return False
    return all(done.get(k) == v for k, v in stamp.items())


def dequantize_gguf(path_or_dir: str, gguf_file: str | None = None, out_dir: str | None = None) -> str:
    """Convert a GGUF file into a plain Hugging Face checkpoint in `out_dir` (default: the cache); returns `out_dir`.

    A no-op when `out_dir` already holds the conversion of this file at its current size and mtime.
    """
    path = locate_gguf(path_or_dir, gguf_file)
    out_dir = out_dir or cache_dir_for(path)
    stamp = source_stamp(path)
    if is_converted(out_dir, stamp):
        return out_dir
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError(f"{path}: reading GGUF files needs the `gguf` package (pip install 'instructgpt[gguf]')")
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    with _exclusive(f"{out_dir}.lock"):
        if is_converted(out_dir, stamp):  # another process converted it while we waited for the lock
            return out_dir
        t0 = time.time()
        model, tokenizer = load_dense(path)
        tmp = f"{out_dir}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as fh:  # last: marks the copy complete
                json.dump({**stamp, "seconds": round(time.time() - t0, 2)}, fh, indent=2)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, out_dir)
    return out_dir


def load_dense(gguf_path: str):
    """(model, tokenizer) read from a GGUF file by transformers, every weight de-quantised to a dense fp32 tensor."""
    folder, name = os.path.split(gguf_path)
    kwargs: dict = {}
    try:  # transformers >= 5 can keep GGUF blocks packed; ask for dense weights (older versions always unpack)
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # a truncated or unsupported file fails deep inside transformers; name the file here
        raise GGUFError(f"{gguf_path}: cannot load this GGUF file ({type(e).__name__}: {e})") from e
    model = drop_gguf_quantizer(model)
    # A GGUF has no generation_config.json; write one with the stop tokens the file's metadata names
    eos = eos_token_ids(gguf_path, tokenizer)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=eos[0] if len(eos) == 1 else eos)
    return model, tokenizer


def eos_token_ids(gguf_path: str, tokenizer) -> list[int]:
    """The tokenizer's EOS first, then any other end-of-turn ids the GGUF metadata names."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    for key in EOS_KEYS:
        f = fields.get(key)
        if f is not None and f.data:
            i = int(f.parts[f.data[0]][0])  # a scalar field: its one value
            if i not in ids:
                ids.append(i)
    return ids


def drop_gguf_quantizer(model):
    """Remove the GGUF quantizer transformers attaches to a model loaded from a GGUF file.

    It makes ``save_pretrained`` refuse even when every weight is already a dense tensor (transformers' legacy GGUF
    path, or ``GgufConfig(dequantize=True)``). Weights still packed in GGUF blocks cannot be saved as they are: that
    is an error here, with the way out.
    """
    q = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(q, "quantization_config", None), "quant_method", None)
    if q is None or getattr(method, "value", method) != "gguf":
        return model
    if getattr(q, "packed_modules", None):
        raise GGUFError("this model's weights are still packed in GGUF blocks and cannot be saved; load the file "
                        "with instructgpt's load_model (which de-quantises it) or with GgufConfig(dequantize=True)")
    q.remove_quantization_config(model)
    return model


@contextlib.contextmanager
def _exclusive(lock_path: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (POSIX; elsewhere concurrent conversions are not serialised)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
