"""Test-time search over how a trained model is run: chain-of-layers (CoLa) path search (docs/cola.md)."""
