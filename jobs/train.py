"""Ray job entrypoint for training: the same code path as `vitray train`, for `ray job submit` and KubeRay RayJobs.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train.py jobs/configs/digits_vit_pico.yaml \
        --set cluster.num_workers=4

Inside a Ray job the driver already runs on the cluster: it connects with address="auto" unless the config says
otherwise. Exit codes as the CLI: 0 success, 2 bad config, 1 runtime failure.
"""
import sys

from vitray.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--address" not in args:
        args += ["--address", "auto"]
    sys.exit(main(["train", *args]))
