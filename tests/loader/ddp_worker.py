"""One rank of the two-process DDP test: a real gloo process group, a DDP model, one step per loader batch."""
import json
import os
import sys

import torch
import torch.distributed as dist


def run(rank: int, world_size: int, root: str, port: int, out: str) -> None:
    from maskstream.loader.stream import LoaderConfig, MLMLoader
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Embedding(30522, 8))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = MLMLoader(root, LoaderConfig(batch_size=16, num_workers=1), rank=rank, world_size=world_size)
        steps, uids = 0, []
        for _ in range(2):  # two epochs
            for batch in loader:
                loss = model(batch["input_ids"]).float().pow(2).mean()
                opt.zero_grad()
                loss.backward()  # the gradient all-reduce: a rank short of batches would hang here
                opt.step()
                steps += 1
                uids.append(batch["uids"].tolist())
        dist.barrier()
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"steps": steps, "uids": uids, "epoch": loader.epoch, "stats": loader.stats[0]}, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, root, port, out = sys.argv[1:]
    run(int(rank), int(world), root, int(port), out)
