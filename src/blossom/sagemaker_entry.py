"""SageMaker entry point: torchrun starts one copy per GPU on every instance.

The first process on each instance prepares data, VAE and cache (skipped when a restarted job
finds them in its restored checkpoint folder); the others wait for it. Then every process trains
with `--resume auto`, and rank 0 copies the model to SageMaker's model folder.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from blossom import cli
    from blossom.config import load_config
    from blossom.env import launch_env, sagemaker_model_dir
    from blossom.stages import needed_by
    from blossom.train.distributed import Runtime

    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default=None)
    parser.add_argument("--overrides", default="")
    args = parser.parse_args(argv)
    params = Path(__file__).resolve().with_name("params.yaml")  # staged beside this file by `blossom sagemaker`
    overrides = shlex.split(args.overrides)
    cfg = load_config(params, args.preset, overrides)
    paths, launch = cli.Paths(cfg.out), launch_env()
    ready = paths.cache / "index.json"
    if launch.local_rank == 0 and not ready.exists():
        options = argparse.Namespace(source=None, path=None)
        for stage in needed_by("train"):  # what training reads: data, VAE, cache
            if stage.name == "cache":
                cli.cmd_cache(cfg, paths, options, Runtime())  # this process alone: the others wait below
            else:
                cli.stage_command(stage.name)(cfg, paths, options)
    while not ready.exists():
        time.sleep(5)
    cmd = ["--params", str(params), *(["--preset", args.preset] if args.preset else [])]
    cmd += [a for o in overrides for a in ("--set", o)] + ["train", "--resume", "auto"]
    rc = cli.main(cmd)
    model_dir = sagemaker_model_dir()
    if rc == 0 and launch.rank == 0 and model_dir:
        shutil.copytree(paths.model, Path(model_dir) / "blossom", dirs_exist_ok=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
