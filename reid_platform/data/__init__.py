"""Data formats, synthetic data, transforms, PK sampling and image decoding."""
