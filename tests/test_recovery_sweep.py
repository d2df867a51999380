"""The recovery sweep removes a job folder without a record only while it is empty: it
may be another daemon's claim under way, whose record and input must survive."""

from __future__ import annotations

from pathlib import Path

from daemon.recovery import _remove_if_empty


def test_an_empty_job_folder_goes_with_its_temporary_files(tmp_path: Path) -> None:
    job_dir = tmp_path / "20300101T000000-0badcafe"
    job_dir.mkdir()
    (job_dir / ".job.json.1234.tmp").write_text("{")
    assert _remove_if_empty(job_dir) and not job_dir.exists()
    assert not _remove_if_empty(job_dir)  # gone already: nothing to do


def test_a_claim_that_filled_the_folder_meanwhile_keeps_everything(tmp_path: Path) -> None:
    # The sweep saw the folder empty; then the other daemon wrote its record and renamed
    # its input in. A recursive removal here would delete the input: the file is lost.
    job_dir = tmp_path / "20300101T000000-0badcafe"
    job_dir.mkdir()
    (job_dir / "job.json").write_text("{}")
    (job_dir / "list.csv").write_bytes(b"a@example.com\n")
    assert not _remove_if_empty(job_dir)
    assert sorted(p.name for p in job_dir.iterdir()) == ["job.json", "list.csv"]
