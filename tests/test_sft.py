import json
import os
import random
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import (HISTORY_REWRITING_TEMPLATE, NO_SYSTEM_TEMPLATE, read_jsonl, saved_weights,
                      sigkill_after_checkpoint)
from instructgpt.config import ConfigError, load_config
from instructgpt.data import DataError, Demonstration, load_comparisons, load_demonstrations
from instructgpt.prompting import (encode_conversation, encode_prompt, encode_response, render_prompt,
                                   render_segments)
from instructgpt.runs import StageError
from instructgpt.batching import collate, length_groups, pack
from instructgpt.losses import token_loss_sum
from instructgpt.sft import SFTConfig, build_examples, train
from instructgpt.supervised import eval_loss, response_loss_sum
from instructgpt.training import batch_indices, cosine_lr_factor, grouped_batch_indices


def demo(prompt, response):
    return Demonstration([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])


def test_loss_mask_covers_exactly_the_response(tiny):
    _, tok = tiny
    d = demo("add 2 plus 3", "five and then some more words")
    ids, mask = encode_conversation(tok, d.messages)
    resp = encode_response(tok, "five and then some more words")
    assert sum(mask) == len(resp) and ids[-len(resp):] == resp and resp[-1] == tok.eos_token_id
    assert not any(mask[:-len(resp)])
    prompt_ids = tok(render_prompt(tok, d.messages[:1]), add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids  # training sees the prompt exactly as generation does
    b = collate(build_examples(tok, [d], 256)[0], tok.pad_token_id)
    assert int((b["labels"] != -100).sum()) == len(resp)


def test_gradient_wrt_prompt_logits_is_zero(tiny):
    model, tok = tiny
    ex, _ = build_examples(tok, [demo("spell the word dog", "d o g"), demo("add one", "two")], 256)
    b = collate(ex, tok.pad_token_id)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    logits.retain_grad()
    loss, n = token_loss_sum(logits, b["labels"])
    loss.backward()
    g = logits.grad.abs().sum(-1)  # (B, T)
    predicts_response = torch.zeros_like(g, dtype=torch.bool)
    predicts_response[:, :-1] = b["labels"][:, 1:] != -100  # position t is trained only if token t+1 is a label
    assert n == int(predicts_response.sum())
    assert torch.all(g[~predicts_response] == 0) and torch.all(g[predicts_response] > 0)


def test_segments_reassemble_the_conversation(tiny):
    _, tok = tiny
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"}]
    segs = render_segments(tok, msgs)
    assert "".join(t for t, _ in segs) == tok.apply_chat_template(
        msgs, chat_template=__import__("instructgpt.prompting").prompting.template_of(tok), tokenize=False)
    assert [t for t, a in segs if a] == ["b" + tok.eos_token, "d" + tok.eos_token]


def test_too_long_example_names_file_and_line(tiny, tmp_path):
    _, tok = tiny
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "hi", "response": "ok"}) + "\n" +
                 json.dumps({"prompt": "hi", "response": "apple " * 300}) + "\n")
    demos = load_demonstrations(str(p))
    with pytest.raises(DataError, match=r"d.jsonl, line 2: field 'response'.*longer than data.max_length=64"):
        build_examples(tok, demos, 64)
    ok, skipped = build_examples(tok, demos, 64, skip_bad=True)
    assert len(ok) == 1 and skipped == 1


def test_a_conversation_the_chat_template_refuses_names_file_and_line(tiny, tmp_path):
    """A record whose conversation the model's chat template refuses (a system turn a template without a system role
    raises on), in demonstrations, PPO's prompts or rankings, is a DataError naming its file, line and field, or with
    data.skip_bad_lines a counted skip."""
    import copy

    from instructgpt.batching import prompt_ids
    from instructgpt.rankings import encode_rankings
    from conftest import write_jsonl
    _, tok = tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = NO_SYSTEM_TEMPLATE
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    refused = r"d.jsonl, line 2: field 'messages': the chat template refuses this conversation: System role not"
    demos = load_demonstrations(write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "hi", "response": "ok"}, {"messages": system + [{"role": "assistant", "content": "ok"}]}]))
    with pytest.raises(DataError, match=refused):
        build_examples(tok, demos, 64)
    ok, skipped = build_examples(tok, demos, 64, skip_bad=True)
    assert len(ok) == 1 and skipped == 1
    prompts = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi"}, {"messages": system}, {"prompt": "yo"}])
    with pytest.raises(DataError, match=refused):
        prompt_ids(tok, prompts, 64)
    kept, ids, skipped = prompt_ids(tok, prompts, 64, skip_bad=True)
    assert [m[-1]["content"] for m in kept] == ["hi", "yo"] and len(ids) == 2 and skipped == 1
    rankings = load_comparisons(write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "hi", "responses": ["a", "b"], "ranks": [1, 2]},
        {"messages": system, "responses": ["a", "b"], "ranks": [1, 2]}]))
    with pytest.raises(DataError, match=refused):
        encode_rankings(tok, rankings, 64, skip_bad=False)
    items, skipped = encode_rankings(tok, rankings, 64, skip_bad=True)
    assert len(items) == 1 and skipped == 1


def test_a_template_that_rewrites_earlier_answers_trains_each_answer_in_its_own_context(tiny, tmp_path):
    """Where the chat template renders an earlier answer otherwise once a later turn follows (Qwen3's drops the
    thinking of answers before the last user turn), a demonstration of two answers becomes two rows: each answer,
    with the loss on it alone, after its turns as generation renders them; a one-answer demonstration stays one row,
    and an incremental template keeps a conversation one row."""
    import copy

    from conftest import write_jsonl
    _, tok = tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = HISTORY_REWRITING_TEMPLATE
    two = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
           {"role": "assistant", "content": "d"}]
    demos = load_demonstrations(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "response": "ok"},
                                                                    {"messages": two}]))
    rows, skipped = build_examples(tok, demos, 64)
    assert skipped == 0 and len(rows) == 3

    def split(row):
        return (tok.decode([t for t, m in zip(row.input_ids, row.loss_mask) if not m]),
                tok.decode([t for t, m in zip(row.input_ids, row.loss_mask) if m]))

    eos = tok.eos_token
    assert split(rows[0]) == ("<user>hi\n<assistant>", f"<think></think>ok{eos}\n")
    assert split(rows[1]) == ("<user>a\n<assistant>", f"<think></think>b{eos}\n")
    assert split(rows[2]) == (f"<user>a\n<assistant>b{eos}\n<user>c\n<assistant>", f"<think></think>d{eos}\n")
    for row, messages in zip(rows[1:], (two[:1], two[:3])):  # each context exactly as generation renders it
        assert row.input_ids[:row.loss_mask.index(True)] == encode_prompt(tok, messages)
    tok.chat_template = NO_SYSTEM_TEMPLATE  # incremental: one row with both answers
    rows, _ = build_examples(tok, demos[1:], 64)
    assert len(rows) == 1 and split(rows[0])[1] == f"b{eos}\nd{eos}\n"


def test_response_only_head_equals_the_full_forward(tiny):
    """Left padding + the LM head over the response positions only gives the full forward's loss and gradients."""
    model, tok = tiny
    ex, _ = build_examples(tok, [demo("spell the word dog", "d o g"), demo("add one and then two more", "three"),
                                 demo("hi", "a much longer answer than the others, with several words")], 256)
    right, left = collate(ex, tok.pad_token_id), collate(ex, tok.pad_token_id, left=True)
    full, n_full = token_loss_sum(model(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits,
                                  right["labels"])
    g_full = torch.autograd.grad(full, list(model.parameters()))
    part, n_part = response_loss_sum(model, left)
    g_part = torch.autograd.grad(part, list(model.parameters()))
    assert n_part == n_full == sum(sum(e.loss_mask[1:]) for e in ex)
    torch.testing.assert_close(part, full, atol=1e-4, rtol=1e-5)
    for a, b in zip(g_part, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_pack_keeps_masks_and_limits():
    from instructgpt.batching import Example
    ex = [Example([1, 2, 3], [False, True, True]), Example([4, 5], [False, True]), Example([6] * 4, [True] * 4)]
    rows = pack(ex, 5)
    assert [r.input_ids for r in rows] == [[1, 2, 3, 4, 5], [6, 6, 6, 6]]
    assert rows[0].loss_mask == [False, True, True, False, True]
    assert [r.position_ids for r in rows] == [[0, 1, 2, 0, 1], [0, 1, 2, 3]]  # restarting at each example


def test_packed_examples_do_not_see_each_other(tiny):
    """A packed row's positions restart at each example, and transformers then masks attention per example: the
    row's loss is the sum of its examples' losses each forwarded alone, in a batch beside a padded row too. Plain
    concatenation (one sequence of positions) lets later examples attend to earlier ones and differs."""
    from instructgpt.batching import Example
    model, tok = tiny
    exs = []
    for prompt, answer in [("add 2 plus 3", "5"), ("what is the first word", "the"), ("repeat cat twice", "cat cat")]:
        p, a = tok(prompt).input_ids, tok(" " + answer).input_ids
        exs.append(Example(p + a, [False] * len(p) + [True] * len(a)))
    pad = tok.pad_token_id
    with torch.no_grad():
        alone = [float(response_loss_sum(model, collate([e], pad, left=True))[0]) for e in exs]
        rows = pack(exs[:2], 256) + pack(exs[2:], 256)  # a row of two, and a shorter row of one (padded)
        assert [r.position_ids[:1] for r in rows] == [[0], [0]] and rows[0].position_ids.count(0) == 2
        b = collate(rows, pad, left=True)
        assert b["position_ids"][1].tolist()[:3] == [0, 1, 2]  # the padding numbered as a sequence of its own
        packed = float(response_loss_sum(model, b)[0])
        plain = float(response_loss_sum(model, collate([Example(r.input_ids, r.loss_mask) for r in rows], pad,
                                                       left=True))[0])
    assert packed == pytest.approx(sum(alone), rel=1e-5)
    assert abs(plain - sum(alone)) > 1e-3 * sum(alone)  # 100 times the tolerance above


def test_cosine_schedule_and_batch_order():
    assert cosine_lr_factor(0, 0, 100, 0.1) == pytest.approx(1.0)
    assert cosine_lr_factor(100, 0, 100, 0.1) == pytest.approx(0.1)
    assert cosine_lr_factor(50, 0, 100, 0.1) == pytest.approx(0.55)
    assert cosine_lr_factor(4, 10, 100, 0.1) == pytest.approx(0.5)
    # one epoch of batches is a permutation; batches are a pure function of the step
    seen = sum((batch_indices(12, 4, s, 0) for s in range(3)), [])
    assert sorted(seen) == list(range(12))
    assert batch_indices(12, 4, 5, 0) == batch_indices(12, 4, 5, 0)
    assert batch_indices(10, 4, 2, 0)[:2] == batch_indices(10, 4, 2, 0)[:2] and len(batch_indices(10, 4, 2, 0)) == 4


def test_group_by_length_keeps_the_examples_and_cuts_padding():
    rng = random.Random(0)
    lengths = [rng.choice((8, 12, 40, 70)) + rng.randrange(4) for _ in range(400)]
    group, bs = 8, 16
    for mega in range(3):  # each mega-batch holds exactly the ungrouped stream's examples of its steps
        steps = range(mega * group, (mega + 1) * group)
        grouped = [grouped_batch_indices(lengths, bs, s, 0, group) for s in steps]
        assert sorted(sum(grouped, [])) == sorted(sum((batch_indices(400, bs, s, 0) for s in steps), []))
        assert all(len(b) == bs for b in grouped)
    assert grouped_batch_indices(lengths, bs, 11, 0, group) == grouped_batch_indices(lengths, bs, 11, 0, group)
    assert grouped_batch_indices(lengths, bs, 5, 0, 0) == batch_indices(400, bs, 5, 0)

    def padded(g):
        return sum(max(lengths[i] for i in grouped_batch_indices(lengths, bs, s, 0, g)) * bs for s in range(48))
    assert padded(group) < 0.75 * padded(0)


def _cfg(model_dir, demos, out, **kw):
    over = [f"model.name_or_path={model_dir}", f"data.train={demos}", f"out_dir={out}", "train.batch_size=8",
            "train.lr=3e-3", "data.eval_size=20", "train.eval_every=1000", "train.log_every=1"]
    over += [f"{k}={v}" for k, v in kw.items()]
    return load_config(SFTConfig, None, over)


def test_sft_lowers_heldout_loss(tiny_model_dir, demos_file, tmp_path):
    from instructgpt.modeling import load_model
    from instructgpt.batching import split_eval
    cfg = _cfg(tiny_model_dir, demos_file, tmp_path / "sft", **{"train.max_steps": 30})
    model, tok = load_model(tiny_model_dir)
    ex, _ = build_examples(tok, load_demonstrations(demos_file), 256)
    _, held = split_eval(ex, 20, cfg.seed)
    before = eval_loss(model, held, tok.pad_token_id, 8, "cpu")
    train(cfg)
    after_model, _ = load_model(str(tmp_path / "sft" / "model"))
    after = eval_loss(after_model, held, tok.pad_token_id, 8, "cpu")
    assert after < before - 1.0, (before, after)
    rows = read_jsonl(tmp_path / "sft" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31)) and "eval/loss" in rows[-1]
    assert json.load(open(tmp_path / "sft" / "DONE.json"))["steps"] == 30


def test_sft_with_packing_lowers_heldout_loss(tiny_model_dir, demos_file, tmp_path):
    from instructgpt.modeling import load_model
    from instructgpt.batching import split_eval
    cfg = _cfg(tiny_model_dir, demos_file, tmp_path / "sft", **{"train.max_steps": 30, "data.packing": "true",
                                                                "data.max_length": 128})
    model, tok = load_model(tiny_model_dir)
    ex, _ = build_examples(tok, load_demonstrations(demos_file), 128)
    _, held = split_eval(ex, 20, cfg.seed)
    assert len(pack(ex, 128)) < len(ex) / 3  # short demonstrations: several to a row
    before = eval_loss(model, held, tok.pad_token_id, 8, "cpu")
    train(cfg)
    after = eval_loss(load_model(str(tmp_path / "sft" / "model"))[0], held, tok.pad_token_id, 8, "cpu")
    assert after < before - 1.0, (before, after)


def test_packing_is_refused_for_a_model_that_would_let_examples_see_each_other(tiny_model_dir, demos_file,
                                                                               tmp_path, monkeypatch):
    """Before packing, SFT probes the model: the second example of a packed row must get its own logits. A model
    whose attention ignores the packed positions (here: every position id dropped) is refused, not trained wrongly."""
    from instructgpt.modeling import load_model
    from instructgpt.supervised import packing_isolates
    model, _ = load_model(tiny_model_dir)
    assert packing_isolates(model)
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, position_ids=None, **k: forward(self, *a, **k))
    assert not packing_isolates(model)
    with pytest.raises(ConfigError, match="data.packing: this model's attention does not keep packed examples apart"):
        train(_cfg(tiny_model_dir, demos_file, tmp_path / "sft", **{"data.packing": "true"}))
    assert not (tmp_path / "sft" / "checkpoint").exists()


def test_bf16_mixed_precision_trains_close_to_fp32_and_saves_fp32_weights(tiny_model_dir, demos_file, tmp_path):
    losses = {}
    for mp in ("no", "bf16"):  # one process, two precisions: the pipeline's case
        train(_cfg(tiny_model_dir, demos_file, tmp_path / mp, **{"train.max_steps": 4,
                                                                  "train.mixed_precision": mp}))
        losses[mp] = [json.loads(l)["train/loss"] for l in open(tmp_path / mp / "metrics.jsonl")]
    # the same batches: bf16 matmuls round at ~3 significant digits; the losses agree closely (here 1e-4), not exactly
    assert losses["bf16"] != losses["no"]
    for a, b in zip(losses["no"], losses["bf16"]):
        assert abs(a - b) < 0.005 * a, losses
    assert losses["bf16"][-1] < losses["bf16"][0]
    assert all(w.dtype == torch.float32 for w in saved_weights(tmp_path / "bf16").values())


def test_gradient_accumulation_equals_the_whole_batch(tiny_model_dir, demos_file, tmp_path):
    """train.grad_accum splits each batch into micro-batches; the loss is normalised by the whole batch's response
    tokens, so 1, 2 or 4 micro-batches of unequal lengths give the same steps (the classic accumulation bug: a mean
    per micro-batch weights short examples up)."""
    runs = {}
    for ga in (1, 2, 4):
        train(_cfg(tiny_model_dir, demos_file, tmp_path / f"ga{ga}", **{"train.max_steps": 4, "train.grad_accum": ga}))
        runs[ga] = (saved_weights(tmp_path / f"ga{ga}"), [json.loads(l)["train/loss"]
                                                          for l in open(tmp_path / f"ga{ga}" / "metrics.jsonl")])
    first = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not torch.allclose(runs[1][0][k], first[k]) for k in first)
    for ga in (2, 4):
        for k, w in runs[1][0].items():
            torch.testing.assert_close(runs[ga][0][k], w, atol=1e-5, rtol=1e-4)
        assert runs[ga][1] == pytest.approx(runs[1][1], rel=1e-5)


def test_length_groups_pad_the_fewest_tokens():
    """batching.length_groups: every row in exactly one group, and the split pads as few tokens as the best of
    every split of the sorted rows into at most that many groups (brute force)."""
    from itertools import combinations

    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.randrange(3, 60) for _ in range(rng.randrange(1, 11))]
        for groups in (1, 2, 3, 4):
            split = length_groups(lengths, groups)
            assert sorted(i for g in split for i in g) == list(range(len(lengths))) and len(split) <= groups
            assert all(g == sorted(g) for g in split)
            cost = sum(len(g) * max(lengths[i] for i in g) for g in split)
            s = sorted(lengths)
            best = min(sum((b - a) * s[b - 1] for a, b in zip((0,) + cuts, cuts + (len(s),)))
                       for k in range(min(groups, len(s)))
                       for cuts in combinations(range(1, len(s)), k))
            assert cost == best, (lengths, groups, split)
    assert length_groups([5, 5, 5], 3) == [[0, 1, 2]]  # equal lengths: one group, not three forwards


def test_length_groups_of_two_lengths_pad_as_little_as_each_order_allows():
    """A row of two lengths padded apart (PPO: left-padded query, right-padded response): a group costs its rows
    times its longest query plus its longest response. The split is at least as good as the best split of the rows
    sorted by their summed length, and finds the split a sum order misses."""
    def cost(split, sizes):
        return sum(len(g) * (max(sizes[i][0] for i in g) + max(sizes[i][1] for i in g)) for g in split)

    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        n = int(torch.randint(2, 9, (1,), generator=g))
        sizes = [tuple(int(x) for x in torch.randint(1, 40, (2,), generator=g)) for _ in range(n)]
        for groups in (1, 2, 3):
            split = length_groups(sizes, groups)
            assert sorted(i for part in split for i in part) == list(range(n)) and len(split) <= groups
            by_sum = length_groups([a + b for a, b in sizes], groups)
            assert cost(split, sizes) <= cost(by_sum, sizes)
    # queries of 10 and 1, responses of 1 and 10: by summed length all four rows tie; grouping by query pads least
    sizes = [(10, 1), (1, 10), (10, 2), (1, 9)]
    assert cost(length_groups(sizes, 2), sizes) == 2 * 12 + 2 * 11
    assert length_groups([(5, 0), (3, 0), (9, 0)], 2) == length_groups([5, 3, 9], 2)


def test_length_groups_train_as_one_padded_batch(tiny_model_dir, demos_file, tmp_path):
    """train.length_groups forwards each micro-batch as groups of similar length, each padded to its own longest:
    the same loss and weights as one padded batch, with the pretraining mix and gradient accumulation."""
    ptx = tmp_path / "ptx.txt"
    ptx.write_text("\n".join(f"the {w} is {c}." for w in ("moon", "sea", "road") for c in ("gold", "grey")) * 30)
    runs = {}
    for groups, ga in ((1, 1), (3, 1), (2, 2)):
        out = tmp_path / f"g{groups}ga{ga}"
        train(_cfg(tiny_model_dir, demos_file, out, **{"train.max_steps": 4, "train.length_groups": groups,
                                                       "train.grad_accum": ga, "train.pretrain_coef": 0.5,
                                                       "train.pretrain_batch_size": 2, "data.pretrain": str(ptx),
                                                       "data.max_length": 64}))
        runs[groups, ga] = (saved_weights(out), [json.loads(l)["train/loss"] for l in open(out / "metrics.jsonl")])
    for key in ((3, 1), (2, 2)):
        for k, w in runs[1, 1][0].items():
            torch.testing.assert_close(runs[key][0][k], w, atol=1e-5, rtol=1e-4)
        assert runs[key][1] == pytest.approx(runs[1, 1][1], rel=1e-5)
    with pytest.raises(ConfigError, match="train.length_groups"):
        _cfg(tiny_model_dir, demos_file, tmp_path / "bad", **{"train.length_groups": 0}).validate()


def test_pretraining_mix_keeps_the_model_on_its_pretraining_text(tiny_model_dir, demos_file, tmp_path):
    """train.pretrain_coef: L = L_CE(responses) + coef * L_LM(pretraining blocks). With the mix the model's loss on
    the pretraining text falls instead of rising, while its demonstrations are learned as well."""
    from instructgpt.modeling import load_model
    from instructgpt.sft import Example, split_eval
    ptx = tmp_path / "ptx.txt"
    ptx.write_text("\n".join(f"the {w} is {c} and the {w} is {c}." for w in ("moon", "sea", "road", "bell")
                             for c in ("gold", "grey", "tall")) * 30)
    model, tok = load_model(tiny_model_dir)
    ex, _ = build_examples(tok, load_demonstrations(demos_file), 256)
    _, held = split_eval(ex, 20, 0)
    lines = ptx.read_text().splitlines()[:12]  # each sentence once: the text the mix trains on
    ptx_ex = [Example(ids, [True] * len(ids)) for ids in (tok(line).input_ids for line in lines)]

    def losses(m):
        return eval_loss(m, held, tok.pad_token_id, 8, "cpu"), eval_loss(m, ptx_ex, tok.pad_token_id, 8, "cpu")

    before = losses(model)
    after = {}
    for coef in (0.0, 1.0):
        out = tmp_path / f"coef{coef}"
        train(_cfg(tiny_model_dir, demos_file, out, **{"train.max_steps": 20, "train.pretrain_coef": coef,
                                                       "data.pretrain": str(ptx), "data.max_length": 64}))
        after[coef] = losses(load_model(str(out / "model"))[0])
    assert after[0.0][0] < before[0] - 1.0 and after[1.0][0] < before[0] - 1.0  # both learn the demonstrations
    assert after[1.0][1] < before[1] - 1.0 < after[0.0][1]  # only the mix learns the pretraining text


def test_pretrain_batch_size_sets_the_blocks_in_each_steps_mix(tiny_model_dir, demos_file, tmp_path, monkeypatch):
    """train.pretrain_batch_size: each step forwards that many pretraining blocks beside train.batch_size
    demonstrations, split over the micro-batches as the demonstrations are; it must divide as they must."""
    import instructgpt.supervised as loop
    ptx = tmp_path / "ptx.txt"
    ptx.write_text("\n".join(f"the {w} is {c}." for w in ("moon", "sea", "road", "bell") for c in ("gold", "grey")) * 40)
    rows = {"ptx": [], "demos": []}
    real = loop.collate

    def counting(examples, pad_token_id, left=False):
        rows["demos" if left else "ptx"].append(len(examples))  # demonstrations go left-padded, blocks right
        return real(examples, pad_token_id, left)

    monkeypatch.setattr(loop, "collate", counting)
    over = {"train.max_steps": 3, "train.pretrain_coef": 1.0, "data.pretrain": str(ptx), "data.max_length": 32,
            "train.grad_accum": 2, "data.eval_size": 0, "train.length_groups": 1}  # a micro-batch one forward
    train(_cfg(tiny_model_dir, demos_file, tmp_path / "a", **over, **{"train.pretrain_batch_size": 4}))
    assert rows["ptx"] == [2] * 6 and rows["demos"] == [4] * 6  # 3 steps x 2 micro-batches: 2 blocks, 4 demos
    with pytest.raises(ConfigError, match="pretrain_batch_size"):
        _cfg(tiny_model_dir, demos_file, tmp_path / "b", **over, **{"train.pretrain_batch_size": 3})


def test_gradient_checkpointing_recomputes_each_layer_and_changes_nothing(tiny_model_dir, demos_file, tmp_path,
                                                                          mlp_forwards):
    """model.gradient_checkpointing: every transformer block runs once more in the backward pass (its activations
    were not kept), with the same gradients, and SFT with it ends where SFT without it does."""
    from instructgpt.config import ModelConfig
    from instructgpt.modeling import load_model
    grads, calls = {}, {}
    for gc in (False, True):
        model, tok = load_model(ModelConfig(name_or_path=tiny_model_dir, gradient_checkpointing=gc), for_training=True)
        ids = torch.tensor([tok("the cat is red and the dog is blue").input_ids])
        mlp_forwards["all"] = 0
        model(input_ids=ids, labels=ids).loss.backward()
        calls[gc], grads[gc] = mlp_forwards["all"], {k: p.grad.clone() for k, p in model.named_parameters()}
    assert calls == {False: 2, True: 4}  # two blocks; with checkpointing each forwards again in the backward
    for k, g in grads[False].items():
        torch.testing.assert_close(grads[True][k], g, atol=1e-6, rtol=1e-5)
    for gc in ("false", "true"):
        train(_cfg(tiny_model_dir, demos_file, tmp_path / gc, **{"train.max_steps": 4,
                                                                 "model.gradient_checkpointing": gc}))
    for k, w in saved_weights(tmp_path / "false").items():
        torch.testing.assert_close(saved_weights(tmp_path / "true")[k], w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_resume_equals_uninterrupted(tiny_model_dir, demos_file, tmp_path, lora):
    kw = {"train.max_steps": 10, **({"model.lora.enabled": "true", "model.lora.target_modules": "[c_attn]"}
                                    if lora else {})}
    train(_cfg(tiny_model_dir, demos_file, tmp_path / "a", **kw))
    b = tmp_path / "b"
    train(_cfg(tiny_model_dir, demos_file, b, **kw, **{"train.stop_after": 5}))
    assert not (b / "DONE.json").exists() and (b / "checkpoint" / "trainer_state.json").exists()
    train(_cfg(tiny_model_dir, demos_file, b, **kw))
    wa, wb = saved_weights(tmp_path / "a"), saved_weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    rows = [json.loads(l)["step"] for l in open(b / "metrics.jsonl")]
    assert rows == list(range(1, 11))  # nothing logged twice


def test_rerun_of_finished_stage_and_config_mismatch(tiny_model_dir, demos_file, tmp_path, capsys):
    out = tmp_path / "s"
    train(_cfg(tiny_model_dir, demos_file, out, **{"train.max_steps": 2}))
    mtime = os.path.getmtime(out / "model" / "model.safetensors")
    train(_cfg(tiny_model_dir, demos_file, out, **{"train.max_steps": 2}))
    assert "already finished" in capsys.readouterr().out
    assert os.path.getmtime(out / "model" / "model.safetensors") == mtime
    with pytest.raises(StageError, match=r"different config \(train.lr"):
        train(_cfg(tiny_model_dir, demos_file, out, **{"train.max_steps": 2, "train.lr": 1e-4}))
    # a max_length beyond the model's positions (the tiny model has 256) is refused before any step
    with pytest.raises(ConfigError, match=r"data.max_length=512 is longer than the model's context \(256 positions\)"):
        train(_cfg(tiny_model_dir, demos_file, tmp_path / "long", **{"train.max_steps": 2, "data.max_length": 512}))
    assert not (tmp_path / "long" / "metrics.jsonl").exists()
    # ... but a run that stopped before its first checkpoint has nothing to resume: a new config takes its place
    early = tmp_path / "early"
    with pytest.raises(DataError, match="no such file"):  # a typo in the data path
        train(_cfg(tiny_model_dir, demos_file, early, **{"train.max_steps": 2, "data.train": "demoz.jsonl"}))
    assert (early / "config.yaml").exists() and not (early / "checkpoint").exists()
    train(_cfg(tiny_model_dir, demos_file, early, **{"train.max_steps": 2}))
    assert "starting afresh" in capsys.readouterr().out and (early / "DONE.json").exists()
    assert [json.loads(x)["step"] for x in open(early / "metrics.jsonl") if "train/loss" in x] == [1, 2]
    # a run from before a config key existed (here: no train.group_by_length) is the same run when the key is at
    # its default, so it still resumes or reports finished
    cfg_file = out / "config.yaml"
    cfg_file.write_text("".join(ln for ln in cfg_file.read_text().splitlines(keepends=True)
                                if "group_by_length" not in ln))
    train(_cfg(tiny_model_dir, demos_file, out, **{"train.max_steps": 2}))
    assert "already finished" in capsys.readouterr().out
    with pytest.raises(StageError, match="group_by_length"):
        train(_cfg(tiny_model_dir, demos_file, out, **{"train.max_steps": 2, "train.group_by_length": 4}))
    # the run's own config.yaml reruns it as --config: same config, so the finished stage is recognised
    again = load_config(SFTConfig, str(out / "config.yaml"))
    assert again == _cfg(tiny_model_dir, demos_file, out, **{"train.max_steps": 2})


def test_saving_a_lora_model_merges_a_copy_and_leaves_the_adapter_training(tiny, tmp_path):
    """peft's merge_and_unload rewrites a model in place; a save mid-run (PPO's keep_best) must not."""
    from transformers import AutoModelForCausalLM

    from instructgpt.config import LoraConfig
    from instructgpt.modeling import apply_lora, save_model
    model, tok = tiny
    model = apply_lora(model, LoraConfig(enabled=True, r=4, target_modules=["c_attn"]))
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero; a trained adapter changes the outputs
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.tensor([tok("the cat is red and the dog").input_ids])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        out = model(ids).logits
        with model.disable_adapter():
            ref = model(ids).logits
    assert float((out - ref).abs().max()) > 1e-2
    save_model(model, tok, str(tmp_path / "copy"))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    with torch.no_grad():
        assert torch.equal(model(ids).logits, out)
        with model.disable_adapter():  # the reference (adapter off) is still the untouched base
            assert torch.equal(model(ids).logits, ref)
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "copy")(ids).logits
    torch.testing.assert_close(saved, out, atol=1e-5, rtol=0)  # merged: a plain checkpoint of the adapted model
    save_model(model, tok, str(tmp_path / "last"), consume=True)  # a stage's last save merges in place
    assert not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "last")(ids).logits, out,
                                   atol=1e-5, rtol=0)



@pytest.mark.parametrize("arch,expected", [("gpt2", ["c_attn"]), ("mixtral", ["q_proj", "v_proj"]),
                                           ("phi3", ["qkv_proj"]), ("smollm3", ["q_proj", "v_proj"])])
def test_lora_adapts_peft_default_modules_else_the_query_and_value_projections(arch, expected):
    """model.lora.target_modules null: peft's default for the model type (GPT-2's c_attn; Mixtral's q_proj and v_proj,
    which peft finds none of by itself under this transformers), else, where peft names none (Phi-3, SmolLM3), the
    query and value projections or a fused query-key-value one; a list given is used as it is, and a model with none
    of those layers is a config error naming the key."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from instructgpt.config import LoraConfig
    from instructgpt.modeling import apply_lora, lora_target_modules
    torch.manual_seed(0)
    shape = dict(vocab_size=64, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0, bos_token_id=1,
                 eos_token_id=1)
    shape.update(n_embd=32) if arch == "gpt2" else shape.update(hidden_size=32, intermediate_size=64,
                                                                  num_key_value_heads=2)
    if arch == "mixtral":
        shape.update(num_local_experts=2, num_experts_per_tok=1)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **shape)).eval()
    assert lora_target_modules(model, None) == expected
    assert lora_target_modules(model, ["o_proj"]) == ["o_proj"]
    x = torch.randint(2, 64, (2, 6))
    before = model(x).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = apply_lora(model, LoraConfig(enabled=True, r=4))
    # GPT-2's Conv1D layers are adapted with fan_in_fan_out set beforehand, not by peft with a warning each
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    assert adapted.peft_config["default"].fan_in_fan_out == (arch == "gpt2")
    with torch.no_grad():  # LoRA's B starts at zero: the model is unchanged ...
        assert torch.equal(adapted(x).logits, before)
        for n, p in adapted.named_parameters():
            if ".lora_B" in n:
                p.normal_()
        # ... and a nonzero B changes it: the adapter's product has the layer's shape (transposed for Conv1D)
        assert not torch.allclose(adapted(x).logits, before)
    with_lora = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in adapted.named_parameters() if ".lora_A" in n}
    assert with_lora == set(expected)
    assert sum("lora_A" in n for n, _ in adapted.named_parameters()) == 2 * len(expected)  # in both layers
    with pytest.raises(ConfigError, match="model.lora.target_modules: peft has no default"):
        lora_target_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)), None)

def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        load_config(SFTConfig, None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        load_config(SFTConfig, None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="model.dtype: must be one of"):
        load_config(SFTConfig, None, ["model.dtype=float8"])
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lr: 0.5\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown config key 'train.bogus'"):
        load_config(SFTConfig, str(y))
    cfg = load_config(SFTConfig, None, ["model.lora.enabled=true", "model.lora.target_modules=c_attn,c_proj"])
    assert cfg.model.lora.enabled and cfg.model.lora.target_modules == ["c_attn", "c_proj"]
    # YAML 1.1 reads an unquoted `no` as false: the choice "no" is still meant, on the command line and in a file
    assert load_config(SFTConfig, None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    y.write_text("train:\n  mixed_precision: no\n")
    assert load_config(SFTConfig, str(y)).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision: must be one of .* got True"):
        load_config(SFTConfig, None, ["train.mixed_precision=yes"])


def test_sigkill_midway_then_rerun_matches_uninterrupted(tiny_model_dir, demos_file, tmp_path):
    args = [f"model.name_or_path={tiny_model_dir}", f"data.train={demos_file}", "train.batch_size=16",
            "train.max_steps=40", "train.save_every=4", "data.eval_size=0", "train.lr=1e-3"]
    cli = [sys.executable, "-m", "instructgpt.cli", "sft"]
    ref = tmp_path / "ref"
    subprocess.run(cli + args + [f"out_dir={ref}"], check=True, capture_output=True)
    out = tmp_path / "killed"
    sigkill_after_checkpoint(cli + args + [f"out_dir={out}"], out, step=8)
    subprocess.run(cli + args + [f"out_dir={out}"], check=True, capture_output=True)
    wa, wb = saved_weights(ref), saved_weights(out)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_truncate_metrics_keeps_rows_up_to_the_checkpoint_and_none_without_one(tiny_model_dir, demos_file, tmp_path):
    from instructgpt.runs import StageRun
    run = StageRun(_cfg(tiny_model_dir, demos_file, tmp_path / "m"), "sft")
    assert run.prepare() == "fresh"
    for step in (0, 1, 2, 3):  # step 0: a log before the first update (PPO's first held-out evaluation)
        run.log(step, {"x": step})
    run.truncate_metrics(2)
    assert [json.loads(l)["step"] for l in open(tmp_path / "m" / "metrics.jsonl")] == [0, 1, 2]
    run.truncate_metrics(0)  # killed before the first checkpoint: the rerun logs everything again, step 0 included
    assert open(tmp_path / "m" / "metrics.jsonl").read() == ""


def test_a_chat_template_override_trains_and_travels_with_the_checkpoint(tiny_model_dir, demos_file, tmp_path):
    """model.chat_template replaces the tokenizer's template: SFT's examples are rendered with it (the loss still
    covers exactly the response), and the saved SFT model carries it, so RM, PPO and serving read prompts the same way."""
    from instructgpt.modeling import load_model
    from instructgpt.prompting import render_prompt

    tpl = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
           "{% if add_generation_prompt %}<assistant>{% endif %}")
    cfg = _cfg(tiny_model_dir, demos_file, tmp_path / "sft", **{"train.max_steps": 2, "model.chat_template": tpl})
    _, tok = load_model(cfg.model)
    assert render_prompt(tok, "add 1 and 2") == "<user>add 1 and 2\n<assistant>"
    assert render_prompt(load_model(tiny_model_dir)[1], "add 1 and 2") != render_prompt(tok, "add 1 and 2")
    d = demo("add 2 plus 3", "five")
    ids, mask = encode_conversation(tok, d.messages)
    prompt_ids = tok(render_prompt(tok, d.messages[:1]), add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids and not any(mask[:len(prompt_ids)])
    assert tok.decode([t for t, m in zip(ids, mask) if m]).startswith("five")
    train(cfg)
    _, saved = load_model(str(tmp_path / "sft" / "model"))
    assert saved.chat_template == tpl and render_prompt(saved, "hi") == "<user>hi\n<assistant>"
