#!/usr/bin/env python3
"""Benchmark the TrainingRun stage beside a plain PyTorch loop on the same model, data and batch.

    python tests/bench/bench_train.py                  CPU: 2 workers x 1 CPU, the quickstart's tiny llama
    python tests/bench/bench_train.py --device cuda    one GPU: a ~125M llama in bf16, tokens/s and MFU

Both sides train the model the TrainingRun's config describes, from the same seed, on the training
split of the same pile version, with the same micro-batch, accumulation and workers, one after the
other on this machine:
  - fmforge: the TrainingRun stage as `fmforge run` runs it (Ray Train TorchTrainer, Ray Data
    streaming the Iceberg snapshot into the workers, progress queue, checkpoints);
  - peer: `torch.distributed` DDP over the same number of processes (gloo on CPU, nccl on GPU),
    each reading its rows from an in-memory copy of the same split, and the same optimizer,
    schedule, clipping and precision. No Ray.
The two sides alternate, A B A B A B (`--rounds`, 3 by default; the same seed and data every
time, a TrainingRun of its own name each round so that nothing is skipped as up to date): on a
shared machine a neighbour's burst then lands on both sides alike instead of on one run.
Steady-state tokens/s is measured in each run over the steps after the first `--warmup`
(start-up, first batches and compilation excluded), from each step's wall-clock time: the mean
and from the median step. The overhead is taken between the two sides' medians over the rounds,
with each side's spread (lowest to highest run) and the load average printed beside it. Prints
a table and one JSON line. Goal on 2 CPU workers: fmforge's
overhead <= 5% of the peer's tokens/s.

Where fmforge's time goes: during each fmforge run's steady state the bench reads every
process's CPU time from /proc and prints the cores the training workers, Ray's own processes
with the driver (raylet, GCS, the progress queue, Ray Train's controller and Ray Data's actors)
and the rest of the machine used. On a machine the workers fill (2 workers of 1 CPU on 2
cores, the default here) Ray's share comes out of the workers' time; `--workers 1` leaves Ray a
core and measures the training loop's own overhead. With --device cuda:
MFU >= 40% (model FLOPs: 6 x parameters + attention per token, over the GPU's bf16 peak).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart"
sys.path.insert(0, str(ROOT / "operator" / "src"))

#: bf16 dense peak of the GPUs this is meant for (TFLOP/s, no sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def pile(work: Path, seq_len: int, vocab: int) -> Path:
    """A pile of the quickstart corpus (no filters: the benchmark is about training), published once."""
    corpus = work / "corpus"
    subprocess.run([sys.executable, str(QUICKSTART / "build-corpus.py"), "--out", str(corpus)], check=True,
                   capture_output=True)
    m = {"apiVersion": "fmforge.io/v1alpha1", "kind": "DataPile", "metadata": {"name": "bench"},
         "spec": {"sources": [{"name": "prose", "uri": "file://corpus/prose/", "format": "jsonl"},
                              {"name": "code", "uri": "file://corpus/code/", "format": "code", "include": ["*.py"]}],
                  "categorize": {"naturalLanguage": {"enabled": False}, "programmingLanguage": {"enabled": False}},
                  "filters": [], "dedup": {"exact": True, "fuzzy": {"enabled": False}},
                  "tokenizer": {"train": {"vocabSize": vocab}}, "tokenize": {"sequenceLength": seq_len},
                  "split": {"validationFraction": 0.02}, "publish": {"tags": ["v1"]}}}
    p = work / "datapile.yaml"
    p.write_text(yaml.safe_dump(m))
    return p


def training_manifest(work: Path, args, name: str) -> Path:
    m = yaml.safe_load((QUICKSTART / "trainingrun.yaml").read_text())
    m["metadata"]["name"] = name
    m["spec"]["dataPileRef"] = {"name": "bench", "tag": "v1"}
    m["spec"]["model"]["config"] = {"layers": args.layers, "hidden": args.hidden, "heads": args.heads}
    t = m["spec"]["training"]
    args.lr = t["learningRate"]  # the peer trains at the TrainingRun's rate
    t.update(maxSteps=args.steps, globalBatchSize=args.global_batch, microBatchSize=args.micro_batch,
             warmupSteps=min(10, args.steps), checkpointEvery=None, precision="bf16")
    del t["checkpointEvery"]
    m["spec"]["resources"] = {"workers": args.workers, "cpusPerWorker": args.cpus_per_worker,
                              "gpusPerWorker": 1 if args.device == "cuda" else 0}
    m["spec"]["faultTolerance"] = {"maxFailures": 0}
    p = work / f"{name}.yaml"
    p.write_text(yaml.safe_dump(m))
    return p


def steady(curve: list[dict], warmup: int) -> dict[str, float]:
    """tokens/s over the steps after `warmup`: the mean (all tokens over all time) and from the
    median step time (robust to a neighbour's burst on a shared machine)."""
    pts = [p for p in curve if p["step"] > warmup]
    t0 = next(p["unixTime"] for p in curve if p["step"] == warmup)
    secs = pts[-1]["unixTime"] - t0
    # Each step after warm-up paired with the one before it: the first list is one longer (it
    # starts at the warm-up step), and its last element pairs with nothing.
    times = sorted(b["unixTime"] - a["unixTime"]
                   for a, b in zip([c for c in curve if c["step"] >= warmup], pts, strict=False))
    median = times[len(times) // 2]
    tokens = sum(p["tokens"] for p in pts)
    return {"mean": tokens / secs, "median": tokens / len(pts) / median, "step": secs / len(pts)}


class CpuSampler:
    """Every process's CPU time, read from /proc once a second in a thread: what the training
    workers, Ray's own processes (raylet, GCS, the progress queue, Ray Train's and Ray Data's
    actors) and the rest of the machine used during a window of the run."""

    def __init__(self) -> None:
        import threading

        self.snaps: list[tuple[float, dict[int, tuple[int, str]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _snap() -> dict[int, tuple[int, str]]:
        out = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            out[int(pid)] = (int(fields[11]) + int(fields[12]), cmd or stat[stat.index("(") + 1:stat.rindex(")")])
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            self.snaps.append((time.time(), self._snap()))
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cores(self, t0: float, t1: float) -> dict[str, float]:
        """Cores used between unix times t0 and t1 (the snapshots inside), by group."""
        inside = [s for s in self.snaps if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return {}
        (ta, a), (tb, b) = inside[0], inside[-1]
        hz = os.sysconf("SC_CLK_TCK")
        groups = {"workers": 0.0, "ray": 0.0, "other": 0.0}
        for pid, (ticks, cmd) in b.items():
            used = (ticks - a[pid][0]) if pid in a else 0
            if used <= 0:
                continue
            group = "workers" if "RayTrainWorker" in cmd else ("ray" if "ray" in cmd or pid == os.getpid()
                                                                 else "other")
            groups[group] += used / hz / (tb - ta)
        return {k: round(v, 3) for k, v in groups.items()}


# -- the peer: plain torch.distributed ------------------------------------------------------------


def peer_worker(rank: int, world: int, cfg: dict, out: str) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM, get_scheduler

    cuda = cfg["device"] == "cuda"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=cfg["port"])
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(cfg["threads"])  # what Ray Train gives a worker: its CPUs
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.manual_seed(cfg["seed"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg["model_config"]),
                                             attn_implementation="sdpa").to(device)
    if cfg["compile"]:
        model = torch.compile(model)
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(0.9, 0.95), fused=cuda)
    sched = get_scheduler("cosine", opt, num_warmup_steps=min(10, cfg["steps"]), num_training_steps=cfg["steps"])
    data = np.load(cfg["data"])
    ids_all, len_all = data["ids"], data["length"]
    rows = np.arange(rank, len(ids_all) - len(ids_all) % world, world)  # this rank's shard
    micro, accum = cfg["micro"], cfg["accum"]
    dtype = torch.bfloat16 if cuda else None
    curve, step, cursor = [], 0, 0
    acc = torch.zeros(2, dtype=torch.float64)
    while step < cfg["steps"]:
        for m in range(accum):
            take = rows[(np.arange(micro) + cursor) % len(rows)]
            cursor += micro
            ids = torch.from_numpy(ids_all[take].astype(np.int64))
            valid = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(len_all[take].astype(np.int64))[:, None]
            labels = ids.masked_fill(~valid, -100)
            ctx = model.no_sync() if m < accum - 1 else torch.autocast("cuda", enabled=False)
            with ctx, torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = model(input_ids=ids.to(device), attention_mask=valid.long().to(device),
                             labels=labels.to(device)).loss
            (loss / accum).backward()
            acc += torch.tensor([loss.item(), float(valid.sum())], dtype=torch.float64)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        dist.all_reduce(acc)
        if cuda:
            torch.cuda.synchronize()
        curve.append({"step": step, "loss": float(acc[0]) / (accum * world), "tokens": float(acc[1]),
                      "unixTime": time.time()})
        acc.zero_()
    if rank == 0:
        Path(out).write_text(json.dumps(curve))
    dist.destroy_process_group()


def run_peer(state: Path, model_config: dict, args, work: Path) -> list[dict]:
    import numpy as np
    import pyarrow.compute as pc
    import torch.multiprocessing as mp

    from fmforge.stages.datapile import publish as pub

    # The peer reads the split into memory: it is the baseline, not a way to train on a pile.
    seqs = pub.read_version(pub.catalog(state), "default", "bench", "v1", which="sequences")
    train = seqs.filter(pc.equal(seqs.column("split"), "train"))
    np.savez(work / "peer.npz", ids=np.stack(train.column("input_ids").to_numpy(zero_copy_only=False)),
             length=train.column("length").to_numpy())
    accum = args.global_batch // (args.micro_batch * args.workers)
    cfg = {"device": args.device, "port": "29517", "lr": args.lr, "threads": args.cpus_per_worker, "seed": 42,
           "model_config": model_config, "compile": args.compile and args.device == "cuda", "steps": args.steps,
           "data": str(work / "peer.npz"), "micro": args.micro_batch, "accum": accum}
    out = work / "peer-curve.json"
    mp.spawn(peer_worker, args=(args.workers, cfg, str(out)), nprocs=args.workers, join=True)
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the steady state")
    ap.add_argument("--compile", action="store_true", help="torch.compile the peer (cuda)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each side (A B A B ...)")
    ap.add_argument("--workers", type=int, default=None,
                    help="training workers of 1 CPU each (CPU: 2 by default, the whole machine here)")
    args = ap.parse_args()
    if args.device == "cuda":  # ~125M llama (12 x 768, GPT-2 small sizes), one GPU
        args.layers, args.hidden, args.heads, args.seq, args.vocab = 12, 768, 12, 1024, 32768
        args.workers, args.cpus_per_worker, args.micro_batch, args.global_batch = 1, 8, 16, 64
        args.steps, args.warmup = args.steps or 60, args.warmup or 20
    else:  # the quickstart's tiny llama on 2 CPU workers
        args.layers, args.hidden, args.heads, args.seq, args.vocab = 4, 256, 4, 256, 8192
        args.cpus_per_worker, args.micro_batch, args.global_batch = 1, 8, 32
        args.workers = args.workers or 2
        args.steps, args.warmup = args.steps or 40, args.warmup or 10

    from fmforge.runtime.local import run_paths
    from fmforge.runtime.progress import RunConsole
    from fmforge.runtime.state import StateDir
    from fmforge.stages import raysession
    from fmforge.stages.artifacts import TRAINING_LOG
    from fmforge.stages.raytrain import RUN_RECORD

    work = Path(tempfile.mkdtemp(prefix="fmforge-bench-train-"))
    state = work / ".fmforge"
    report = run_paths([pile(work, args.seq, args.vocab)], state_dir=state, console=RunConsole(rich=False))
    assert report.ok, report.outcomes
    raysession.shutdown()

    def fmforge_side(n: int) -> dict:
        name = f"bench-gpt-{n}"
        t = time.monotonic()
        sampler = CpuSampler()
        try:
            report = run_paths([work / "datapile.yaml", training_manifest(work, args, name)], state_dir=state,
                               console=RunConsole(rich=False))
        finally:
            sampler.stop()
        wall = time.monotonic() - t
        assert report.ok, report.outcomes
        raysession.shutdown()  # the peer gets the machine to itself
        rec = StateDir(state).read("TrainingRun", name)
        model = Path(rec["status"]["model"]["uri"].removeprefix("file://"))
        log = json.loads((model / TRAINING_LOG).read_text())
        # The model's log has each step's tokens; their times are in the attempt's run record.
        [record] = StateDir(state).artifacts_dir("TrainingRun", name).glob(f"attempts/*/{RUN_RECORD}")
        times = {p["step"]: p["unixTime"] for p in json.loads(record.read_text())["stepTimes"]}
        fm = steady([{**p, "unixTime": times[p["step"]]} for p in log["lossCurve"]], args.warmup)
        # what each group of processes used in the steady state (the steps after the warm-up)
        cores = sampler.cores(times[args.warmup], times[max(times)])
        return {**fm, "cores": cores, "load": os.getloadavg()[0], "wall": wall, "loss": log["lossCurve"][-1]["loss"],
                "parameters": rec["status"]["model"]["parameters"],
                "config": json.loads((model / "config.json").read_text())}

    def peer_side(config: dict) -> dict:
        curve = run_peer(state, config, args, work)
        return {**steady(curve, args.warmup), "load": os.getloadavg()[0], "loss": curve[-1]["loss"]}

    fms, peers = [], []
    for n in range(1, args.rounds + 1):
        fms.append(fmforge_side(n))
        peers.append(peer_side(fms[0]["config"]))
        c = fms[-1]["cores"]
        print(f"round {n}/{args.rounds}: fmforge {fms[-1]['mean']:.1f} tokens/s (load {fms[-1]['load']:.1f}; "
              f"cores in its steady state: workers {c.get('workers', 0):.2f}, Ray and the driver "
              f"{c.get('ray', 0):.2f}, other {c.get('other', 0):.2f}), "
              f"plain torch {peers[-1]['mean']:.1f} tokens/s (load {peers[-1]['load']:.1f})", flush=True)

    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    fm_tps, peer_tps = med(fms, "mean"), med(peers, "mean")
    fm_med, peer_med = med(fms, "median"), med(peers, "median")
    figures = {
        "device": args.device, "workers": args.workers, "parameters": fms[0]["parameters"], "rounds": args.rounds,
        "steps": args.steps, "warmup": args.warmup, "globalBatch": args.global_batch, "microBatch": args.micro_batch,
        "sequenceLength": args.seq,
        "fmforgeTokensPerSecond": round(fm_tps, 1), "peerTokensPerSecond": round(peer_tps, 1),
        "fmforgeRuns": [round(r["mean"], 1) for r in fms], "peerRuns": [round(r["mean"], 1) for r in peers],
        "fmforgeMedianStepTokensPerSecond": round(fm_med, 1), "peerMedianStepTokensPerSecond": round(peer_med, 1),
        "fmforgeSecondsPerStep": round(med(fms, "step"), 4), "peerSecondsPerStep": round(med(peers, "step"), 4),
        "overhead": round(1 - fm_tps / peer_tps, 4), "overheadMedianStep": round(1 - fm_med / peer_med, 4),
        "loadAverage1m": {"fmforge": [round(r["load"], 2) for r in fms], "peer": [round(r["load"], 2) for r in peers]},
        "fmforgeWallSeconds": [round(r["wall"], 1) for r in fms],
        "fmforgeSteadyCores": [r["cores"] for r in fms],
        "fmforgeFinalLoss": round(fms[0]["loss"], 4), "peerFinalLoss": round(peers[0]["loss"], 4),
    }
    if args.device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        flops_per_token = 6 * figures["parameters"] + 12 * args.layers * args.hidden * args.seq
        figures["gpu"] = name
        if peak:
            figures["fmforgeMFU"] = round(fm_tps * flops_per_token / peak, 4)
            figures["peerMFU"] = round(peer_tps * flops_per_token / peak, 4)

    def spread(runs: list[dict]) -> str:
        return f"{min(r['mean'] for r in runs):.0f}-{max(r['mean'] for r in runs):.0f}"

    print(f"{'':30}{'fmforge':>14}{'plain torch':>14}")
    print(f"{'tokens/s, median of runs':30}{fm_tps:14.1f}{peer_tps:14.1f}")
    print(f"{'spread (lowest-highest run)':30}{spread(fms):>14}{spread(peers):>14}")
    print(f"{'tokens/s from median steps':30}{fm_med:14.1f}{peer_med:14.1f}")
    print(f"{'s/step, median of runs':30}{figures['fmforgeSecondsPerStep']:14.4f}{figures['peerSecondsPerStep']:14.4f}")
    fm_loads = "/".join(f"{r['load']:.1f}" for r in fms)
    peer_loads = "/".join(f"{r['load']:.1f}" for r in peers)
    print(f"{'load average (1 min), runs':30}{fm_loads:>14}{peer_loads:>14}")
    print(f"{'final loss (round 1)':30}{figures['fmforgeFinalLoss']:14.4f}{figures['peerFinalLoss']:14.4f}")
    ray_cores = statistics.median(r["cores"].get("ray", 0) for r in fms)
    print(f"{'Ray and driver cores (median)':30}{ray_cores:14.2f}{'0':>14}  of {os.cpu_count()} on this machine")
    print(f"fmforge overhead: {100 * figures['overhead']:.1f}% between the medians of {args.rounds} alternating runs, "
          f"{100 * figures['overheadMedianStep']:.1f}% by median step (goal <= 5%)")
    print(json.dumps(figures))
    return 0

if __name__ == "__main__":
    sys.exit(main())
