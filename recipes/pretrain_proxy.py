"""Pretrain (or find cached) the proxy base model used by the method comparison on CPU.

    python recipes/pretrain_proxy.py                      # 2000 steps, ~30 minutes on one CPU core; prints the directory
    python recipes/pretrain_proxy.py --max_minutes 40     # stop early on a slow machine (cached; its log says so)

The model lands in $TASO_LLM_CACHE/taso-proxy-<hash> (default ~/.cache/taso_llm); recipes refer to it as
`model_name_or_path: taso-proxy`. What defines it (size, steps, cache key) is in taso_llm/tiny.py; what it is trained on
and why, in taso_llm/proxy.py.
"""

import argparse
import logging
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: on 2 shared cores one thread ran ~2x faster than two


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_minutes", type=float, default=None, help="Stop pretraining after this many minutes.")
    p.add_argument("--steps", type=int, default=None, help="Override the number of steps (changes the cache key).")
    args = p.parse_args(argv)
    logging.basicConfig(format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    from taso_llm.proxy import pretrain

    print(pretrain(pretrain={"steps": args.steps} if args.steps else None, max_minutes=args.max_minutes))


if __name__ == "__main__":
    main()
