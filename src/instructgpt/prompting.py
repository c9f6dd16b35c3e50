"""The one prompt template, shared by training, evaluation, generation and serving.

When the tokenizer has a chat template (Qwen, Llama, SmolLM2 ...) it is used; otherwise (GPT-2, Pythia, our own base
model) :data:`DEFAULT_CHAT_TEMPLATE`, an Alpaca-style layout whose assistant turns end with the EOS token, so that a
model learns to stop. Everything goes through ``apply_chat_template`` so there is one code path.
"""

from __future__ import annotations

from typing import Sequence

from jinja2 import TemplateError

# Alpaca-style, kept short because every token costs on a CPU. Assistant turns end with EOS (what generation stops on).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def template_of(tokenizer) -> str:
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


def as_messages(prompt: str | Sequence[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


class ChatTemplateError(ValueError):
    """The chat template refuses a conversation (its `raise_exception`: a system turn where it has no system role,
    roles out of order ...), or cannot say where its assistant turns are."""


class NotIncrementalError(ChatTemplateError):
    """The chat template renders an earlier turn otherwise once a later one follows (Qwen3's drops the thinking of
    answers before the last user turn), so one rendering of a conversation is not each answer's context."""


def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), chat_template=template_of(tokenizer), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template refuses this conversation: {e}") from e


def render_prompt(tokenizer, messages: str | Sequence[dict]) -> str:
    """The text a model continues to answer `messages` (a string is one user turn)."""
    return render(tokenizer, as_messages(messages), add_generation_prompt=True)


def _answer_turns(tokenizer, messages: Sequence[dict]) -> list[tuple[str, str]]:
    """(the generation prompt before it, what a model must generate there) for each assistant turn: the conversation
    rendered up to that turn for generation, and the rest of its rendering up to and including the turn (content and
    end-of-turn)."""
    turns = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(prefix):
            raise ChatTemplateError("the chat template renders an answer's context otherwise after the answer; "
                                    "cannot locate its assistant turns")
        turns.append((prefix, full[len(prefix):]))
    return turns


def _segments(turns: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
    """`_answer_turns` as the (text, is_assistant) pieces of one rendering of the whole conversation."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for prefix, answer in turns:
        if not prefix.startswith(done):
            raise NotIncrementalError("the chat template does not render this conversation incrementally (an "
                                      "earlier turn is rendered differently once a later one follows); cannot locate "
                                      "its assistant turns")
        if len(prefix) > len(done):
            pieces.append((prefix[len(done):], False))
        pieces.append((answer, True))
        done = prefix + answer
    return pieces


def render_segments(tokenizer, messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """Split a whole conversation into (text, is_assistant) pieces whose concatenation is the rendered conversation.

    Each assistant piece is the difference between the conversation up to and including that turn and the
    generation prompt before it, so it holds exactly what a model must generate there (content and end-of-turn).
    """
    return _segments(_answer_turns(tokenizer, messages))


def _encode_segments(tokenizer, segments: Sequence[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Each (text, is_assistant) piece tokenized on its own, the way generation sees them: the ids and, per token,
    whether it belongs to an assistant turn."""
    ids: list[int] = []
    mask: list[bool] = []
    for text, is_assistant in segments:
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += t
        mask += [is_assistant] * len(t)
    return ids, mask


def encode_conversation(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per token, whether it belongs to an assistant turn (SFT's loss mask).

    Pieces are tokenized separately, the way generation sees them: the prompt's tokens, then the response's.
    """
    return _encode_segments(tokenizer, render_segments(tokenizer, messages))


def encode_answers(tokenizer, messages: Sequence[dict]) -> list[tuple[list[int], list[bool]]]:
    """A conversation as SFT trains on it: `encode_conversation`'s one sequence; or, where the template renders an
    earlier turn otherwise once a later one follows (NotIncrementalError), a sequence per assistant turn: the turns
    before it as generation renders them (`encode_prompt`), then that answer as the template ends it, so each answer
    is learnt in the context the model has when it gives it."""
    turns = _answer_turns(tokenizer, messages)
    try:
        return [_encode_segments(tokenizer, _segments(turns))]
    except NotIncrementalError:
        return [_encode_segments(tokenizer, [(prefix, False), (answer, True)]) for prefix, answer in turns]


def encode_prompt(tokenizer, messages: str | Sequence[dict]) -> list[int]:
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, response: str) -> list[int]:
    """A response's tokens as the template ends an assistant turn (content + end of turn, e.g. EOS)."""
    msgs = [{"role": "user", "content": "x"}]
    prefix = render(tokenizer, msgs, add_generation_prompt=True)
    full = render(tokenizer, msgs + [{"role": "assistant", "content": response}], add_generation_prompt=False)
    return tokenizer(full[len(prefix):], add_special_tokens=False)["input_ids"]


def encode_exchange(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a conversation for an encoder-decoder model: the prompt is everything before the
    last assistant turn, rendered as generation renders it (`encode_prompt`), for the encoder; the response is that
    turn as the template ends it, ended by EOS, for the decoder. Earlier assistant turns are context only."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    pieces = render_segments(tokenizer, messages[: last + 1])
    response = tokenizer([text for text, is_assistant in pieces if is_assistant][-1], add_special_tokens=False)
    response = response["input_ids"]
    if tokenizer.eos_token_id is not None and (not response or response[-1] != tokenizer.eos_token_id):
        response.append(tokenizer.eos_token_id)  # a chat template that ends turns otherwise (<|im_end|>\n)
    return encode_prompt(tokenizer, messages[:last]), response
