"""ich: intracranial hemorrhage detection on head CT (RSNA 2019). Research use only."""

__version__ = "0.1.0"
