"""The late EBM rate on the main run's length (issue 37): results/lrE-late-1600/ holds the small files of the `cpu`
profile's main run trained with `lr_E_late 1e-3` from iteration 200 (commit 8e07f8f, where the profile took it), which
diverged at iteration 1489; this script draws it against results/cpu's main run (the same settings without the late
rate) into results/lrE-late-1600/divergence.png and prints the numbers the README there quotes.
    python reproduce/lrE_late_1600.py
To train the run again (about 45 minutes on one core):
    mmebm train --profile cpu --set lr_E_late=0.001 lr_E_late_at=200 --run-dir runs/lrE-late-1600"""
from pathlib import Path
import numpy as np
import pandas as pd
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
late = pd.read_csv(ROOT / "results" / "lrE-late-1600" / "log.csv")
base = pd.read_csv(ROOT / "results" / "cpu" / "runs" / "main" / "log.csv")
runs = (("cpu main (lr_E 1e-4 throughout)", base, "tab:blue"), ("lr_E 1e-3 from iteration 200", late, "tab:red"))
roll = lambda s: s.rolling(25, min_periods=1).mean()

fig, ax = plt.subplots(1, 4, figsize=(17, 3.6))
for label, log, c in runs:
    p = log.dropna(subset=["probe_coh"])
    ax[0].plot(p["iteration"], p["probe_coh"], "o-", color=c, label=label)
    ax[1].plot(log["iteration"], roll(log["x_move"] / log["x_noise_floor"]), color=c, label=label)
    ax[2].plot(log["iteration"], roll(log["E_revised"] - log["E_data"]), color=c, label=label)
    ax[3].plot(log["iteration"], log["loss_E_times_T"].abs(), color=c, lw=0.6, alpha=0.7, label=label)
ax[0].set_ylabel("probe coherence (500 test tuples)"); ax[0].axhline(0.134, color="k", lw=0.6, ls=":")
ax[1].set_ylabel("data chain move / noise floor"); ax[1].set_yscale("log")
ax[2].set_ylabel("E(revised) - E(data), rolling 25"); ax[2].set_yscale("symlog", linthresh=10)
ax[3].set_ylabel("|L_E x T| (guard at 1e4)"); ax[3].set_yscale("log"); ax[3].axhline(1e4, color="k", lw=0.6, ls=":")
for a in ax: a.set_xlabel("iteration"); a.axvline(200, color="gray", lw=0.5, ls="--")
ax[0].legend(fontsize=8)
fig.suptitle("The late EBM rate on the cpu main run's length: the chain works from iteration 200, then the EBM's "
             "energies run away and the divergence guard stops the run at 1489", fontsize=10)
fig.tight_layout()
fig.savefig(ROOT / "results" / "lrE-late-1600" / "divergence.png", dpi=110)

tenth = lambda log, a, b: (log["x_move"] / log["x_noise_floor"]).iloc[a:b].mean()
print("chain / floor, iterations 1301-1400:", round(tenth(late, 1300, 1400), 1), "against", round(tenth(base, 1300, 1400), 1))
print("probe coherence at 1400:", late.dropna(subset=["probe_coh"]).query("iteration == 1400")["probe_coh"].item(),
      "against", base.dropna(subset=["probe_coh"]).query("iteration == 1400")["probe_coh"].item())
w = late.set_index("iteration")
for i in (1400, 1450, 1470, 1480, 1489):
    r = w.loc[i]
    print(f"iteration {i}: |L_E x T| {abs(r.loss_E_times_T):.0f}, E(revised) - E(data) {r.E_revised - r.E_data:.0f}, grad_x {r.grad_x:.3f}")
