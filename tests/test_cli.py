"""Bad input gets one clear line on stderr and a non-zero exit."""
import subprocess
import sys

import pytest

from harness.cli import main


@pytest.mark.parametrize("argv,needle", [
    (["convert", "--method", "caer", "--kv-save", "0.5", "--out", "x"], "unknown method 'caer'"),
    (["convert", "--model", "/no/such/dir", "--method", "svd", "--kv-save", "0.5", "--out", "x"], "neither an embedded"),
    (["convert", "--method", "svd", "--kv-save", "1.2", "--out", "x"], "outside [0, 1)"),
    (["convert", "--method", "care", "--kv-save", "0.5", "--option", "bogus=1", "--out", "x"], "no option"),
    (["sweep", "/no/such.yaml"], "does not exist"),
    (["leaderboard", "/no/such/results"], "run the sweep first"),
])
def test_errors_are_one_line(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err
    assert len(err.splitlines()) == 1


def test_exit_code_from_a_real_process():
    p = subprocess.run([sys.executable, "-m", "harness", "convert", "--method", "nope", "--kv-save", "0.5",
                        "--out", "x"], capture_output=True, text=True)
    assert p.returncode == 2
    assert "unknown method 'nope'" in p.stderr and "Traceback" not in p.stderr


def test_rank_above_parity_on_the_real_model(capsys):
    assert main(["convert", "--method", "svd", "--rank", "999", "--out", "x"]) == 2
    assert "above KV parity (192" in capsys.readouterr().err
