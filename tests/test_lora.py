"""Sequential LoRA fine-tuning of the factors (SVD-LLM §3.2) on tiny compressed models."""
import copy
import json

import pytest
import torch

import svdllm
from svdllm.cli import main
from svdllm.data.instructions import IGNORE, alpaca_prompt, load_items, tokenize_record
from svdllm.errors import SvdllmError
from svdllm.factorization import LowRankLinear
from svdllm.io import load
from svdllm.update.lora import FinetuneConfig, finetune
from tiny import tiny_model


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("ft") / "records.json"
    recs = [{"instruction": f"Name the number after {i}.", "input": "" if i % 3 else f"count {i}",
             "output": f"It is {i + 1}. " * (1 + i % 3)} for i in range(48)]
    path.write_text(json.dumps(recs))
    return path


def _compressed(tok, family="llama", ratio=0.5):
    model = tiny_model(family)
    svdllm.compress(model, tok, svdllm.CompressConfig(preset="paper", ratio=ratio, method="svd"), progress=False)
    return model


def _config(records, **kw):
    base = dict(data=str(records), val_samples=8, batch_size=8, micro_batch=4, lr=5e-3, warmup_steps=0,
                max_steps=4, save_every=2)
    return FinetuneConfig(**{**base, **kw})


def _factors(model, which):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(f".{which}.weight")}


def test_prompt_is_masked_and_response_is_learned(tok):
    rec = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
    ex = tokenize_record(tok, rec, max_len=512)
    n_prompt = len(tok(alpaca_prompt(rec))["input_ids"])
    assert all(t == IGNORE for t in ex["labels"][:n_prompt])
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:] and ex["input_ids"][-1] == tok.eos_token_id
    assert "### Input:" in alpaca_prompt({"instruction": "a", "input": "b"})
    assert "### Input:" not in alpaca_prompt(rec)


def test_chat_template_records_learn_the_answer_and_its_end_of_turn(tok):
    chat = copy.deepcopy(tok)
    chat.chat_template = ("{% for m in messages %}<s>{{ m.role }}: {{ m.content }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    rec = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
    ex = tokenize_record(chat, rec, max_len=512, template="chat")
    assert chat.decode(ex["input_ids"]) == "<s>user: Add 2 and 3.</s><s>assistant: 5</s>"
    learned = [t for t in ex["labels"] if t != IGNORE]
    assert chat.decode(learned) == "5</s>"  # the prompt and its markup are context only
    with pytest.raises(SvdllmError, match="--template chat needs a tokenizer with a chat template"):
        load_items(tok, "alpaca", 64, template="chat")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_loss_from_scored_rows_equals_loss_from_all_logits(family, tok, records):
    from peft import LoraConfig, get_peft_model

    from svdllm.data.instructions import collate
    from svdllm.update.lora import _loss_sum

    model = _compressed(tok, family)
    if family == "gemma3":
        model.config.final_logit_softcapping = 3.0  # the elementwise step after the head must still apply
    recs = json.loads(records.read_text())[:3]
    batch = collate([tokenize_record(tok, r, max_len=512) for r in recs], tok.eos_token_id)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["model.layers.0.self_attn.q_proj.u"]))
    head = peft_model.get_output_embeddings()
    loss, n = _loss_sum(peft_model, batch, torch.device("cpu"))
    assert peft_model.get_output_embeddings() is head  # the head is put back
    logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                             reduction="sum")
    assert n == int((labels != IGNORE).sum()) > 0
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-4)
    loss.backward()  # gradients reach the adapter through the selected rows
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in peft_model.parameters() if p.requires_grad)


def test_sequential_stages_freeze_the_other_factor_and_lower_the_loss(tok, records):
    model = _compressed(tok)
    u0, v0 = _factors(model, "u"), _factors(model, "v")
    params = sum(p.numel() for p in model.parameters())
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    seen = {}

    def spy(stage, step, loss):  # the factors at the end of stage 1 (after its last step, before the merge)
        seen[stage] = _factors(model, "v") if stage == 0 else _factors(model, "u")

    history = finetune(model, tok, _config(records, max_steps=6), progress=False, callback=spy)
    u1 = _factors(model, "u")
    # stage 1 (W_u) left every W_v bit-identical; stage 2 (W_v) left the merged W_u bit-identical
    assert all(torch.equal(seen[0][n], v0[n]) for n in v0)
    assert all(torch.equal(seen[1][n], u1[n]) for n in u1)
    assert any(not torch.equal(u1[n], u0[n]) for n in u0)
    assert any(not torch.equal(p, v0[n]) for n, p in _factors(model, "v").items())
    # ranks and size unchanged, no adapter left behind
    assert sum(p.numel() for p in model.parameters()) == params
    assert {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)} == ranks
    assert {n: tuple(p.shape) for n, p in _factors(model, "u").items()} == {n: tuple(p.shape) for n, p in u0.items()}
    assert not any("lora" in n for n, _ in model.named_parameters())
    val = [v["loss"] for v in history["val"]]
    assert len(val) == 3 and val[2] < val[1] < val[0]
    first, last = history["train"][0]["loss"], history["train"][-1]["loss"]
    assert last < first


def test_balance_keeps_the_product_and_equalises_the_norms():
    torch.manual_seed(0)
    w_u, w_v = torch.randn(12, 5) * 1e4, torch.randn(5, 9) * 1e-4  # kfac-svd's kind of split
    w_u[:, 3] = 0  # a dead component
    m = LowRankLinear.from_factors(w_u, w_v)
    before = (w_u.double() @ w_v.double())
    m.balance_()
    # float32 factors: the product moves by rounding only
    torch.testing.assert_close(m.u.weight.double() @ m.v.weight.double(), before, rtol=1e-5,
                               atol=1e-6 * float(before.abs().max()))
    nu, nv = m.u.weight.detach().norm(dim=0), m.v.weight.detach().norm(dim=1)
    live = torch.arange(5) != 3
    torch.testing.assert_close(nu[live], nv[live], rtol=1e-5, atol=0)
    assert torch.equal(m.v.weight[3], w_v[3]) and float(nu[3]) == 0


def _rescaled(model, seed=1):
    """The same model with every component's split between W_u and W_v moved by factors from 10⁻³ to 10³."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LowRankLinear):
                c = 10 ** (torch.rand(m.rank, generator=g) * 6 - 3)
                m.u.weight.mul_(c)
                m.v.weight.div_(c[:, None])
    return model


def _products(model):
    return {n: m.u.weight.double() @ m.v.weight.double() for n, m in model.named_modules()
            if isinstance(m, LowRankLinear)}


def test_balanced_finetune_does_not_depend_on_how_the_factors_were_split(tok, records):
    """The same model, split differently between W_u and W_v: balanced, LoRA takes the same steps on both."""
    runs = {}
    for balance in (True, False):
        for split in ("method", "rescaled"):
            model = _compressed(tok)
            if split == "rescaled":
                _rescaled(model)
            finetune(model, tok, _config(records, max_steps=2, balance=balance), progress=False)
            runs[balance, split] = _products(model)
    for n, want in runs[True, "method"].items():
        torch.testing.assert_close(runs[True, "rescaled"][n], want, rtol=1e-4, atol=1e-6)
    # without balancing the split changes what LoRA does
    assert any(not torch.allclose(runs[False, "rescaled"][n], w, rtol=1e-3, atol=1e-5)
               for n, w in runs[False, "method"].items())


def test_merged_model_equals_the_adapter_model(tok, records):
    """Merging B·A into a factor changes nothing the model computes."""
    from peft import LoraConfig, get_peft_model

    model = _compressed(tok)
    names = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[n + ".u" for n in names]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # B starts at zero; give the adapters something to merge
    ids = tok("The game began development in 2010.", return_tensors="pt").input_ids
    peft_model.eval()
    with torch.no_grad():
        with_adapters = peft_model(ids).logits
        merged = peft_model.merge_and_unload()
        after = merged(ids).logits
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(after, with_adapters, rtol=1e-5, atol=1e-5)


# step 3: after stage 2's checkpoint at step 2, so step 3 is lost and redone; step 1: before any checkpoint of
# stage 2, so the run resumes from the state written at the stage boundary (no adapter in it yet)
@pytest.mark.parametrize("stop_at", [3, 1])
def test_resume_after_interruption_equals_uninterrupted_run(stop_at, tok, records, tmp_path):
    cfg = _config(records, max_steps=5, save_every=2, lora_dropout=0.1)
    straight = _compressed(tok)
    h_straight = finetune(straight, tok, cfg, progress=False)

    class Stop(Exception):
        pass

    def stop_in_stage_two(stage, step, loss):
        if stage == 1 and step == stop_at:
            raise Stop

    interrupted = _compressed(tok)
    with pytest.raises(Stop):
        finetune(interrupted, tok, cfg, checkpoint_dir=tmp_path / "ckpt", progress=False, callback=stop_in_stage_two)
    resumed = _compressed(tok)  # a fresh process: the compressed model as it was saved, before any training
    h_resumed = finetune(resumed, tok, cfg, checkpoint_dir=tmp_path / "ckpt", progress=False)
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    assert [r["loss"] for r in h_resumed["train"]] == [r["loss"] for r in h_straight["train"]]


def test_checkpoint_from_other_settings_is_refused(tok, records, tmp_path):
    finetune(_compressed(tok), tok, _config(records, max_steps=2), checkpoint_dir=tmp_path / "c", progress=False)
    with pytest.raises(SvdllmError, match="other settings"):
        finetune(_compressed(tok), tok, _config(records, max_steps=2, lr=1e-3), checkpoint_dir=tmp_path / "c",
                 progress=False)


def test_non_finite_loss_stops_with_a_clear_error(tok, records):
    model = _compressed(tok)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.v.weight[0, 0] = float("nan")
    with pytest.raises(SvdllmError, match="loss became nan"):
        finetune(model, tok, _config(records), progress=False)


def test_dense_model_is_refused(tok, records):
    with pytest.raises(SvdllmError, match="no low-rank layers"):
        finetune(tiny_model("llama"), tok, _config(records), progress=False)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_gqa_families_and_compress_update_lora(family, tok, records, data_dir, tmp_path):
    model = tiny_model(family)
    cfg = svdllm.CompressConfig(preset="paper", ratio=0.4, update="lora", finetune=_config(records, max_steps=2),
                                calibration=svdllm.CalibrationConfig(nsamples=4, seqlen=32, data_dir=str(data_dir)),
                                cache_dir=str(tmp_path / "cache"))
    res = svdllm.compress(model, tok, cfg, out=tmp_path / "m", progress=False)[0]
    assert res.manifest["update"] == "lora" and res.manifest["finetune"]["steps_per_stage"] == 2
    loaded = load(tmp_path / "m")
    ids = tok("The game began.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert (tmp_path / "m" / "finetune_loss.png").stat().st_size > 0
    assert not (tmp_path / ".m.finetune").exists()


def test_cli_finetune(tok, records, tmp_path, capsys):
    model = tiny_model("llama")
    svdllm.compress(model, tok, svdllm.CompressConfig(preset="paper", ratio=0.6, method="svd"), out=tmp_path / "c2", progress=False)
    params = sum(p.numel() for p in load(tmp_path / "c2").parameters())
    rc = main(["finetune", str(tmp_path / "c2"), "--out", str(tmp_path / "ft"), "--data", str(records),
               "--max-steps", "2", "--batch-size", "4", "--micro-batch", "2", "--val-samples", "4", "-q", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps_per_stage"] == 2 and set(out["val_loss"]) == {"before", "after_stage1", "after_stage2"}
    tuned = load(tmp_path / "ft")
    assert sum(p.numel() for p in tuned.parameters()) == params
    manifest = json.loads((tmp_path / "ft" / "svdllm_manifest.json").read_text())
    assert manifest["update"] == "lora" and manifest["finetune"]["config"]["lora_r"] == 8
    # bad input: a missing data file is named
    rc = main(["finetune", str(tmp_path / "c2"), "--out", str(tmp_path / "ft2"), "--data", "nope.json", "-q"])
    assert rc == 2 and "nope.json" in capsys.readouterr().err


def test_damaged_checkpoint_is_named(tok, records, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "state.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(SvdllmError, match="damaged"):
        finetune(_compressed(tok), tok, _config(records, max_steps=1), checkpoint_dir=tmp_path / "c", progress=False)
