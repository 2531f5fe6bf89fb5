"""The task modules (issue 20): SQuAD v1.1 EM/F1 against hand-computed values, detokenized BLEU,
label-smoothed cross-entropy, decoding, MLM masking statistics, and loaders/tokenizers from small
local files written here in the real formats (never downloaded)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lowprec.mlm import mask_tokens, text_blocks
from lowprec.squad import (best_answer, exact_match, f1_score, load_squad, normalize_answer, qa_features,
                           squad_metrics)
from lowprec.tasks import TaskDataSpec, load_tokenizer, require_local, train_tokenizer
from lowprec.translation import beam_search, bleu, greedy_decode, label_smoothed_nll_loss, load_pairs

CONTEXT1 = "The Eiffel Tower was completed in 1889 in Paris. It was designed by the company of Gustave Eiffel."
CONTEXT2 = "Photosynthesis converts light energy into chemical energy, which is stored in glucose."
SQUAD = {"version": "1.1", "data": [
    {"title": "Eiffel", "paragraphs": [{"context": CONTEXT1, "qas": [
        {"id": "q1", "question": "When was the Eiffel Tower completed?",
         "answers": [{"text": "1889", "answer_start": CONTEXT1.index("1889")},
                     {"text": "in 1889", "answer_start": CONTEXT1.index("in 1889")}]},
        {"id": "q2", "question": "Who designed the tower?",
         "answers": [{"text": "the company of Gustave Eiffel", "answer_start": CONTEXT1.index("the company")}]}]}]},
    {"title": "Biology", "paragraphs": [{"context": CONTEXT2, "qas": [
        {"id": "q3", "question": "Where is chemical energy stored?",
         "answers": [{"text": "glucose", "answer_start": CONTEXT2.index("glucose")}]}]}]}]}


# ----------------------------------------------------------------------------- SQuAD


def test_normalization_official_order():
    assert normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("An apple a day, the end") == "apple day end"
    assert normalize_answer("banana theatre") == "banana theatre"  # articles only as whole words
    assert normalize_answer("the.cat") == "thecat"  # punctuation goes first, so 'the' is no longer a word


def test_em_f1_hand_computed():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "eiffel tower") == 0.0
    # pred "in city of paris" (4 tokens) vs "paris": P = 1/4, R = 1, F1 = 2·(1/4)/(5/4) = 0.4
    assert f1_score("in the city of Paris", "Paris") == pytest.approx(0.4)
    # pred "gustave eiffel" vs "company of gustave eiffel": P = 1, R = 2/4, F1 = 2/3
    assert f1_score("Gustave Eiffel", "the company of Gustave Eiffel") == pytest.approx(2 / 3)
    # multiset overlap: pred "a a b" -> "b"? no: 'a' is an article -> "b"; truth "b b" -> common 1:
    # P = 1, R = 1/2 -> 2/3
    assert f1_score("a a b", "b b") == pytest.approx(2 / 3)
    assert f1_score("x", "y") == 0.0


def test_squad_file_and_metrics(tmp_path):
    """Per question the max over ground truths; q1 exact, q2 F1 2/3, q3 missing (0)."""
    p = tmp_path / "dev-v1.1.json"
    p.write_text(json.dumps(SQUAD))
    ex = load_squad(p)
    assert [e["id"] for e in ex] == ["q1", "q2", "q3"] and ex[0]["answers"] == ["1889", "in 1889"]
    m = squad_metrics(ex, {"q1": "in 1889", "q2": "Gustave Eiffel"})
    assert m["exact_match"] == pytest.approx(100 / 3)
    assert m["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    bad = tmp_path / "bad.json"
    for doc in ({"data": [{"paragraphs": [{"qas": [{"id": "x"}]}]}]}, {"data": [{"paragraphs": []}]}):
        bad.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match="not a SQuAD v1.1 JSON"):
            load_squad(bad)


def test_qa_features_and_best_answer_round_trip(tmp_path):
    """Windows over a long context with a stride: the labelled token span maps back to the
    answer's characters, and logits peaked at it decode to the answer text."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join([CONTEXT1, CONTEXT2] * 5))
    tok = train_tokenizer([corpus], vocab_size=200, kind="wordpiece", lowercase=True)
    ex = load_squad(_write(tmp_path, SQUAD))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    f = qa_features(ex, tok, max_length=24, doc_stride=4, cls_id=cls, sep_id=sep)
    assert f["input_ids"].shape[1] == 24 and len(f["offsets"]) == f["input_ids"].shape[0] > len(ex)
    found = set()
    for w, i in enumerate(f["example"]):
        s, e = int(f["start_positions"][w]), int(f["end_positions"][w])
        if s:
            off = f["offsets"][w]
            assert ex[i]["context"][off[s][0]:off[e][1]].lower() == ex[i]["answers"][0].lower()
            found.add(i)
            sl, el = torch.zeros(24), torch.zeros(24)
            sl[s], el[e] = 5.0, 5.0
            assert best_answer(ex[i]["context"], [sl], [el], [off]) == ex[i]["context"][off[s][0]:off[e][1]]
    assert found == {0, 1, 2}


def _write(tmp_path, doc):
    p = tmp_path / "squad.json"
    p.write_text(json.dumps(doc))
    return p


# ----------------------------------------------------------------------------- translation


def test_bleu_detokenized_hand_computed():
    """13a splits the final period: 7 tokens each; clipped n-gram precisions 6/7, 4/6, 2/5, 1/4,
    equal lengths (no brevity penalty): BLEU = 100·(6/7·4/6·2/5·1/4)^(1/4)."""
    hyp, ref = "The cat sat on the mat.", "The cat sat on a mat."
    assert bleu([hyp], [ref]) == pytest.approx(100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25, abs=1e-6)
    pairs = [("Der Hund bellt.", "Der Hund bellt."), ("Ein Haus am See.", "Ein Haus am See.")]
    assert bleu([a for a, _ in pairs], [b for _, b in pairs]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        bleu(["a", "b"], ["a"])


def test_label_smoothed_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # [N=2, V=3]
    y = torch.tensor([0, -100])
    lp0 = [2.0 - math.log(math.exp(2) + 1 + math.exp(-1)) + 0.0 * i for i in range(1)][0]
    lse = math.log(math.exp(2) + 1 + math.exp(-1))
    mean_nlp = -((2 - lse) + (0 - lse) + (-1 - lse)) / 3
    want = 0.9 * (-lp0) + 0.1 * mean_nlp  # the second row is padding
    assert float(label_smoothed_nll_loss(logits, y, 0.1)) == pytest.approx(want)
    assert float(label_smoothed_nll_loss(logits, y, 0.0)) == pytest.approx(
        float(nn.functional.cross_entropy(logits, y, ignore_index=-100)))
    # [B, V, T] layout (class dim second) as the HF wrappers return
    assert float(label_smoothed_nll_loss(logits.t()[None], y[None], 0.1)) == pytest.approx(want)


class _Table(nn.Module):
    """A decoder whose next-token probabilities depend only on the prefix (a lookup table):
    start(0) -> A(1) 0.6, B(2) 0.4; after A: eos(3) 0.5, A 0.5; after B: eos 0.9, A 0.1."""
    P = {(0,): {1: 0.6, 2: 0.4}, (0, 1): {3: 0.5, 1: 0.5}, (0, 2): {3: 0.9, 1: 0.1}}

    def forward(self, src, dec, attention_mask=None):
        out = torch.full((dec.shape[0], 4, dec.shape[1]), -30.0)
        for b, row in enumerate(dec.tolist()):
            for tok, p in self.P.get(tuple(row), {3: 1.0}).items():
                out[b, tok, -1] = math.log(p)
        return out


def test_greedy_and_beam():
    """Greedy takes A (0.6) then eos or A; beam 2 finds B eos (0.36 > A eos 0.30)."""
    src = torch.zeros(1, 3, dtype=torch.long)
    g = greedy_decode(_Table(), src, decoder_start_id=0, eos_id=3, max_len=5)
    assert g[0][0] == 1
    assert beam_search(_Table(), src, decoder_start_id=0, eos_id=3, max_len=5, beam=2) == [2]


def test_load_pairs_both_formats(tmp_path):
    (tmp_path / "train.en").write_text("Hello world.\nA small house.\n")
    (tmp_path / "train.de").write_text("Hallo Welt.\nEin kleines Haus.\n")
    assert load_pairs(tmp_path, "train") == [("Hello world.", "Hallo Welt."), ("A small house.", "Ein kleines Haus.")]
    rows = [{"translation": {"en": "Good morning.", "de": "Guten Morgen."}},
            {"translation": {"en": "Thank you.", "de": "Danke."}}]
    (tmp_path / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_pairs(tmp_path, "validation") == [("Good morning.", "Guten Morgen."), ("Thank you.", "Danke.")]
    (tmp_path / "test.en").write_text("one\ntwo\n")
    (tmp_path / "test.de").write_text("eins\n")
    with pytest.raises(ValueError, match="not parallel"):
        load_pairs(tmp_path, "test")


# ----------------------------------------------------------------------------- MLM


def test_mask_statistics():
    """15% of maskable tokens selected; of those 80% [MASK], 10% random (a different token with
    prob 1 - 1/V), 10% kept; specials never selected; labels -100 elsewhere. Bounds: 5 standard
    errors of each binomial proportion."""
    V, mask_id, specials = 50, 4, (0, 1, 2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (400, 500), generator=g)
    ids[:, 0], ids[:, -1], ids[:, 250:260] = 1, 2, 0  # CLS, SEP, padding
    x, labels = mask_tokens(ids, vocab_size=V, mask_id=mask_id, special_ids=specials, generator=g)
    maskable = ids >= 5
    sel = labels != -100
    assert not (sel & ~maskable).any() and torch.equal(labels[sel], ids[sel])
    assert torch.equal(x[~sel], ids[~sel])

    def close(k, n, p):
        assert abs(k / n - p) <= 5 * math.sqrt(p * (1 - p) / n), (k, n, p)

    n, s = int(maskable.sum()), int(sel.sum())
    close(s, n, 0.15)
    close(int((x[sel] == mask_id).sum()), s, 0.8)
    changed = (x[sel] != mask_id) & (x[sel] != ids[sel])
    close(int(changed.sum()), s, 0.1 * (1 - 1 / V))
    close(int((x[sel] == ids[sel]).sum()), s, 0.1 + 0.1 / V)


def test_text_blocks_and_tokenizer_from_local_files(tmp_path):
    shard = tmp_path / "shard0.txt"
    shard.write_text("\n".join(f"Sentence number {i} talks about the weather and the sea." for i in range(40)))
    a = train_tokenizer([shard], vocab_size=400, kind="bpe")
    b = train_tokenizer([shard], vocab_size=400, kind="bpe")
    assert a.get_vocab() == b.get_vocab() and a.token_to_id("[PAD]") == 0  # deterministic, specials first
    a.save(str(tmp_path / "tokenizer.json"))
    t = load_tokenizer(tmp_path)
    assert t.encode("the weather").ids == a.encode("the weather").ids
    cls, sep = t.token_to_id("[CLS]"), t.token_to_id("[SEP]")
    blocks = text_blocks(shard, t, block_size=16, cls_id=cls, sep_id=sep)
    assert blocks.shape[1] == 16 and (blocks[:, 0] == cls).all() and (blocks[:, -1] == sep).all()
    assert t.decode(blocks[0, 1:-1].tolist()).strip().startswith("Sentence number 0")


def test_offline_missing_files_name_what_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        require_local(tmp_path / "wmt16", "data.root", "python scripts/prepare_wmt16.py")
    msg = str(e.value)
    assert "data.root=" in msg and "python scripts/prepare_wmt16.py" in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError, match="data.root=.*prepare"):
        load_pairs(tmp_path / "nope", "train", prepare="the WMT16 files")


@pytest.mark.parametrize("kw, msg", [
    (dict(task="summarization"), "data.task='summarization'"),
    (dict(task="qa", doc_stride=200, max_length=128), "data.doc_stride=200"),
    (dict(task="mlm", mlm_probability=1.5), "data.mlm_probability=1.5"),
    (dict(task="translation", beam=0), "data.beam=0"),
])
def test_task_spec_errors(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        TaskDataSpec(name="x", **kw)
