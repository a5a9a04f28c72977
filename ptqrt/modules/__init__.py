from .linear import QuantLinear, is_quantizable, linear_weight

__all__ = ["QuantLinear", "is_quantizable", "linear_weight"]
