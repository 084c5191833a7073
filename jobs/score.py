"""Ray job entrypoint for batch scoring: the same code path as `vitray score`, for `ray job submit` and RayJobs.

    ray job submit --address http://HEAD:8265 -- python jobs/score.py --model models:/digits-vit@champion \
        --input s3-mounted/shards --output /mnt/shared/predictions --concurrency 4 --use-gpu

Inside a Ray job the driver runs on the cluster: it connects with address="auto". Rerun the same command after an
interruption: completed units are kept and skipped. Exit codes as the CLI: 0 success, 2 bad input, 1 failure.
"""
import sys

from vitray.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--address" not in args:
        args += ["--address", "auto"]
    sys.exit(main(["score", *args]))
