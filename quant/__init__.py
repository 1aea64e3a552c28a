"""Block formats and quantizers: formats as data, pure numpy reference functions, native fast paths."""

from edgeai.quant.formats import FORMATS, QuantFormat, dequantize, format_by_name, quantize
from edgeai.quant.recipes import OutType, parse_outtype, tensor_type

__all__ = ["FORMATS", "OutType", "QuantFormat", "dequantize", "format_by_name", "parse_outtype", "quantize", "tensor_type"]
