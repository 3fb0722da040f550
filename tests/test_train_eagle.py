"""`outrider train drafter --method eagle` end to end on a tiny target, and the pieces it is made
of: self-distilled data, the reduced vocabulary, the unrolled (training-time test) attention."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import tiny_model
from outrider import SpeculativeDecoder
from outrider.cli import main
from outrider.drafters.datastore import SEP, Datastore
from outrider.train.eagle import EagleRecipe, train_eagle, unroll_mask
from outrider.train.selfdistill import frequent_tokens


def test_unroll_mask_follows_the_drafting_chain():
    m = unroll_mask(5, 3, torch.device("cpu"))  # 5 pairs, step 3: keys [step1 | step2 | step3]
    # Pair 4 at depth 3 drafts after true pairs 0..2, then its chain: step 2 at pair 3, itself.
    assert m[4].nonzero().flatten().tolist() == [0, 1, 2, 5 + 3, 10 + 4]
    assert m[2].nonzero().flatten().tolist() == [0, 5 + 1, 10 + 2]
    assert unroll_mask(4, 1, torch.device("cpu"))[:, :4].tril().equal(unroll_mask(4, 1, torch.device("cpu")))


def test_frequent_tokens_are_the_reduced_vocabulary():
    seqs = torch.tensor([[5, 5, 5, 2, 2, 9], [5, 2, 7, 7, 7, 7]])
    assert frequent_tokens(seqs, 3, 10).tolist() == [2, 5, 7]  # 7 x4, 5 x4, 2 x3; ascending ids


def tiny_recipe(tmp_path, tokenizer, layers: int, prompt: str, out: str, prompt_len: int, gen_len: int) -> EagleRecipe:
    """A saved tiny Llama target with the tiny tokenizer, 40 prompts (`prompt` formatted with i) in a
    JSONL file, and a recipe training for 3 s on 24 of them."""
    target = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=layers, eos_token_id=tokenizer.eos_token_id)
    target.save_pretrained(tmp_path / "target")
    tokenizer.save_pretrained(tmp_path / "target")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": prompt.format(i=i)}) + "\n" for i in range(40)))
    return EagleRecipe(target=str(tmp_path / "target"), out=str(tmp_path / out), minutes=0.05, prompts=24,
                       heldout_prompts=8, prompt_len=prompt_len, gen_len=gen_len, draft_vocab=64, gen_batch=8,
                       prompts_file=str(prompts))


@pytest.mark.slow
def test_train_drafter_end_to_end(tmp_path, tokenizer):
    recipe = tiny_recipe(tmp_path, tokenizer, 4, "def f{i}(a, b):\n    return a + {i}", "head", 8, 16)
    report = train_eagle(recipe)
    assert report["steps"] > 0 and report["draft_vocab"] == 64 and len(report["heldout_acceptance_by_depth"]) == 3
    assert all(0.0 <= a <= 1.0 for a in report["heldout_acceptance_by_depth"])
    assert (tmp_path / "head" / "report.md").read_text().startswith("# EAGLE head")
    # Resuming a finished run trains no further and reports the same steps.
    assert train_eagle(recipe)["steps"] == report["steps"]
    dec = SpeculativeDecoder.from_pretrained(str(tmp_path / "target"), draft=str(tmp_path / "head"), method="eagle",
                                             k=3, dtype="float32")
    ref = SpeculativeDecoder.from_pretrained(str(tmp_path / "target"), method="autoregressive", dtype="float32")
    prompt = "def f3(a, b):\n"
    assert dec.generate(prompt, max_new_tokens=16).token_ids == ref.generate(prompt, max_new_tokens=16).token_ids
    # The head's folder keeps the target's training answers as a datastore, prompts left out.
    data = torch.load(tmp_path / "head" / "work" / "data.pt")
    answers = [row[start:][row[start:] >= 0].tolist() for row, start in zip(data["train"], data["train_starts"])]
    assert all(tokenizer.decode(row[:start].tolist()).startswith("def f") and 0 < start <= 8
               for row, start in zip(data["train"], data["train_starts"]))
    assert sequences(Datastore.load(tmp_path / "head")) == answers and report["datastore_tokens"] == sum(map(len, answers))
    # `outrider train datastore` gathers runs' answers into one file that `suffix` reads.
    assert main(["train", "datastore", "--target", str(tmp_path / "target"), "--runs", str(tmp_path / "head"),
                 "--out", str(tmp_path / "answers.npy")]) == 0
    assert sequences(Datastore.load(tmp_path / "answers.npy")) == answers
    # --max-tokens keeps the first whole answers within the budget (here the first two).
    budget = len(answers[0]) + len(answers[1])
    assert main(["train", "datastore", "--target", str(tmp_path / "target"), "--runs", str(tmp_path / "head"),
                 "--out", str(tmp_path / "first.npy"), "--max-tokens", str(budget)]) == 0
    assert sequences(Datastore.load(tmp_path / "first.npy")) == answers[:2]
    dec = SpeculativeDecoder.from_pretrained(str(tmp_path / "target"), method="suffix", dtype="float32",
                                             datastore=str(tmp_path / "answers.npy"))
    assert dec.generate(prompt, max_new_tokens=16).token_ids == ref.generate(prompt, max_new_tokens=16).token_ids


def sequences(store) -> list[list[int]]:
    """A datastore's corpus split back into its sequences."""
    out, cur = [], []
    for t in store.corpus.tolist():
        if t == SEP:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out


def test_cli_train_drafter_validates(tmp_path, capsys):
    from outrider.cli import main

    assert main(["train", "drafter", "--target", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    args = ["train", "drafter", "--target", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--device"]
    assert main(args + ["tpu"]) == 2
    assert "--device 'tpu' is invalid: use cpu or cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(args + ["cuda"]) == 2
        assert "torch sees no CUDA device here; use --device cpu" in capsys.readouterr().err


class _ScriptedGenerator:
    """A stand-in for a target's generate(): appends fixed new tokens to each left-padded row."""

    device = torch.device("cpu")

    def __init__(self, new: dict[int, list[int]]) -> None:
        self.new = new  # first real prompt token -> the new tokens generate returns for that row

    def generate(self, ids, attention_mask, max_new_tokens, pad_token_id, **kw):
        firsts = [int(r[m.bool()][0]) for r, m in zip(ids, attention_mask)]
        return torch.cat([ids, torch.tensor([self.new[f][:max_new_tokens] for f in firsts])], dim=1)


def test_chat_answers_end_at_eos_and_rows_are_right_padded():
    from outrider.train.selfdistill import PAD, self_distill

    eos = 9
    gen = _ScriptedGenerator({1: [5, 9, 9, 9], 2: [6, 6, 6, 6], 3: [9, 4, 4, 4]})
    rows = self_distill(gen, [[1, 1, 1], [2], [3, 3]], gen_len=4, batch=8, seed=0, eos=(eos,))
    # Sorted by prompt length; the left padding is gone; each answer stops at (and keeps) EOS.
    assert rows.tolist() == [[2, 6, 6, 6, 6], [3, 3, 9, PAD, PAD], [1, 1, 1, 5, 9]]


def test_answer_starts_mark_where_each_row_answers(tokenizer):
    """The held-out figures score answer tokens only: the starts follow self_distill's row order,
    and for data saved without them, the chat template's assistant cue finds them."""
    import copy

    from outrider.train.selfdistill import answer_starts, chat_answer_starts, chat_prompt_ids, self_distill

    prompts = [[1, 1, 1], [2], [3, 3]]
    rows = self_distill(_ScriptedGenerator({1: [5, 9, 9, 9], 2: [6, 6, 6, 6], 3: [9, 4, 4, 4]}), prompts,
                        gen_len=4, batch=8, seed=0, eos=(9,))
    starts = answer_starts(prompts)
    assert [r[:s].tolist() for r, s in zip(rows, starts)] == [[2], [3, 3], [1, 1, 1]]
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    asks = [chat_prompt_ids(chat, t) for t in ("def add(a, b):", "print(1)")]
    answer = chat("    return a + b", add_special_tokens=False)["input_ids"]
    rows = torch.tensor([asks[0] + answer, asks[1] + answer + [-1] * (len(asks[0]) - len(asks[1]))])
    assert chat_answer_starts(rows, chat).tolist() == [len(asks[0]), len(asks[1])]


def test_heldout_scores_only_answer_tokens(tokenizer):
    """A head that always drafts token c (two draft tokens, zero output weights: ties pick the first)
    agrees with the target exactly where the target's top token over the whole vocabulary is c, as
    the decoder checks it: where the target prefers c to c2 but a token outside the draft vocabulary
    to both, the head is wrong. With starts, only the answer pairs count."""
    from outrider.drafters.eagle import new_head
    from outrider.train.eagle import evaluate
    from outrider.train.loop import autocast

    target = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=4)
    embed = target.get_input_embeddings().weight.detach().clone()
    c, c2 = 5, 17
    with torch.no_grad():  # every other token's logit 0: the target's top is c, c2 or (both < 0) token 0
        out = target.get_output_embeddings().weight.detach().clone()
        keep = out[[c, c2]].clone()
        out.zero_()
        out[[c, c2]] = keep
        target.get_output_embeddings().weight = torch.nn.Parameter(out)
    head = new_head(target.config, embed, "t", torch.tensor([c, c2]), (0, 2, 4))
    with torch.no_grad():
        head.lm_head.weight.zero_()
    rows = torch.randint(0, len(tokenizer), (6, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), autocast(rows.device):
        logits = target(input_ids=rows).logits.float()
    prefers_c = (logits.argmax(-1) == c).float()  # (6, 12): position t predicts token t+1
    reduced_only = (logits[..., c] >= logits[..., c2]).float()
    assert (reduced_only[:, 7:11] > prefers_c[:, 7:11]).any()  # the case the full vocabulary decides
    # Pair j predicts token j+2 from the target's logits at j+1; answers from token 8 on: j+1 = 7..10.
    late = evaluate(head, target, embed, rows, 2, starts=torch.full((6,), 8))
    assert late["by_depth"][0] == late["chain"][0] == round(float(prefers_c[:, 7:11].mean()), 4)
    # Depth 2 of a chain from pair j: right where the target prefers c at j+1 and at j+2 (both answer pairs).
    both = prefers_c[:, 7:10] * prefers_c[:, 8:11]
    assert late["chain"][1] == round(float(both.mean()), 4)
    assert late["by_depth"][1] == round(float(both.sum() / prefers_c[:, 7:10].sum()), 4)
    every = evaluate(head, target, embed, rows, 1)
    assert every["by_depth"] == [round(float(prefers_c[:, 1:11].mean()), 4)]
    assert evaluate(head, target, embed, rows, 1, starts=torch.zeros(6, dtype=torch.long)) == every
    nothing = torch.tensor([8, 8, 8, 99, 99, 99])  # rows 3-5 answer after their end: they add nothing
    assert evaluate(head, target, embed, rows, 1, starts=nothing)["by_depth"] == [round(float(prefers_c[:3, 7:11].mean()), 4)]


def test_chains_are_counted_as_decoding_walks_them():
    from outrider.train.eagle import chain_counts, stepped_counts

    # One row, 8 pairs, 2 depths. hits[s][j]: depth s+1 of the chain ending at pair j is right.
    h1 = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 1]], dtype=torch.bool)
    h2 = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    score = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)  # pair 0 is the prompt's
    # From every scored pair i (1..7): depth 1 right at 1, 3, 4, 5, 7; of those, depth 2 (at pair i+1)
    # drafted for i = 1, 3, 4, 5 (pair 8 does not exist) and right at pairs 2, 4, 5, 6.
    assert chain_counts([h1, h2], score) == ([7.0, 4.0], [5.0, 4.0])
    # Decoding: chain at 1 keeps 2 -> bonus -> chain at 4 keeps 2 -> chain at 7: depth 1 right, no pair 8.
    assert stepped_counts([h1, h2], score) == ([3.0, 2.0], [3.0, 2.0])
    # Chain at 1 misses at depth 1 and still drafted depth 2 (right, but not accepted); next at 2...
    h1b = torch.tensor([[1, 0, 1, 1, 1, 1, 0, 1]], dtype=torch.bool)
    # Chain at 1 keeps 2; then every chain misses at once and the next starts one pair on: 4, 5, 6, 7.
    miss = torch.tensor([[0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert stepped_counts([miss, h2], score) == ([5.0, 4.0], [1.0, 1.0])
    # ...chain at 2 keeps 2 (pairs 2, 3: h2[3] misses -> keeps 1) -> chain at 4 keeps 2 -> at 7 keeps 1.
    assert stepped_counts([h1b, h2], score) == ([4.0, 3.0], [3.0, 1.0])


def test_padding_changes_no_loss(tokenizer):
    """Right padding must be invisible: a row with a PAD tail scores exactly as the row alone."""
    from outrider.drafters.eagle import new_head
    from outrider.train.eagle import target_pass, unrolled_losses

    target = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=4)
    embed = target.get_input_embeddings().weight.detach()
    head = new_head(target.config, embed, "t", torch.arange(64), (0, 2, 4))
    row = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([row, torch.full((1, 5), -1)], dim=1)

    def losses(batch):
        hidden, logits = target_pass(target, batch, head.cfg.target_layers)
        loss, hits = unrolled_losses(head, embed, batch, hidden, logits[..., head.d2t], 3)
        return torch.stack(loss), torch.stack(hits)[..., : row.shape[1] - 1]  # (steps, 1, the row's pairs)

    (l1, a1), (l2, a2) = losses(row), losses(padded)
    assert torch.allclose(l1, l2, atol=1e-5) and torch.equal(a1, a2)
    # ...and the tail is really skipped: scoring it as token 0 would change the loss.
    l3, _ = losses(padded.clamp(min=0))
    assert not torch.allclose(l1, l3, atol=1e-3)


def test_chat_prompts_go_through_the_template(tmp_path, tokenizer):
    from outrider.train.selfdistill import prompt_windows

    tok = tiny_tokenizer_with_template(tokenizer)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"def f{i}():"}) + "\n" for i in range(10)))
    recipe = EagleRecipe(target="t", out="o", prompts_file=str(prompts), heldout_prompts=2, prompt_len=64)
    rows = prompt_windows(tok, recipe, False, 8, 0)
    assert len(rows) == 8 and tok.decode(rows[0]) == "<|user|>def f0():\n<|assistant|>"
    plain = prompt_windows(tok, EagleRecipe(target="t", out="o", prompts_file=str(prompts), heldout_prompts=2,
                                            prompt_len=64, chat=False), False, 8, 0)
    assert tok.decode(plain[0]) == "def f0():"


def tiny_tokenizer_with_template(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


@pytest.mark.slow
def test_a_rerun_with_more_prompts_extends_the_data_and_keeps_the_head(tmp_path, tokenizer):
    """A finished run rerun with more prompts generates only the new ones, appends them, and resumes
    the same head (its reduced vocabulary too) instead of starting over."""
    from dataclasses import replace

    from outrider.drafters.eagle import EagleHead

    recipe = tiny_recipe(tmp_path, tokenizer, 2, "def g{i}(x):\n    return x * {i}", "head", 8, 8)
    recipe = replace(recipe, prompts=12, draft_vocab=16, minutes=0.02, cache_on_disk=True)
    train_eagle(recipe)
    store = tmp_path / "head" / "work" / "features"
    assert json.loads((store / "meta.json").read_text())["done"] == 12  # --cache-on-disk: the features on disk
    data = torch.load(tmp_path / "head" / "work" / "data.pt")
    first_d2t = EagleHead.load(tmp_path / "head").d2t.clone()
    grown = train_eagle(replace(recipe, prompts=20, minutes=0.04))
    more = torch.load(tmp_path / "head" / "work" / "data.pt")
    assert more["train"].shape[0] == 20 and grown["data"]["train_sequences"] == 20
    assert more["train_starts"].shape[0] == 20  # each row keeps where its answer begins
    old = data["train"]
    assert torch.equal(more["train"][:12, : old.shape[1]], old)  # the first rows, untouched
    assert torch.equal(more["heldout"], data["heldout"])  # the same held-out set: figures compare
    # The new rows continue prompts 12..19 of the file (the rows are sorted by prompt length).
    new_prompts = {re.match(r"def g(\d+)", tokenizer.decode(r[r >= 0].tolist())).group(1) for r in more["train"][12:]}
    assert new_prompts == {str(i) for i in range(12, 20)}
    assert torch.equal(EagleHead.load(tmp_path / "head").d2t, first_d2t)
    assert json.loads((store / "meta.json").read_text())["done"] == 20  # the rerun's store covers its 20 rows



def test_a_warm_start_carries_the_head_and_refuses_another_targets(tmp_path, tokenizer):
    """--init starts from a trained head: its layers and reduced vocabulary carry over (the recipe's
    draft_vocab is not used), the report names it; a head of another target is refused by name."""
    from dataclasses import replace

    from outrider.drafters.eagle import EagleHead
    from outrider.models import load_transformers_model
    from outrider.train.eagle import warm_head

    recipe = replace(tiny_recipe(tmp_path, tokenizer, 2, "def h{i}(y):\n    return y - {i}", "head", 8, 8),
                     prompts=12, draft_vocab=16, minutes=0.02)
    train_eagle(recipe)
    first = EagleHead.load(tmp_path / "head", dtype=torch.float32)
    embed = load_transformers_model(tmp_path / "target", torch.float32).get_input_embeddings().weight.detach()
    warm = warm_head(str(tmp_path / "head"), embed, "t")
    assert all(torch.equal(a, b) for a, b in zip(warm.state_dict().values(), first.state_dict().values()))
    report = train_eagle(replace(recipe, out=str(tmp_path / "warm"), init=str(tmp_path / "head"), draft_vocab=32))
    assert report["init"] == str(tmp_path / "head") and report["draft_vocab"] == 16
    assert torch.equal(EagleHead.load(tmp_path / "warm").d2t, first.d2t)

    other = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=2, seed=7)
    with pytest.raises(ValueError, match="is a head for target .* not for 'other'"):
        warm_head(str(tmp_path / "head"), other.get_input_embeddings().weight.detach(), "other")
    with pytest.raises(ValueError, match="is not an EAGLE head folder"):
        replace(recipe, init=str(tmp_path)).check()


def test_batches_group_rows_of_similar_length():
    """A batch costs its longest row: batches are windows of rows in length order, seeded."""
    from outrider.train.eagle import LengthGroupedSampler

    lengths = torch.tensor([900, 10, 500, 20, 880, 30, 510, 15])
    ordered = lengths.sort().values.tolist()
    windows = [ordered[i : i + 3] for i in range(len(ordered) - 2)]
    a, b = LengthGroupedSampler(lengths, 3, 0), LengthGroupedSampler(lengths, 3, 0)
    seen = set()
    for _ in range(60):
        batch = a.next_batch()
        assert torch.equal(batch, b.next_batch())  # seeded
        assert lengths[batch].sort().values.tolist() in windows  # neighbours in length order
        seen.update(batch.tolist())
    assert seen == set(range(8))  # every row is drawn


def test_long_requests_carry_passages_and_keep_the_split():
    from outrider.train.instructions import LONG_PASSAGE, make_long_instructions, read_sources

    train, held = make_long_instructions(40, False, 0), make_long_instructions(10, True, 0)
    assert train == make_long_instructions(40, False, 0) and train != make_long_instructions(40, False, 1)
    assert len(set(train)) > 30  # passages differ, not one text 40 times
    assert all(len(r) > LONG_PASSAGE[0] // 3 for r in train + held)
    held_paragraphs = {p for paras in read_sources(True) for p in paras if len(p) > 200}
    assert held_paragraphs and not any(p in r for p in held_paragraphs for r in train)
    with pytest.raises(ValueError, match="self_requests \\+ long_requests = 1.2 is over 1"):
        EagleRecipe(target="t", out="o", self_requests=0.6, long_requests=0.6).check()


def test_generation_stopped_midway_resumes_from_its_last_chunk(tmp_path, tokenizer, monkeypatch):
    """Self-distillation saves every chunk: a run stopped while generating keeps what it wrote, and
    the rerun generates only the rest."""
    from transformers import AutoModelForCausalLM

    from outrider.train import selfdistill

    recipe = tiny_recipe(tmp_path, tokenizer, 2, "def h{i}(x):\n    return x - {i}", "head", 8, 6)
    target = AutoModelForCausalLM.from_pretrained(recipe.target).eval()
    monkeypatch.setattr(selfdistill, "GEN_CHUNK_BATCHES", 1)  # chunks of gen_batch = 8 rows
    real, calls = selfdistill.self_distill, []

    def stopping(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 3:  # the first chunk (8 rows) and the held-out set are done
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(selfdistill, "self_distill", stopping)
    path = tmp_path / "data.pt"
    with pytest.raises(KeyboardInterrupt):
        selfdistill.load_or_generate(target, tokenizer, recipe, path)
    kept = torch.load(path)
    assert kept["train"].shape[0] == 8 and kept["heldout"].shape[0] == 8
    monkeypatch.setattr(selfdistill, "self_distill", real)
    done = selfdistill.load_or_generate(target, tokenizer, recipe, path)
    assert done["train"].shape[0] == 24 and torch.equal(done["heldout"], kept["heldout"])
    assert torch.equal(done["train"][:8, : kept["train"].shape[1]], kept["train"])
    names = {re.match(r"def h(\d+)", tokenizer.decode(r[r >= 0].tolist())).group(1) for r in done["train"]}
    assert names == {str(i) for i in range(24)}  # every training prompt of the file, once


def test_feature_cache_on_disk_equals_ram_and_resumes(tmp_path, monkeypatch):
    """--cache-on-disk: the target's features in memory-mapped files give the same batches as the
    RAM cache; a rerun (a stopped run resumed) computes only the rows not yet stored, and a store
    of other rows is computed anew, not read."""
    from outrider.train.eagle import Features

    target = tiny_model("llama", vocab_size=64, num_hidden_layers=4)
    rows = torch.randint(0, 64, (5, 9), generator=torch.Generator().manual_seed(0))
    rows[1, 6:] = -1  # right padding, as the data has
    d2t, layers, store = torch.tensor([3, 7, 11]), (0, 2, 4), tmp_path / "features"
    ram = Features(target, rows, layers, d2t, cache_gb=1.0, batch=2)
    disk = Features(target, rows, layers, d2t, cache_gb=1.0, batch=2, store=store)
    index = torch.tensor([4, 1, 0])
    for a, b in zip(ram(index), disk(index)):
        assert torch.equal(a, b)

    computed = []
    real_states = Features._states
    monkeypatch.setattr(Features, "_states", lambda self, b: computed.append(b.shape[0]) or real_states(self, b))
    again = Features(target, rows, layers, d2t, cache_gb=1.0, batch=2, store=store)
    assert computed == []  # every row was stored: nothing recomputed
    assert torch.equal(again(index)[1], ram(index)[1])
    meta = json.loads((store / "meta.json").read_text())
    (store / "meta.json").write_text(json.dumps({**meta, "done": 2}))  # stopped after the first chunk
    Features(target, rows, layers, d2t, cache_gb=1.0, batch=2, store=store)
    assert computed == [2, 1]  # rows 2-3, then row 4
    computed.clear()
    other = rows.flip(0)
    fresh = Features(target, other, layers, d2t, cache_gb=1.0, batch=2, store=store)
    assert computed == [2, 2, 1]
    assert torch.equal(fresh(index)[1], Features(target, other, layers, d2t, cache_gb=1.0, batch=2)(index)[1])


def test_feature_cache_on_disk_refuses_a_disk_too_small(tmp_path, monkeypatch):
    """A mapped write past a full disk kills the process (SIGBUS): the store checks the room first
    and names what it needs and the fix."""
    import collections
    import shutil

    from outrider.train.eagle import Features

    target = tiny_model("llama", vocab_size=64, num_hidden_layers=4)
    rows = torch.randint(0, 64, (5, 9), generator=torch.Generator().manual_seed(0))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ValueError, match=r"--cache-on-disk needs .* GB more .* leave out --cache-on-disk"):
        Features(target, rows, (0, 2, 4), torch.tensor([3, 7]), cache_gb=1.0, store=tmp_path / "features")
