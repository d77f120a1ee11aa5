"""dualign: constrained alignment of language models by Lagrangian duality (CAID and the methods it is compared with)."""

__version__ = "0.1.0"
