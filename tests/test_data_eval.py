"""Texts built as PROTOCOL.md says, windows, and perplexity against an independent computation."""
import copy
import json
import math

import pytest
import torch

from svdllm.data import calibration_set, calibration_windows, eval_windows, load_text, tokenize_text
from svdllm.data.instructions import conversation_text
from svdllm.errors import SvdllmError
from svdllm.evaluation import perplexity
from tiny import tiny_model


def test_wikitext_rows_joined_like_the_hub(data_dir):
    raw = (data_dir / "wikitext2_raw" / "wiki.test.raw").read_text()
    rows = ["" if line.strip() == "" else line for line in raw.splitlines(keepends=True)]
    assert load_text("wikitext2", "test", data_dir) == "\n\n".join(rows)
    assert "\n\n\n\n" in load_text("wikitext2", "test", data_dir)  # blank rows become empty strings


def test_ptb_and_c4(data_dir):
    ptb = load_text("ptb", "test", data_dir)
    assert ptb.startswith("the company said 0 shares") and "\n\n" in ptb and not ptb.startswith(" ")
    c4 = load_text("c4", "test", data_dir)
    assert c4.startswith("Document 0:") and "Document 255:" in c4 and "Document 256:" not in c4
    # calibration (the validation split) reads the documents after the 256 that perplexity scores, never those
    calib = load_text("c4", "validation", data_dir)
    assert calib.startswith("Document 256:") and "Document 299:" in calib and "Document 255:" not in calib


def test_c4_calibration_and_test_documents_are_disjoint(shared_data):
    from svdllm.data.texts import _docs_c4

    path = shared_data / "c4" / "c4_validation_2k.jsonl"
    test, calib = _docs_c4(path, "test"), _docs_c4(path, "validation")
    assert len(test) == 256 and len(calib) == 2000 - 256
    assert not set(test) & set(calib)
    assert load_text("c4", "test", shared_data) == " ".join(test)


def test_real_wikitext_test_set_size(shared_data):
    text = load_text("wikitext2", "test", shared_data)
    # 4,358 rows joined by "\n\n"; the first row is blank, as on the hub
    raw = (shared_data / "wikitext2_raw" / "wiki.test.raw").read_text()
    assert len(raw.splitlines()) == 4358
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")


def test_calibration_windows_are_seeded(tok, data_dir):
    ids = tokenize_text(tok, load_text("wikitext2", "validation", data_dir))
    a = calibration_windows(ids, 5, 64, seed=0)
    assert a.shape == (5, 64)
    assert torch.equal(a, calibration_windows(ids, 5, 64, seed=0))
    assert not torch.equal(a, calibration_windows(ids, 5, 64, seed=1))
    text = tok.decode(a[0])
    assert text in tok.decode(ids)


def test_one_corpus_gives_the_same_windows_as_before(tok, data_dir):
    # the statistics cache is keyed by the windows: a single source must keep the keys of earlier runs
    ids = tokenize_text(tok, load_text("ptb", "validation", data_dir))
    assert torch.equal(calibration_set(tok, "ptb", 5, 64, 3, data_dir), calibration_windows(ids, 5, 64, seed=3))


def test_mixture_of_corpus_and_chat_conversations(tok, data_dir, tmp_path):
    chat = copy.deepcopy(tok)
    chat.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}</s>{% endfor %}"
    recs = [{"instruction": f"Add {i} and 1.", "input": "" if i % 2 else "show work", "output": f"{i + 1}"}
            for i in range(40)]
    path = tmp_path / "recs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    w = calibration_set(chat, f"wikitext2,{path}", 5, 48, 0, data_dir)
    assert w.shape == (5, 48)
    wiki = tokenize_text(chat, load_text("wikitext2", "validation", data_dir))
    assert torch.equal(w[:3], calibration_windows(wiki, 3, 48, seed=0))  # 5 windows: 3 + 2
    assert conversation_text(chat, recs[0]) == "[user] Add 0 and 1.\n\nshow work</s>[assistant] 1</s>"
    stream = "".join(conversation_text(chat, r) for r in recs)
    convo = chat.decode(w[3:].flatten())  # consecutive windows over whole conversations in a seeded order
    assert convo.startswith("[user] Add ") and convo.count("[assistant]") >= 2
    assert all(piece + "</s>" in stream for piece in convo.split("</s>")[:-1])
    assert torch.equal(w, calibration_set(chat, f"wikitext2,{path}", 5, 48, 0, data_dir))
    assert not torch.equal(w[3:], calibration_set(chat, f"wikitext2,{path}", 5, 48, 1, data_dir)[3:])
    # without a chat template the records are written in Alpaca's prompt format
    assert "### Response:" in tok.decode(calibration_set(tok, str(path), 1, 400, 0, data_dir)[0])


def test_bad_calibration_sources_are_named(tok, data_dir, tmp_path):
    with pytest.raises(SvdllmError, match="'wikitext3' is neither a corpus .* nor an existing file"):
        calibration_set(tok, "wikitext2,wikitext3", 4, 32, 0, data_dir)
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(SvdllmError, match="keys \\['prompt'\\]; calibration reads 'text'"):
        calibration_set(tok, str(odd), 1, 8, 0, data_dir)
    with pytest.raises(SvdllmError, match="hf:DATASET:SPLIT:COLUMN or"):
        calibration_set(tok, "hf:wikitext:train", 1, 8, 0, data_dir)
    small = tmp_path / "small.json"
    small.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi."}]))
    with pytest.raises(SvdllmError, match="fewer than the 2 × 400 .* lower --nsamples or --seqlen"):
        calibration_set(tok, str(small), 2, 400, 0, data_dir)
    with pytest.raises(SvdllmError, match="fewer than the 2 calibration sources"):
        calibration_set(tok, "wikitext2,ptb", 1, 32, 0, data_dir)


def test_your_own_calibration_text(tok, data_dir, tmp_path):
    wiki = load_text("wikitext2", "validation", data_dir)
    txt = tmp_path / "domain.txt"
    txt.write_text(wiki[:20000], encoding="utf-8")
    ids = tokenize_text(tok, wiki[:20000])
    assert torch.equal(calibration_set(tok, str(txt), 4, 64, 2, data_dir), calibration_windows(ids, 4, 64, seed=2))
    rows = [r for r in wiki[:20000].split("\n\n") if r.strip()][:40]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": r, "meta": i}) + "\n" for i, r in enumerate(rows)))
    joined = tokenize_text(tok, "\n\n".join(rows))
    assert torch.equal(calibration_set(tok, str(jsonl), 3, 32, 0, data_dir), calibration_windows(joined, 3, 32, seed=0))
    # chats in the 'messages' format are written in the model's chat template, like instruction records
    chat = copy.deepcopy(tok)
    chat.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}</s>{% endfor %}"
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Is {i} even?"},
                                                      {"role": "assistant", "content": "yes" if i % 2 == 0 else "no"}]})
                             + "\n" for i in range(60)))
    convo = chat.decode(calibration_set(chat, str(chats), 2, 40, 0, data_dir).flatten())
    assert convo.count("[user] Is ") >= 2 and "[assistant] " in convo
    with pytest.raises(SvdllmError, match="no chat template"):
        calibration_set(tok, str(chats), 2, 40, 0, data_dir)
    # a mix of a corpus and a file shares the windows evenly
    assert torch.equal(calibration_set(tok, f"ptb,{txt}", 4, 64, 0, data_dir)[2:], calibration_windows(ids, 2, 64, 1))


def test_a_hub_dataset_without_network_is_named(tok, data_dir, monkeypatch):
    from svdllm.data.sources import parse_hub_source

    assert parse_hub_source("hf:allenai/c4:en:validation:text") == ("allenai/c4", "en", "validation", "text")
    assert parse_hub_source("hf:me/code:train:content") == ("me/code", None, "train", "content")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SvdllmError, match="not reachable .* save the text to a file"):
        calibration_set(tok, "hf:me/code:train:content", 2, 32, 0, data_dir)


def test_python_strings_and_token_windows(tok, data_dir):
    from svdllm.data.windows import given_windows

    texts = load_text("wikitext2", "validation", data_dir)[:20000].split("\n\n")
    ids = tokenize_text(tok, "\n\n".join(texts))
    assert torch.equal(given_windows(tok, iter(texts), 3, 32, 5), calibration_windows(ids, 3, 32, seed=5))
    w = torch.randint(0, 100, (6, 40))
    assert torch.equal(given_windows(tok, w, 4, 32, 0), w[:4, :32])
    assert torch.equal(given_windows(tok, [r.tolist() for r in w], 6, 40, 0), w)
    with pytest.raises(SvdllmError, match="6 calibration windows were given and nsamples is 8"):
        given_windows(tok, w, 8, 32, 0)
    with pytest.raises(SvdllmError, match="40 tokens, fewer than seqlen = 64"):
        given_windows(tok, w, 2, 64, 0)
    with pytest.raises(SvdllmError, match="integer token ids"):
        given_windows(tok, torch.rand(3, 8), 2, 8, 0)


def test_eval_windows_drop_partial_and_limit():
    ids = torch.arange(10 * 7 + 3)
    w = eval_windows(ids, 7)
    assert w.shape == (10, 7) and torch.equal(w[1], torch.arange(7, 14))
    assert eval_windows(ids, 7, max_windows=3).shape == (3, 7)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_perplexity_equals_transformers_loss(family, tok, data_dir):
    model = tiny_model(family)
    res = perplexity(model, tok, "wikitext2", data_dir, seqlen=400, progress=False)
    ids = tokenize_text(tok, load_text("wikitext2", "test", data_dir))
    windows = eval_windows(ids, 400)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]  # mean over 399 predictions each
    assert res["windows"] == res["total_windows"] == len(windows)
    assert res["tokens_scored"] == len(windows) * 399
    assert res["ppl"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_gemma_softcapping_is_applied(tok, data_dir):
    model = tiny_model("gemma3", final_logit_softcapping=2.0)
    res = perplexity(model, tok, "wikitext2", data_dir, seqlen=64, max_windows=2, progress=False)
    w = eval_windows(tokenize_text(tok, load_text("wikitext2", "test", data_dir)), 64, 2)
    with torch.no_grad():
        ref = [model(x[None], labels=x[None]).loss.item() for x in w]
    assert res["ppl"] == pytest.approx(math.exp(sum(ref) / 2), rel=1e-5)


def test_generation_without_chat_template_keeps_the_bos_token():
    from tokenizers import processors

    from svdllm.evaluation.generation import generate_timed
    from tiny import byte_tokenizer

    tok = byte_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    model = tiny_model("llama")
    seen = {}
    real = model.generate

    def spy(**kw):
        seen.update(kw)
        return real(**kw)

    model.generate = spy
    out = generate_timed(model, tok, "hello", max_new_tokens=3, chat=True)  # no template: the plain prompt
    assert seen["input_ids"][0, 0] == 256 and seen["pad_token_id"] == 258
    assert out["new_tokens"] == 3


class Killed(Exception):
    """Stands for the process being killed mid-run."""


def test_interrupted_perplexity_resumes_to_the_same_number(tok, data_dir, tmp_path, monkeypatch):
    import importlib

    ppl_mod = importlib.import_module("svdllm.evaluation.perplexity")  # (the package exports a function of that name)

    model = tiny_model("llama")
    whole = perplexity(model, tok, "wikitext2", data_dir, seqlen=64, max_windows=6, progress=False)
    real, calls = ppl_mod._nll_sum, []

    def killed_after_two(m, batch):
        if len(calls) == 2:
            raise Killed
        calls.append(1)
        return real(m, batch)

    monkeypatch.setattr(ppl_mod, "_nll_sum", killed_after_two)
    with pytest.raises(Killed):
        perplexity(model, tok, "wikitext2", data_dir, seqlen=64, max_windows=6, progress=False, resume_dir=tmp_path)
    monkeypatch.setattr(ppl_mod, "_nll_sum", lambda m, b: calls.append(1) or real(m, b))
    again = perplexity(model, tok, "wikitext2", data_dir, seqlen=64, max_windows=6, progress=False,
                       resume_dir=tmp_path)
    assert len(calls) == 6 and again["resumed_batches"] == 2  # 2 before the kill, 4 after
    assert again["ppl"] == whole["ppl"] and again["tokens_scored"] == whole["tokens_scored"]
    assert not list(tmp_path.iterdir())  # the log is gone once the result exists
    with pytest.raises(Killed):  # other weights never read this model's log
        monkeypatch.setattr(ppl_mod, "_nll_sum", killed_after_two)
        calls.clear()
        perplexity(model, tok, "wikitext2", data_dir, seqlen=64, max_windows=6, progress=False, resume_dir=tmp_path)
    monkeypatch.setattr(ppl_mod, "_nll_sum", real)
    other = perplexity(tiny_model("llama", seed=1), tok, "wikitext2", data_dir, seqlen=64, max_windows=6,
                       progress=False, resume_dir=tmp_path)
    assert "resumed_batches" not in other
