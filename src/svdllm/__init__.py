"""svdllm: compress causal language models by truncation-aware low-rank factorization (SVD-LLM and successors).

    import svdllm
    model, tok = svdllm.load_model("smollm2-135m")
    svdllm.compress(model, tok, svdllm.CompressConfig(ratio=0.4), out="runs/smollm2-r40")
    model = svdllm.load("runs/smollm2-r40")
"""
__version__ = "0.1.0"

import logging as _logging  # noqa: E402

# On a CPU build of torch, torchao (which transformers and peft import when it is installed) logs every GPU kernel
# library it cannot load, and torch warns about torchao's enums: noise to a user of this library. Quietened only
# where the application has not set a level of its own.
for _name in ("torchao", "torch.utils._pytree"):
    if _logging.getLogger(_name).level == _logging.NOTSET:
        _logging.getLogger(_name).setLevel(_logging.ERROR)

from .config import CalibrationConfig, CompressConfig  # noqa: E402
from .errors import SvdllmError  # noqa: E402
from .io import load, save  # noqa: E402
from .io.loader import load_model  # noqa: E402
from .pipeline import CompressionResult, compress  # noqa: E402

__all__ = ["__version__", "CalibrationConfig", "CompressConfig", "SvdllmError", "load", "save", "load_model",
           "CompressionResult", "compress"]
