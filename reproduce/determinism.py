"""Does one training iteration repeat bit for bit across fresh processes at a given thread count? (issue 36, item 6)

    python reproduce/determinism.py --profile tiny --threads 2 --processes 20
    python reproduce/determinism.py --profile cpu --set batch_size=32 --threads 2 --processes 12

Each process trains the profile's first iteration in a fresh interpreter, recording a hash of every leaf module's
forward output in call order and of every parameter after the step. The report: how many distinct results, and the
first call whose output differs between processes (the op to look at), or that all calls agreed.
"""
import argparse, collections, hashlib, json, os, subprocess, sys, tempfile
from pathlib import Path


def one(profile: str, sets: list[str], threads: int, out: Path):
    import torch
    torch.set_num_threads(threads)
    from mmebm.cli import _parse_set as parse_set      # the CLI's own reading of --set KEY=VALUE
    from mmebm.train import Trainer, profile as get_profile
    cfg = get_profile(profile, iterations=1, probe_every=0, **parse_set(sets))
    calls = []
    def hook(name):
        def record(mod, inp, output):
            t = output[0] if isinstance(output, (tuple, list)) else output
            if torch.is_tensor(t): calls.append((name, hashlib.sha1(t.detach().contiguous().float().numpy().tobytes()).hexdigest()[:12]))
        return record
    t = Trainer(cfg, Path(tempfile.mkdtemp()) / "run")
    for n, m in t.model.named_modules():
        if n and not list(m.children()): m.register_forward_hook(hook(n))
    t.fit(progress=False)
    params = {n: hashlib.sha1(p.detach().contiguous().numpy().tobytes()).hexdigest()[:12] for n, p in t.model.named_parameters()}
    out.write_text(json.dumps({"calls": calls, "params": params}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="tiny"); ap.add_argument("--set", nargs="*", default=[], help="Config overrides KEY=VALUE")
    ap.add_argument("--threads", type=int, default=2); ap.add_argument("--processes", type=int, default=20)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one: return one(a.profile, a.set, a.threads, Path(a.one))
    tmp = Path(tempfile.mkdtemp())
    env = os.environ | {"OMP_NUM_THREADS": str(a.threads), "MMEBM_RUNS_DIR": str(tmp / "runs")}
    for i in range(a.processes):
        subprocess.run([sys.executable, __file__, "--profile", a.profile, "--threads", str(a.threads), "--one", str(tmp / f"{i}.json"),
                        *(["--set", *a.set] if a.set else [])], env=env, check=True, capture_output=True)
    runs = [json.loads((tmp / f"{i}.json").read_text()) for i in range(a.processes)]
    finals = collections.Counter(json.dumps(r["params"], sort_keys=True) for r in runs)
    print(f"{a.processes} processes, {a.threads} thread(s), profile {a.profile} {' '.join(a.set)}: "
          f"{len(finals)} distinct parameter sets after the step ({sorted(finals.values(), reverse=True)})")
    calls = [r["calls"] for r in runs]
    for k in range(min(len(c) for c in calls)):
        seen = collections.Counter(c[k][1] for c in calls)
        if len(seen) > 1: return print(f"first differing call: #{k} {calls[0][k][0]} ({dict(seen)})")
    print(f"all {len(calls[0])} recorded module calls agree")


if __name__ == "__main__":
    main()
