"""ptqrt — post-training INT8 quantization runtime for PyTorch.

    from ptqrt import PTQConfig, quantize, save_quantized, load_quantized, set_backend
    model = quantize(model, PTQConfig(act_dtype="int8"), calib_data)
"""
__version__ = "0.1.0"

from . import ops  # noqa: E402  (registers the torch.library ops)
from .config import PTQConfig  # noqa: E402
from .dequantize import dequantize  # noqa: E402
from .format import FormatError, load_quantized, save_quantized  # noqa: E402
from .modules.linear import QuantLinear, prepack  # noqa: E402
from .ops import get_backend, set_backend  # noqa: E402
from .pretrained import from_pretrained  # noqa: E402
from .quantize import quantize  # noqa: E402
from .integrations.hf_quantizer import register_when_available as _register_hf  # noqa: E402

_register_hf()  # transformers' from_pretrained loads packed directories (now, or once transformers is imported)

__all__ = ["PTQConfig", "quantize", "dequantize", "save_quantized", "load_quantized", "from_pretrained", "set_backend",
           "get_backend", "QuantLinear", "prepack", "FormatError", "ops", "__version__"]
