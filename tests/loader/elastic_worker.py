"""One rank of the elastic-resume test: a real gloo group; rank 0 writes every global batch (all ranks' batches
gathered, rank order) from the loader's position on, and the loader state after `save_at` batches."""
import json
import os
import sys

import torch
import torch.distributed as dist


def run(rank: int, world: int, batch: int, workers: int, root: str, port: int, out: str, state_in: str,
        save_at: int) -> None:
    from maskstream.loader.stream import LoaderConfig, MLMLoader
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loader = MLMLoader(root, LoaderConfig(batch_size=batch, partitions=8, seed=3, num_workers=workers),
                           rank=rank, world_size=world)
        loader.set_epoch(1)
        if state_in:
            with open(state_in) as f:
                loader.load_state_dict(json.load(f))
        steps = []
        for b in loader:
            mine = torch.cat([b["uids"][:, None], b["input_ids"], b["labels"]], dim=1)  # (B, 1 + 2L)
            gathered = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(gathered, mine)  # a rank short of batches would hang here
            steps.append(torch.cat(gathered).tolist())
            if len(steps) == save_at and rank == 0:
                with open(f"{out}.state", "w") as f:
                    json.dump(loader.state_dict(), f)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(steps, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    r, w, b, nw, root, port, out, state_in, save_at = sys.argv[1:]
    run(int(r), int(w), int(b), int(nw), root, int(port), out, state_in, int(save_at))
