"""Training: `python -m train.main --config configs/<name>.py --workdir DIR` (see train/train.py)."""
