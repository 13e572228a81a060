"""The `grpo-fast` command line.

    grpo-fast train --config configs/tiny-offline.yaml [--set learning_rate=1e-4 ...] [--resume]
    grpo-fast eval  --config configs/tiny-offline.yaml [--adapter outputs/tiny-offline] [--data F]
    grpo-fast plan  --config configs/qwen2.5-1.5b-gsm8k-qlora.yaml [--gpu-memory 12GiB]
                    [--accelerate-config configs/accelerate/fsdp2.yaml] [--num-processes 4]
    grpo-fast vllm-serve --config run.yaml [--host H] [--port P]   # for online.vllm_mode: server
    grpo-fast plot  outputs/tiny-online

Config and data errors print one line naming the file, line or key, and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from tqdm.contrib.logging import logging_redirect_tqdm

from .config import ConfigError, load_config
from .data import DataError
from .errors import TrainingStopped



def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (dotted for sections, e.g. lora.r=8); repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo-fast", description="Fast GRPO training for causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train with a config (offline or online GRPO)")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in output_dir")

    p = sub.add_parser("eval", help="evaluate a model or adapter on held-out data")
    _add_config_args(p)
    p.add_argument("--adapter", help="trained adapter (or full model) directory; default: the config's model")
    p.add_argument("--data", help="held-out file; default: the config's eval_dataset_path")
    p.add_argument("--output", help="results JSON path; default: <adapter or output_dir>/eval_results.json")

    p = sub.add_parser("plan", help="estimate peak GPU memory for a config before running it")
    _add_config_args(p)
    p.add_argument("--gpu-memory", help="card memory to plan for, e.g. 12GiB or 24GB")
    p.add_argument("--accelerate-config", metavar="FILE",
                   help="plan per GPU for the launch of this accelerate config (configs/accelerate/*.yaml)")
    p.add_argument("--num-processes", type=int, metavar="N",
                   help="processes (GPUs) of the launch; overrides the file's count, alone it means DDP")

    p = sub.add_parser("vllm-serve", help="serve rollouts from a vLLM engine for trainers with online.vllm_mode: server")
    _add_config_args(p)
    p.add_argument("--host", help="address to listen on; default: the config's online.vllm_server_host")
    p.add_argument("--port", type=int, help="port to listen on; default: the config's online.vllm_server_port")

    p = sub.add_parser("plot", help="plot metrics.jsonl of a run directory to a PNG")
    p.add_argument("run_dir", help="a run's output_dir holding metrics.jsonl")
    p.add_argument("--output", help="PNG path; default: <run_dir>/metrics.png")
    p.add_argument("--metrics", nargs="*", help="metric names to plot (default: the main ones present)")
    return parser


def train(cfg, resume: bool = False) -> dict:
    """Train in cfg.mode; returns the run's summary metrics. The config is checked first
    (grpo_fast.preflight), and only then is the trainer imported (HF's Trainer takes seconds to
    import): a bad config fails fast, and `plot` never loads it."""
    from .preflight import preflight
    from .rundir import OFFLINE_CHECKPOINT_FILES, ONLINE_CHECKPOINT_FILES

    files = OFFLINE_CHECKPOINT_FILES if cfg.mode == "offline" else ONLINE_CHECKPOINT_FILES
    checked = preflight(cfg, resume, files)
    if cfg.mode == "offline":
        from .offline import train_offline

        return train_offline(cfg, resume, checked)
    from .online import train_online

    return train_online(cfg, resume, checked)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun / accelerate launch every rank runs this; the main one (RANK 0) logs.
    main_rank = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # Log lines go through tqdm's writer, so they print above a progress bar, not glued onto it.
    with logging_redirect_tqdm():
        try:
            run(args)
        except (ConfigError, DataError, FileNotFoundError) as e:
            print(f"grpo-fast {args.command}: error: {e}", file=sys.stderr)
            return 2
        except TrainingStopped as e:
            print(f"grpo-fast {args.command}: stopped: {e}", file=sys.stderr)
            return 1
    return 0


def run(args: argparse.Namespace) -> None:
    if args.command == "plot":
        from .plot import plot_run

        print(f"wrote {plot_run(args.run_dir, args.output, args.metrics)}")
        return
    cfg = load_config(args.config, args.overrides)
    if cfg.cpu_threads > 0:
        import torch

        torch.set_num_threads(cfg.cpu_threads)
    if args.command == "train":
        train(cfg, resume=args.resume)
        from .distributed import shutdown

        shutdown()
    elif args.command == "eval":
        from .evaluate import evaluate

        evaluate(cfg, adapter=args.adapter, data_path=args.data, output=args.output)
    elif args.command == "plan":
        from .plan import plan_command

        print(plan_command(cfg, args.gpu_memory, args.accelerate_config, args.num_processes))
    elif args.command == "vllm-serve":
        from .rollout.vllm_server import serve

        serve(cfg, args.host, args.port)

if __name__ == "__main__":
    sys.exit(main())
