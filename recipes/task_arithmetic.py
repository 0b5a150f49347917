"""Task arithmetic as a command: add task vectors (one α on a grid, by mean normalized validation accuracy) and
negate one (α cutting the target task while the control task keeps >= 0.95 of its base accuracy); writes the merged
models (HF format) and report.json / report.md. Task vectors: any training outputs of the same base (TaLoS, SpaRTA,
TASO, LoRA, full fine-tuning). See docs/task_arithmetic.md.

    python recipes/task_arithmetic.py --config recipes/configs/task_arithmetic/tiny.yaml
    python recipes/task_arithmetic.py --config my.yaml --alpha_step 0.1 --output_dir outputs/ta
"""

import argparse
import logging

from taso_llm.task_arithmetic import load_config, run_task_arithmetic


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="Task arithmetic YAML (format: taso_llm/task_arithmetic.py).")
    p.add_argument("--output_dir", default=None, help="Override the config's output_dir.")
    p.add_argument("--alpha_step", type=float, default=None, help="Override the α grid's step (default 0.05).")
    p.add_argument("--alpha_max", type=float, default=None, help="Override the α grid's end (default 1).")
    args = p.parse_args(argv)
    logging.basicConfig(format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    overrides = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    config = load_config(args.config, **overrides)
    report = run_task_arithmetic(config)
    add = report["addition"]["chosen"]
    print(f"addition: alpha={add['alpha']:g} accuracy={add['accuracy']} mean normalized={add['mean_normalized']:.3f}")
    if "negation" in report:
        neg = report["negation"]["chosen"]
        print(f"negation: alpha={neg['alpha']:g} accuracy={neg['accuracy']}")
    print(f"wrote {config.output_dir}/report.md and the merged models under {config.output_dir}")
    return report


if __name__ == "__main__":
    main()
