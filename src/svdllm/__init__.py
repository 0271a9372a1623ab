"""svdllm: compress causal language models by truncation-aware low-rank factorization (SVD-LLM and successors).

    import svdllm
    model, tok = svdllm.load_model("smollm2-135m")
    svdllm.compress(model, tok, svdllm.CompressConfig(ratio=0.4), out="runs/smollm2-r40")
    model = svdllm.load("runs/smollm2-r40")
    svdllm.evaluate("runs/smollm2-r40", svdllm.EvalConfig(ppl=["wikitext2"]))
    svdllm.quantize("runs/smollm2-r40", svdllm.QuantizeConfig(scheme="int4"), out="runs/smollm2-r40-int4")
    svdllm.export("runs/smollm2-r40-int4", "runs/smollm2-r40-ct", "compressed-tensors")

Each call checks its config (`validate()`) before any model is read; the `svdllm` command is a thin layer over these.
"""
__version__ = "0.1.0"

import logging as _logging  # noqa: E402

# On a CPU build of torch, torchao (which transformers and peft import when it is installed) logs every GPU kernel
# library it cannot load, and torch warns about torchao's enums: noise to a user of this library. Quietened only
# where the application has not set a level of its own.
for _name in ("torchao", "torch.utils._pytree"):
    if _logging.getLogger(_name).level == _logging.NOTSET:
        _logging.getLogger(_name).setLevel(_logging.ERROR)

from .config import CalibrationConfig, CompressConfig, QuantizeConfig  # noqa: E402
from .errors import SvdllmError  # noqa: E402
from .evaluation.api import EvalConfig, evaluate  # noqa: E402
from .io import load, save  # noqa: E402
from .io.export import ExportConfig, export  # noqa: E402
from .io.loader import load_model  # noqa: E402
from .io.quantize import QuantizeResult, quantize  # noqa: E402
from .pipeline import CompressionResult, compress  # noqa: E402

__all__ = ["__version__", "CalibrationConfig", "CompressConfig", "SvdllmError", "load", "save", "load_model",
           "CompressionResult", "compress", "QuantizeConfig", "QuantizeResult", "quantize", "ExportConfig", "export",
           "EvalConfig", "evaluate"]
