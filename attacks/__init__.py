"""poisonaudit's attack library: pure PyTorch, tensors in, tensors out.

Kept light on purpose: importing ``attacks`` loads no torch. Import the
modules you need (``attacks.pipeline``, ``attacks.data``, ...) directly.
"""

__version__ = "0.1.0"
