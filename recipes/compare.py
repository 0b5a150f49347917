"""Compare fine-tuning methods on the same data, seeds and steps; write report.md, results.json and PNG plots.

    python recipes/compare.py --config recipes/configs/compare/proxy.yaml        # CPU proxy, ~40 min on 2 cores
    python recipes/compare.py --config recipes/configs/compare/llama-3.1-8b.yaml # the same on a real model (GPUs)

Each run is `recipes/sft_taso.py --config recipes/configs/<recipes>/<task>_<method>.yaml` with overrides, in its own
subprocess; finished runs are reused, so re-running the command resumes. See docs/comparison.md.
"""

import argparse
import logging

from taso_llm.compare import load_compare_config, run_comparison


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="Compare config YAML (recipes/configs/compare/*.yaml).")
    p.add_argument("--output_dir", default=None, help="Override the config's output_dir (runs).")
    p.add_argument("--report_dir", default=None, help="Override the config's report_dir.")
    p.add_argument("--workers", type=int, default=None, help="Override how many runs go at once.")
    p.add_argument("--tasks", nargs="+", default=None, help="Only these of the config's tasks (resume adds others).")
    p.add_argument("--methods", nargs="+", default=None, help="Only these of the config's methods.")
    args = p.parse_args(argv)
    logging.basicConfig(format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    config = load_compare_config(args.config)
    for key in ("output_dir", "report_dir", "workers"):
        if getattr(args, key) is not None:
            setattr(config, key, getattr(args, key))
    for key in ("tasks", "methods"):  # a subset now, the rest later: finished runs are reused either way
        wanted = getattr(args, key)
        if wanted:
            unknown = set(wanted) - set(getattr(config, key))
            if unknown:
                raise SystemExit(f"--{key}: {sorted(unknown)} not in the config's {key} {list(getattr(config, key))}")
            setattr(config, key, {k: v for k, v in getattr(config, key).items() if k in wanted})
    results = run_comparison(config)
    from taso_llm.compare.report import table_markdown

    print(table_markdown(results))
    print(f"wrote {config.report_dir or config.output_dir}/report.md")


if __name__ == "__main__":
    main()
