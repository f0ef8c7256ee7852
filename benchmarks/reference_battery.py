"""Every reference posterior x every registered backend: how far each backend is from ground
truth computed elsewhere (posteriordb; see ``ppl_lvm.testing.reference``).

    python benchmarks/reference_battery.py                      # the full table (about an hour on 2 cores)
    python benchmarks/reference_battery.py --posteriors arK,gp_regr --backends svi,smc

Columns: worst |z| of a mean, worst |z| of an sd (both in combined MCSEs, ours and the
reference's), the sd ratio farthest from 1, the smallest ESS (bulk ESS for samplers, importance
ESS for guides), ESS/s, the log-evidence error in nats with its z where the reference has one,
the importance k-hat for guide-based backends, and the fit's wall time.  A backend that refuses
a posterior (its declared requirements) gets "not valid" and the reason; one that fails gets
the error.  Run alone on the machine: the times are wall-clock.
"""

import argparse
import sys
import time
import traceback
import warnings

import torch

import ppl_lvm
from ppl_lvm.errors import IncompatibleModelError
from ppl_lvm.testing import check_against_reference, reference_posteriors


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--posteriors", default=",".join(reference_posteriors()))
    ap.add_argument("--backends", default=",".join(ppl_lvm.list_backends()))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    header = (f"{'posterior':<26}{'backend':<12}{'|z| mean':>9}{'|z| sd':>8}{'sd ratio':>9}{'min ESS':>9}"
              f"{'ESS/s':>8}{'logZ err':>10}{'z':>6}{'k-hat':>7}{'time s':>8}  note")
    print(header, flush=True)
    for name in a.posteriors.split(","):
        for backend in a.backends.split(","):
            t0 = time.perf_counter()
            caught = []
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    res = check_against_reference(name, backend, seed=a.seed, progress=False)
            except IncompatibleModelError as exc:
                line = f"{name:<26}{backend:<12}{'not valid':>9}  {str(exc).splitlines()[0][:110]}"
            except Exception as exc:  # noqa: BLE001 - a failure is a row of the table
                line = (f"{name:<26}{backend:<12}{'FAILED':>9}  {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:110] if str(exc) else ''} ({time.perf_counter() - t0:.0f} s)")
                traceback.print_exc(file=sys.stderr)
            else:
                ev = res.log_evidence
                evs = f"{ev[0] - ev[2]:>10.3f}{ev[4]:>6.1f}" if ev else f"{'':>10}{'':>6}"
                kh = f"{res.khat:>7.2f}" if res.khat is not None else f"{'':>7}"
                warn = sorted({" ".join(str(w.message).split(":")[:2])[:60] for w in caught
                               if issubclass(w.category, RuntimeWarning)})
                line = (f"{name:<26}{backend:<12}{res.worst_z:>9.2f}{res.worst_sd_z:>8.2f}{res.worst_sd_ratio:>9.3f}"
                        f"{res.min_ess:>9.0f}{res.ess_per_second:>8.0f}{evs}{kh}{res.seconds:>8.1f}  "
                        + ("; ".join(warn + [n for n in res.notes if not n.startswith("no log-evidence")]))[:160])
            rows.append(line)
            print(line, flush=True)
    return rows


if __name__ == "__main__":
    main()
