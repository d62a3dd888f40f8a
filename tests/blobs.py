"""A tiny learnable pair set shared by the trainer, checkpoint and speedups tests (tests/ is on
``sys.path`` under pytest: ``from blobs import Blobs``)."""

from __future__ import annotations

import numpy as np
import torch


class Blobs(torch.utils.data.Dataset):
    """K noisy views of smooth blobs -> the clean blob: a tiny learnable pair set."""

    def __init__(self, n=32, k=2, c=1, size=32, seed=0):
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.uniform(8, size - 8, (2, n))
        r = rng.uniform(3, 7, n)
        self.targets = np.exp(
            -(
                ((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2)
                / (2 * r[:, None, None] ** 2)
            )
        )
        self.targets = np.repeat(self.targets[:, None], c, 1).astype(np.float32)
        self.inputs = np.clip(
            self.targets[:, None] + rng.normal(0, 0.05, (n, k, c, size, size)), 0, 1
        ).astype(np.float32)
        self.epochs_seen = []

    def set_epoch(self, epoch):
        self.epochs_seen.append(epoch)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.from_numpy(self.inputs[i]), torch.from_numpy(self.targets[i])
