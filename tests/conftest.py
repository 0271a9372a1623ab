import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(int(os.environ.get("SVDLLM_TEST_THREADS", min(2, os.cpu_count() or 1))))

from tiny import byte_tokenizer  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SAMPLE = (
    " = Valkyria Chronicles III = \n"
    " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game developed by Sega . \n"
    " The game began development in 2010 , carrying over a large portion of the work done on Valkyria Chronicles II . \n"
)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Every test's default cache (statistics, converted models, evaluation resume files) in a temporary directory:
    a command run without --cache-dir (`svdllm demo`, a default compress) never writes into the user's own cache."""
    previous = os.environ.get("SVDLLM_CACHE_DIR")
    os.environ["SVDLLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("svdllm-cache"))
    yield Path(os.environ["SVDLLM_CACHE_DIR"])
    if previous is None:
        del os.environ["SVDLLM_CACHE_DIR"]
    else:
        os.environ["SVDLLM_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("data"))


def make_data_dir(root: Path) -> Path:
    """A small data directory with the shared data layout (synthetic text, real file formats)."""
    (root / "wikitext2_raw").mkdir()
    lines = []
    for i in range(60):
        lines += [SAMPLE.replace("2010", str(1900 + i)), "\n"]
    text = "".join(lines)
    (root / "wikitext2_raw" / "wiki.test.raw").write_text(text)
    (root / "wikitext2_raw" / "wiki.valid.raw").write_text(text[::-1].replace("\n", " ") + "\n" + text)
    (root / "ptb").mkdir()
    ptb = "".join(f" the company said {i} shares rose <unk> in N trading \n" for i in range(400))
    (root / "ptb" / "ptb.test.txt").write_text(ptb)
    (root / "ptb" / "ptb.valid.txt").write_text(ptb)
    (root / "c4").mkdir()
    import json

    with open(root / "c4" / "c4_validation_2k.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"Document {i}: a short web page about topic {i % 7}.", "url": "x"}) + "\n")
    # zero-shot tasks in their original release formats (PIQA: jsonl + labels; ARC: AI2 jsonl)
    (root / "piqa").mkdir()
    with open(root / "piqa" / "valid.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"goal": f"How do I open jar {i}?", "sol1": "Twist the lid.",
                                "sol2": f"Paint it {'blue' * (i % 3 + 1)}."}) + "\n")
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(8)))
    (root / "arc_easy").mkdir()
    with open(root / "arc_easy" / "ARC-Easy-Test.jsonl", "w") as f:
        for i in range(8):
            choices = [{"text": t, "label": l} for t, l in zip(["sun", "moon", "rock", f"tree {i}"], "ABCD")]
            f.write(json.dumps({"id": f"q{i}", "question": {"stem": f"What gives light {i}?", "choices": choices},
                                "answerKey": "ABCD"[i % 4]}) + "\n")
    return root


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared data folder is not at {SHARED_DATA}")
    return SHARED_DATA
