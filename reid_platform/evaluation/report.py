"""Former name of `reid_platform.evaluation.pictures`; import from there (or from
`reid_platform.evaluation`) instead. Kept so the training loop's import keeps working."""

from reid_platform.evaluation.pictures import plot_cmc

__all__ = ["plot_cmc"]
