"""The tiny world: `python -m tiny.world` writes tiny/data/, `python -m tiny.pretrain` trains tiny/model/ (README.md)."""
