"""Train a policy under constraints: python train.py [group=option ...] [key=value ...] [-m for sweeps].

Configs: conf/ (train.yaml lists the groups). The same entry point is installed as `dualign-train`.
"""
from dualign.cli import main

if __name__ == "__main__":
    main()
