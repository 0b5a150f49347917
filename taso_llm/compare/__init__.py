"""Method comparison: several methods on the same data, seeds and steps → report.md, results.json, PNGs.

config.py (the YAML file) → runs.py (LR grid, seeds, subprocess training and evaluation, resume) → evaluation.py
(one trained run on the test rows) → report.py (table, plots, JSON). CLI: recipes/compare.py.
"""

from taso_llm.compare.config import CompareConfig, CompareConfigError, load_compare_config, parse_compare_config

__all__ = ["CompareConfig", "CompareConfigError", "load_compare_config", "parse_compare_config", "run_comparison"]


def run_comparison(config: CompareConfig) -> dict:
    """Build the proxy base if the config names it, run everything not yet done, write the report."""
    from taso_llm.compare.report import write_report
    from taso_llm.compare.runs import execute

    if config.base_model == "taso-proxy":
        from taso_llm.proxy import pretrain

        pretrain()
    return write_report(config, execute(config))
