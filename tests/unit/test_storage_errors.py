"""Named storage errors: a tokenizer that is not a local folder never reaches the Hub, and
an unwritable output is found before the work whose result would go there."""

import pytest

from megatron_r1v.atomic_dir import check_writable
from megatron_r1v.data.tokenizer import load_tokenizer


def test_tokenizer_names_that_are_not_folders_fail_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A relative name that looks like a Hub repo id: no network, one clear line.
    with pytest.raises(FileNotFoundError, match=r"tokenizer folder Qwen/QwQ-32B does not exist"):
        load_tokenizer("Qwen/QwQ-32B")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model holds no tokenizer \(none of tokenizer\.json"):
        load_tokenizer(tmp_path / "model")


def test_unwritable_output_is_named(tmp_path, monkeypatch):
    check_writable(tmp_path / "new" / "result.json", "--out")  # creates the folder, leaves no file
    assert list((tmp_path / "new").iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"--out .*file/result\.json: cannot write there"):
        check_writable(tmp_path / "file" / "result.json", "--out")  # its "folder" is a file

    import tempfile

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", full_disk)
    with pytest.raises(ValueError, match=r"--samples-out .*: cannot write there \(No space left on device\)"):
        check_writable(tmp_path / "s.jsonl", "--samples-out")


def test_evaluate_checks_out_before_any_work(tmp_path, capsys):
    import json

    from megatron_r1v.evaluate.cli import main

    (tmp_path / "file").write_text("")
    (tmp_path / "model").mkdir()
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": 1, "images": [], "question": "1+1?", "answer": "2",
                                                  "answer_type": "number"}) + "\n")
    # The model folder holds no checkpoint: --out is checked before the model is read.
    code = main(["--benchmark", "project", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "d.jsonl"),
                 "--out", str(tmp_path / "file" / "run")])
    assert code == 2 and "error: --out" in capsys.readouterr().err


def test_export_onto_an_unwritable_place_is_one_error_line(tmp_path):
    # In this process (tool_modules.run_tool: main's return value is the exit status, its stderr
    # captured; an exception escaping main fails the test); the script's own exit status as a
    # process is tested by tests/distributed/test_conversion.py and tests/e2e/test_mpo_train.py.
    from tool_modules import run_tool  # tests/ is on sys.path (pytest.ini: pythonpath)

    (tmp_path / "file").write_text("")
    (tmp_path / "model").mkdir()
    proc = run_tool("convert_checkpoint", "export", "--mcore-dir", str(tmp_path / "model"), "--out",
                    str(tmp_path / "file" / "hf"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"error: --out {tmp_path / 'file' / 'hf'}: cannot write there" in proc.stderr


def test_sigint_is_a_graceful_stop_like_sigterm():
    import os
    import signal

    import torch

    from megatron_r1v.trainer.stop import GracefulStop

    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    with GracefulStop() as stopper:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt, a recorded stop
        assert stopper.agreed(torch.device("cpu")) and stopper.signal == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is before  # restored on exit
