"""Config loading: defaults, file, environment, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import Config, ConfigError, WatchConfig, _from_env, load_config
from daemon.constraints import Between, Mode, Section, field_type
from daemon.logs import MASK, add_secret, redact

FAKE_KEY = "fake-key-for-tests-0000"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_example_file_documents_exactly_the_defaults() -> None:
    example = Path(__file__).parent.parent / "config.example.toml"
    assert load_config(example, {}) == Config()


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[api]\nkey = "from-file"\n[upload]\nconcurrency = 2\n')
    config = load_config(path, {"IPQS_API_KEY": FAKE_KEY, "IPQS_BULKD_UPLOAD_CONCURRENCY": "7",
                                "IPQS_BULKD_SPOOL_TYPES": "email, url",
                                "IPQS_BULKD_WATCH_FORCE_POLLING": "yes"})
    assert config.api.key == FAKE_KEY
    assert config.upload.concurrency == 7
    assert config.spool.types == ("email", "url")
    assert config.watch.force_polling is True


def test_key_file_and_credentials_directory(tmp_path: Path) -> None:
    (tmp_path / "api-key").write_text(FAKE_KEY + "\n")
    path = write(tmp_path, '[api]\nkey_file = "api-key"\n')
    config = load_config(path, {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.api.key == FAKE_KEY


@pytest.mark.parametrize(("text", "named"), [
    ("[api]\nkee = 'x'\n", "api.kee"),
    ("[upload]\nconcurrency = 'four'\n", "upload.concurrency"),
    ("[upload]\nconcurrency = 0\n", "upload.concurrency"),
    ("[spool]\ntypes = ['email', 'fax']\n", "spool.types"),
    ("[results]\nsets = []\n", "results.sets"),
    ("[api]\nkey_in = 'query'\n", "api.key_in"),
    ("[api]\nbase_url = 'ftp://x'\n", "api.base_url"),
    ("[poll]\nfactor = nan\n", "poll.factor"),
    ("[api]\nkey_file = '/nonexistent/key'\n", "api.key_file"),
    ("[nope]\n", "[nope]"),
    ("[health]\nport = 99999\n", "health.port"),
    ("[poll]\nfactor = 0.5\n", "poll.factor"),
    ("[poll]\ninitial_seconds = 90.0\n", "poll.initial_seconds"),
    ("[upload]\nretry_initial_seconds = 120.0\n", "upload.retry_initial_seconds"),
    ("not toml ][", "not valid TOML"),
    ("[budget]\nreserve_credits = -1\n", "budget.reserve_credits"),
    ("[budget]\nmax_rows_per_day = 1.5\n", "budget.max_rows_per_day"),
    ("[budget]\nmax_rows_per_file = -5\n", "budget.max_rows_per_file"),
    ("[budget]\ncheck_credits = 'yes'\n", "budget.check_credits"),
    ("[budget]\nmax_rows_per_day_by_type = { email = -1 }\n", "budget.max_rows_per_day_by_type"),
    ("[budget]\nmax_rows_per_day_by_type = { email = 'x' }\n",
     "budget.max_rows_per_day_by_type"),
    ("[budget]\nmax_rows_per_day_by_type = 5\n", "budget.max_rows_per_day_by_type"),
    ("[spool]\ntypes = ['email']\n[budget]\nmax_rows_per_day_by_type = { phone = 5 }\n",
     "budget.max_rows_per_day_by_type has 'phone', which is not in spool.types"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_config(write(tmp_path, text), {})


def test_budget_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert Config().budget.check_credits and Config().budget.max_rows_per_day == 0
    path = write(tmp_path, "[budget]\ncheck_credits = false\nreserve_credits = 0\n"
                           "max_rows_per_day = 50\nmax_rows_per_day_by_type = { email = 0 }\n"
                           "max_rows_per_file = 100\n")
    budget = load_config(path, {}).budget
    assert (budget.check_credits, budget.reserve_credits, budget.max_rows_per_day,
            budget.max_rows_per_day_by_type, budget.max_rows_per_file) == (
        False, 0, 50, {"email": 0}, 100)
    from_env = load_config(None, {"IPQS_BULKD_BUDGET_MAX_ROWS_PER_DAY_BY_TYPE":
                                  "email=100000, phone=5"}).budget
    assert from_env.max_rows_per_day_by_type == {"email": 100000, "phone": 5}
    with pytest.raises(ConfigError, match="IPQS_BULKD_BUDGET_MAX_ROWS_PER_DAY_BY_TYPE"):
        load_config(None, {"IPQS_BULKD_BUDGET_MAX_ROWS_PER_DAY_BY_TYPE": "email:5"})
    # check-config prints the section as TOML that reads back the same.
    assert main(["check-config", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "max_rows_per_day_by_type = { email = 0 }" in printed
    assert load_config(write(tmp_path, printed), {}).budget == budget


def test_bad_env_value_names_key_and_variable() -> None:
    with pytest.raises(ConfigError, match=r"watch.force_polling.*IPQS_BULKD_WATCH_FORCE_POLLING"):
        load_config(None, {"IPQS_BULKD_WATCH_FORCE_POLLING": "maybe"})


def test_key_is_never_in_repr_or_dump(tmp_path: Path) -> None:
    config = load_config(None, {"IPQS_API_KEY": FAKE_KEY})
    assert FAKE_KEY not in repr(config)
    assert FAKE_KEY not in str(config.as_dict())


def test_check_config_prints_redacted(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPQS_API_KEY", FAKE_KEY)
    path = write(tmp_path, '[spool]\nroot = "/srv/spool"\n')
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert 'root = "/srv/spool"' in out
    assert FAKE_KEY not in out
    assert 'key = "<redacted>"' in out


def test_config_error_is_one_line_exit_2(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[upload]\nconcurrency = -1\n")
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "upload.concurrency" in err


def test_missing_explicit_config_is_an_error(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_environment_variable_is_named() -> None:
    with pytest.raises(ConfigError, match="IPQS_BULKD_SPOLL_ROOT"):
        load_config(None, {"IPQS_BULKD_SPOLL_ROOT": "/spool"})


def test_file_mode_from_the_environment_is_octal() -> None:
    for raw in ("640", "0640", "0o640"):
        assert load_config(None, {"IPQS_BULKD_SPOOL_FILE_MODE": raw}).spool.file_mode == 0o640


def test_a_mistyped_key_is_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "[api]\nkey = 12345678901234567890\n"), {})
    assert "12345678901234567890" not in str(caught.value)


def test_usage_errors_are_one_line_naming_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, command in ((["submit"], "submit"), (["jobs", "--page", "0"], "jobs"),
                          (["nonsense"], "")):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"ipqs-bulkd {command}".rstrip() + ":")


# -- limits declared on the fields (issue 12) ------------------------------------------------


def test_every_section_is_checked_by_its_declared_limits() -> None:
    for f in dataclasses.fields(Config):
        section = getattr(Config(), f.name)
        assert isinstance(section, Section) and section.section_name == f.name
    # Built directly (as the watcher's tests do), a section checks itself all the same.
    with pytest.raises(ConfigError, match=r"config key watch\.queue_size must be at least 1"):
        WatchConfig(queue_size=0)
    with pytest.raises(ConfigError,
                       match=r"watch\.writer_check must be one of auto, lease, proc, quiet"):
        dataclasses.replace(WatchConfig(), writer_check="sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize(("var", "value", "message"), [
    ("IPQS_BULKD_UPLOAD_CONCURRENCY", "100000000", "upload.concurrency (from {var}) must be at "
                                                   "least 1 and at most 256"),
    ("IPQS_BULKD_WATCH_QUEUE_SIZE", "4x", "watch.queue_size (from {var}) must be an integer"),
    ("IPQS_BULKD_POLL_INITIAL_SECONDS", "600", "poll.initial_seconds (from {var}) (600) must "
                                               "not exceed poll.max_seconds (60)"),
    ("IPQS_BULKD_API_BASE_URL", "http://[::1", "api.base_url (from {var}) must be an http"),
    ("IPQS_BULKD_HEALTH_PORT", "65536", "health.port (from {var}) must be at least 0 and at "
                                        "most 65535"),
])
def test_limits_name_the_key_and_the_variable(var: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {var: value})
    assert str(caught.value).startswith("config key " + message.format(var=var))


def test_every_count_and_duration_has_an_upper_bound() -> None:
    for f in dataclasses.fields(Config):
        section = type(getattr(Config(), f.name))
        for name in (g.name for g in dataclasses.fields(section)):
            base, marks = field_type(section, name)
            if base in (int, float):
                assert any(isinstance(m, Between | Mode) for m in marks), f"{f.name}.{name}"


# -- relative paths (issue 18, item 4) ------------------------------------------------------


def test_a_relative_root_is_taken_from_the_config_files_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "etc").mkdir()
    path = write(tmp_path / "etc", '[spool]\nroot = "../spool"\n')
    monkeypatch.chdir(tmp_path / "etc")
    assert load_config(Path("config.toml"), {}).spool.root == tmp_path / "spool"
    monkeypatch.chdir("/")
    assert load_config(path, {}).spool.root == tmp_path / "spool"
    assert load_config(None, {"IPQS_BULKD_SPOOL_ROOT": "srv/x"}).spool.root == Path("/srv/x")
    home = load_config(path, {"IPQS_BULKD_SPOOL_ROOT": "~/s"})
    assert home.spool.root == Path.home() / "s"


# -- typos (issue 14, item 6) ---------------------------------------------------------------


@pytest.mark.parametrize(("text", "environ", "message"), [
    ('[spool]\nrot = "/x"\n', {}, "unknown config key spool.rot (did you mean spool.root?)"),
    ("[uplaod]\n", {}, "unknown config section [uplaod] (did you mean [upload]?)"),
    ("", {"IPQS_BULKD_SPOOL_ROTO": "/x"},
     "environment variable IPQS_BULKD_SPOOL_ROTO names no config key (did you mean "
     "IPQS_BULKD_SPOOL_ROOT?)"),
    ("", {"IPQS_BULKD_SPOLL_ROOT": "/x"}, "IPQS_BULKD_SPOLL_ROOT names no config key (did you "
                                          "mean IPQS_BULKD_SPOOL_ROOT?)"),
])
def test_typos_get_a_suggestion(tmp_path: Path, text: str, environ: dict[str, str],
                                message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ)
    assert str(caught.value).endswith(message)


# -- the key (issue 14, items 5 and 12) -----------------------------------------------------


def test_short_keys_are_refused_naming_where_they_came_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config key api.key \(from IPQS_API_KEY\) is only "
                                          r"1 characters long"):
        load_config(None, {"IPQS_API_KEY": "k"})
    (tmp_path / "api-key").write_text("0123456789abcde\n")  # 15
    with pytest.raises(ConfigError, match=rf"api.key \(from api.key_file {tmp_path}/api-key "
                                          r"\(systemd LoadCredential=\)\) is only 15"):
        load_config(None, {"IPQS_BULKD_API_KEY_FILE": "api-key",
                           "CREDENTIALS_DIRECTORY": str(tmp_path)})
    with pytest.raises(ConfigError, match=rf"api.key \(from api.key_file {tmp_path}/api-key\) "
                                          r"is only 15 characters"):
        load_config(None, {"IPQS_BULKD_API_KEY_FILE": str(tmp_path / "api-key")})
    with pytest.raises(ConfigError, match=r"^config key api.key is only 5 characters"):
        load_config(write(tmp_path, '[api]\nkey = "short"\n'), {})
    assert load_config(None, {"IPQS_API_KEY": "x" * 16}).api.key == "x" * 16


def test_a_valid_key_is_masked_and_short_words_are_not() -> None:
    # Only keys of 16 characters or more get this far, so masking one cannot eat common words.
    config = load_config(None, {"IPQS_API_KEY": FAKE_KEY})
    add_secret(config.api.key)
    event = redact(None, "info", {"event": "k_is_a_letter", "word": f"kitten key {FAKE_KEY}"})
    assert event == {"event": "k_is_a_letter", "word": f"kitten key {MASK}"}


@pytest.mark.parametrize(("environ", "says"), [
    ({"IPQS_API_KEY": FAKE_KEY}, "# API key: from IPQS_API_KEY"),
    ({"IPQS_BULKD_API_KEY_FILE": "api-key", "CREDENTIALS_DIRECTORY": "{tmp}"},
     "# API key: from api.key_file {tmp}/api-key (systemd LoadCredential=)"),
    ({"IPQS_BULKD_API_KEY_FILE": "{tmp}/api-key"}, "# API key: from api.key_file {tmp}/api-key"),
])
def test_check_config_says_where_the_key_comes_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        environ: dict[str, str], says: str) -> None:
    (tmp_path / "api-key").write_text(FAKE_KEY)
    for name, value in environ.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    assert main(["check-config", "--config", str(write(tmp_path, ""))]) == 0
    assert capsys.readouterr().out.splitlines()[0] == says.format(tmp=tmp_path)


def test_check_config_without_a_key_says_how_to_check_under_systemd(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(write(tmp_path, ""))]) == 0
    err = capsys.readouterr().err
    assert err.startswith("# warning: no API key here") and err.count("\n") == 1
    assert "LoadCredential=api-key:/etc/ipqs-bulkd/api-key" in err and "systemd-run -P" in err
    # A bare key_file name outside the unit says why it cannot be found.
    with pytest.raises(ConfigError, match="bare name is a systemd credential"):
        load_config(None, {"IPQS_BULKD_API_KEY_FILE": "no-such-credential"})


@dataclasses.dataclass(frozen=True)
class PerTypeConfig(Section):
    """A section as a new one is written: one dataclass, its limits on its fields."""

    by_type: dict[str, int] = dataclasses.field(default_factory=dict)


def test_a_new_section_is_one_dataclass_with_its_limits() -> None:
    assert PerTypeConfig.section_name == "pertype"
    assert PerTypeConfig(by_type={"email": 5}).by_type == {"email": 5}
    with pytest.raises(ConfigError, match=r"^config key pertype\.by_type must be a table of "
                                          r"whole numbers, like \{ email = 100000 \}, got \{"):
        PerTypeConfig(by_type={"email": "five"})  # type: ignore[dict-item]
    assert _from_env(dict[str, int], "email=5, phone=16", ()) == {"email": 5, "phone": 16}
    with pytest.raises(ConfigError, match=r"\(from IPQS_BULKD_BUDGET_MAX_ROWS_PER_DAY_BY_TYPE\) "
                                          r"must be at least 0 .*, got -1 for email$"):
        load_config(None, {"IPQS_BULKD_BUDGET_MAX_ROWS_PER_DAY_BY_TYPE": "email=-1"})
