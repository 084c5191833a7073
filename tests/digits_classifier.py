"""A ViT classifier trained on scikit-learn's bundled digits in one process, for what needs a real classifier but
does not test the trainer (ONNX parity and int8 agreement: tests/test_onnx.py, benchmarks/edge_latency.py)."""
from __future__ import annotations

PRE = {"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875, "interpolation": "bicubic"}


def digit_rows(shards: str, split: str):
    """(encoded image, label) of one split of packed shards, in shard order."""
    import pyarrow.parquet as pq

    from vitray.data.formats import Manifest

    m = Manifest.read(shards)
    for f in m.files(shards, split):
        t = pq.read_table(f, columns=["image", "label"])
        yield from zip(t.column("image").to_pylist(), t.column("label").to_pylist())


def train_digits_classifier(shards: str, folder, epochs: int = 12, name: str = "vit_pico_patch4_32"):
    """``name`` trained on the train split (AdamW, one-cycle, batch 64, fixed seeds) and exported to ``folder``:
    about 0.9 val top-1 in half a minute on 2 cores. Inputs are the val transform of the packed PNGs, as every
    runtime sees them."""
    import torch

    from vitray.models import create_model
    from vitray.models.export import save_export
    from vitray.predict import normalise, prepare

    meta = {"task": "classification", "preprocessing": PRE}
    images, labels = zip(*digit_rows(shards, "train"))
    x = normalise([prepare(im, meta)[0] for im in images], meta)
    y = torch.tensor(labels)
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    per_epoch = len(x) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * per_epoch, pct_start=0.1)
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(per_epoch):
            idx = order[i * 64:(i + 1) * 64]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    arch = {"name": name, "num_classes": 10, "img_size": 32}
    return save_export(folder, model.state_dict(), model=arch, task="classification",
                       class_names=[str(i) for i in range(10)], preprocessing=PRE)
