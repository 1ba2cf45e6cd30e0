"""A study: its declaration (factors x levels, what a study script writes), its validated plan, the
Ray Tune run of its trials, the shared command line, and the live progress view.

    from nvae_platform.study import Factor, Study, field_factor
"""
from nvae_platform.study.declaration import Factor, Search, Study, field_factor

__all__ = ["Factor", "Search", "Study", "field_factor"]
