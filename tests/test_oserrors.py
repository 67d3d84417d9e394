"""`prunetune.oserrors`: what the OS said, recovered from wherever a library put it, as one line with the fix; the
path checks that find link loops before any work; the CLI's last line of defence."""

from __future__ import annotations

import errno
import shutil

import pytest
from safetensors import SafetensorError

from prunetune import cli, oserrors
from prunetune.errors import UserError
from prunetune.oserrors import check_links, error_number, link_problem, user_error


@pytest.mark.parametrize(("err", "number"), [
    (OSError(errno.ENOSPC, "No space left on device", "/x"), errno.ENOSPC),
    (PermissionError(errno.EACCES, "Permission denied"), errno.EACCES),
    (OSError(errno.EROFS, "Read-only file system"), errno.EROFS),
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), errno.ENOSPC),
    (SafetensorError("Error while serializing: I/O error: Disk quota exceeded (os error 122)"), errno.EDQUOT),
    (RuntimeError("Symlink loop from '/tmp/a'"), errno.ELOOP),
    (RuntimeError("wrapped"), None),
    (ValueError("a bug"), None),
])
def test_the_errno_is_found_wherever_a_library_put_it(err, number):
    assert error_number(err) == number


def test_the_errno_is_found_in_the_cause_chain():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert error_number(outer) == errno.ENOSPC


def test_a_torch_writer_failure_is_a_full_disk_only_when_the_disk_is_full(tmp_path, monkeypatch):
    """torch's zip writer says "unexpected pos" and carries no errno: the free space decides."""
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert error_number(err, tmp_path) == errno.EIO
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: type(usage)(usage.total, usage.total, 0))
    assert error_number(err, tmp_path) == errno.ENOSPC
    assert "no space left on device at" in str(user_error(err, "saving a checkpoint", tmp_path))


def test_user_error_names_what_was_done_the_cause_the_path_and_what_recovers():
    err = OSError(errno.ENOSPC, "No space left on device", "/data/run/checkpoint-4/optimizer.pt")
    text = str(user_error(err, "fine-tuning into /data/run", "/data/run", "resume with: X"))
    assert text.startswith("fine-tuning into /data/run: no space left on device at /data/run/checkpoint-4/optimizer.pt")
    assert "free space on that disk" in text and text.endswith("; resume with: X")
    assert user_error(ValueError("a bug")) is None  # a bug keeps its traceback
    assert "out of memory" in str(user_error(MemoryError()))


def test_link_problems_are_found_also_above_the_path(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    assert "symbolic link loop" in link_problem(tmp_path / "a")
    assert "symbolic link loop" in link_problem(tmp_path / "a" / "out")  # a loop above the path
    assert "which does not exist" in link_problem(tmp_path / "gone")
    assert link_problem(tmp_path / "new" / "out") is None and link_problem(tmp_path) is None
    with pytest.raises(UserError, match="--out .* symbolic link loop"):
        check_links(tmp_path / "a", "--out")


def test_the_cli_turns_any_os_failure_it_can_name_into_one_line(monkeypatch, capsys):
    """The last line of defence: a full disk met where no writer translated it is still one line, exit 2."""
    from prunetune.commands import verify

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/somewhere/file")

    monkeypatch.setattr(verify, "main", full)
    assert cli.main(["verify", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prunetune verify: error: no space left on device at /somewhere/")

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(verify, "main", bug)
    with pytest.raises(KeyError):
        cli.main(["verify", "x"])  # anything else is a bug and keeps its traceback


def test_every_cause_has_a_fix():
    assert all(cause and fix for cause, fix in oserrors.CAUSES.values())
