"""The paper's findings as studies: each a list of recipe runs and a page.

A study module has ``NAME``, ``TITLE``, ``SOURCE``, ``SUMMARY``,
``runs(scale)`` (every :class:`~studies.runner.Run`, in the order they
run) and ``report_page(scale, results, page, figure_path)`` (fills the
:class:`~studies.report.Page` from the finished runs and draws the figure).
``tools/study.py`` is the command line.
"""

import importlib

ORDER = (
    "settings",
    "autoencoder",
    "decoders",
    "decoder_analysis",
    "mask_ratio",
    "single_image",
    "early_clustering",
    "self_guided",
)


def load(name):
    """The study module called ``name``."""
    if name not in ORDER:
        raise KeyError(name)
    return importlib.import_module(f"studies.{name}")
