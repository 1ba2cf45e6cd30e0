"""The workers' final figures are over the whole test set, not rank 0's shard: on 2 real processes
(gloo), each holding every other image, the active-unit counts every rank reports are those of one
process adding up both shards' sums (the sums of nvae_core.evaluation.active_unit_sums)."""
import json
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_config

from nvae_core import NVAE
from nvae_core.datasets import Batches
from nvae_core.evaluation import active_unit_sums, counts_from_sums
from nvae_platform.train.measures import seeded, unit_counts

WORLD, SEED, DEVICE = 2, 7, torch.device("cpu")


def _model_and_shards():
    torch.manual_seed(0)
    model = NVAE(tiny_config()).eval()
    images = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, [list(images[rank::WORLD].split(3)) for rank in range(WORLD)]


def _worker(rank, port, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model, shards = _model_and_shards()
        counts = unit_counts(model, shards[rank], model.cfg, DEVICE, SEED)
        with open(f"{folder}/rank{rank}.json", "w") as f:
            json.dump(counts, f)
    finally:
        dist.destroy_process_group()


def _shard_sums(model, shard):
    """What a rank sums over its shard: the same seed and batches as unit_counts."""
    with seeded(SEED, DEVICE):
        prepare = Batches(model.cfg, DEVICE, SEED)
        return active_unit_sums(model, (prepare(x) for x in shard))


def test_every_rank_reports_active_units_over_both_shards(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    reported = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]

    model, shards = _model_and_shards()
    (m0, q0, k0, n0), (m1, q1, k1, n1) = (_shard_sums(model, shard) for shard in shards)
    add = lambda a, b: [x + y for x, y in zip(a, b)]
    units, channels = counts_from_sums(add(m0, m1), add(q0, q1), add(k0, k1), n0 + n1)
    own_units, _ = counts_from_sums(m0, q0, k0, n0)
    print(f"\nactive units over both shards {units}, over rank 0's alone {own_units}")
    for counts in reported:
        assert [counts[f"active_units_group_{g}"] for g in range(len(units))] == units
        assert [counts[f"active_units_kl_group_{g}"] for g in range(len(channels))] == channels
        assert counts["active_units"] == sum(units) and counts["active_units_kl"] == sum(channels)
