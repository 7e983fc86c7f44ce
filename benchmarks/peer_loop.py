"""A hand-written training loop, the peer `throughput.py` measures the package against.

    python benchmarks/peer_loop.py DATA_FOLDER --model resnet18 --size 64 --batch 32 --steps 20 --workers 1

What an engineer writes without the package: torchvision `ImageFolder` + `DataLoader` + the
same v2 transforms (RandomResizedCrop, flip, float32 normalize in the workers) + plain SGD and
cross-entropy. Prints one JSON line: {"images_per_second": ..., "images_per_cpu_second": ..., "steps": ...},
timed as the package times its training (from making the loader's iterator to the last step's
update); CPU time counts this process and its data workers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args()

    import torchvision
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    torch.manual_seed(0)
    transform = v2.Compose(
        [
            v2.RandomResizedCrop(args.size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    data = ImageFolder(args.data, transform=transform)
    loader = DataLoader(
        data,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    model = torchvision.models.get_model(args.model, num_classes=len(data.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    steps, start, cpu = 0, time.perf_counter(), cpu_seconds()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        if steps == args.steps:
            break
    loss.item()
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    images = steps * args.batch
    print(json.dumps({"images_per_second": images / elapsed, "images_per_cpu_second": images / cpu, "steps": steps}))


def cpu_seconds() -> float:
    """CPU time of this process and its live children (the data workers), user + system."""
    import psutil

    me = psutil.Process()
    return sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)])


if __name__ == "__main__":
    main()
