import subprocess
import sys


from ppl_lvm.cli import main


def test_backends_lists_svi(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "svi" in out and "valid for" in out


def test_demo_prints_diagnostics_and_writes_plot(tmp_path, capsys):
    plot = tmp_path / "demo.png"
    assert main(["demo", "--num-steps", "300", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    for needle in ("diabetes", "r_hat", "ess_bulk", "log-evidence", "PSIS k-hat", "PSIS-LOO", "w[bmi]"):
        assert needle in out, needle
    assert plot.exists() and plot.stat().st_size > 10_000


def test_fit_on_csv(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 2))
    y = 2.0 * X[:, 0] - X[:, 1] + 0.3 * rng.normal(size=80)
    path = tmp_path / "data.csv"
    np.savetxt(path, np.column_stack([X, y]), delimiter=",", header="a,b,target", comments="")
    assert main(["fit", str(path), "--target", "target", "--num-steps", "800"]) == 0
    out = capsys.readouterr().out
    assert "w[a]" in out and "w[b]" in out
    assert main(["fit", str(path), "--target", "nope"]) == 2
    assert "column 'nope' not in" in capsys.readouterr().err


def test_fit_refuses_non_numeric_columns_by_name(tmp_path, capsys):
    """A text column used to become 442 'missing' rows, then ZeroDivisionError."""
    path = tmp_path / "mixed.csv"
    rows = ["age,sex,target"] + [f"{20 + i},{'male' if i % 2 else 'female'},{0.1 * i}" for i in range(30)]
    path.write_text("\n".join(rows) + "\n")
    assert main(["fit", str(path), "--target", "target", "--num-steps", "10"]) == 2
    err = capsys.readouterr().err
    assert "non-numeric column(s)" in err and "'sex' (30 of 30 entries, e.g. 'female')" in err


def test_console_script_is_installed():
    res = subprocess.run([sys.executable, "-m", "ppl_lvm.cli", "backends"], capture_output=True, text=True)
    assert res.returncode == 0 and "svi" in res.stdout


def test_bad_num_steps(capsys):
    assert main(["demo", "--num-steps", "0"]) == 2


def test_device_option_runs_on_the_cpu_and_refuses_a_missing_gpu(capsys):
    import pytest
    import torch

    assert main(["demo", "--num-steps", "50", "--plot", "", "--device", "cpu"]) == 0
    assert "device cpu" in capsys.readouterr().out
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    assert main(["demo", "--num-steps", "50", "--plot", "", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "torch.cuda.is_available() is False" in err and "device='cpu'" in err
    from ppl_lvm.datasets import load_diabetes

    with pytest.raises(ValueError, match="asks for CUDA"):
        load_diabetes(device="cuda")
    with pytest.raises(ValueError, match="is not a device"):
        load_diabetes(device="gpu0")
