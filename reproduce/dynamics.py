"""Train the controlled short runs of a plan (reproduce/dynamics.yaml unless `--plan` names another; each run
resumable), copy their logs into results/<the plan's `out`, default dynamics>/<tag>/, and draw the comparison
figure and table the training notebooks cite.

    python reproduce/dynamics.py [TAG ...]                               # all runs, or only the named ones
    python reproduce/dynamics.py --plan reproduce/dynamics-400.yaml      # the 400-iteration runs (nbs/05a_config)
"""
import argparse, json, math, shutil
from pathlib import Path
import pandas as pd
import yaml
from mmebm.train import Trainer, profile, train, runs_root
from mmebm.runs import finished_in, training_probe
from mmebm import metrics
from mmebm.data import PolyMNIST

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "results" / "dynamics"      # set from the plan's `out` in __main__


def run(tag: str, spec: dict, plan: dict):
    cfg = profile(spec["profile"], iterations=plan["iterations"], probe_every=plan["probe_every"],
                  **{k: tuple(v) if k in ("betas", "betas_E") else v for k, v in (spec.get("set") or {}).items()})
    cfg = cfg.replace(name=f"dynamics-{tag}")
    d, dest = runs_root() / OUT.name / tag, OUT / tag
    status = finished_in(d, cfg)
    if status: t = Trainer.load(d)            # finished: its status (and the revision that trained it) stand; read only
    else: t, status = train(cfg, d, probe=training_probe(cfg))
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("log.csv", "config.yaml", "status.json"): shutil.copy(t.run_dir / f, dest / f)
    if hasattr(t.model.ebm, "log_gain"):     # the learnable EBM gain at the end (cfg.ebm_gain)
        (dest / "ebm_gain.json").write_text(json.dumps({"gain": float(t.model.ebm.log_gain.exp())}) + "\n")
    if status["state"] == "completed" and cfg.dataset == "polymnist":
        # where the data's revised latents lie against the prior at the end (nbs/06_metrics, latent_fit), on the probe's tuples
        model, test, clf = t.model.eval(), PolyMNIST(t.data_path, "test"), metrics.get_classifiers(t.data_path)
        fit = metrics.latent_fit(model, test, clf, n=500)
        (dest / "latent_fit.json").write_text(json.dumps(fit, indent=1) + "\n")
        if plan.get("chain_steps"):
            # what the EBM's revision does to prior samples as its chain grows at sampling time only (nbs/06_metrics)
            eff = metrics.chain_length_effect(model, test, clf, n=500, steps=plan["chain_steps"])
            (dest / "chain.json").write_text(json.dumps(eff, indent=1) + "\n")
            # the ex-post sampler (a departure from the paper): a mixture fitted to 2,000 training tuples' revised latents
            draw = metrics.expost_sampler(model, PolyMNIST(t.data_path, "train"), n_fit=2000, components=10)
            (dest / "expost.json").write_text(json.dumps(metrics.expost_coherence(model, draw, clf, n=500), indent=1) + "\n")
    print(f"{tag}: {status['state']} at {status['iteration']}")


def latent_columns(f: Path) -> dict:
    "The latent-fit columns of a run's table row (NaN for a run scored before latent_fit.json was written)."
    fit = json.loads(f.read_text()) if f.exists() else None
    nan = float("nan")
    return {"KL(fit to prior) / dim": fit["kl_fit_to_prior_per_dim"] if fit else nan,
            "joint coh. from prior": fit["joint_coherence"]["prior"] if fit else nan,
            "joint coh. from z~": fit["joint_coherence"]["revised_latents"] if fit else nan}


def chain_columns(f: Path, run_cfg: dict) -> dict:
    "The sampling-chain columns of a run's table row: joint coherence and classifier FID at 0, K_x and the longest chain."
    eff = json.loads(f.read_text())["steps"] if f.exists() else {}
    if not eff: return {}
    longest, K_x = max(eff, key=int), int(run_cfg["K_x"])
    return {"uncond. coh. gen / rev / long": "{:.3f} / {:.3f} / {:.3f}".format(
                eff["0"]["joint_coherence"], eff[str(K_x)]["joint_coherence"], eff[longest]["joint_coherence"]),
            # a constant digit everywhere is coherent without being generative: the share of the most common agreed digit
            "top agreed digit share gen / rev": "{:.2f} / {:.2f}".format(
                eff["0"].get("top_digit_share", math.nan), eff[str(K_x)].get("top_digit_share", math.nan)),
            "clf FID gen / rev / long": "{:.1f} / {:.1f} / {:.1f}".format(
                eff["0"]["fid"]["mean"], eff[str(K_x)]["fid"]["mean"], eff[longest]["fid"]["mean"]),
            "sampling move / floor (K_x)": eff[str(K_x)]["move_per_element"] / (run_cfg["n_x"] * (K_x * 2 / math.pi) ** 0.5)} | (
            {"ex-post GMM coh. gen / rev": "{generator:.3f} / {ebm:.3f}".format(**json.loads((f.parent / "expost.json").read_text()))}
            if (f.parent / "expost.json").exists() else {})


def summarise(plan: dict):
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, logs = [], {}
    for tag, spec in plan["runs"].items():
        f = OUT / tag / "log.csv"
        main = HERE.parent / "results" / "cpu" / "runs" / "main" / "log.csv"
        if not f.exists() and tag == "cpu" and main.exists():
            # the cpu main run is this config with the same seed (only its budget and probe interval differ, neither
            # changes training): its first iterations are this run's, and its probe every 200 iterations
            f = main
            spec = dict(spec, says=spec["says"] + " (the first iterations of results/cpu's main run)")
        if not f.exists(): continue
        log = logs[tag] = pd.read_csv(f).set_index("iteration").loc[:plan["iterations"]]
        probe, last = log["probe_coh"].dropna(), log.iloc[-20:].mean(numeric_only=True)
        M = sum(c.startswith("rec_z_") for c in log.columns)
        rows.append({"run": tag, "what it changes": spec["says"], "iterations": int(log.index.max()),
                     "probe coherence": probe.iloc[-1] if len(probe) else float("nan"),
                     "from expert mean": log["probe_coh_mu"].dropna().iloc[-1] if len(probe) else float("nan"),
                     "rec from z~": last[[f"rec_z_{m}" for m in range(M)]].mean(),
                     "rec from expert mean": last[[f"rec_mu_{m}" for m in range(M)]].mean(),
                     "z0 norm": last["z0_norm"], "z~ norm": last["zrev_norm"], "expert log-var": last["logvar_I"],
                     "x move / floor": last["x_move"] / last["x_noise_floor"], "mean dE/dx": last["grad_x"]}
                    | ({"EBM gain (end)": json.loads((f.parent / "ebm_gain.json").read_text())["gain"]}
                       if (f.parent / "ebm_gain.json").exists() else {})
                    | latent_columns(f.parent / "latent_fit.json")
                    | chain_columns(f.parent / "chain.json", yaml.safe_load((f.parent / "config.yaml").read_text())))
    table = pd.DataFrame(rows)
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    md = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    md += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in table.itertuples(index=False)]
    (OUT / "dynamics.md").write_text(
        f"Controlled runs of reproduce/{plan['file']}, {plan['iterations']} iterations each (seed 0 unless the run says "
        "otherwise, offline PolyMNIST). "
        "Probe: single-source coherence of the generator on 500 test tuples (chance 0.1); the other columns are means "
        "over the last 20 iterations of the log (reconstruction error per pixel in [-1, 1] units; the data's variance "
        "is 0.29). The last three columns: `metrics.latent_fit` on the 500 probe tuples at the run's end (the data's revised "
        "latents against the prior; empty for runs that finished before it was written)."
        + (" The sampling-chain columns (`metrics.chain_length_effect`, 500 prior draws, chain.png): joint coherence and "
           "classifier-feature FID of the generator's samples, of them revised by the training K_x steps and by the longest "
           f"chain ({max(plan['chain_steps'])} steps); the data chain's move at sampling over its noise floor; the joint coherence of "
           "500 decodes from a 10-component Gaussian mixture fitted to 2,000 training tuples' revised latents (`metrics."
           "expost_sampler`, a departure from the paper), before and after the revision."
           if plan.get("chain_steps") else "") + "\n\n" + "\n".join(md) + "\n")
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.6))
    for i, (tag, log) in enumerate(logs.items()):
        style = dict(color=plt.cm.tab20(i % 20), ls="-" if i < 10 else "--")     # 11+ runs: no colour twice
        p = log["probe_coh"].dropna()
        ax[0].plot(p.index, p, marker=".", label=tag, **style)
        sm = log.rolling(10, min_periods=1).mean()
        M = sum(c.startswith("rec_z_") for c in log.columns)
        ax[1].plot(sm.index, sm[[f"rec_mu_{m}" for m in range(M)]].mean(1), lw=1, **style)
        ax[2].plot(sm.index, sm["zrev_norm"], lw=1, **style)
        ax[3].semilogy(sm.index, sm["x_move"] / sm["x_noise_floor"], lw=1, **style)
    ax[0].axhline(0.1, color="k", lw=0.6, ls=":"); ax[0].set_title("coherence probe (chance 0.1)", fontsize=9)
    ax[0].legend(fontsize=6)
    ax[1].axhline(0.29, color="k", lw=0.6, ls=":"); ax[1].set_title("reconstruction from the experts' means (data variance dotted)", fontsize=9)
    ax[2].axhline(1, color="k", lw=0.6, ls=":"); ax[2].set_title("|z~| / sqrt(d) (prior: 1)", fontsize=9)
    ax[3].axhline(10, color="k", lw=0.6, ls=":"); ax[3].set_title("data chain: |x~ - x0| / noise floor", fontsize=9)
    for a in ax: a.set_xlabel("iteration", fontsize=8)
    fig.tight_layout(); fig.savefig(OUT / "dynamics.png", dpi=80)
    chains = {tag: json.loads((OUT / tag / "chain.json").read_text()) for tag in logs if (OUT / tag / "chain.json").exists()}
    if chains:
        # the sampling chain's length only (training keeps its K_x): what longer revision does to prior samples
        fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
        for i, (tag, eff) in enumerate(chains.items()):
            K = sorted(eff["steps"], key=int)
            ks, style = [int(k) for k in K], dict(marker=".", color=plt.cm.tab20(i % 20), ls="-" if i < 10 else "--")
            ax[0].plot(ks, [eff["steps"][k]["joint_coherence"] for k in K], label=tag, **style)
            # relative to the same run's generator (K = 0): the samples are paired, the runs' own FIDs differ widely
            ax[1].plot(ks, [eff["steps"][k]["fid"]["mean"] / eff["steps"]["0"]["fid"]["mean"] for k in K], **style)
            ax[2].plot(ks, [eff["steps"][k]["move_per_element"] for k in K], **style)
        ax[1].axhline(0.9, color="k", lw=0.6, ls=":"); ax[1].set_ylim(0.5, 1.5)
        for a, what in zip(ax, ("unconditional coherence (all 5 digits agree)",
                                "classifier-feature FID / the generator's (K = 0); dotted: 0.9",
                                "mean |x~ - g(z)| per element")):
            a.set_title(what, fontsize=9); a.set_xlabel("sampling chain length K (0: the generator)", fontsize=8)
        ax[0].legend(fontsize=6); fig.tight_layout(); fig.savefig(OUT / "chain.png", dpi=80)
    print(table.to_string(index=False))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tags", nargs="*", help="runs of the plan to train (default: all)")
    ap.add_argument("--plan", default=str(HERE / "dynamics.yaml"), help="a plan file (default: reproduce/dynamics.yaml)")
    ap.add_argument("--summarise-only", action="store_true", help="redraw the table and figures from results/ alone")
    args = ap.parse_args()
    plan = yaml.safe_load(Path(args.plan).read_text())
    plan["file"] = Path(args.plan).name
    OUT = HERE.parent / "results" / plan.get("out", "dynamics")
    tags = args.tags or list(plan["runs"])
    if not args.summarise_only:
        for tag in tags: run(tag, plan["runs"][tag], plan)
    summarise(plan)
